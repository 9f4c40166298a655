"""Rebuild a trained module from a Lightning checkpoint (for evaluation, export, mining)."""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
from lightning.pytorch import LightningModule


def load_module(path: str | Path, map_location: str | torch.device = "cpu") -> LightningModule:
    """The module class recorded in the checkpoint, rebuilt from its hyper-parameters; frozen weights left out
    of the checkpoint come back from the backbone config (local weights or the seeded preset)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(
            f"{path} is a distributed (FSDP) checkpoint directory; consolidate it first with "
            f"`python -m lightning.pytorch.utilities.consolidate_checkpoint {path}`"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)  # our own checkpoint, not data
    except Exception as e:
        raise ValueError(f"{path} is not a readable Lightning checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise ValueError(f"{path} is not a Lightning checkpoint of a muco module (no state_dict/hyper_parameters)")
    dotted = ckpt.get("muco_module_class", "muco.train.module.MuCoModule")
    module_name, _, cls_name = dotted.rpartition(".")
    cls = getattr(importlib.import_module(module_name), cls_name)
    # LightningCLI adds `_class_path`/`_instantiator` bookkeeping to the saved hyper-parameters
    hparams = {k: v for k, v in ckpt["hyper_parameters"].items() if not k.startswith("_")}
    for name in getattr(cls, "REBUILD_WITHOUT", ()):  # e.g. the init_from a run started from: not needed now
        hparams.pop(name, None)
    module = cls(**hparams)
    missing, unexpected = module.load_state_dict(ckpt["state_dict"], strict=False)
    if unexpected:
        raise ValueError(f"{path}: checkpoint keys the module does not have: {unexpected[:5]}")
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    lost = sorted(trainable & set(missing))
    if lost:
        raise ValueError(f"{path}: trained parameters missing from the checkpoint: {lost[:5]}")
    return module.to(map_location).eval()
