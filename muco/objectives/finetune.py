"""Fine-tuning: single pairs with the guided reconstruction turn and hard negatives (docs/method.md §8).

Per step, three forwards of the shared encoder: the query sequences ``TRAIN(q, masked(p))`` and the target
sequences ``TRAIN(p, masked(q))`` (two ``<|emb|>`` each: turn 1 gives q / p, turn 3 gives q' / p'), and the
hard negatives ``BASE(n)`` (one ``<|emb|>``). The loss (``blockwise`` or ``joint_masked``) gathers targets and
negatives from all ranks with gradient.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from muco.losses.finetune import blockwise_loss, joint_masked_loss
from muco.model.pooling import PooledEmbeddings
from muco.objectives.base import Objective, Sequences, StepCounts, StepOutput, sequence_counts

LOSSES = {"blockwise": blockwise_loss, "joint_masked": joint_masked_loss}


def split_turns(pooled: PooledEmbeddings, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(first, second) embeddings [B, d] of 2-``<|emb|>`` sequences; the pooler has checked the count."""
    first, second = pooled.emb[pooled.turn_id == 0], pooled.emb[pooled.turn_id == 1]
    if first.shape[0] != batch_size or second.shape[0] != batch_size:
        raise ValueError(f"expected {batch_size} sequences with two <|emb|> each, got {first.shape[0]} / "
                         f"{second.shape[0]} first / second embeddings")
    return first, second


class FinetuneObjective(Objective):
    """The fine-tuning loss on pair batches (``data.records: PairRecords``).

    Args:
        loss: ``blockwise`` (released code, default: the sum of the four terms (q,P), (q,P'), (q',P), (q',P'),
            each over one target family plus the hard negatives) or ``joint_masked`` (paper: the mean over the
            4B augmented pairs of one softmax over both target forms, the positive's other form masked).
        hard_negatives: encode each sample's drawn hard negative and append the gathered negatives as extra
            columns to every term (docs/method.md §8.4).
        released_placeholder: a sample without a negative contributes the released code's empty prompt
            ``"\\n"`` as a real (junk) negative column; by default that column is masked.
        mask_same_text: also mask in-batch targets and hard negatives whose text equals the row's positive.
    """

    def __init__(self, loss: str = "blockwise", hard_negatives: bool = True, released_placeholder: bool = False,
                 mask_same_text: bool = False) -> None:
        if loss not in LOSSES:
            raise ValueError(f"model.objective.loss={loss!r}; choose one of {sorted(LOSSES)}")
        self.loss, self.hard_negatives = loss, hard_negatives
        self.released_placeholder, self.mask_same_text = released_placeholder, mask_same_text

    def sequences(self, batch: dict[str, Any]) -> dict[str, Sequences]:
        keys = list(batch["keys"])
        seqs = {"query": Sequences(batch["query"], 2, keys), "target": Sequences(batch["target"], 2, keys)}
        if self.hard_negatives:
            # always encoded, also when no local sample has one: the gather is a collective on every rank
            seqs["negative"] = Sequences(batch["negative"], 1, keys)
        return seqs

    def compute_loss(self, embeddings: Mapping[str, PooledEmbeddings], batch: dict[str, Any], tau: torch.Tensor,
                     rank: int) -> StepOutput:
        b = len(batch["keys"])
        q1, q2 = split_turns(embeddings["query"], b)
        p1, p2 = split_turns(embeddings["target"], b)
        kw: dict[str, Any] = {}
        if self.hard_negatives:
            kw["negatives"] = embeddings["negative"].emb
            if not self.released_placeholder:
                kw["negative_valid"] = batch["negative_valid"]
            if self.mask_same_text:
                kw["negative_text_id"] = batch["negative_text_id"]
        if self.mask_same_text:
            kw.update(positive_text_id=batch["target_text_id"], mask_same_text=True)
        out = LOSSES[self.loss](q1, q2, p1, p2, tau=tau, **kw)
        metrics = out.log_dict("")
        metrics.pop("loss")
        return StepOutput(out.loss, metrics)

    def counts(self, batch: dict[str, Any]) -> StepCounts:
        seqs = [batch[k] for k in ("query", "target", "negative") if k in batch]
        tokens, positions = sequence_counts(seqs)
        return StepCounts(
            images=sum(int(s["image_grid_thw"].shape[0]) for s in seqs if s.get("image_grid_thw") is not None),
            samples=len(batch["keys"]), pairs=len(batch["keys"]), tokens=tokens, positions=positions)

    def init_args(self) -> dict[str, Any]:
        return {"loss": self.loss, "hard_negatives": self.hard_negatives,
                "released_placeholder": self.released_placeholder, "mask_same_text": self.mask_same_text}
