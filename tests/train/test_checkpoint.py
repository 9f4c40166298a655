"""Reading a muco checkpoint: the one reader's errors, the module and the encoder it rebuilds, the data settings."""

from __future__ import annotations

import re
import zipfile

import pytest
import torch

from muco.encoder import MuCoEncoder
from muco.inputs.image_policy import ImagePolicy
from muco.model.backbone import AdapterConfig, BackboneConfig
from muco.train import init_from
from muco.train.checkpoint import datamodule_hparams, load_encoder, read_checkpoint
from muco.train.module import MuCoModule


def test_adapter_checkpoint_drops_frozen_weights_and_reloads_equal(tmp_path, photos):
    module = MuCoModule(tokenizer="tiny", backbone=BackboneConfig(preset="tiny", adapter=AdapterConfig(r=4, alpha=8)),
                        eval_image_policy="tiny")
    with torch.no_grad():
        for _, p in module.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))  # a "trained" adapter and token rows
    ckpt = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(ckpt)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert set(ckpt["state_dict"]) >= trainable
    assert len(ckpt["state_dict"]) < len(module.state_dict()), "frozen base weights were kept"
    torch.save(ckpt, tmp_path / "m.ckpt")

    loaded = load_encoder(tmp_path / "m.ckpt")
    ref = MuCoEncoder.from_parts(module.tokenizer, module.embedder.backbone, "tiny")
    texts, images = ["a digit", "caption of a cat"], [photos[0], None]
    assert torch.allclose(loaded.embed(texts, images), ref.embed(texts, images), atol=1e-6)
    assert loaded.image_policy == ImagePolicy.preset("tiny")  # the module's eval_image_policy


def test_load_encoder_dispatch(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_encoder(tmp_path / "missing")
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="expected an exported model directory"):
        load_encoder(tmp_path / "model.bin")
    with pytest.raises(ValueError, match="expected an exported model directory"):
        load_encoder(tmp_path)
    (tmp_path / "last.ckpt").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a checkpoint file"):
        load_encoder(tmp_path / "last.ckpt")
    dcp = tmp_path / "sharded"
    dcp.mkdir()
    (dcp / "__0_0.distcp").write_bytes(b"x")
    with pytest.raises(ValueError, match="distributed checkpoint directory without Lightning's meta.pt"):
        load_encoder(dcp)


def test_read_checkpoint_errors_name_the_path_or_the_setting(tmp_path):
    dcp = tmp_path / "last.ckpt"
    dcp.mkdir()
    (dcp / ".metadata").write_bytes(b"x")
    with pytest.raises(ValueError, match="^" + re.escape(f"{dcp} is a distributed checkpoint directory without")):
        read_checkpoint(dcp)
    with pytest.raises(ValueError, match="^" + re.escape(f"init_from={dcp} is a distributed")):
        read_checkpoint(dcp, "init_from")
    torch.save({"hyper_parameters": {}}, dcp / "meta.pt")  # cut short: no readable shards
    with pytest.raises(ValueError, match="^" + re.escape(f"{dcp} is not a readable distributed checkpoint")):
        read_checkpoint(dcp)
    with pytest.raises(ValueError, match="^" + re.escape(f"init_from={tmp_path} is a directory, not a checkpoint")):
        read_checkpoint(tmp_path, "init_from")
    with pytest.raises(FileNotFoundError, match="^" + re.escape(f"{tmp_path / 'nope.ckpt'} does not exist")):
        read_checkpoint(tmp_path / "nope.ckpt")
    (tmp_path / "a.tar").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="is not a checkpoint file \\(cut short, damaged"):
        read_checkpoint(tmp_path / "a.tar")
    with zipfile.ZipFile(tmp_path / "z.ckpt", "w") as z:
        z.writestr("hello.txt", "a zip, but not torch.save's")
    with pytest.raises(ValueError, match="is not a readable Lightning checkpoint") as e:
        read_checkpoint(tmp_path / "z.ckpt")
    assert "\n" not in str(e.value)  # one line, whatever torch said
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="not a Lightning checkpoint of a muco module"):
        read_checkpoint(tmp_path / "other.ckpt")
    # the name init_from has always offered: errors name the setting
    other = re.escape(f"init_from={tmp_path / 'other.ckpt'}")
    with pytest.raises(ValueError, match=f"^{other} is not a Lightning checkpoint"):
        init_from.read_checkpoint(tmp_path / "other.ckpt")


def test_datamodule_hparams(tmp_path):
    ckpt = {"state_dict": {}, "hyper_parameters": {}, "datamodule_hyper_parameters": {"image_policy": "tiny",
                                                                                       "turns_per_sample": 3}}
    torch.save(ckpt, tmp_path / "last.ckpt")
    assert datamodule_hparams(tmp_path / "last.ckpt") == {"image_policy": "tiny", "turns_per_sample": 3}
    del ckpt["datamodule_hyper_parameters"]
    torch.save(ckpt, tmp_path / "bare.ckpt")
    assert datamodule_hparams(tmp_path / "bare.ckpt") == {}
    assert datamodule_hparams(tmp_path) == {}  # an exported directory: no training data settings
    assert datamodule_hparams(tmp_path / "missing.ckpt") == {}
    (tmp_path / "bad.ckpt").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a checkpoint file"):
        datamodule_hparams(tmp_path / "bad.ckpt")


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_checkpoint_from_before_objectives_rebuilds_with_the_same_options(tmp_path, stage):
    from muco.objectives import FinetuneObjective, PretrainObjective
    from muco.train.checkpoint import load_module

    kind = FinetuneObjective(loss="joint_masked", hard_negatives=False) if stage == "finetune" else \
        PretrainObjective(symmetric_loss=True, mask_same_text=True)
    module = MuCoModule(tokenizer="tiny", backbone=BackboneConfig(preset="tiny"), objective=kind)
    ckpt = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(ckpt)
    # the layout of the earlier release: loss options flat among the module's, fine-tuning its own class
    old = {k: v for k, v in ckpt["hyper_parameters"].items() if k != "objective"}
    old.update(kind.init_args())
    if stage == "finetune":
        ckpt["muco_module_class"] = "muco.train.finetune_module.FinetuneModule"
        old["symmetric_loss"] = False
    old["init_from"] = str(tmp_path / "gone.ckpt")  # the run it started from, long deleted
    ckpt["hyper_parameters"] = old
    torch.save(ckpt, tmp_path / "old.ckpt")

    rebuilt = load_module(tmp_path / "old.ckpt")
    assert type(rebuilt) is MuCoModule and type(rebuilt.objective) is type(kind)
    assert rebuilt.objective.init_args() == kind.init_args()
    for name, p in module.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[name], p), name


def test_a_run_from_before_record_kinds_resumes_its_data_position():
    module = MuCoModule(tokenizer="tiny", backbone=BackboneConfig(preset="tiny"))
    state = {"format": 2, "epoch": 3, "ranks": [{"epoch": 3, "batches": 5}]}
    for old in ("M3TDataModule", "PairDataModule"):
        checkpoint = {"hyper_parameters": dict(module.hparams), old: state}
        module.on_load_checkpoint(checkpoint)  # Lightning calls it before it restores the DataModule
        assert checkpoint.get("MuCoDataModule") is state and old not in checkpoint
    current = {"hyper_parameters": dict(module.hparams), "MuCoDataModule": state, "M3TDataModule": {"epoch": 0}}
    module.on_load_checkpoint(current)
    assert current["MuCoDataModule"] is state  # a current checkpoint's own state wins
