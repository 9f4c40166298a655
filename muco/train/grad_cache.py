"""GradCache: a rank's batch embedded in chunks, with the gradients of the whole batch's loss (docs/recipe.md §7).

The contrastive loss couples every embedding of the batch (and, through the gather, of every rank), so a batch
cannot be split into independent micro-batches the way a language-model batch can. GradCache (Gao et al., 2021;
the approach VLM2Vec uses) splits it into the loss and the encoder:

1. every chunk of every sequence set (:meth:`~muco.objectives.base.Objective.sequences`) is embedded without
   an autograd graph, and the RNG state before each chunk's forward is kept;
2. the objective's loss (:meth:`~muco.objectives.base.Objective.compute_loss`: cross-rank gather, group masks,
   hard negatives, the fine-tuning terms) runs once on the whole batch's embeddings, as leaves, and its
   backward gives d loss / d embedding for every row (and τ's gradient, when τ is learned);
3. every chunk is embedded again, now with a graph and the RNG state of step 1 (dropout draws the same masks),
   and backpropagates its rows' cached embedding gradients into the weights.

Gradients equal those of the unchunked batch up to float rounding, while activations are held for one chunk
at a time: the step's activation memory falls with the chunk size, for one extra forward without graph.

Distributed: the weights' gradients accumulate locally over the chunks. The caller makes the data-parallel
reduction happen once per step (:class:`~muco.train.module.MuCoModule`: DDP reduces on Lightning's own
backward of the step's returned loss; FSDP2 reduce-scatters in the last chunk's backward via ``sync_last``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from muco.model.pooling import PooledEmbeddings
from muco.objectives.base import EmbedFn, Objective, Sequences, StepOutput

__all__ = ["chunk_sequences", "grad_cache_step"]

# model inputs with one row per sequence and one column per position
ROW_KEYS = frozenset({"input_ids", "attention_mask", "mm_token_type_ids"})


def _image_rows(inputs: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    """Bool [rows]: which rows hold an image (each holds zero or one, :class:`muco.inputs.sequence.SequenceEncoder`);
    None when the inputs carry no pixels."""
    if "pixel_values" not in inputs:
        return None
    if "mm_token_type_ids" not in inputs:
        raise ValueError("GradCache splits image sequences by their mm_token_type_ids, which these inputs lack")
    return inputs["mm_token_type_ids"].bool().any(dim=1)


def _slice_inputs(inputs: Mapping[str, torch.Tensor], start: int, stop: int,
                  has_image: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Rows [start, stop) of padded model inputs, their images' patches with them; trailing all-padding
    columns are dropped (sequences are right-padded, so no row changes)."""
    mask = inputs["attention_mask"][start:stop]
    width = int(mask.sum(dim=1).max()) if mask.numel() else 0
    out = {k: v[start:stop, :width] for k, v in inputs.items() if k in ROW_KEYS}
    if has_image is not None:
        grid = inputs["image_grid_thw"]
        patches = grid.prod(dim=-1)
        first = int(has_image[:start].sum())
        count = int(has_image[start:stop].sum())
        if count:
            offsets = torch.cumsum(patches, 0) - patches
            lo = int(offsets[first])
            hi = lo + int(patches[first:first + count].sum())
            out["pixel_values"] = inputs["pixel_values"][lo:hi]
            out["image_grid_thw"] = grid[first:first + count]
    return out


@dataclass
class Chunk:
    """Rows [start, stop) of one sequence set."""

    start: int
    stop: int
    sequences: Sequences


