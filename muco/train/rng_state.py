"""Random-number states in checkpoints, per rank, so a resumed run draws the same dropout masks.

Lightning checkpoints hold no RNG state. Every rank's Python, NumPy, torch CPU and CUDA generator states are
gathered into the checkpoint and each rank restores its own right before the first training step after a
restore (later than ``on_load_checkpoint``, so nothing Lightning does while setting up draws from them in
between). The data pipeline does not use these generators (its draws are keyed by seed, epoch, rank, worker
and sample, and its loaders carry their own ``torch.Generator``), so the state saved at the end of step ``s``
is the state the uninterrupted run had at the start of step ``s + 1``.

A resume on another world size restores nothing and says so (the data stream is re-split then as well).
"""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from muco.distributed import gather_objects

log = logging.getLogger("muco.train")


def capture_rng() -> dict[str, Any]:
    """The generators' states in types ``torch.load(weights_only=True)`` reads (tensors, ints, floats, str)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "gauss": float(gauss)}
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class RNGState(Callback):
    """Saves every rank's RNG states with each checkpoint and restores them on resume (see the module doc)."""

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    @property
    def state_key(self) -> str:
        return "RNGState"

    def state_dict(self) -> dict[str, Any]:
        return {"ranks": gather_objects(capture_rng())}  # called on every rank by Trainer.save_checkpoint

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._pending is None:
            return
        ranks, self._pending = self._pending.get("ranks", []), None
        if len(ranks) != trainer.world_size:
            log.warning("resuming on %d ranks from a checkpoint of %d: random states not restored (dropout "
                        "masks differ from the uninterrupted run)", trainer.world_size, len(ranks))
            return
        restore_rng(ranks[trainer.global_rank])
