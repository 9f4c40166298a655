"""Padding-free forwards: a right-padded batch runs as one packed row of its real tokens (docs/recipe.md §9).

A padded batch of B sequences computes ``B x L_max`` positions in every linear layer and attention; at M3T
shapes about a tenth of them are padding (``perf/token_efficiency``). Packed, the language model sees one row of
the ``N = sum(lengths)`` real tokens, with

- the M-RoPE positions the padded forward would use (``get_rope_index`` with the padding mask), so every token
  keeps its rotary angle;
- per-sequence text positions (``0 .. len-1``) as a fourth row of ``position_ids``, transformers' packed-sequence
  format for Qwen2-VL: its flash-attention 2 path reads the sequence bounds from them and runs the varlen
  kernel, and :func:`varlen_sdpa_attention` (the ``sdpa`` choice) runs causal SDPA on each sequence alone.

The vision tower already runs padding-free (its patches are concatenated and split by ``cu_seqlens``).
Results equal the padded forward's up to float rounding (``tests/model/test_packing.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

VARLEN_SDPA = "muco_varlen_sdpa"


@dataclass
class PackedRow:
    """The model kwargs of one packed row, and where each padded position went."""

    inputs: dict[str, torch.Tensor]
    flat_index: torch.Tensor  # (B, L) long: the packed position of every real token (padding: -1)


def varlen_sdpa_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, run sequence by sequence on a packed row.

    A packed row comes without a mask and with per-sequence text positions (a sequence starts where its position
    is 0). Anything else (a padded batch with its mask) goes to the stock SDPA function unchanged, so a backbone
    set to this implementation still runs padded batches exactly as ``sdpa`` does.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attention_mask is not None or position_ids is None or query.shape[0] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    starts = (position_ids[0] == 0).nonzero().flatten().tolist()
    bounds = zip(starts, [*starts[1:], query.shape[2]])
    out = [sdpa_attention_forward(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None, **kwargs)[0]
           for a, b in bounds]
    return torch.cat(out, dim=1), None


def _varlen_sdpa_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """No mask for a packed row (the attention splits it itself); the SDPA mask for a padded batch."""
    from transformers.masking_utils import sdpa_mask

    return None if kwargs.get("attention_mask") is None else sdpa_mask(*args, **kwargs)


def use_varlen_sdpa(model: nn.Module) -> None:
    """Run ``model``'s language model (a Qwen2VLModel's, not the vision tower's) with :data:`VARLEN_SDPA`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN_SDPA, varlen_sdpa_attention)
    AttentionMaskInterface.register(VARLEN_SDPA, _varlen_sdpa_mask)
    model.set_attn_implementation({"text_config": VARLEN_SDPA})


def pack_inputs(rope_index: Callable[..., tuple[torch.Tensor, torch.Tensor]],
                inputs: dict[str, torch.Tensor]) -> PackedRow:
    """Model kwargs of a right-padded batch (``attention_mask`` required) -> one packed row.

    ``rope_index`` is the Qwen2VLModel's ``get_rope_index``; it is called only when the batch holds images (a
    text-only batch's M-RoPE positions are its text positions).
    """
    mask = inputs["attention_mask"].bool()
    text_pos = mask.long().cumsum(1) - 1
    if "image_grid_thw" in inputs:
        rope, _ = rope_index(inputs["input_ids"], image_grid_thw=inputs["image_grid_thw"], attention_mask=mask,
                             mm_token_type_ids=inputs["mm_token_type_ids"])
        rope = rope[:, mask]
    else:
        rope = text_pos[mask].expand(3, -1)
    position_ids = torch.cat([text_pos[mask][None], rope]).unsqueeze(1)  # (4, 1, N): text row first
    packed = {k: v[mask][None] for k, v in inputs.items() if k in ("input_ids", "mm_token_type_ids")}
    packed.update({k: v for k, v in inputs.items() if k in ("pixel_values", "image_grid_thw")})
    packed["position_ids"] = position_ids
    flat_index = torch.full_like(text_pos, -1)
    flat_index[mask] = torch.arange(int(mask.sum()), device=mask.device)
    return PackedRow(inputs=packed, flat_index=flat_index)