def chunk_sequences(seqs: Sequences, rows_per_chunk: int) -> list[Chunk]:
    """The set split into consecutive chunks of at most ``rows_per_chunk`` sequences."""
    if rows_per_chunk < 1:
        raise ValueError(f"GradCache chunk size must be >= 1, got {rows_per_chunk}")
    unknown = set(seqs.inputs) - ROW_KEYS - {"pixel_values", "image_grid_thw"}
    if unknown:
        raise ValueError(f"GradCache does not know how to split model inputs {sorted(unknown)}")
    rows = int(seqs.inputs["input_ids"].shape[0])
    has_image = _image_rows(seqs.inputs)
    chunks = []
    for start in range(0, rows, rows_per_chunk):
        stop = min(rows, start + rows_per_chunk)
        expected = seqs.expected if isinstance(seqs.expected, int) else seqs.expected[start:stop]
        chunks.append(Chunk(start, stop, Sequences(_slice_inputs(seqs.inputs, start, stop, has_image), expected,
                                                   seqs.keys[start:stop])))
    return chunks


def _rng_state() -> tuple[torch.Tensor, list[torch.Tensor]]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[torch.Tensor, list[torch.Tensor]]) -> None:
    torch.set_rng_state(state[0])
    if state[1]:
        torch.cuda.set_rng_state_all(state[1])


def _concat(parts: list[tuple[Chunk, PooledEmbeddings]]) -> PooledEmbeddings:
    """The chunks' pooled embeddings as those of the whole set: sample ids shifted by each chunk's first row."""
    return PooledEmbeddings(emb=torch.cat([p.emb for _, p in parts]),
                            sample_id=torch.cat([p.sample_id + c.start for c, p in parts]),
                            turn_id=torch.cat([p.turn_id for _, p in parts]))


def grad_cache_step(embed: EmbedFn, objective: Objective, batch: dict[str, Any], tau: torch.Tensor, rank: int,
                    rows_per_chunk: int, loss_scale: float = 1.0,
                    sync_last: Callable[[bool], None] | None = None) -> StepOutput:
    """One training step's forward and backward in chunks; returns the objective's output (loss detached).

    Gradients of ``loss * loss_scale`` are accumulated into the weights' ``.grad`` (and τ's, when learned), as
    ``(loss * loss_scale).backward()`` on the unchunked step would. ``loss_scale`` carries what the trainer
    would apply to the returned loss (gradient accumulation, an AMP loss scale). ``sync_last(is_last)`` is
    called before each chunk's backward (FSDP2: reduce-scatter on the last one only).
    """
    sets = objective.sequences(batch)
    chunked = {name: chunk_sequences(s, rows_per_chunk) for name, s in sets.items()}
    states: dict[str, list[tuple[torch.Tensor, list[torch.Tensor]]]] = {}
    leaves: dict[str, PooledEmbeddings] = {}
    with torch.no_grad():
        for name, chunks in chunked.items():
            parts = []
            states[name] = []
            for c in chunks:
                states[name].append(_rng_state())
                parts.append((c, embed(c.sequences.inputs, c.sequences.expected, c.sequences.keys)))
            whole = _concat(parts)
            leaves[name] = PooledEmbeddings(whole.emb.detach().requires_grad_(True), whole.sample_id, whole.turn_id)
    out = objective.compute_loss(leaves, batch, tau, rank)
    # d loss / d embedding for every row; also accumulates τ's gradient when τ is learned
    (out.loss * loss_scale).backward()
    after = _rng_state()
    total = sum(len(chunks) for chunks in chunked.values())
    done = 0
    for name, chunks in chunked.items():
        grad = leaves[name].emb.grad
        at = 0
        for c, state in zip(chunks, states[name]):
            _set_rng_state(state)  # the same dropout masks as the embeddings the loss saw
            pooled = embed(c.sequences.inputs, c.sequences.expected, c.sequences.keys)
            rows = pooled.emb.shape[0]
            done += 1
            if sync_last is not None:
                sync_last(done == total)
            if grad is not None:  # None: the loss does not use this set
                pooled.emb.backward(grad[at:at + rows])
            at += rows
    _set_rng_state(after)
    return StepOutput(out.loss.detach(), {k: v.detach() if isinstance(v, torch.Tensor) else v
                                         for k, v in out.metrics.items()})
