"""A muco Lightning checkpoint on disk (a ``.ckpt`` file, or an FSDP2 run's distributed checkpoint directory):
the one reader, with one-line errors, and what is built from it: the trained module (:func:`load_module`), an
encoder (:func:`load_encoder`, which also takes an exported model directory) and the training data settings it
recorded (:func:`datamodule_hparams`).

Used for evaluation, export, mining and ``init_from`` (:mod:`muco.train.init_from`).
"""

from __future__ import annotations

import importlib
import warnings
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from muco.encoder import MuCoEncoder, as_dtype, as_policy
from muco.inputs.image_policy import ImagePolicy

if TYPE_CHECKING:
    from lightning.pytorch import LightningModule

CHECKPOINT_HINT = "point it at a run's checkpoints/last.ckpt"


def is_distributed_checkpoint(path: str | Path) -> bool:
    """A distributed (FSDP / torch.distributed.checkpoint) checkpoint directory: ``.metadata`` + ``*.distcp``."""
    path = Path(path)
    return path.is_dir() and ((path / ".metadata").is_file() or any(path.glob("*.distcp")))


def read_checkpoint(path: str | Path, what: str | None = None, *, mmap: bool = False) -> dict[str, Any]:
    """A muco Lightning checkpoint as a dict (``state_dict``, ``hyper_parameters``, ...), with clear errors.

    ``what`` names the setting that gave the path (``"init_from"``): errors then read ``init_from=<path> ...``;
    None: the path alone. ``mmap`` maps the file instead of reading it (cheap when only small entries such as
    the hyper-parameters are needed). A distributed checkpoint directory (FSDP2) is read as the same dict
    (:func:`read_distributed_checkpoint`); with ``mmap`` its weights are not read at all.
    """
    path = Path(path)
    label = str(path) if what is None else f"{what}={path}"
    if path.is_dir():
        if is_distributed_checkpoint(path):
            return read_distributed_checkpoint(path, label, weights=not mmap)
        raise ValueError(f"{label} is a directory, not a checkpoint; {CHECKPOINT_HINT}")
    if not path.is_file():
        raise FileNotFoundError(f"{label} does not exist; point it at a run's .ckpt")
    if not zipfile.is_zipfile(path):  # torch.save's format; a tar, a truncated file or anything else is not
        raise ValueError(f"{label} is not a checkpoint file (cut short, damaged, or another kind of file); "
                         f"{CHECKPOINT_HINT}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)  # our own checkpoint, not data
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise ValueError(f"{label} is not a readable Lightning checkpoint ({type(e).__name__}: {first})") from e
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise ValueError(f"{label} is not a Lightning checkpoint of a muco module (no state_dict/hyper_parameters)")
    return ckpt


def read_distributed_checkpoint(path: Path, label: str, weights: bool = True) -> dict[str, Any]:
    """An FSDP2 checkpoint directory (Lightning's ``ModelParallelStrategy``: every rank's ``*.distcp`` shards,
    ``.metadata``, and ``meta.pt`` with everything that is not a tensor) as the dict a ``.ckpt`` file holds:
    ``meta.pt``'s entries plus ``state_dict``, the whole weights read in this one process (no process group);
    the optimizer state is left on disk. ``weights=False`` reads ``meta.pt`` only."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = path / "meta.pt"
    if not meta.is_file():
        raise ValueError(f"{label} is a distributed checkpoint directory without Lightning's meta.pt (cut short, "
                         f"or not written by `muco fit`); {CHECKPOINT_HINT}")
    try:
        ckpt = torch.load(meta, map_location="cpu", weights_only=False)  # our own checkpoint, not data
        if not weights:
            return ckpt
        reader = dcp.FileSystemReader(path)
        prefix = "state_dict."
        state = {name: torch.empty(m.size, dtype=m.properties.dtype)
                 for name, m in reader.read_metadata().state_dict_metadata.items()
                 if name.startswith(prefix) and isinstance(m, TensorStorageMetadata)}
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message=".*load in a single process")
            dcp.load(state, storage_reader=reader, no_dist=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise ValueError(f"{label} is not a readable distributed checkpoint ({type(e).__name__}: {first})") from e
    if not isinstance(ckpt, dict) or "hyper_parameters" not in ckpt or not state:
        raise ValueError(f"{label} is not a distributed checkpoint of a muco module (no weights/hyper_parameters)")
    ckpt["state_dict"] = {name[len(prefix):]: t for name, t in state.items()}
    return ckpt


def datamodule_hparams(path: str | Path) -> dict[str, Any]:
    """The training data settings a checkpoint recorded (the datamodule's hyper-parameters: ``image_policy``,
    ``turns_per_sample``, ...); ``{}`` for anything that is not a ``.ckpt`` file (an exported model directory)
    or a checkpoint without them. The weights are mapped, or (a distributed checkpoint) not read."""
    path = Path(path)
    if not (path.is_file() and path.suffix == ".ckpt" or is_distributed_checkpoint(path)):
        return {}
    hp = read_checkpoint(path, mmap=True).get("datamodule_hyper_parameters")
    return dict(hp) if isinstance(hp, dict) else {}


# loss options that were module arguments before objectives existed, by the class that took them
LEGACY_OBJECTIVES = {
    "muco.train.module.MuCoModule": ("muco.objectives.PretrainObjective", ("symmetric_loss", "mask_same_text")),
    "muco.train.finetune_module.FinetuneModule": (
        "muco.objectives.FinetuneObjective", ("loss", "hard_negatives", "released_placeholder", "mask_same_text")),
}


def with_objective(module_class: str, hparams: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The module class and hyper-parameters to rebuild a checkpoint with. A checkpoint written before
    objectives existed (loss options as module arguments; fine-tuning as ``FinetuneModule``) becomes
    ``MuCoModule(objective=...)`` with the same options; its ``init_from`` was only needed to start that run
    (its trained weights are in the checkpoint), except under ``merge_adapter_first``."""
    legacy = LEGACY_OBJECTIVES.get(module_class)
    if "objective" in hparams or legacy is None:
        return module_class, hparams
    objective, names = legacy
    hparams = dict(hparams)
    init_args = {k: hparams.pop(k) for k in names if k in hparams}
    hparams.pop("symmetric_loss", None)  # fine-tuning never used it
    if not hparams.get("merge_adapter_first"):
        hparams["init_from"] = None
    hparams["objective"] = {"class_path": objective, "init_args": init_args}
    return "muco.train.module.MuCoModule", hparams


def load_module(path: str | Path, map_location: str | torch.device = "cpu") -> LightningModule:
    """The module class recorded in the checkpoint, rebuilt from its hyper-parameters; frozen weights left out
    of the checkpoint come back from the backbone config (local weights or the seeded preset)."""
    ckpt = read_checkpoint(path)
    # LightningCLI adds `_class_path`/`_instantiator` bookkeeping to the saved hyper-parameters
    hparams = {k: v for k, v in ckpt["hyper_parameters"].items() if not k.startswith("_")}
    dotted, hparams = with_objective(ckpt.get("muco_module_class", "muco.train.module.MuCoModule"), hparams)
    module_name, _, cls_name = dotted.rpartition(".")
    cls = getattr(importlib.import_module(module_name), cls_name)
    module = cls(**hparams)
    missing, unexpected = module.load_state_dict(ckpt["state_dict"], strict=False)
    if unexpected:
        raise ValueError(f"{path}: checkpoint keys the module does not have: {unexpected[:5]}")
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    lost = sorted(trainable & set(missing))
    if lost:
        raise ValueError(f"{path}: trained parameters missing from the checkpoint: {lost[:5]}")
    return module.to(map_location).eval()


def load_encoder(path: str | Path, **kwargs: Any) -> MuCoEncoder:
    """Load an encoder from whatever ``path`` is; ``kwargs`` go to the loader (``device``, ``image_policy``,
    ``dtype``, ``autocast_dtype``, ...).

    Supported: an exported Hugging Face-format directory (``config.json`` + weights, as ``muco export`` writes;
    :meth:`MuCoEncoder.from_pretrained`) and a Lightning checkpoint of a muco training run (``.ckpt``), whose
    image policy defaults to the module's ``eval_image_policy``.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no model at {p}")
    if p.is_dir() and (p / "config.json").is_file():
        return MuCoEncoder.from_pretrained(p, **kwargs)
    if p.suffix == ".ckpt" or is_distributed_checkpoint(p):
        return _encoder_from_checkpoint(p, **kwargs)
    raise ValueError(
        f"cannot load an encoder from {p}: expected an exported model directory (config.json + "
        "model.safetensors + tokenizer files, as written by `muco export`)"
    )


def _encoder_from_checkpoint(
    path: Path,
    image_policy: ImagePolicy | str | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    autocast_dtype: str | torch.dtype | None = None,
) -> MuCoEncoder:
    module = load_module(path)
    if dtype is not None:
        module.to(as_dtype(dtype))
    policy = as_policy(image_policy, ImagePolicy.preset(getattr(module, "eval_image_policy", "eval")))
    return MuCoEncoder(module.tokenizer, module.embedder, policy, device, autocast_dtype)
