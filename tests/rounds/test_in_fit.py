"""Rounds inside one `muco fit` (:class:`muco.rounds.in_fit.InFitRounds`), run as the real CLI on the demo digits
with the tiny model: the sidecar mined at a round boundary is the one `muco mine` writes for a checkpoint of those
weights (1 rank canonical, 2 ranks with the training draws), later rounds train with it and their τ, and a run
stopped at a round boundary or inside round 2 resumes with the same negatives and the same losses."""

from __future__ import annotations

import math

import pytest
import torch
import yaml

from muco.data.m3t.sidecar import iter_sidecar_rows, read_sidecar_manifest
from muco.rounds.in_fit import InFitRounds
from tests.train.conftest import REPO, read_scalars, run_muco

STEPS_PER_ROUND = 4  # samples_per_epoch 16 / batch 4, one epoch per round


def rounds_config(path, shards: str, batch_size: int = 4, remine: bool = True):
    path.write_text(yaml.safe_dump({
        "trainer": {"callbacks": [
            {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
             "init_args": {"save_last": True, "every_n_train_steps": 2, "save_top_k": -1}},
            {"class_path": "muco.rounds.in_fit.InFitRounds", "init_args": {
                "epochs_per_round": 1, "remine": remine,
                "schedule": [{"from_round": 2, "band": [2, 6], "per_turn": 1}],
                # the barely trained model puts every text close to every query: no margin filter here
                "mine": {"top_k": 8, "margin": -1}, "temperatures": [0.05, 0.03]}}]},
        "data": {"init_args": {"train_shards": shards, "val_shards": None, "samples_per_epoch": 16,
                               "batch_size": batch_size}},
    }))
    return path


def fit(cwd, config, run_dir, *args: str):
    res = run_muco("fit", "--config", str(REPO / "configs" / "tiny.yaml"), "--config", str(config),
                   "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false",
                   "--trainer.default_root_dir", str(run_dir), *args, cwd=cwd, timeout=400)
    assert res.returncode == 0, res.stderr[-4000:]
    return res


def rows(sidecar) -> list[dict]:
    return list(iter_sidecar_rows(sidecar))


def assert_same_negatives(a, b) -> None:
    ra, rb = rows(a), rows(b)
    assert len(ra) == len(rb) > 0
    for x, y in zip(ra, rb):
        assert (x["key"], x["turn"]) == (y["key"], y["turn"])
        assert [n["text"] for n in x["negatives"]] == [n["text"] for n in y["negatives"]]
        assert [n["sim"] for n in x["negatives"]] == pytest.approx([n["sim"] for n in y["negatives"]], abs=1e-5)
        assert x["pos_sim"] == pytest.approx(y["pos_sim"], abs=1e-5)


def mine_checkpoint(cwd, ckpt, shards: str, out, *args: str) -> None:
    res = run_muco("mine", "--model", str(ckpt), "--shards", shards, "--output", str(out), "--top-k", "8",
                   "--margin", "-1", "--num-workers", "0", "--no-progress", "--device", "cpu", *args, cwd=cwd,
                   timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]


def ckpt_at(run_dir, step: int):
    (path,) = (run_dir / "checkpoints").glob(f"*-step={step}.ckpt")
    return path


@pytest.fixture(scope="module")
def three_rounds(tmp_path_factory, demo_data):
    """One uninterrupted 3-round fit (12 steps, mining after rounds 1 and 2)."""
    tmp = tmp_path_factory.mktemp("in_fit")
    shards = f"{demo_data}/val/manifest.json"  # 297 samples: quick to mine
    cfg = rounds_config(tmp / "rounds.yaml", shards)
    run = tmp / "run"
    res = fit(tmp, cfg, run, "--trainer.max_steps=12")
    return tmp, shards, cfg, run, res


@pytest.mark.slow
def test_round_boundary_mines_what_muco_mine_mines_and_later_rounds_train_with_it(three_rounds):
    tmp, shards, _, run, res = three_rounds
    for r in (1, 2):
        manifest = read_sidecar_manifest(run / "rounds" / f"after_round{r}")
        assert manifest["settings"]["global_step"] == r * STEPS_PER_ROUND
    mine_checkpoint(tmp, ckpt_at(run, STEPS_PER_ROUND), shards, tmp / "mined")
    assert_same_negatives(run / "rounds" / "after_round1", tmp / "mined")
    assert not (run / "rounds" / "after_round3").exists()  # training ended with round 3: nothing to mine for

    s = read_scalars(run)
    negs = dict(s["train/neg_valid_frac"])
    assert sorted(negs) == list(range(STEPS_PER_ROUND, 12))  # rounds 2 and 3 only (logged at steps 0-11)
    assert all(v > 0.5 for v in negs.values())
    taus = dict(s["train/temperature"])
    assert [taus[k] for k in sorted(taus)] == pytest.approx([0.05] * 4 + [0.03] * 8)
    assert [v for _, v in sorted(s["rounds/round"])] == [1] * 4 + [2] * 4 + [3] * 4
    assert all(math.isfinite(v) for _, v in s["rounds/mined_mean_pos_sim"])

    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["callbacks"]
    assert state["InFitRounds"]["round"] == 3
    assert state["InFitRounds"]["sidecars"] == {str(r): str(run / "rounds" / f"after_round{r}") for r in (1, 2)}


