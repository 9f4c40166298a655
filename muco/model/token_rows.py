"""Trainable ``<|emb|>``/``<|mask|>`` embedding rows that never copy the embedding table (issue 17).

PEFT's ``trainable_token_indices`` (``TrainableTokensLayer``) builds ``W.index_copy(0, ids, rows)`` on every
forward: a full copy of the table (151,657 x 1,536 for Qwen2-VL-2B, ~467 MB in bf16) to change two rows, and
as much again for its gradient in backward. :class:`TokenRows` looks the ids up in the frozen table and writes
the trainable rows over the positions that hold one of the tokens instead: the same output and the same row
gradients (bitwise on CPU, tests/model/test_token_rows.py), and no tensor larger than the lookup's output
(benchmarks/bench_token_rows.py).

The rows are stored under PEFT's name (``trainable_tokens_delta``, which also holds the rows themselves, not a
difference), so weight-decay and test filters keep matching; checkpoints written with PEFT's layer
(``embed_tokens.token_adapter.trainable_tokens_delta.default``, ``embed_tokens.token_adapter.base_layer.weight``)
load through :func:`upgrade_state_dict` (a load-state-dict hook applies it too).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import torch
from torch import nn

ROWS = "trainable_tokens_delta"
# PEFT's state-dict spellings (``TrainableTokensWrapper`` -> ``TrainableTokensLayer``, adapter "default")
_OLD_ROWS = f"token_adapter.{ROWS}.default"
_OLD_TABLE = "token_adapter.base_layer.weight"

T = TypeVar("T")


class TokenRows(nn.Embedding):
    """An embedding whose ``token_ids`` rows are a separate (trainable) parameter, ``trainable_tokens_delta``.

    A subclass rather than a wrapper so the frozen table keeps its place and name (``...embed_tokens.weight``)
    and code that reads ``.weight``, ``.num_embeddings`` or checks for ``nn.Embedding`` works unchanged. The
    table's parameter object is taken over, not copied.
    """

    def __init__(self, embedding: nn.Embedding, token_ids: Sequence[int]) -> None:
        if type(embedding) is not nn.Embedding:
            # a subclass may scale or otherwise change its lookup, which the trainable rows would then skip
            raise TypeError(f"TokenRows wraps a plain nn.Embedding, got {type(embedding).__name__}")
        ids = [int(i) for i in token_ids]
        if not ids or len(set(ids)) != len(ids) or not all(0 <= i < embedding.num_embeddings for i in ids):
            raise ValueError(f"token ids {ids} must be distinct rows of a {embedding.num_embeddings}-row table")
        weight = embedding.weight
        super().__init__(embedding.num_embeddings, embedding.embedding_dim, embedding.padding_idx,
                         embedding.max_norm, embedding.norm_type, embedding.scale_grad_by_freq, embedding.sparse,
                         _weight=weight, _freeze=not weight.requires_grad)
        self.weight = weight  # the very parameter (nn.Embedding wrapped it in a new one)
        # not persistent: the ids come from the tokenizer, and checkpoints keep the keys PEFT's layer had
        self.register_buffer("token_ids", torch.tensor(ids, dtype=torch.long, device=weight.device),
                             persistent=False)
        # the rows themselves, starting from the table's (as PEFT's ``init_weights=True``)
        setattr(self, ROWS, nn.Parameter(weight.detach()[self.token_ids].clone()))
        self.register_load_state_dict_pre_hook(_rename_peft_keys)

    @property
    def rows(self) -> nn.Parameter:
        """The trainable rows, one per ``token_ids`` entry."""
        return getattr(self, ROWS)

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - nn.Embedding's argument name
        out = super().forward(input)  # the frozen table: no copy, and no gradient unless it trains itself
        return _PutRows.apply(out, input, self.token_ids, self.rows.to(out.dtype))

    @torch.no_grad()
    def merged(self) -> nn.Embedding:
        """A plain ``nn.Embedding`` whose table has the trained rows written in (a new table: the old one may be
        shared, e.g. with the model a copy was exported from)."""
        table = self.weight.index_copy(0, self.token_ids, self.rows.to(self.weight.dtype))
        return self._plain(nn.Parameter(table, requires_grad=self.weight.requires_grad))

    def _plain(self, weight: nn.Parameter) -> nn.Embedding:
        # built on the meta device: no throw-away table is allocated and initialised
        plain = nn.Embedding(self.num_embeddings, self.embedding_dim, self.padding_idx, self.max_norm,
                             self.norm_type, self.scale_grad_by_freq, self.sparse, device="meta")
        plain.weight = weight
        return plain

    # PEFT's `merge_and_unload` / `unload` call this on every module that has it, so a plain PEFT merge also
    # writes the rows in (`merge=False`: the untouched table, as PEFT's own `unload`)
    def unload_and_optionally_merge_module(self, merge: bool, safe_merge: bool = False,
                                           adapter_names: list[str] | None = None) -> nn.Embedding:
        if not merge:
            return self._plain(self.weight)
        out = self.merged()
        if safe_merge and not torch.isfinite(out.weight).all():
            raise ValueError("the trained <|emb|>/<|mask|> rows hold NaN or inf")
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, trainable_rows={self.token_ids.tolist()}"


class _PutRows(torch.autograd.Function):
    """``out`` (a fresh lookup) with ``rows[k]`` written, in place, wherever ``input == token_ids[k]``.

    In place and with a hand-written backward so that no activation-sized tensor is made besides ``out``: the
    row gradients are ``embedding_dense_backward`` over a (K + 1)-row table whose last row, the positions of
    other tokens, is its padding row (skipped) - the reduction PEFT's ``F.embedding`` over the copied table ran,
    in the same order per row. No step waits on the device (no count of hit positions is needed).
    """

    @staticmethod
    def forward(ctx: Any, out: torch.Tensor, input: torch.Tensor, token_ids: torch.Tensor,  # noqa: A002
                rows: torch.Tensor) -> torch.Tensor:
        k_rows = rows.shape[0]
        slot = torch.full_like(input, k_rows)  # which row a position takes; K: none
        for k in range(k_rows):
            slot.masked_fill_(input == token_ids[k], k)
        for k in range(k_rows):
            torch.where((slot == k).unsqueeze(-1), rows[k], out, out=out)
        ctx.mark_dirty(out)
        ctx.save_for_backward(slot)
        ctx.k_rows = k_rows
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, torch.Tensor | None]:
        (slot,) = ctx.saved_tensors
        k_rows = ctx.k_rows
        grad_out = grad_rows = None
        if ctx.needs_input_grad[0]:  # a trainable table: nothing for the positions the rows took over
            grad_out = grad.masked_fill((slot < k_rows).unsqueeze(-1), 0)
        if ctx.needs_input_grad[3]:
            grad_rows = torch.ops.aten.embedding_dense_backward(grad, slot, k_rows + 1, k_rows, False)[:k_rows]
        return grad_out, None, None, grad_rows


def add_token_rows(model: nn.Module, embedding_path: str, token_ids: Sequence[int]) -> TokenRows:
    """Replace the ``nn.Embedding`` at ``embedding_path`` (dotted, from ``model``) with a :class:`TokenRows`."""
    parent_path, _, name = embedding_path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    rows = TokenRows(getattr(parent, name), token_ids)
    setattr(parent, name, rows)
    return rows


def merge_token_rows(model: nn.Module) -> nn.Module:
    """Every :class:`TokenRows` in ``model`` replaced by its merged ``nn.Embedding`` (in place; returns
    ``model``, or the merged embedding when ``model`` itself is one). A no-op when there is none."""
    if isinstance(model, TokenRows):
        return model.merged()
    for name, module in list(model.named_modules()):
        if isinstance(module, TokenRows):
            parent_path, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_path) if parent_path else model, attr, module.merged())
    return model


def upgrade_key(key: str) -> str:
    """A state-dict key of PEFT's trainable-tokens layer spelled as :class:`TokenRows` spells it (others as
    they are)."""
    for old, new in ((_OLD_ROWS, ROWS), (_OLD_TABLE, "weight")):
        if key.endswith("." + old) or key == old:
            return key[: len(key) - len(old)] + new
    return key


def upgrade_state_dict(state_dict: Mapping[str, T]) -> dict[str, T]:
    """``state_dict`` with PEFT's trainable-token keys renamed for :class:`TokenRows` (order kept)."""
    return {upgrade_key(k): v for k, v in state_dict.items()}


def _rename_peft_keys(module: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    # runs before this module reads its own keys (`prefix` = "...embed_tokens."), on the dict being loaded
    for old, new in ((_OLD_ROWS, ROWS), (_OLD_TABLE, "weight")):
        if prefix + old in state_dict and prefix + new not in state_dict:
            state_dict[prefix + new] = state_dict.pop(prefix + old)
