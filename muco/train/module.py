"""MuCoModule: the one LightningModule of every training stage (docs/method.md §7, §8, §11).

It owns the model (Qwen2-VL backbone + ``<|emb|>`` pooling), τ, the optimizer and schedule, checkpoints,
validation tasks and logging; the objective (:mod:`muco.objectives`) owns what a step computes from a batch.
Pretraining and fine-tuning are two configs of this class, not two classes.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule

from muco.components import plain
from muco.data.datamodule import adopt_legacy_state
from muco.inputs.tokenizer import SpecialTokenIds, build_tokenizer
from muco.losses.temperature import Temperature, TemperatureSchedule
from muco.model.backbone import BackboneConfig, build_backbone
from muco.model.embedder import Embedder
from muco.model.sharding import fully_shard_backbone
from muco.objectives.base import Objective, build_objective
from muco.objectives.pretrain import PretrainObjective
from muco.train.grad_cache import grad_cache_step
from muco.train.init_from import check_compatible, load_continue, merged_backbone, read_checkpoint, resume_mismatches
from muco.train.optim import OptimConfig, build_optimizer


def coerce_schedule(value: TemperatureSchedule | dict | None) -> TemperatureSchedule | None:
    """``model.temperature_schedule`` (a dict in YAML) as a :class:`TemperatureSchedule`."""
    if value is None or isinstance(value, TemperatureSchedule):
        return value
    if not isinstance(value, dict):
        raise TypeError(f"model.temperature_schedule must be a mapping, got {value!r}")
    known = {"mode", "tau_start", "tau_end", "total_steps"}
    if set(value) - known:
        raise ValueError(f"model.temperature_schedule: unknown keys {sorted(set(value) - known)}; "
                         f"expected {sorted(known)}")
    try:
        return TemperatureSchedule(**value)
    except ValueError as e:
        raise ValueError(f"model.temperature_schedule: {e}") from e


def resolve_tokenizer(tokenizer: str | None, backbone: BackboneConfig) -> str:
    """``model.tokenizer``, where None means the tokenizer of ``backbone.pretrained`` (``tiny`` without weights)."""
    if tokenizer is not None:
        return tokenizer
    if backbone.pretrained is None:
        return "tiny"
    if not Path(backbone.pretrained).is_dir():
        raise FileNotFoundError(
            f"model.backbone.pretrained={backbone.pretrained} is not a directory (the tokenizer comes from it too); "
            "download Qwen2-VL weights and set model.init_args.backbone.pretrained to their local directory")
    return backbone.pretrained


class MuCoModule(LightningModule):
    """Backbone + `<|emb|>` pooling + an objective.

    Args:
        tokenizer: ``tiny`` | ``qwen-offline`` | a local Qwen2-VL directory. None (default): the directory of
            ``backbone.pretrained``, or ``tiny`` for a random-init preset. The DataModule uses this one.
        backbone: where the Qwen2-VL weights come from, adapter, checkpointing.
        objective: what a step computes (default :class:`~muco.objectives.PretrainObjective`, the multi-turn
            InfoNCE of pretraining; :class:`~muco.objectives.FinetuneObjective` for fine-tuning pairs).
        temperature: τ of the InfoNCE (0.02, fixed, as in paper and released code).
        learnable_temperature: learn log τ instead (off by default).
        temperature_schedule: anneal τ over optimizer steps instead, e.g. ``{mode: cosine, tau_start: 0.05,
            tau_end: 0.02, total_steps: 1000}`` (``mode``: constant | linear | cosine; ``tau_end`` after
            ``total_steps``; see :class:`~muco.losses.temperature.TemperatureSchedule`). Replaces
            ``temperature``; cannot be combined with ``learnable_temperature``. Steps are the trainer's
            ``global_step``, so a resumed run continues the schedule. The current τ is logged as
            ``train/temperature``.
        optim: AdamW and the learning-rate schedule.
        save_frozen_weights: also store frozen weights in checkpoints; they are rebuilt from ``backbone``
            otherwise, which keeps a LoRA checkpoint of a 7B model small.
        eval_image_policy: resolution preset for MMEB-format evaluation (in `fit` and of this checkpoint).
        val_tasks: an MMEB-format task list (YAML) run at the end of every validation epoch, logged under
            ``val/<task>/precision@1`` and ``val/overall``; ``val_task_limit`` queries per task.
        val_pictures: with ``val_tasks`` and a TensorBoard logger, the first N queries of each task are shown at
            every validation: a projector of their embeddings (image thumbnails, task and label), a grid of
            retrieval examples (top-5, hit or miss) and histograms of positive and hardest-negative
            similarities (:mod:`muco.eval.pictures`); drawn from the scores the metrics use. 0: none.
        init_from: a muco ``.ckpt`` whose trained weights this run starts from, with a fresh optimizer, schedule
            and step count (fine-tuning starts from pretraining, ``muco rounds`` starts round r from round r-1);
            ``model.backbone`` must describe the same model. Use ``--ckpt_path`` instead to resume an
            interrupted run.
        merge_adapter_first: with ``init_from``, merge its adapter into the base and train a fresh adapter
            (``backbone.adapter``); default false: continue training its adapter (released code). See
            :mod:`muco.train.init_from`.
        grad_cache_chunk: GradCache (:mod:`muco.train.grad_cache`): embed each training batch in chunks of this
            many sequences per set, with the gradients of the whole batch's loss; activation memory then
            follows the chunk instead of the batch, for one extra forward without graph. None: off (one
            forward per set). Validation steps run unchunked (no graph is kept there).
    """

    def __init__(
        self,
        tokenizer: str | None = None,
        backbone: BackboneConfig | None = None,
        objective: Objective | None = None,
        temperature: float = 0.02,
        learnable_temperature: bool = False,
        temperature_schedule: dict | None = None,
        optim: OptimConfig | None = None,
        save_frozen_weights: bool = False,
        eval_image_policy: str = "eval",
        val_tasks: str | None = None,
        val_task_limit: int | None = 100,
        val_pictures: int = 16,
        eval_batch_size: int = 32,
        init_from: str | None = None,
        merge_adapter_first: bool = False,
        grad_cache_chunk: int | None = None,
    ) -> None:
        hparams = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__()
        self.objective = PretrainObjective() if objective is None else build_objective(objective)
        # saved as plain values only (the objective as its class_path/init_args), the same from YAML or Python
        self.save_hyperparameters({k: plain(v) for k, v in {**hparams, "objective": self.objective}.items()})
        schedule = coerce_schedule(temperature_schedule)
        if schedule is not None and learnable_temperature:
            raise ValueError("model.learnable_temperature and model.temperature_schedule exclude each other: "
                             "τ is either learned or annealed on a schedule; set one of them")
        if merge_adapter_first and init_from is None:
            raise ValueError("model.merge_adapter_first needs model.init_from (the adapter to merge)")
        self.backbone_cfg = BackboneConfig.coerce(backbone)
        self.optim_cfg = OptimConfig.coerce(optim)
        tokenizer = resolve_tokenizer(tokenizer, self.backbone_cfg)
        self.hparams["tokenizer"] = tokenizer  # checkpoints (and the DataModule) see the tokenizer actually used
        self.tokenizer = build_tokenizer(tokenizer)
        self.token_ids = SpecialTokenIds.from_tokenizer(self.tokenizer)
        init = None
        if init_from is not None:
            init = read_checkpoint(init_from)
            check_compatible(init, init_from, tokenizer, self.backbone_cfg)
        if init is not None and merge_adapter_first:
            backbone_model = merged_backbone(init, init_from, self.backbone_cfg, self.tokenizer)
        else:
            backbone_model = build_backbone(self.backbone_cfg, self.tokenizer)
        self.embedder = Embedder(backbone_model, self.token_ids.emb, self.backbone_cfg.padding_free)
        self.temperature = Temperature(temperature, learnable=learnable_temperature, schedule=schedule)
        self.init_from, self.merge_adapter_first = init_from, merge_adapter_first
        # frozen here but trained in the init checkpoint: not base weights, so they stay in checkpoints
        self._frozen_from_init: set[str] = set()
        if init is not None and not merge_adapter_first:
            self._frozen_from_init = load_continue(self, init, init_from)
        del init  # free the state dict
        self.save_frozen_weights = save_frozen_weights
        # frozen weights may be left out of checkpoints (rebuilt from the backbone config on load)
        self.strict_loading = save_frozen_weights
        self.eval_image_policy = eval_image_policy
        self.val_tasks, self.val_task_limit, self.eval_batch_size = val_tasks, val_task_limit, eval_batch_size
        if val_pictures < 0:
            raise ValueError(f"model.val_pictures must be >= 0 (0: no pictures), got {val_pictures}")
        self.val_pictures = val_pictures
        if grad_cache_chunk is not None and grad_cache_chunk < 1:
            raise ValueError(f"model.grad_cache_chunk must be >= 1 sequences per chunk (or null: off), "
                             f"got {grad_cache_chunk}")
        self.grad_cache_chunk = grad_cache_chunk
        self._sharded = False

    # ---------------------------------------------------------------- model
    def setup(self, stage: str) -> None:
        if stage == "fit" and self.val_tasks is not None:  # fail now, not at the first validation
            from muco.eval.validation import check_val_tasks

            check_val_tasks(self.val_tasks, self.val_task_limit)

    def configure_model(self) -> None:
        if getattr(self, "device_mesh", None) is None or self._sharded:
            return  # DDP / single device: nothing to shard
        fully_shard_backbone(self.embedder.backbone, self.device_mesh)
        self._sharded = True

    def model_step(self, batch: dict[str, Any], stage: str) -> torch.Tensor:
        """One step of the objective, shared by training and validation.

        With GradCache a training step also runs its backward here (the loss it returns is detached).
        """
        if stage == "train" and self.grad_cache_chunk:
            out = grad_cache_step(self.embedder, self.objective, batch, self.temperature(), self.global_rank,
                                  self.grad_cache_chunk, loss_scale=self._trainer_loss_scale(),
                                  sync_last=self._gradient_sync_switch())
        else:
            out = self.objective.step(self.embedder, batch, self.temperature(), self.global_rank)
        bs, sync = len(batch["keys"]), stage != "train"
        self.log(f"{stage}/loss", out.loss, prog_bar=True, batch_size=bs, sync_dist=sync)
        self.log_dict({f"{stage}/{k}": v for k, v in out.metrics.items()}, batch_size=bs, sync_dist=sync)
        return out.loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        self.temperature.set_step(self.global_step)
        if self.grad_cache_chunk and batch_idx % self.trainer.accumulate_grad_batches == 0:
            self.optimizers().zero_grad(set_to_none=True)  # Lightning's zero_grad would come after the backward
        loss = self.model_step(batch, "train")
        if self.grad_cache_chunk:
            # the gradients are in place; Lightning's backward of this exact zero over every trained weight
            # is what runs the data-parallel reduction, once per step (DDP's hooks fire on it)
            loss = loss + self._zero_over_weights()
        self.log("train/temperature", float(self.temperature()), batch_size=len(batch["keys"]))
        self.log("train/lr", self.lr_schedulers().get_last_lr()[0], batch_size=len(batch["keys"]))
        self._log_data_stats(batch)
        counts = self.objective.counts(batch)
        if self.embedder.padding_free:  # the language model computed the real tokens only
            counts = replace(counts, positions=counts.tokens)
        return {"loss": loss, "counts": counts}

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: torch.optim.Optimizer) -> None:
        if not self.grad_cache_chunk:  # GradCache zeroes before its backward, in training_step
            super().optimizer_zero_grad(epoch, batch_idx, optimizer)

    def _trainer_loss_scale(self) -> float:
        """What Lightning applies to a returned loss before its backward: 1/accumulation and an AMP scale."""
        scale = 1.0 / self.trainer.accumulate_grad_batches
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is not None:
            scale *= float(scaler.get_scale())
        return scale

    def _gradient_sync_switch(self) -> Any:
        """FSDP2: reduce-scatter in the last chunk's backward only; None when not sharded (DDP reduces on the
        returned loss's backward)."""
        if not self._sharded:
            return None
        return self.embedder.backbone.set_requires_gradient_sync  # fully_shard'ed: an FSDPModule

    def _zero_over_weights(self) -> torch.Tensor:
        """An exact 0 that depends on every trained weight (one element of each, local shard for DTensors)."""
        zero = torch.zeros((), device=self.device)
        for p in self.parameters():
            if p.requires_grad:
                local = p.to_local() if hasattr(p, "to_local") else p
                zero = zero + (local.reshape(-1)[:1].float() * 0).sum()
        return zero

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self.model_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        if self.val_tasks is None or self.trainer.sanity_checking:
            return
        from muco.eval.validation import score_val_tasks, val_metrics

        # every rank runs the same tasks: under FSDP2 each forward needs all ranks anyway
        scored = score_val_tasks(self.tokenizer, self.embedder.backbone, self.val_tasks, self.eval_image_policy,
                                 self.val_task_limit, self.eval_batch_size)
        self.log_dict(val_metrics(scored, self.val_tasks, self.val_task_limit), batch_size=1)
        writer = self._tensorboard()
        if self.val_pictures and writer is not None and self.trainer.is_global_zero:
            from muco.eval.pictures import log_pictures

            log_pictures(writer, scored, self.global_step, self.val_pictures)

    def _tensorboard(self) -> Any:
        """The SummaryWriter of the run's TensorBoard logger, if it has one."""
        from lightning.pytorch.loggers import TensorBoardLogger

        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger):
                return logger.experiment
        return None

    def _log_data_stats(self, batch: dict[str, Any]) -> None:
        stats = batch.get("stats")
        total = getattr(stats, "skipped_total", None)
        if total is not None:  # counted by the DataModule over the batches training took
            self.log("train/skipped_samples", float(total), batch_size=1)

    def on_train_epoch_end(self) -> None:
        # skips after a worker's last batch of the epoch reach no batch: read the DataModule's count
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        if datamodule is not None and hasattr(datamodule, "skipped_total"):
            self.log("train/skipped_samples_total", float(datamodule.skipped_total()), batch_size=1)

    def on_before_optimizer_step(self, optimizer) -> None:
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if grads:
            # before clipping; DTensor grads (FSDP2) reduce over shards inside get_total_norm
            norm = torch.nn.utils.get_total_norm(grads)
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
            self.log("train/grad_norm", norm, batch_size=1)

    def configure_optimizers(self) -> dict:
        total = int(self.trainer.estimated_stepping_batches) if self.trainer is not None else 1
        return build_optimizer(self, self.optim_cfg, max(1, total))

    # ---------------------------------------------------------- checkpoints
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        adopt_legacy_state(checkpoint)  # a run started before record kinds resumes at its exact data position
        # frozen weights are not in the checkpoint: they come from this run's backbone settings, which must
        # therefore be the checkpoint's (a changed seed or base model would silently train a mixed model)
        diff = resume_mismatches(checkpoint.get("hyper_parameters", {}), dict(self.hparams))
        if diff:
            raise ValueError(f"this checkpoint was trained with other weight settings than this run ({'; '.join(diff)}"
                             "); resume with the checkpoint's settings, or start a new run directory "
                             "(--trainer.default_root_dir) and use model.init_from to start from its weights")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # lets `muco eval` / `muco export` rebuild the module from a checkpoint alone
        checkpoint["muco_module_class"] = f"{type(self).__module__}.{type(self).__qualname__}"
        checkpoint["muco_init_from"] = self.init_from
        if not (self.save_frozen_weights or self._sharded):
            trainable = {n for n, p in self.named_parameters() if p.requires_grad}
            frozen = {n for n, _ in self.named_parameters()} - trainable
            sd = checkpoint["state_dict"]
            for name in frozen:
                sd.pop(name, None)
        if self.merge_adapter_first:
            return  # the merged base weights are rebuilt from init_from on load
        if not self._sharded and not self.save_frozen_weights:
            # frozen here but trained in the init checkpoint: not base weights, so they stay in the checkpoint
            params = dict(self.named_parameters())
            for name in self._frozen_from_init:
                checkpoint["state_dict"][name] = params[name].detach().clone()
        # every trained weight is in this checkpoint: rebuilding it (eval, export) needs no init checkpoint
        checkpoint["hyper_parameters"]["init_from"] = None
