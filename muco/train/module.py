"""MuCoModule: the multi-turn contrastive LightningModule (METHOD.md §7, §11)."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningModule

from muco.losses.pretrain import pretrain_loss
from muco.losses.temperature import Temperature
from muco.model.backbone import BackboneConfig, build_backbone
from muco.model.embedder import Embedder
from muco.model.tokenizer import SpecialTokenIds, build_tokenizer
from muco.train.optim import OptimConfig, build_optimizer
from muco.train.sharding import fully_shard_backbone


def batch_counts(batch: dict[str, Any]) -> dict[str, int]:
    """Images, pairs and tokens of a batch, for throughput logging."""
    q, t = batch["query"], batch["target"]
    grid = q.get("image_grid_thw")
    return {
        "images": 0 if grid is None else int(grid.shape[0]),
        "samples": len(batch["keys"]),
        "pairs": int(batch["num_turns"].sum()),
        "tokens": int(q["attention_mask"].sum() + t["attention_mask"].sum()),
    }


class MuCoModule(LightningModule):
    """Backbone + `<|emb|>` pooling + multi-turn InfoNCE with logit masking.

    Args:
        tokenizer: ``tiny`` | ``qwen-offline`` | a local Qwen2-VL directory (shared with the DataModule).
        backbone: where the Qwen2-VL weights come from, adapter, checkpointing.
        temperature: τ of the InfoNCE (0.02, fixed, as in paper and released code).
        learnable_temperature: learn log τ instead (off by default).
        symmetric_loss: add the target→query term (off, as in the released code).
        mask_same_text: also mask in-batch targets whose text equals the row's positive (identical answers of
            different images are false negatives; off by default, as in the paper).
        optim: AdamW and the learning-rate schedule.
        save_frozen_weights: also store frozen weights in checkpoints; they are rebuilt from ``backbone``
            otherwise, which keeps a LoRA checkpoint of a 7B model small.
        eval_image_policy: resolution preset for MMEB-format evaluation (in `fit` and of this checkpoint).
        val_tasks: an MMEB-format task list (YAML) run at the end of every validation epoch, logged under
            ``val/<task>/precision@1`` and ``val/overall``; ``val_task_limit`` queries per task.
    """

    def __init__(
        self,
        tokenizer: str = "tiny",
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
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.backbone_cfg = BackboneConfig.coerce(backbone)
        self.optim_cfg = OptimConfig.coerce(optim)
        self.tokenizer = build_tokenizer(tokenizer)
        self.token_ids = SpecialTokenIds.from_tokenizer(self.tokenizer)
        self.embedder = Embedder(self.configure_backbone(), self.token_ids.emb)
        self.temperature = Temperature(temperature, learnable=learnable_temperature)
        self.symmetric_loss = symmetric_loss
        self.mask_same_text = mask_same_text
        self.save_frozen_weights = save_frozen_weights
        # frozen weights may be left out of checkpoints (rebuilt from the backbone config on load)
        self.strict_loading = save_frozen_weights
        self.eval_image_policy = eval_image_policy
        self.val_tasks, self.val_task_limit, self.eval_batch_size = val_tasks, val_task_limit, eval_batch_size
        self._sharded = False
        self._skipped: dict[str, int] = {}

    # ---------------------------------------------------------------- model
    def configure_backbone(self) -> torch.nn.Module:
        """The backbone at construction (a hook: fine-tuning may start from a merged pretrained adapter)."""
        return build_backbone(self.backbone_cfg, self.tokenizer)

    def batch_counts(self, batch: dict[str, Any]) -> dict[str, int]:
        """Images, pairs and tokens of a batch for throughput logging (a hook for other batch layouts)."""
        return batch_counts(batch)

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
        out = pretrain_loss(q.emb, t.emb, gid, tau=self.temperature(), symmetric=self.symmetric_loss,
                            positive_text_id=text_ids, mask_same_text=self.mask_same_text)
        bs = len(keys)
        self.log(f"{stage}/loss", out.loss, prog_bar=True, batch_size=bs, sync_dist=stage != "train")
        self.log_dict(
            {
                f"{stage}/pos_sim": out.pos_sim,
                f"{stage}/hardest_neg_sim": out.hardest_neg_sim,
                f"{stage}/masked_frac": out.masked_frac,
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
        if not stats:
            return
        # each worker reports its cumulative count; keep the latest per worker and log the sum
        self._skipped[str(stats["worker"])] = int(stats["skipped"])
        self.log("train/skipped_samples", float(sum(self._skipped.values())), batch_size=1)

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

