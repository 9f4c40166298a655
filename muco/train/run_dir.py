"""The run directory: where one training run keeps everything, and which checkpoint a restart resumes from.

A run lives in ``trainer.default_root_dir`` (when a config leaves it unset: ``runs/<config name>``):

```
<run_dir>/
  config.yaml                      the resolved config (rewritten by every (re)start)
  events.out.tfevents.*            TensorBoard (one directory for the whole run, across restarts)
  checkpoints/last.ckpt, ...       ModelCheckpoint
  hpc_ckpt_<n>.ckpt                preemption checkpoints (SLURM SIGUSR1, :mod:`muco.train.preemption`)
  skipped.jsonl                    every bad sample the data stream skipped: shard, key, reason
  slurm-<jobid>.out                SLURM logs (`muco slurm submit`)
```

Restarting the same command in the same run directory continues the run from its newest checkpoint (by
modification time, as Lightning's own ``ckpt_path="last"`` and its SLURM resume decide), so a requeued job,
a kill -9 or a node failure needs nothing but the original command again.
"""

from __future__ import annotations

import logging
import os
import zipfile
from pathlib import Path

log = logging.getLogger("muco.train")
CHECKPOINT_DIR = "checkpoints"
HPC_PREFIX = "hpc_ckpt_"


def default_run_dir(config_files: list[str]) -> str:
    """The run directory of a config that does not set ``trainer.default_root_dir``: ``runs/<first config's
    file name without .yaml>`` (``muco fit --config configs/m3t_2b.yaml`` -> ``runs/m3t_2b``)."""
    return str(Path("runs") / Path(config_files[0]).stem)


def is_complete(path: Path) -> bool:
    """A checkpoint file whose zip directory is intact (``torch.save``'s format: a truncated file has none), or
    a distributed checkpoint directory with its ``.metadata``. Cheap: nothing is loaded."""
    if path.is_dir():
        return (path / ".metadata").is_file()
    return path.is_file() and zipfile.is_zipfile(path)


def checkpoints_in(run_dir: str | os.PathLike) -> list[Path]:
    """Every resumable checkpoint of a run directory: ``checkpoints/**/*.ckpt`` (files, or directories of a
    distributed checkpoint) and ``hpc_ckpt_*.ckpt``. Temporary files of an unfinished save are not listed."""
    root = Path(run_dir)
    found = [p for p in root.glob(f"{HPC_PREFIX}*.ckpt")]
    ckpt_dir = root / CHECKPOINT_DIR
    if ckpt_dir.is_dir():
        found += [p for p in ckpt_dir.rglob("*.ckpt") if not any(q.suffix == ".ckpt" for q in p.parents)]
    return [p for p in found if p.is_file() or (p.is_dir() and (p / ".metadata").is_file())]


def newest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint a restart resumes from: the most recently written complete one (None: a fresh run). A
    damaged newer file (e.g. cut short by a full disk in a run from before atomic saves) is passed over."""
    found = sorted(checkpoints_in(run_dir), key=lambda p: (p.stat().st_mtime_ns, p.name.startswith(HPC_PREFIX)))
    for path in reversed(found):
        if is_complete(path):
            return path
        log.warning("passing over %s: not a complete checkpoint (cut short or damaged)", path)
    return None


def check_writable(directory: str | os.PathLike, what: str) -> None:
    """Create ``directory`` and write a file into it now, so an unwritable run or checkpoint directory fails
    before training instead of at the first checkpoint."""
    path = Path(directory)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".muco-write-check-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"{what} {path} is not writable ({e.strerror or e}); choose a writable place "
                              "(--trainer.default_root_dir)") from e


def resolve_resume(run_dir: str | os.PathLike, ckpt_path: str | None) -> str | None:
    """What ``muco fit`` passes to ``trainer.fit(ckpt_path=...)``.

    - ``None`` (the default): the newest checkpoint of the run directory, or a fresh start when it has none;
    - ``"last"``: the same, but a run directory without a checkpoint is an error (you asked to resume);
    - a path: that checkpoint, which must exist.
    """
    if ckpt_path is None or ckpt_path == "last":
        found = newest_checkpoint(run_dir)
        if found is None and ckpt_path == "last":
            raise FileNotFoundError(
                f"--ckpt_path last: the run directory {run_dir} holds no checkpoint to resume; drop --ckpt_path "
                "to start the run, or set --trainer.default_root_dir to the run you want to continue")
        return None if found is None else str(found)
    if ckpt_path == "hpc":
        return ckpt_path  # Lightning resolves it in the run directory
    if not os.path.exists(ckpt_path):
        raise FileNotFoundError(f"--ckpt_path {ckpt_path} does not exist; give an existing .ckpt, or omit "
                                "--ckpt_path to resume from the newest checkpoint of the run directory")
    if not is_complete(Path(ckpt_path)):
        raise ValueError(f"--ckpt_path {ckpt_path} is not a complete checkpoint (cut short, damaged, or not a "
                         "checkpoint); omit --ckpt_path to resume from the newest complete one of the run directory")
    return ckpt_path
