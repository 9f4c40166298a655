"""Starting fine-tuning from a pretraining checkpoint (docs/method.md §8.1, §11).

Two ways, chosen by ``FinetuneModule(merge_adapter_first=...)``:

- **continue** (default, as the released code): the fine-tuning model has the same adapter as the pretraining
  run; its trained weights (adapter, ``<|emb|>``/``<|mask|>`` rows, anything else the checkpoint stored) are
  loaded into it and keep training. ``model.backbone`` must describe the same model as the pretraining run.
- **merge**: the pretrained adapter is merged into the base weights with peft's ``merge_and_unload`` (the
  ``<|emb|>``/``<|mask|>`` rows with it, muco/model/token_rows.py) and a fresh adapter
  (``model.backbone.adapter``, which may differ) is trained on top. The merged base weights are frozen and are
  not stored in fine-tuning checkpoints, so rebuilding one needs ``init_from`` again.

Frozen base weights left out of a checkpoint come back from the backbone config (local weights or the seeded
preset), so the pretraining run's ``pretrained`` / ``preset`` / ``seed`` must match (checked).
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from muco.inputs.tokenizer import SpecialTokenIds
from muco.model.backbone import BackboneConfig, apply_adapter, load_qwen2vl, prepare_for_training
from muco.model.token_rows import merge_token_rows, upgrade_state_dict
from muco.train import checkpoint

log = logging.getLogger(__name__)
BACKBONE_PREFIX = "embedder.backbone."


def read_checkpoint(path: str | Path, what: str | None = "init_from") -> dict[str, Any]:
    """:func:`muco.train.checkpoint.read_checkpoint`, its errors naming the ``init_from`` setting."""
    return checkpoint.read_checkpoint(path, what)


def check_compatible(ckpt: dict[str, Any], path: str | Path, tokenizer: str, cfg: BackboneConfig) -> BackboneConfig:
    """The pretraining run's backbone config, after checking that the frozen weights it left out of the
    checkpoint are the ones ``cfg`` rebuilds, and that the tokenizer is the same."""
    hp = ckpt["hyper_parameters"]
    if hp.get("tokenizer", tokenizer) != tokenizer:
        raise ValueError(f"init_from={path} was trained with tokenizer {hp['tokenizer']!r} but model.tokenizer is "
                         f"{tokenizer!r}; the <|emb|>/<|mask|> rows are only meaningful with the same tokenizer")
    pre = BackboneConfig.coerce(hp.get("backbone"))
    if pre.pretrained is None and cfg.pretrained is None and (pre.preset, pre.seed) != (cfg.preset, cfg.seed):
        raise ValueError(f"init_from={path} was pretrained on the random-init preset {pre.preset!r} (seed "
                         f"{pre.seed}); model.backbone has preset {cfg.preset!r} (seed {cfg.seed})")
    if (pre.pretrained is None) != (cfg.pretrained is None):
        raise ValueError(f"init_from={path} has backbone.pretrained={pre.pretrained!r}; model.backbone has "
                         f"{cfg.pretrained!r}: the frozen base weights would differ")
    if pre.pretrained is not None and Path(pre.pretrained).name != Path(cfg.pretrained).name:  # type: ignore[arg-type]
        log.warning("init_from=%s was pretrained on %s; fine-tuning uses %s", path, pre.pretrained, cfg.pretrained)
    return pre


# settings that decide which weights a checkpoint holds and what the frozen rest is rebuilt from
WEIGHT_SETTINGS = ("tokenizer", "backbone.pretrained", "backbone.preset", "backbone.seed", "backbone.freeze_vision",
                   "backbone.adapter")


def weight_settings(hparams: dict[str, Any]) -> dict[str, Any]:
    """The :data:`WEIGHT_SETTINGS` of a module's hyper-parameters, flattened (adapter fields one by one)."""
    cfg = asdict(BackboneConfig.coerce(hparams.get("backbone")))
    out: dict[str, Any] = {"tokenizer": hparams.get("tokenizer")}
    for key in WEIGHT_SETTINGS[1:]:
        value = cfg[key.split(".", 1)[1]]
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


