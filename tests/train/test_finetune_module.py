"""MuCoModule with the fine-tuning objective: steps with both losses, logged terms, the placeholder switch,
starting from a pretraining checkpoint (continue / merge), and rebuilding fine-tuning checkpoints."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader

from muco.data.pairs.collate import FinetuneCollator, PairSample
from muco.inputs.image_policy import ImagePolicy
from muco.inputs.templates import MASK_TOKEN
from muco.losses.finetune import TERM_NAMES
from muco.model.backbone import AdapterConfig, BackboneConfig
from muco.objectives import FinetuneObjective
from muco.train.module import MuCoModule

OBJECTIVE_ARGS = ("loss", "hard_negatives", "released_placeholder", "mask_same_text")


def FinetuneModule(**kw) -> MuCoModule:  # noqa: N802  (reads like the module it builds)
    """``MuCoModule`` with a ``FinetuneObjective`` made of the objective's options among ``kw``."""
    objective = FinetuneObjective(**{k: kw.pop(k) for k in OBJECTIVE_ARGS if k in kw})
    return MuCoModule(objective=objective, **kw)


def backbone(r: int = 4) -> BackboneConfig:
    return BackboneConfig(preset="tiny", adapter=AdapterConfig(r=r, alpha=2 * r))


@pytest.fixture(scope="module")
def batches(tiny_tok, photos):
    collate = FinetuneCollator(tiny_tok, ImagePolicy.preset("tiny"))
    out = []
    for step in range(2):
        ss = [PairSample(f"s{step}{i}", f"what is in picture {i}?", photos[i], f"answer {i + step}", None,
                         f"answer {MASK_TOKEN}", f"Image description: photo {i}\n{MASK_TOKEN}",
                         neg_text=None if i == 3 else f"wrong {i}") for i in range(4)]
        out.append(collate(ss))
    return out


def fit(module, batches, steps=1) -> Trainer:
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1)
    trainer.fit(module, DataLoader(batches, batch_size=None))
    return trainer


@pytest.mark.parametrize("loss", ["blockwise", "joint_masked"])
def test_step_runs_and_logs_the_four_terms(loss, batches, tmp_path):
    module = FinetuneModule(backbone=backbone(), loss=loss, optim={"lr": 1e-3})
    trainer = fit(module, batches)
    m = trainer.callback_metrics
    terms = torch.stack([m[f"train/term/{t}"] for t in TERM_NAMES])
    assert torch.isfinite(terms).all()
    # blockwise is the sum of its four terms (released code), joint_masked the mean over the 4B pairs
    expected = terms.sum() if loss == "blockwise" else terms.mean()
    torch.testing.assert_close(m["train/loss"], expected, rtol=1e-5, atol=1e-5)
    # columns: blockwise N in-batch + N negatives; joint both target forms 2N + N negatives
    assert float(m["train/num_columns"]) == (8 if loss == "blockwise" else 12)
    assert float(m["train/masked_frac"]) > 0  # the missing negative's column (and, joint, the other form)
    assert "train/grad_norm" in m and "train/pos_sim" in m


def test_released_placeholder_keeps_the_junk_negative(batches):
    logged = {}
    module = FinetuneModule(backbone=backbone(), released_placeholder=True)
    module.log = lambda name, value, **kw: logged.__setitem__(name, value)
    module.log_dict = lambda d, **kw: logged.update(d)
    module.model_step(batches[0], "train")
    assert float(logged["train/masked_frac"]) == 0.0
    module.objective.released_placeholder = False
    module.model_step(batches[0], "train")
    assert float(logged["train/masked_frac"]) == pytest.approx(1 / 8)  # 1 of 4 negatives, 4 + 4 columns


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A pretraining checkpoint (trainable weights only, like MuCoModule's) with non-trivial adapter weights."""
    m = MuCoModule(backbone=backbone())
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    path = tmp_path_factory.mktemp("pre") / "pre.ckpt"
    sd = {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}
    torch.save({"state_dict": sd, "hyper_parameters": dict(m.hparams),
                "muco_module_class": "muco.train.module.MuCoModule"}, path)
    return m.eval(), path


def embed(module, batch):
    with torch.no_grad():
        return module.embedder(batch["negative"], 1).emb


def test_init_from_continues_the_adapter_and_checkpoints_rebuild(pretrained, batches, tmp_path):
    from muco.train.checkpoint import load_module

    pre, path = pretrained
    ft = FinetuneModule(backbone=backbone(), init_from=str(path))
    own = dict(ft.named_parameters())
    for name, p in pre.named_parameters():
        if p.requires_grad:
            assert torch.equal(own[name], p), name
    torch.testing.assert_close(embed(ft.eval(), batches[0]), embed(pre, batches[0]))
    trainer = fit(ft.train(), batches)
    trainer.save_checkpoint(tmp_path / "ft.ckpt")
    ckpt = torch.load(tmp_path / "ft.ckpt", weights_only=False)
    assert ckpt["hyper_parameters"]["init_from"] is None and ckpt["muco_init_from"] == str(path)
    rebuilt = load_module(tmp_path / "ft.ckpt")
    assert type(rebuilt) is MuCoModule and isinstance(rebuilt.objective, FinetuneObjective)
    torch.testing.assert_close(embed(rebuilt, batches[0]), embed(ft.eval(), batches[0]))


def test_init_from_merge_first_trains_a_fresh_adapter(pretrained, batches):
    pre, path = pretrained
    ft = FinetuneModule(backbone=backbone(r=2), init_from=str(path), merge_adapter_first=True).eval()
    # the merged base reproduces the pretrained model; the fresh adapter (B = 0) changes nothing yet
    torch.testing.assert_close(embed(ft, batches[0]), embed(pre, batches[0]), atol=1e-5, rtol=1e-4)
    lora_a = [p for n, p in ft.named_parameters() if p.requires_grad and "lora_A" in n]
    assert lora_a and all(p.shape[0] == 2 for p in lora_a)
    assert all(float(p.detach().abs().sum()) == 0 for n, p in ft.named_parameters() if "lora_B" in n)


def test_init_from_errors(pretrained, tmp_path):
    _, path = pretrained
    with pytest.raises(ValueError, match="merge_adapter_first"):
        FinetuneModule(backbone=backbone(r=2), init_from=str(path))
    with pytest.raises(ValueError, match="preset"):
        FinetuneModule(backbone=BackboneConfig(preset="tiny", seed=1, adapter=AdapterConfig(r=4, alpha=8)),
                       init_from=str(path))
    with pytest.raises(FileNotFoundError, match="init_from"):
        FinetuneModule(backbone=backbone(), init_from=str(tmp_path / "nope.ckpt"))
    with pytest.raises(ValueError, match="model.objective.loss"):
        FinetuneModule(loss="infonce")