@pytest.mark.slow
def test_stopped_at_a_round_boundary_and_inside_round_2_resumes_like_the_uninterrupted_run(three_rounds):
    tmp, _, cfg, full, _ = three_rounds
    run = tmp / "stopped"
    # 1. stopped at step 4, the last batch of round 1's epoch, before the epoch ended: Lightning resumes into the
    #    next epoch and numbers it one higher; rounds follow the data epochs, so the resume mines then
    fit(tmp, cfg, run, "--trainer.max_steps=4")
    assert not (run / "rounds").exists()  # training was over: nothing mined
    res = fit(tmp, cfg, run, "--trainer.max_steps=6")
    assert "round 1 over at step 4" in res.stderr
    assert_same_negatives(run / "rounds" / "after_round1", full / "rounds" / "after_round1")
    # 2. stopped inside round 2: resumes in round 2 from the checkpoint's state, without mining again
    first = (run / "rounds" / "after_round1" / "manifest.json").stat().st_mtime_ns
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == 6 and state["callbacks"]["InFitRounds"]["round"] == 2
    res = fit(tmp, cfg, run, "--trainer.max_steps=8")
    assert "resuming from" in res.stderr and "round 2 (from epoch 1)" in res.stderr
    assert "mining" not in res.stderr
    assert (run / "rounds" / "after_round1" / "manifest.json").stat().st_mtime_ns == first
    a, b = read_scalars(full), read_scalars(run)
    for key in ("train/loss", "train/neg_valid_frac", "train/temperature", "rounds/round"):
        assert dict(b[key]) == pytest.approx({k: v for k, v in a[key] if k < 8}, abs=1e-6), key


STRATEGIES = {"ddp": ("--trainer.strategy=ddp",),
              # FSDP2: every forward gathers the sharded weights from both ranks, while each mines its own share
              # (75 and 74 query batches of 2): the ranks stay in step
              "fsdp2": ("--config", str(REPO / "configs" / "strategy" / "fsdp.yaml"))}


@pytest.mark.slow
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_two_ranks_mine_the_training_draws_as_muco_mine_does_in_one_process(tmp_path, demo_data, strategy):
    # `mine: {query_draws: train}`: the sidecar after round 1 is mined for the draws of data epoch 1 (round 2's
    # first) with the DataModule's seed; 2 ranks mine what `muco mine --query-draws train` mines in one process
    from muco.mine.pipeline import CANONICAL_QUERY_TURNS

    shards = f"{demo_data}/val/manifest.json"
    cfg = rounds_config(tmp_path / "rounds.yaml", shards, batch_size=2)
    conf = yaml.safe_load(cfg.read_text())
    conf["trainer"]["callbacks"][1]["init_args"]["mine"]["query_draws"] = "train"
    cfg.write_text(yaml.safe_dump(conf))
    run = tmp_path / strategy
    res = fit(tmp_path, cfg, run, "--trainer.max_steps=5", "--trainer.devices=2", *STRATEGIES[strategy])
    # one rank's share is a query batch short: under FSDP2 it runs one more (text-only) forward, and with it the
    # vision tower, since the other rank's batch has an image
    assert ("sharded model: 1 forward(s) run only to keep the ranks in step" in res.stderr) == (strategy == "fsdp2")
    side = run / "rounds" / "after_round1"
    manifest = read_sidecar_manifest(side)
    assert manifest["num_query_turns"] == 297 * 7
    assert manifest["settings"]["query_turns"] == {
        "draws": "train", "seed": 0, "epoch": 1, "turn_order": "sample", "undrawn turns": CANONICAL_QUERY_TURNS}
    # under FSDP2 the checkpoint is a distributed checkpoint directory, which `muco mine` reads as it is
    mine_checkpoint(tmp_path, ckpt_at(run, STEPS_PER_ROUND), shards, tmp_path / "mined", "--query-draws", "train",
                    "--draw-epoch", "1")
    assert_same_negatives(side, tmp_path / "mined")


@pytest.mark.parametrize("kwargs, message", [
    ({"schedule": [{"from_round": 1, "band": [1, 10]}]}, "from_round >= 2"),
    ({"schedule": []}, "from_round >= 2"),
    ({"schedule": [{"from_round": 2, "band": [5, 1]}]}, "band"),
    ({"mine": {"topk": 3}}, "unknown keys ['topk']"),
    ({"temperatures": [0.05, -1]}, "positive"),
    ({"epochs_per_round": 0}, "epochs_per_round"),
])
def test_bad_settings_fail_with_the_setting_named(kwargs, message):
    args = {"epochs_per_round": 1, "schedule": [{"from_round": 2, "band": [1, 10]}], **kwargs}
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        InFitRounds(**args)


def test_static_negatives_mine_once_and_later_rounds_reuse_them():
    static = InFitRounds(1, [{"from_round": 2, "band": [11, 30]}, {"from_round": 3, "band": [1, 10]}], remine=False)
    dynamic = InFitRounds(1, [{"from_round": 2, "band": [11, 30]}, {"from_round": 3, "band": [1, 10]}])
    assert [static.schedule.mines_after(r, static.remine) for r in (1, 2, 3)] == [True, False, False]
    assert [dynamic.schedule.mines_after(r, dynamic.remine) for r in (1, 2, 3)] == [True, True, True]
    static.sidecars = dynamic.sidecars = {1: "after1", 2: "after2"}
    assert static.negatives(3).sidecar == "after1" and static.negatives(3).band == (1, 10)
    assert dynamic.negatives(3).sidecar == "after2"
    assert static.negatives(1) is None