def resume_mismatches(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``"key: saved -> current"`` for every weight setting a resumed run would change (empty: compatible)."""
    a, b = weight_settings(saved), weight_settings(current)
    if a["tokenizer"] is None:  # checkpoints written before the tokenizer was recorded resolved
        a["tokenizer"] = b["tokenizer"]
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def backbone_weights(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The checkpoint's ``embedder.*`` weights (the temperature and other extras are not carried over), PEFT's
    trainable-token names, as checkpoints before ``TokenRows`` have them, renamed for it."""
    return upgrade_state_dict({k: v for k, v in ckpt["state_dict"].items() if k.startswith("embedder.")})


def load_continue(module: nn.Module, ckpt: dict[str, Any], path: str | Path) -> set[str]:
    """Load the pretrained weights into ``module`` (same adapter); returns the names of the parameters
    loaded that are frozen here (they are not base weights, so fine-tuning checkpoints must keep them)."""
    weights = backbone_weights(ckpt)
    own = module.state_dict()
    unexpected = sorted(k for k in weights if k not in own)
    bad_shape = sorted(k for k in weights if k in own and own[k].shape != weights[k].shape)
    if unexpected or bad_shape:
        pre = ckpt["hyper_parameters"].get("backbone")
        names = (unexpected or bad_shape)[:3]
        raise ValueError(
            f"init_from={path}: {len(unexpected)} pretrained weights have no place in this model and "
            f"{len(bad_shape)} have another shape (e.g. {names}); continuing the pretrained adapter needs "
            f"model.backbone to match the pretraining run's ({pre}); or set model.merge_adapter_first=true to "
            "merge it and train a fresh adapter")
    if not weights:
        raise ValueError(f"init_from={path} holds no embedder weights")
    module.load_state_dict(weights, strict=False)
    params = dict(module.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    log.info("init_from=%s: loaded %d tensors (continue the pretrained adapter)", path, len(weights))
    untouched = sorted(trainable - set(weights))
    if untouched:
        log.warning("init_from=%s: %d trainable parameters start fresh, e.g. %s", path, len(untouched),
                    untouched[:3])
    return {n for n in weights if n in params and n not in trainable}


def merged_backbone(ckpt: dict[str, Any], path: str | Path, cfg: BackboneConfig,
                    tokenizer: PreTrainedTokenizerBase) -> nn.Module:
    """Base weights of ``cfg`` + the pretraining run's trained weights, its adapter merged into the base, then
    ``cfg``'s vision freezing, gradient checkpointing and a fresh adapter (as ``build_backbone``)."""
    pre = BackboneConfig.coerce(ckpt["hyper_parameters"].get("backbone"))
    ids = SpecialTokenIds.from_tokenizer(tokenizer)
    model = load_qwen2vl(cfg, tokenizer)
    if pre.adapter is not None:
        model = apply_adapter(model, pre.adapter, ids)
    weights = {k[len(BACKBONE_PREFIX):]: v for k, v in backbone_weights(ckpt).items() if k.startswith(BACKBONE_PREFIX)}
    _, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or not weights:
        raise ValueError(f"init_from={path}: weights that do not fit the pretraining run's own backbone config "
                         f"({pre}), e.g. {unexpected[:3]}")
    if pre.adapter is not None:
        # LoRA/DoRA deltas and the trained token rows go into the base (`merge_token_rows`: the rows are merged
        # by PEFT through the `TokenRows` unload hook already; kept should that hook stop being called)
        model = merge_token_rows(model.merge_and_unload())
    log.info("init_from=%s: merged the pretrained %s into the base; training a fresh adapter on top", path,
             pre.adapter.kind if pre.adapter else "full weights")
    model.requires_grad_(True)  # merge_and_unload leaves the base frozen
    return prepare_for_training(model, cfg, ids)
