"""Softmax temperature τ: fixed (MuCo default 0.02), learnable, or scheduled over optimizer steps."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

__all__ = ["Temperature", "TemperatureSchedule"]

ScheduleMode = Literal["constant", "linear", "cosine"]


@dataclass(frozen=True)
class TemperatureSchedule:
    """τ(step) from ``tau_start`` to ``tau_end`` over ``total_steps`` optimizer steps, then ``tau_end``.

    ``linear`` interpolates linearly; ``cosine`` follows a half cosine (slow at both ends); ``constant`` is
    ``tau_start`` throughout. Steps count optimizer steps (the trainer's ``global_step``), not micro-batches.
    """

    mode: ScheduleMode = "constant"
    tau_start: float = 0.02
    tau_end: float = 0.02
    total_steps: int = 1

    def __post_init__(self) -> None:
        if self.mode not in ("constant", "linear", "cosine"):
            raise ValueError(f"unknown temperature schedule mode {self.mode!r}")
        if self.tau_start <= 0 or self.tau_end <= 0:
            raise ValueError("temperatures must be positive")
        if self.total_steps < 1:
            raise ValueError("total_steps must be >= 1")

    def value(self, step: int) -> float:
        """τ at optimizer step ``step`` (clamped to ``[0, total_steps]``)."""
        if self.mode == "constant":
            return float(self.tau_start)
        frac = min(max(step, 0), self.total_steps) / self.total_steps
        if self.mode == "cosine":
            frac = 0.5 * (1.0 - math.cos(math.pi * frac))
        return float(self.tau_start + (self.tau_end - self.tau_start) * frac)

    __call__ = value


class Temperature(nn.Module):
    """Holds τ; ``forward()`` returns it as a 0-d fp32 tensor to divide cosine similarities by.

    - fixed (default): a non-persistent buffer, so checkpoints from runs with another τ config still load
      and a schedule's value is recomputed from the step on resume instead of being restored stale;
    - learnable: ``log τ`` is the parameter (keeps τ positive, well-conditioned updates), optionally clamped
      to ``[min_tau, max_tau]`` in the forward like CLIP's logit-scale clamp;
    - scheduled: fixed τ updated by :meth:`set_step` from a :class:`TemperatureSchedule`.
    """

    def __init__(
        self,
        tau: float = 0.02,
        learnable: bool = False,
        schedule: TemperatureSchedule | None = None,
        min_tau: float | None = None,
        max_tau: float | None = None,
    ) -> None:
        super().__init__()
        if tau <= 0:
            raise ValueError("tau must be positive")
        if learnable and schedule is not None:
            raise ValueError("a learnable temperature cannot also follow a schedule")
        self.learnable = learnable
        self.schedule = schedule
        self.min_tau = min_tau
        self.max_tau = max_tau
        init = schedule.value(0) if schedule is not None else float(tau)
        if learnable:
            self.log_tau = nn.Parameter(torch.tensor(math.log(init), dtype=torch.float32))
        else:
            self.register_buffer("tau", torch.tensor(init, dtype=torch.float32), persistent=False)

    def forward(self) -> Tensor:
        if not self.learnable:
            return self.tau
        tau = self.log_tau.float().exp()
        if self.min_tau is not None or self.max_tau is not None:
            tau = tau.clamp(min=self.min_tau, max=self.max_tau)
        return tau

    def set_step(self, step: int) -> None:
        """Move a scheduled τ to its value at optimizer step ``step``; no-op for fixed or learnable τ."""
        if self.schedule is not None:
            self.tau.fill_(self.schedule.value(step))

    @property
    def value(self) -> float:
        """Current τ as a Python float, for logging (syncs the device once)."""
        return float(self.forward().detach())

    def extra_repr(self) -> str:
        kind = "learnable" if self.learnable else ("scheduled" if self.schedule is not None else "fixed")
        return f"{kind}, tau={self.value:.4g}"
