"""AdamW over the trainable parameters only, with schedules counted in optimizer steps."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

SCHEDULES = ("constant", "constant_with_warmup", "cosine")


@dataclass
class OptimConfig:
    """Defaults follow the released code: AdamW, wd 0.01, betas (0.9, 0.999), eps 1e-8, lr 5e-5 constant."""

    lr: float = 5e-5
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    schedule: str = "constant"
    warmup_steps: int = 0  # optimizer steps, not micro-batches or ranks (docs/method.md §14, item 3)
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr

    @classmethod
    def coerce(cls, value: OptimConfig | dict | None) -> OptimConfig:
        """Accept the dict form that saved hyper-parameters come back as."""
        if value is None:
            return cls()
        return value if isinstance(value, cls) else cls(**{**value, "betas": tuple(value.get("betas", cls.betas))})

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule={self.schedule!r}; choose one of {SCHEDULES}")
        if self.warmup_steps < 0 or self.lr <= 0:
            raise ValueError("optim.lr must be > 0 and optim.warmup_steps >= 0")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters only; no decay on biases, norms and the trainable `<|emb|>`/`<|mask|>` rows
    (`trainable_tokens_delta`, the name PEFT gave them and `TokenRows` keeps)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name or "trainable_tokens" in name else decay).append(p)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters")
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int, min_lr_ratio: float):
    """Multiplier of the base lr at optimizer step `step` (0-based)."""

    def f(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "cosine":
            span = max(1, total_steps - warmup_steps)
            progress = min(1.0, (step - warmup_steps) / span)
            return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    return f


def build_optimizer(model: nn.Module, cfg: OptimConfig, total_steps: int) -> dict:
    """What `configure_optimizers` returns: AdamW + a per-step LambdaLR."""
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    sched = LambdaLR(opt, lr_lambda(cfg.schedule, cfg.warmup_steps, total_steps, cfg.min_lr_ratio))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}
