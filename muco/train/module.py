"""MuCoModule: the multi-turn contrastive LightningModule (docs/method.md §7, §11)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule

from muco.losses.pretrain import pretrain_loss
from muco.losses.temperature import Temperature, TemperatureSchedule
from muco.model.backbone import BackboneConfig, build_backbone
from muco.model.embedder import Embedder
from muco.model.pooling import PooledEmbeddings
from muco.model.sharding import fully_shard_backbone
from muco.model.tokenizer import SpecialTokenIds, build_tokenizer
from muco.train.init_from import check_compatible, load_continue, read_checkpoint, resume_mismatches
from muco.train.optim import OptimConfig, build_optimizer


def batch_counts(batch: dict[str, Any]) -> dict[str, int]:
    """Images, pairs and tokens of a batch, for throughput logging (mined negatives count as tokens only)."""
    q, t = batch["query"], batch["target"]
    grid = q.get("image_grid_thw")
    tokens = q["attention_mask"].sum() + t["attention_mask"].sum()
    if "negative" in batch:
        tokens = tokens + batch["negative"]["attention_mask"].sum()
    return {
        "images": 0 if grid is None else int(grid.shape[0]),
        "samples": len(batch["keys"]),
        "pairs": int(batch["num_turns"].sum()),
        "tokens": int(tokens),
    }


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


def own_turn_negative_sim(q: PooledEmbeddings, neg: PooledEmbeddings, num_turns: torch.Tensor,
                          valid: torch.Tensor, per_turn: int) -> torch.Tensor | None:
    """Mean cosine of each query row with the negatives of its own sample and turn (valid ones only); None
    when no negative is valid. Negative sequences are sample-major, ``per_turn`` per sample."""
    if not bool(valid.any()):
        return None
    sample = neg.sample_id // per_turn
    starts = torch.cumsum(num_turns, 0) - num_turns
    rows = starts.to(sample.device)[sample] + neg.turn_id
    sims = (neg.emb.detach() * q.emb.detach()[rows]).sum(-1)
    return sims[valid.to(sims.device)].mean()


class MuCoModule(LightningModule):
    """Backbone + `<|emb|>` pooling + multi-turn InfoNCE with logit masking.

    Args:
        tokenizer: ``tiny`` | ``qwen-offline`` | a local Qwen2-VL directory. None (default): the directory of
            ``backbone.pretrained``, or ``tiny`` for a random-init preset. The DataModule uses this one.
        backbone: where the Qwen2-VL weights come from, adapter, checkpointing.
        temperature: τ of the InfoNCE (0.02, fixed, as in paper and released code).
        learnable_temperature: learn log τ instead (off by default).
        temperature_schedule: anneal τ over optimizer steps instead, e.g. ``{mode: cosine, tau_start: 0.05,
            tau_end: 0.02, total_steps: 1000}`` (``mode``: constant | linear | cosine; ``tau_end`` after
            ``total_steps``; see :class:`~muco.losses.temperature.TemperatureSchedule`). Replaces
            ``temperature``; cannot be combined with ``learnable_temperature``. Steps are the trainer's
            ``global_step``, so a resumed run continues the schedule. The current τ is logged as
            ``train/temperature``.
        symmetric_loss: add the target→query term (off, as in the released code).
        mask_same_text: also mask in-batch targets whose text equals the row's positive (identical answers of
            different images are false negatives; off by default, as in the paper).
        optim: AdamW and the learning-rate schedule.
        save_frozen_weights: also store frozen weights in checkpoints; they are rebuilt from ``backbone``
            otherwise, which keeps a LoRA checkpoint of a 7B model small.
        eval_image_policy: resolution preset for MMEB-format evaluation (in `fit` and of this checkpoint).
        val_tasks: an MMEB-format task list (YAML) run at the end of every validation epoch, logged under
            ``val/<task>/precision@1`` and ``val/overall``; ``val_task_limit`` queries per task.
        init_from: a muco ``.ckpt`` whose trained weights this run starts from, with a fresh optimizer, schedule
            and step count (``muco rounds`` starts round r from round r-1 this way); ``model.backbone`` must
            describe the same model. Use ``--ckpt_path`` instead to resume an interrupted run.

    Batches with mined negatives (``data.negatives``: a ``negative`` entry of packed K-turn negative sequences)
    embed them with the same encoder and append them, gathered from all ranks, as extra columns of every query
    row; missing negatives and negatives whose text equals a row's positive are masked. Logged:
    ``train/neg_sim`` (mean cosine of each query row with its own turn's valid negatives) and
    ``train/neg_valid_frac``.
    """

    # hyper-parameters a checkpoint does not need to be rebuilt (its own state dict holds every trained weight)
    REBUILD_WITHOUT: tuple[str, ...] = ("init_from",)

    def __init__(
        self,
        tokenizer: str | None = None,
        backbone: BackboneConfig | None = None,
        temperature: float = 0.02,
        learnable_temperature: bool = False,
        symmetric_loss: bool = False,
        mask_same_text: bool = False,
        optim: OptimConfig | None = None,
        save_frozen_weights: bool = False,
        eval_image_policy: str = "eval",
        val_tasks: str | None = None,
        val_task_limit: int | None = 100,
        eval_batch_size: int = 32,
        temperature_schedule: dict | None = None,
        init_from: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        schedule = coerce_schedule(temperature_schedule)
        if schedule is not None and learnable_temperature:
            raise ValueError("model.learnable_temperature and model.temperature_schedule exclude each other: "
                             "τ is either learned or annealed on a schedule; set one of them")
        self.backbone_cfg = BackboneConfig.coerce(backbone)
        self.optim_cfg = OptimConfig.coerce(optim)
        tokenizer = resolve_tokenizer(tokenizer, self.backbone_cfg)
        self.hparams["tokenizer"] = tokenizer  # checkpoints (and the DataModule) see the tokenizer actually used
        self.tokenizer = build_tokenizer(tokenizer)
        self.token_ids = SpecialTokenIds.from_tokenizer(self.tokenizer)
        self.embedder = Embedder(self.configure_backbone(), self.token_ids.emb)
        self.temperature = Temperature(temperature, learnable=learnable_temperature, schedule=schedule)
        if init_from is not None:
            ckpt = read_checkpoint(init_from)
            check_compatible(ckpt, init_from, tokenizer, self.backbone_cfg)
            load_continue(self, ckpt, init_from)
        self.symmetric_loss = symmetric_loss
        self.mask_same_text = mask_same_text
        self.save_frozen_weights = save_frozen_weights
        # frozen weights may be left out of checkpoints (rebuilt from the backbone config on load)
        self.strict_loading = save_frozen_weights
        self.eval_image_policy = eval_image_policy
        self.val_tasks, self.val_task_limit, self.eval_batch_size = val_tasks, val_task_limit, eval_batch_size
        self._sharded = False

    # ---------------------------------------------------------------- model
    def configure_backbone(self) -> torch.nn.Module:
        """The backbone at construction (a hook: fine-tuning may start from a merged pretrained adapter)."""
        return build_backbone(self.backbone_cfg, self.tokenizer)

    def batch_counts(self, batch: dict[str, Any]) -> dict[str, int]:
        """Images, pairs and tokens of a batch for throughput logging (a hook for other batch layouts)."""
        return batch_counts(batch)

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
        """One contrastive round, shared by training and validation."""
        keys, num_turns = batch["keys"], batch["num_turns"]
        q = self.embedder(batch["query"], num_turns, keys)
        t = self.embedder(batch["target"], num_turns, keys)
        # global image ids: ranks hold equal batch sizes (the DataModule drops partial batches)
        gid = self.global_rank * len(keys) + q.sample_id
        text_ids = batch.get("target_text_id") if self.mask_same_text else None
        kw: dict[str, Any] = {}
        neg_metrics: dict[str, torch.Tensor] = {}
        if "negative" in batch:
            # every rank has B*per_turn*K negative rows (missing ones are masked placeholders): equal gathers
            per_turn = batch["negative_num_turns"].numel() // max(1, len(keys))
            neg = self.embedder(batch["negative"], batch["negative_num_turns"],
                                [k for k in keys for _ in range(per_turn)])
            valid = batch["negative_valid"]
            kw = dict(negatives=neg.emb, negative_valid=valid, negative_text_id=batch["negative_text_id"])
            text_ids = batch["target_text_id"]  # also masks a negative whose text equals a row's positive
            neg_metrics[f"{stage}/neg_valid_frac"] = valid.float().mean()
            sim = own_turn_negative_sim(q, neg, num_turns, valid, per_turn)
            if sim is not None:
                neg_metrics[f"{stage}/neg_sim"] = sim
        out = pretrain_loss(q.emb, t.emb, gid, tau=self.temperature(), symmetric=self.symmetric_loss,
                            positive_text_id=text_ids, mask_same_text=self.mask_same_text, **kw)
        bs = len(keys)
        self.log(f"{stage}/loss", out.loss, prog_bar=True, batch_size=bs, sync_dist=stage != "train")
        self.log_dict(
            {
                f"{stage}/pos_sim": out.pos_sim,
                f"{stage}/hardest_neg_sim": out.hardest_neg_sim,
                f"{stage}/masked_frac": out.masked_frac,
                **neg_metrics,
            },
            batch_size=bs,
            sync_dist=stage != "train",
        )
        return out.loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        self.temperature.set_step(self.global_step)
        loss = self.model_step(batch, "train")
        self.log("train/temperature", float(self.temperature()), batch_size=len(batch["keys"]))
        self.log("train/lr", self.lr_schedulers().get_last_lr()[0], batch_size=len(batch["keys"]))
        self._log_data_stats(batch)
        return {"loss": loss, "counts": self.batch_counts(batch)}

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self.model_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        if self.val_tasks is None or self.trainer.sanity_checking:
            return
        from muco.eval.validation import run_val_tasks

        # every rank runs the same tasks: under FSDP2 each forward needs all ranks anyway
        metrics = run_val_tasks(self.tokenizer, self.embedder.backbone, self.val_tasks, self.eval_image_policy,
                                self.val_task_limit, self.eval_batch_size)
        self.log_dict(metrics, batch_size=1)

    def _log_data_stats(self, batch: dict[str, Any]) -> None:
        stats = batch.get("stats")
        if stats and "skipped_total" in stats:  # counted by the DataModule over the batches training took
            self.log("train/skipped_samples", float(stats["skipped_total"]), batch_size=1)

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
        # frozen weights are not in the checkpoint: they come from this run's backbone settings, which must
        # therefore be the checkpoint's (a changed seed or base model would silently train a mixed model)
        diff = resume_mismatches(checkpoint.get("hyper_parameters", {}), dict(self.hparams))
        if diff:
            raise ValueError(f"this checkpoint was trained with other weight settings than this run ({'; '.join(diff)}"
                             "); resume with the checkpoint's settings, or start a new run directory "
                             "(--trainer.default_root_dir) and use model.init_from to start from its weights")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # lets `muco eval` / `muco export` rebuild the right module class from a checkpoint alone
        checkpoint["muco_module_class"] = f"{type(self).__module__}.{type(self).__qualname__}"
        if self.save_frozen_weights or self._sharded:
            return
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        frozen = {n for n, _ in self.named_parameters()} - trainable
        sd = checkpoint["state_dict"]
        for name in frozen:
            sd.pop(name, None)

