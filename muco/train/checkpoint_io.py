"""Checkpoints written atomically: a crash or a full disk never replaces a good checkpoint with a broken one.

Lightning's own writer goes through an fsspec transaction whose temporary file lives in the system temp
directory, so on another filesystem the final step is a copy over the old checkpoint; a disk that fills
during it leaves a truncated ``last.ckpt``. Here the bytes go to a temporary file next to the target, are
flushed to disk, and only then replace the target with ``os.replace`` (atomic within one filesystem). A failed
write removes its temporary file and raises; the previous checkpoint is untouched.

Distributed (FSDP2) checkpoints are directories that every rank writes its shards into; Lightning's
``ModelParallelStrategy`` writes them in place, over the previous ``last.ckpt/``. :class:`AtomicModelParallelStrategy`
writes a complete new directory beside it first and then swaps the two (``renameat2(RENAME_EXCHANGE)``, one
atomic step on Linux; two renames where the filesystem lacks it).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.strategies import ModelParallelStrategy

TMP_SUFFIX = ".tmp"


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` through a same-directory temporary file + fsync + ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as e:  # a full disk surfaces from torch's zip writer as a RuntimeError
        Path(tmp).unlink(missing_ok=True)
        raise OSError(f"checkpoint {path} could not be written ({type(e).__name__}: {e}); the previous file at "
                      "that path is unchanged. Free space on that filesystem (or move the run directory)") from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass  # some filesystems do not fsync directories; the rename is still atomic


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning ``CheckpointIO`` that writes every checkpoint file atomically (see the module doc)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO.save_checkpoint takes no storage_options")
        if "://" in str(path):  # object stores: Lightning's writer (their uploads are atomic by themselves)
            super().save_checkpoint(checkpoint, path)
            return
        atomic_torch_save(checkpoint, path)


def swap_in_directory(new: Path, final: Path) -> None:
    """Make the complete directory ``new`` the one at ``final`` and delete what was there."""
    if not final.exists():
        os.rename(new, final)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    at_fdcwd, rename_exchange = -100, 2
    if renameat2 is not None and renameat2(at_fdcwd, os.fsencode(new), at_fdcwd, os.fsencode(final),
                                           rename_exchange) == 0:
        shutil.rmtree(new)  # now holds the previous checkpoint
        return
    old = final.with_name(f".{final.name}.old")  # no RENAME_EXCHANGE (e.g. some network filesystems)
    shutil.rmtree(old, ignore_errors=True)
    os.rename(final, old)
    os.rename(new, final)
    shutil.rmtree(old)


class AtomicModelParallelStrategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` (FSDP2) whose distributed checkpoint directories are written to
    ``.<name>.tmp`` by all ranks and swapped in by rank 0 once every shard is on disk."""

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        if not self._save_distributed_checkpoint:
            super().save_checkpoint(checkpoint, filepath, storage_options)  # one file, via the CheckpointIO
            return
        final = Path(self.broadcast(str(filepath)))
        tmp = final.with_name(f".{final.name}{TMP_SUFFIX}")
        if self.global_rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # a save that died earlier
        self.barrier("atomic_checkpoint_start")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        self.barrier("atomic_checkpoint_written")
        if self.global_rank == 0:
            swap_in_directory(tmp, final)
        self.barrier("atomic_checkpoint_swapped")
