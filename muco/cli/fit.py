"""`muco fit` / `muco validate`: LightningCLI with muco's run directory, resume and cluster defaults."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any


def register_resolvers() -> None:
    """`${mul:a,b}` for configs (e.g. FSDP's data_parallel_size = devices x num_nodes)."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("mul"):
        with warnings.catch_warnings():  # omegaconf 2.4 deprecates the name, not the behaviour
            warnings.simplefilter("ignore")
            OmegaConf.register_new_resolver("mul", lambda a, b: int(a) * int(b))


def show_muco_logs() -> None:
    """Print muco's INFO lines (data split per rank, mined negatives found, init_from) like Lightning's own;
    leaves logging alone when the caller configured a handler already."""
    log = logging.getLogger("muco")
    if log.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("[muco] %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)


TENSORBOARD = "lightning.pytorch.loggers.TensorBoardLogger"


def config_files(argv: Sequence[str]) -> list[str]:
    """The ``--config`` files of a command line, in order (``--config F`` and ``--config=F``)."""
    files = []
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            files.append(argv[i + 1])
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
    return files


def arrange_run_dir(cfg: Any, argv_configs: Sequence[str] = ()) -> str:
    """Point the config's TensorBoard logger(s) at the run directory, ``trainer.default_root_dir`` (by default
    ``runs/<name of the first --config>``), so the events, ``config.yaml`` and ``checkpoints/`` of every
    restart land in that one directory; a config without a logger gets a TensorBoard logger there. TensorBoard's
    placeholder ``hp_metric`` (-1) is off: muco logs its own metrics. ``argv_configs``: the command line's
    ``--config`` files, for when the parsed config has lost their list (the ``omegaconf+`` mode drops it when a
    config holds a ``${...}``, as ``configs/strategy/fsdp.yaml`` does)."""
    from jsonargparse import Namespace

    from muco.train.run_dir import default_run_dir

    run_dir = cfg.get("trainer.default_root_dir")
    if not run_dir:
        configs = [str(getattr(c, "relative", c)) for c in (cfg.get("config") or []) if c is not None]
        configs = configs or list(argv_configs)
        if not configs:
            raise ValueError("trainer.default_root_dir is not set: it is the run directory (checkpoints, "
                             "TensorBoard, config); pass --trainer.default_root_dir runs/<name>")
        run_dir = default_run_dir(configs)
        cfg["trainer.default_root_dir"] = run_dir
    run_dir = str(run_dir)
    here = Namespace(save_dir=run_dir, name="", version="", default_hp_metric=False)
    logger = cfg.get("trainer.logger")
    if logger is None or logger is True:
        cfg["trainer.logger"] = Namespace(class_path=TENSORBOARD, init_args=here)
        return run_dir
    for one in logger if isinstance(logger, list) else [logger]:
        if isinstance(one, Namespace) and str(one.get("class_path", "")).endswith("TensorBoardLogger"):
            one["init_args"] = Namespace(**{**vars(one.get("init_args") or Namespace()), **vars(here)})
    return run_dir


def resume_path(run_dir: str, ckpt_path: str | None) -> str | None:
    """``fit``'s checkpoint: :func:`muco.train.run_dir.resolve_resume`, announced on rank 0 in one line that
    names the run directory and whether the run resumes (from which checkpoint) or starts fresh."""
    from lightning.pytorch.utilities import rank_zero_only

    from muco.train.run_dir import resolve_resume

    path = resolve_resume(run_dir, ckpt_path)
    if path is None:
        how = "starting fresh"
    elif path == "hpc":
        how = "resuming from its newest hpc_ckpt_*.ckpt"
    else:
        newest = " (its newest checkpoint)" if ckpt_path in (None, "last") else ""
        how = f"resuming from {os.path.abspath(path)}{newest}"
    if getattr(rank_zero_only, "rank", 0) == 0:
        logging.getLogger("muco").info("run directory: %s (checkpoints/, TensorBoard events, skipped.jsonl); %s",
                                       os.path.abspath(run_dir), how)
    return path


def build_cli(argv: Sequence[str] | None, run: bool = True):
    """LightningCLI on `argv` (None: the process's own command line); `run=False` parses and instantiates
    without a subcommand, for callers that drive the trainer themselves (the demo)."""
    import jsonargparse
    from lightning.pytorch import LightningDataModule
    from lightning.pytorch.cli import LightningCLI

    from muco.train.checkpoint_io import AtomicCheckpointIO
    from muco.train.module import MuCoModule
    from muco.train.preemption import PreemptionCheckpoint
    from muco.train.progress import StepProgressBar
    from muco.train.rng_state import RNGState
    from muco.train.run_dir import check_writable, resolve_resume

    class MuCoCLI(LightningCLI):
        """One tokenizer for model and data without an argument link: the DataModule takes the model's
        tokenizer in setup (a link would copy an unresolved ``${...}`` value into ``data``).

        Every run lives in its run directory, ``trainer.default_root_dir`` (:mod:`muco.train.run_dir`): the
        TensorBoard logger writes there directly, checkpoints go to ``checkpoints/``, and ``fit`` resumes from
        the newest checkpoint found there. Checkpoints are written atomically, carry every rank's RNG and data
        position, and SIGUSR1 (SLURM preemption) saves one at a step boundary and requeues."""

        def _parse_ckpt_path(self) -> None:
            # LightningCLI would torch.load an explicit --ckpt_path here and replace the model's settings with
            # the checkpoint's; muco keeps the command's settings (a resume refuses different weight settings,
            # naming them) and only checks the path early; `before_fit` resolves it in the run directory
            sub = self.config.get("subcommand")
            ckpt_path = self.config[sub].get("ckpt_path") if sub else None
            if ckpt_path not in (None, "last", "hpc"):
                resolve_resume(".", str(ckpt_path))

        def before_instantiate_classes(self) -> None:
            cfg = self.config[self.subcommand] if self.subcommand else self.config
            arrange_run_dir(cfg, config_files(sys.argv[1:] if argv is None else argv))

        def instantiate_trainer(self, **kwargs: Any):
            from lightning.fabric.plugins import CheckpointIO
            from lightning.fabric.plugins.environments import ClusterEnvironment, SLURMEnvironment

            plugins = self._get(self.config_init, "trainer", default={}).get("plugins") or []
            plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
            if not any(isinstance(p, CheckpointIO) for p in plugins):
                plugins.append(AtomicCheckpointIO())
            if SLURMEnvironment.detect() and not any(isinstance(p, ClusterEnvironment) for p in plugins):
                # PreemptionCheckpoint handles SIGUSR1; Lightning's auto-requeue would also ignore SIGTERM
                plugins.append(SLURMEnvironment(auto_requeue=False))
            return super().instantiate_trainer(plugins=plugins, callbacks=self._with_progress_bar(), **kwargs)

        def _with_progress_bar(self) -> list:
            """The config's callbacks plus muco's progress bar (step N/max_steps, not Lightning's "Epoch 0/-2"),
            unless the config brings its own bar or turns the bar off; the other defaults (trainer_defaults)
            are added by LightningCLI after these."""
            from lightning.pytorch.callbacks import ProgressBar

            trainer = self._get(self.config_init, "trainer", default={})
            callbacks = trainer.get("callbacks") or []
            callbacks = list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
            if trainer.get("enable_progress_bar") is not False and not any(
                    isinstance(c, ProgressBar) for c in callbacks):
                callbacks.append(StepProgressBar())
            return callbacks

        def before_fit(self) -> None:
            from lightning.pytorch.callbacks import ModelCheckpoint

            cfg = self.config_init[self.subcommand]
            check_writable(self.trainer.default_root_dir, "the run directory")
            for cb in self.trainer.checkpoint_callbacks:
                if isinstance(cb, ModelCheckpoint) and cb.dirpath is not None:
                    check_writable(cb.dirpath, "the checkpoint directory")
            cfg.ckpt_path = resume_path(self.trainer.default_root_dir, cfg.get("ckpt_path"))

    # the DataModule checkpoints its exact position itself; Lightning cannot see that and warns on every resume
    warnings.filterwarnings("ignore", message=r"You're resuming from a checkpoint that ended before the epoch")
    # `omegaconf+` resolves ${...} after overrides are merged; an absolute ${a.b} needs this (root has a `fit.` prefix)
    jsonargparse.set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
    register_resolvers()
    show_muco_logs()
    return MuCoCLI(
        MuCoModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_kwargs={"parser_mode": "omegaconf+"},
        auto_configure_optimizers=False,  # the module builds its optimizer from model.optim: no --optimizer
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"callbacks": [PreemptionCheckpoint(), RNGState()]},
        args=None if argv is None else list(argv),
        run=run,
    )


