"""Training callbacks: throughput and data-wait logging, per-step sample keys, gradient snapshots for
equivalence checks."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer


class PairThroughput(Callback):
    """Logs images/s, pairs/s and tokens/s per device and in total, the data-wait fraction of each step, the
    token efficiency (real tokens / computed positions: 1 - the padded share), and peak accelerator memory, under
    ``perf/`` (``perf/pairs_per_s`` also on the progress bar). Not
    Lightning's ``ThroughputMonitor``, which counts samples and FLOPs of a model that declares them.

    Data wait is the time between the end of one step and the start of the next: the loader's share.
    """

    def __init__(self, log_every_n_steps: int = 1) -> None:
        self.every = max(1, log_every_n_steps)
        self._last_end: float | None = None
        self._start = 0.0
        self._wait = 0.0

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        self._wait = 0.0 if self._last_end is None else now - self._last_end
        self._start = now

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        compute = now - self._start
        total = compute + self._wait
        self._last_end = now
        counts = outputs.get("counts") if isinstance(outputs, dict) else None
        if counts is None or total <= 0:  # a StepCounts (muco.objectives.base)
            return
        world = trainer.world_size
        metrics = {"perf/data_wait_frac": self._wait / total, "perf/step_time": total}
        for name in ("images", "pairs", "tokens"):
            per_device = getattr(counts, name) / total
            metrics[f"perf/{name}_per_s_device"] = per_device
            metrics[f"perf/{name}_per_s"] = per_device * world
        if counts.token_efficiency is not None:
            metrics["perf/token_efficiency"] = counts.token_efficiency
        if torch.cuda.is_available() and pl_module.device.type == "cuda":
            metrics["perf/peak_mem_gib"] = torch.cuda.max_memory_allocated(pl_module.device) / 2**30
        pairs = metrics.pop("perf/pairs_per_s")
        pl_module.log("perf/pairs_per_s", pairs, prog_bar=True, batch_size=1)
        pl_module.log_dict(metrics, batch_size=1)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._last_end = None  # validation time is not data wait

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._last_end = None


class GradientSnapshot(Callback):
    """Saves the (averaged) gradients of trainable parameters at one optimizer step to a file.

    Used to check that a 2-rank DDP or FSDP2 run computes the same gradients as one process on the union
    batch. Under FSDP2 the shards are gathered with `full_tensor()` (a collective: every rank calls it).
    """

    def __init__(self, path: str, step: int = 0) -> None:
        self.path = Path(path)
        self.step = step

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        if trainer.global_step != self.step:
            return
        grads = {}
        for name, p in pl_module.named_parameters():
            if p.grad is None:
                continue
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            grads[name.replace("_checkpoint_wrapped_module.", "")] = g.detach().cpu().clone()
        if trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(grads, self.path)


class SampleKeyLog(Callback):
    """Appends the sample keys of every training step to ``<run_dir>/<filename>`` (one JSON line per rank and
    step: ``{"step", "rank", "keys"}``), to audit the data order, e.g. that a resumed run trains exactly the
    samples the uninterrupted run would have. Each rank writes its own file (``.rank<r>`` before the suffix)."""

    def __init__(self, filename: str = "sample_keys.jsonl") -> None:
        self.filename = filename

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        path = Path(trainer.default_root_dir) / self.filename
        path = path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix}")
        line = json.dumps({"step": trainer.global_step, "rank": trainer.global_rank, "keys": list(batch["keys"])})
        with path.open("a", encoding="utf-8") as f:
            f.write(line + "\n")
