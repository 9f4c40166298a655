"""Training with mined negatives and τ annealing: the module's wiring against a hand-written reference, the
temperature schedule from the module config, and a short `muco fit` with a fixture sidecar."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
import yaml

from muco.data.m3t.collate import PretrainCollator, PretrainSample
from muco.inputs.image_policy import ImagePolicy
from muco.model.backbone import BackboneConfig
from muco.train.module import MuCoModule
from tests.mined import write_sidecar
from tests.train.conftest import REPO, read_scalars


def test_temperature_schedule_from_the_module_config():
    m = MuCoModule(backbone=BackboneConfig(preset="tiny"),
                   temperature_schedule={"mode": "cosine", "tau_start": 0.05, "tau_end": 0.02, "total_steps": 100})
    got = {}
    for step in (0, 50, 100, 150):
        m.temperature.set_step(step)
        got[step] = float(m.temperature())
    assert got == pytest.approx({0: 0.05, 50: 0.035, 100: 0.02, 150: 0.02}, abs=1e-7)
    assert not any("temperature" in n for n, _ in m.named_parameters())  # annealed, not learned
    with pytest.raises(ValueError, match="learnable_temperature and model.temperature_schedule"):
        MuCoModule(learnable_temperature=True, temperature_schedule={"mode": "linear", "tau_start": 0.1})
    with pytest.raises(ValueError, match=r"temperature_schedule: unknown keys \['tau_stop'\]"):
        MuCoModule(temperature_schedule={"mode": "linear", "tau_stop": 0.1})
    with pytest.raises(ValueError, match="temperature_schedule: unknown temperature schedule mode 'exp'"):
        MuCoModule(temperature_schedule={"mode": "exp"})


def test_model_step_with_negatives_matches_a_hand_written_reference(tiny_tok, photos):
    """3 images x K=2 turns, 2 negative draws each; one negative missing, one equal to another row's positive."""
    samples = [
        PretrainSample("a", photos[0], ["qa1", "qa2"], ["ta1", "ta2"], negatives=[["na1", "na2"], ["ma1", None]]),
        PretrainSample("b", photos[1], ["qb1", "qb2"], ["tb1", "tb2"], negatives=[["nb1", "ta2"], ["mb1", "mb2"]]),
        PretrainSample("c", photos[2], ["qc1", "qc2"], ["tc1", "tc2"], negatives=[["nc1", "nc2"], ["mc1", "mc2"]]),
    ]
    batch = PretrainCollator(tiny_tok, ImagePolicy.preset("tiny"))(samples)
    m = MuCoModule(backbone=BackboneConfig(preset="tiny"), temperature=0.05).eval()
    logged = {}
    m.log = lambda name, value, **kw: logged.__setitem__(name, value)
    m.log_dict = lambda d, **kw: logged.update(d)
    with torch.no_grad():
        loss = m.model_step(batch, "train")
        q = m.embedder(batch["query"], 2).emb
        t = m.embedder(batch["target"], 2).emb
        n = m.embedder(batch["negative"], 2).emb  # sequences: a0 a1 b0 b1 c0 c1; rows: sequence, turn
    texts = [t_ for s in samples for t_ in s.targets]
    negs = [x for s in samples for d in s.negatives for x in d]
    total = 0.0
    for i in range(6):
        logits, keep = [], []
        for j in range(6):  # in-batch targets: the other turn of the row's own image is masked
            logits.append(float(q[i] @ t[j]))
            keep.append(j == i or j // 2 != i // 2)
        for j in range(12):  # every negative is a column of every row, unless missing or the row's positive
            logits.append(float(q[i] @ n[j]))
            keep.append(negs[j] is not None and negs[j] != texts[i])
        z = [v / 0.05 for v, k in zip(logits, keep) if k]
        total += -(logits[i] / 0.05 - math.log(sum(math.exp(v) for v in z)))
    assert float(loss) == pytest.approx(total / 6, rel=1e-5)
    # own-turn negative similarity: row (image, turn) with the valid negatives of that image and turn
    own = [float(q[i * 2 + k] @ n[(i * 2 + d) * 2 + k]) for i in range(3) for d in range(2) for k in range(2)
           if negs[(i * 2 + d) * 2 + k] is not None]
    assert float(logged["train/neg_sim"]) == pytest.approx(sum(own) / len(own), rel=1e-5)
    assert float(logged["train/neg_valid_frac"]) == pytest.approx(11 / 12)
    # 1 own-image + (1 missing + 1 equal text for row "ta2") masked columns
    assert float(logged["train/masked_frac"]) == pytest.approx((6 * 1 + 6 * 1 + 1) / (6 * 18))
    counts = m.objective.counts(batch)
    assert counts.pairs == 6
    assert counts.positions == sum(batch[k]["attention_mask"].numel() for k in ("query", "target", "negative"))
    assert counts.token_efficiency == counts.tokens / counts.positions < 1
    assert counts.tokens == sum(int(batch[k]["attention_mask"].sum()) for k in ("query", "target", "negative"))
    assert F.normalize(n, dim=-1).shape == (12, 128)


def _demo_sidecar(demo, out, top_k: int = 6):
    """Per (record, turn): other records' distinct targets of the same turn, ranked by a fixed order."""
    records = [json.loads(line) for line in (demo / "train.jsonl").read_text().splitlines()]
    by_turn = [sorted({r["turns"][t]["target"] for r in records}) for t in range(7)]
    rows = {}
    for i, r in enumerate(records[: len(records) * 3 // 4]):  # a quarter of the samples have none
        for t, turn in enumerate(r["turns"]):
            others = [x for x in by_turn[t] if x != turn["target"]]
            rows[(r["key"], t)] = [others[(i + j) % len(others)] for j in range(min(top_k, len(others)))]
    return write_sidecar(out, rows)


def test_fit_with_mined_negatives_and_annealed_temperature(muco_cli, demo_data, tmp_path):
    sidecar = _demo_sidecar(demo_data, tmp_path / "mined")
    extra = tmp_path / "round2.yaml"
    extra.write_text(yaml.safe_dump({
        "model": {"init_args": {"temperature_schedule": {"mode": "linear", "tau_start": 0.05, "tau_end": 0.02,
                                                         "total_steps": 3}}},
        "data": {"init_args": {"train_shards": f"{demo_data}/train/manifest.json",
                               "val_shards": f"{demo_data}/val/manifest.json", "batch_size": 4,
                               "records": {"class_path": "muco.data.m3t.kind.M3TRecords", "init_args": {
                                   "turns_per_sample": 4,
                                   "negatives": {"sidecar": str(sidecar), "band": [2, 5]}}}}},
    }))
    res = muco_cli("fit", "--config", str(REPO / "configs" / "tiny.yaml"), "--config", str(extra),
                   "--trainer.max_steps=4", "--trainer.log_every_n_steps=1", "--trainer.num_sanity_val_steps=0",
                   "--trainer.enable_progress_bar=false", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "runs" / "tiny"
    scalars = read_scalars(run)
    for key in ("train/loss", "train/neg_sim", "train/neg_valid_frac", "train/temperature"):
        assert len(scalars.get(key, [])) == 4, f"{key} not logged every step: {sorted(scalars)}"
    assert all(math.isfinite(v) and -1 <= v <= 1 for _, v in scalars["train/neg_sim"])
    assert all(0 < v <= 1 for _, v in scalars["train/neg_valid_frac"])
    taus = [v for _, v in sorted(scalars["train/temperature"])]
    assert taus == pytest.approx([0.05, 0.04, 0.03, 0.02], abs=1e-6)  # linear over 3 optimizer steps
    saved = yaml.safe_load((run / "config.yaml").read_text())
    negatives = saved["data"]["init_args"]["records"]["init_args"]["negatives"]
    assert negatives == {"sidecar": str(sidecar), "band": [2, 5], "per_turn": 1}
