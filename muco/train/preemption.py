"""Preemption: SIGUSR1 -> a checkpoint at the next step boundary -> SLURM requeue -> exact resume.

SLURM sends SIGUSR1 ahead of a time limit or a preemption (``sbatch --signal=USR1@<seconds>``, as
``muco slurm submit`` writes it). Lightning's own handler saves its ``hpc_ckpt_<n>.ckpt`` *inside* the signal
handler, i.e. at whatever point of a step the signal lands (between a forward and the optimizer step, or while
another rank waits in a collective). Here the handler only records the request; at the end of the next
training step all ranks agree on it (one boolean all-reduce per step), save ``<run_dir>/hpc_ckpt_<n>.ckpt``
together (Lightning's name and place, so Lightning's SLURM resume and ``muco fit``'s newest-checkpoint resume
both pick it up). At the start of the next step, with that step's metrics logged, every rank leaves ``fit`` and
exits with code 0; rank 0's last act is ``scontrol requeue $SLURM_JOB_ID``. The requeued job runs the same
command and continues from the saved step exactly (:mod:`muco.train.run_dir`). A failed requeue is logged; the
checkpoint is there for a resubmission.

Outside SLURM (``torchrun``, a workstation) ``kill -USR1 <pid>`` does the same without the requeue: the run
saves, stops with exit code 0, and the same command resumes it.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

from muco.train.run_dir import HPC_PREFIX

log = logging.getLogger("muco.train")


def next_hpc_path(run_dir: str | os.PathLike) -> Path:
    """``<run_dir>/hpc_ckpt_<n+1>.ckpt`` after the highest existing ``n`` (Lightning's numbering)."""
    numbers = [int(m.group(1)) for p in Path(run_dir).glob(f"{HPC_PREFIX}*.ckpt")
               if (m := re.fullmatch(rf"{HPC_PREFIX}(\d+)\.ckpt", p.name))]
    return Path(run_dir) / f"{HPC_PREFIX}{max(numbers, default=0) + 1}.ckpt"


def slurm_job_id() -> str | None:
    """The id ``scontrol requeue`` takes (``<array job>_<task>`` for array jobs), None outside SLURM."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array is not None and "SLURM_ARRAY_TASK_ID" in os.environ:
        return f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def requeue(job_id: str) -> bool:
    """``scontrol requeue <job_id>``; False (with a warning) when it fails."""
    try:
        res = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("could not requeue SLURM job %s (%s); resume it by submitting the same command", job_id, e)
        return False
    if res.returncode != 0:
        log.warning("scontrol requeue %s failed (%s); resume it by submitting the same command", job_id,
                    res.stderr.strip() or res.returncode)
        return False
    log.info("requeued SLURM job %s; it resumes from the preemption checkpoint", job_id)
    return True


class PreemptionCheckpoint(Callback):
    """Checkpoint-and-requeue on ``signum`` (SIGUSR1) at a step boundary, on every rank together."""

    def __init__(self, signum: int = signal.SIGUSR1) -> None:
        self.signum = signal.Signals(signum)
        self.requested = False
        self._exit_pending = False
        self._previous: Any = None
        self._installed = False

    # ---------------------------------------------------------------- signal
    def _on_signal(self, signum: int, frame: Any) -> None:
        self.requested = True  # nothing else here: the save happens at the next step boundary

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # before Lightning registers its own SIGUSR1 handler, which then leaves this one in place
        if stage != "fit" or self._installed or threading.current_thread() is not threading.main_thread():
            return
        self._previous = signal.signal(self.signum, self._on_signal)
        self._installed = True

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._installed:
            signal.signal(self.signum, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False

    # ---------------------------------------------------------------- step boundary
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # any rank signalled -> all ranks save (ranks may get the signal a step apart)
        if not trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            return
        self.requested = False
        path = trainer.strategy.broadcast(str(next_hpc_path(trainer.default_root_dir)), src=0)
        log.info("%s received: saving %s at step %d", self.signum.name, path, trainer.global_step)
        trainer.save_checkpoint(path)
        self._exit_pending = True

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        # Leave at the start of the next step, once the saved step's metrics are logged. `should_stop` instead
        # would close the epoch and let ModelCheckpoint write a newer "end of epoch" checkpoint, from which a
        # resume would skip the rest of this epoch's data. Every rank takes this branch at the same step.
        if not self._exit_pending:
            return
        self._exit_pending = False
        for logger in trainer.loggers:
            logger.save()
        trainer.strategy.barrier("preemption_exit")
        job = slurm_job_id()
        if job is not None and trainer.is_global_zero:
            # SLURM answers a requeue by terminating the job step at once: ask for it at interpreter exit, after
            # Lightning's teardown has stopped the dataloader workers and closed the loggers
            atexit.register(requeue, job)
        log.info("stopping after the preemption checkpoint; the same command resumes from it")
        raise SystemExit(0)
