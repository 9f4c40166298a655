"""Pretraining: multi-turn InfoNCE over K-turn query and target sequences, with mined hard negatives packed into
K-turn negative sequences (docs/method.md §7, §9)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from muco.losses.pretrain import pretrain_loss
from muco.model.pooling import PooledEmbeddings
from muco.objectives.base import Objective, Sequences, StepCounts, StepOutput, sequence_counts


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


class PretrainObjective(Objective):
    """Multi-turn InfoNCE with logit masking of the same image's other turns (M3T batches).

    Args:
        symmetric_loss: add the target→query term (off, as in the released code).
        mask_same_text: also mask in-batch targets whose text equals the row's positive (identical answers of
            different images are false negatives; off by default, as in the paper).

    Batches with mined negatives (``data.records.negatives``: a ``negative`` entry of packed K-turn negative
    sequences) embed them with the same encoder and append them, gathered from all ranks, as extra columns of
    every query row; missing negatives and negatives whose text equals a row's positive are masked. Metrics:
    ``pos_sim``, ``hardest_neg_sim``, ``masked_frac``, and with negatives ``neg_sim`` (mean cosine of each query
    row with its own turn's valid negatives) and ``neg_valid_frac``.
    """

    def __init__(self, symmetric_loss: bool = False, mask_same_text: bool = False) -> None:
        self.symmetric_loss, self.mask_same_text = symmetric_loss, mask_same_text

    def sequences(self, batch: dict[str, Any]) -> dict[str, Sequences]:
        keys, num_turns = list(batch["keys"]), batch["num_turns"]
        seqs = {"query": Sequences(batch["query"], num_turns, keys),
                "target": Sequences(batch["target"], num_turns, keys)}
        if "negative" in batch:
            per_turn = batch["negative_num_turns"].numel() // max(1, len(keys))
            seqs["negative"] = Sequences(batch["negative"], batch["negative_num_turns"],
                                         [k for k in keys for _ in range(per_turn)])
        return seqs

    def compute_loss(self, embeddings: Mapping[str, PooledEmbeddings], batch: dict[str, Any], tau: torch.Tensor,
                     rank: int) -> StepOutput:
        keys, num_turns = batch["keys"], batch["num_turns"]
        q, t = embeddings["query"], embeddings["target"]
        # global image ids: ranks hold equal batch sizes (the DataModule drops partial batches)
        gid = rank * len(keys) + q.sample_id
        text_ids = batch.get("target_text_id") if self.mask_same_text else None
        kw: dict[str, Any] = {}
        neg_metrics: dict[str, torch.Tensor] = {}
        if "negative" in embeddings:
            # every rank has B*per_turn*K negative rows (missing ones are masked placeholders): equal gathers
            per_turn = batch["negative_num_turns"].numel() // max(1, len(keys))
            neg = embeddings["negative"]
            valid = batch["negative_valid"]
            kw = dict(negatives=neg.emb, negative_valid=valid, negative_text_id=batch["negative_text_id"])
            text_ids = batch["target_text_id"]  # also masks a negative whose text equals a row's positive
            neg_metrics["neg_valid_frac"] = valid.float().mean()
            sim = own_turn_negative_sim(q, neg, num_turns, valid, per_turn)
            if sim is not None:
                neg_metrics["neg_sim"] = sim
        out = pretrain_loss(q.emb, t.emb, gid, tau=tau, symmetric=self.symmetric_loss,
                            positive_text_id=text_ids, mask_same_text=self.mask_same_text, **kw)
        return StepOutput(out.loss, {"pos_sim": out.pos_sim, "hardest_neg_sim": out.hardest_neg_sim,
                                     "masked_frac": out.masked_frac, **neg_metrics})

    def counts(self, batch: dict[str, Any]) -> StepCounts:
        grid = batch["query"].get("image_grid_thw")
        tokens, positions = sequence_counts([batch[k] for k in ("query", "target", "negative") if k in batch])
        return StepCounts(images=0 if grid is None else int(grid.shape[0]), samples=len(batch["keys"]),
                          pairs=int(batch["num_turns"].sum()), tokens=tokens, positions=positions)

    def init_args(self) -> dict[str, Any]:
        return {"symmetric_loss": self.symmetric_loss, "mask_same_text": self.mask_same_text}
