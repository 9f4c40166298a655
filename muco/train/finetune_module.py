"""FinetuneModule: single-pair adaptation by guided in-context reconstruction (docs/method.md §8).

Per step, three forwards of the shared encoder: the query sequences ``TRAIN(q, masked(p))`` and the target
sequences ``TRAIN(p, masked(q))`` (two ``<|emb|>`` each: turn 1 gives q / p, turn 3 gives q' / p'), and the
hard negatives ``BASE(n)`` (one ``<|emb|>``). The loss (``blockwise`` or ``joint_masked``) gathers targets and
negatives from all ranks with gradient. Training starts from a pretraining checkpoint (``init_from``), either
continuing its adapter or merging it first (``merge_adapter_first``, see ``muco.train.init_from``).
"""

from __future__ import annotations

from typing import Any

import torch

from muco.losses.finetune import TERM_NAMES, blockwise_loss, joint_masked_loss
from muco.model.backbone import BackboneConfig
from muco.model.pooling import PooledEmbeddings
from muco.train.init_from import check_compatible, load_continue, merged_backbone, read_checkpoint
from muco.train.module import MuCoModule
from muco.train.optim import OptimConfig

LOSSES = {"blockwise": blockwise_loss, "joint_masked": joint_masked_loss}
__all__ = ["LOSSES", "TERM_NAMES", "FinetuneModule", "split_turns"]


def split_turns(pooled: PooledEmbeddings, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(first, second) embeddings [B, d] of 2-``<|emb|>`` sequences; the pooler has checked the count."""
    first, second = pooled.emb[pooled.turn_id == 0], pooled.emb[pooled.turn_id == 1]
    if first.shape[0] != batch_size or second.shape[0] != batch_size:
        raise ValueError(f"expected {batch_size} sequences with two <|emb|> each, got {first.shape[0]} / "
                         f"{second.shape[0]} first / second embeddings")
    return first, second


class FinetuneModule(MuCoModule):
    """Fine-tuning on pairs (``PairDataModule`` batches).

    Args (besides :class:`MuCoModule`'s; ``symmetric_loss`` is not used by fine-tuning and must stay false):
        loss: ``blockwise`` (released code, default: the sum of the four terms (q,P), (q,P'), (q',P), (q',P'),
            each over one target family plus the hard negatives) or ``joint_masked`` (paper: the mean over the
            4B augmented pairs of one softmax over both target forms, the positive's other form masked).
        hard_negatives: encode each sample's drawn hard negative and append the gathered negatives as extra
            columns to every term (docs/method.md §8.4).
        released_placeholder: a sample without a negative contributes the released code's empty prompt
            ``"\\n"`` as a real (junk) negative column; by default that column is masked.
        init_from: a muco ``.ckpt`` (pretraining run) whose trained weights start the fine-tuning.
        merge_adapter_first: merge the pretrained adapter into the base and train a fresh adapter
            (``backbone.adapter``); default false: continue training the pretrained adapter (released code).
        mask_same_text: also mask in-batch targets and hard negatives whose text equals the row's positive.
        temperature_schedule: τ annealing over optimizer steps, as in :class:`MuCoModule`.
    """

    REBUILD_WITHOUT: tuple[str, ...] = ()  # merge mode rebuilds its frozen base from init_from

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
        loss: str = "blockwise",
        hard_negatives: bool = True,
        released_placeholder: bool = False,
        init_from: str | None = None,
        merge_adapter_first: bool = False,
        temperature_schedule: dict | None = None,
    ) -> None:
        if loss not in LOSSES:
            raise ValueError(f"model.loss={loss!r}; choose one of {sorted(LOSSES)}")
        if symmetric_loss:
            raise ValueError("model.symmetric_loss is a pretraining option; fine-tuning losses are query -> target")
        if merge_adapter_first and init_from is None:
            raise ValueError("model.merge_adapter_first needs model.init_from (the adapter to merge)")
        self._init_ckpt: dict[str, Any] | None = None  # read once, by configure_backbone or below
        # MuCoModule saves every init argument (these included) before it builds the backbone
        super().__init__(tokenizer, backbone, temperature, learnable_temperature, False, mask_same_text, optim,
                         save_frozen_weights, eval_image_policy, val_tasks, val_task_limit, eval_batch_size,
                         temperature_schedule)
        self.loss_name, self.hard_negatives = loss, hard_negatives
        self.released_placeholder = released_placeholder
        self.init_from, self.merge_adapter_first = init_from, merge_adapter_first
        self._frozen_from_init: set[str] = set()
        if init_from is not None and not merge_adapter_first:
            self._frozen_from_init = load_continue(self, self._read_init(), init_from)
        self._init_ckpt = None  # free the state dict

    def _read_init(self) -> dict[str, Any]:
        if self._init_ckpt is None:
            path = self.hparams["init_from"]
            self._init_ckpt = read_checkpoint(path)
            check_compatible(self._init_ckpt, path, self.hparams["tokenizer"], self.backbone_cfg)
        return self._init_ckpt

    def configure_backbone(self) -> torch.nn.Module:
        if self.hparams.get("init_from") and self.hparams.get("merge_adapter_first"):
            return merged_backbone(self._read_init(), self.hparams["init_from"], self.backbone_cfg, self.tokenizer)
        return super().configure_backbone()

    # ---------------------------------------------------------------- step
    def model_step(self, batch: dict[str, Any], stage: str) -> torch.Tensor:
        keys = batch["keys"]
        b = len(keys)
        q1, q2 = split_turns(self.embedder(batch["query"], 2, keys), b)
        p1, p2 = split_turns(self.embedder(batch["target"], 2, keys), b)
        kw: dict[str, Any] = {}
        if self.hard_negatives:
            # always encoded, also when no local sample has one: the gather is a collective on every rank
            kw["negatives"] = self.embedder(batch["negative"], 1, keys).emb
            if not self.released_placeholder:
                kw["negative_valid"] = batch["negative_valid"]
            if self.mask_same_text:
                kw["negative_text_id"] = batch["negative_text_id"]
        if self.mask_same_text:
            kw.update(positive_text_id=batch["target_text_id"], mask_same_text=True)
        out = LOSSES[self.loss_name](q1, q2, p1, p2, tau=self.temperature(), **kw)
        sync = stage != "train"
        self.log(f"{stage}/loss", out.loss, prog_bar=True, batch_size=b, sync_dist=sync)
        metrics = out.log_dict(f"{stage}/")
        metrics.pop(f"{stage}/loss")
        self.log_dict(metrics, batch_size=b, sync_dist=sync)
        return out.loss

    def batch_counts(self, batch: dict[str, Any]) -> dict[str, int]:
        seqs = [batch[k] for k in ("query", "target", "negative") if k in batch]
        return {
            "images": sum(int(s["image_grid_thw"].shape[0]) for s in seqs if s.get("image_grid_thw") is not None),
            "samples": len(batch["keys"]),
            "pairs": len(batch["keys"]),
            "tokens": sum(int(s["attention_mask"].sum()) for s in seqs),
        }

    # ---------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)  # drops frozen weights (rebuilt from the backbone config)
        checkpoint["muco_init_from"] = self.init_from
        if self.merge_adapter_first:
            return  # the merged base weights are rebuilt from init_from on load
        if not self._sharded:
            # frozen here but trained in pretraining: not base weights, so they stay in the checkpoint
            params = dict(self.named_parameters())
            for name in self._frozen_from_init:
                checkpoint["state_dict"][name] = params[name].detach().clone()
        # every trained weight is in this checkpoint: rebuilding it (eval, export) needs no init checkpoint
        checkpoint["hyper_parameters"]["init_from"] = None
