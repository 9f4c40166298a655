"""Backbone + pooling: model inputs -> normalised fp32 embeddings at the `<|emb|>` slots.

uint8 ``pixel_values`` (the data path's format) are normalised here, on the device, by ``pixels_to_model``:
the training module and ``MuCoEncoder`` (evaluation, export) both run through this module, so no caller
converts on its own. With ``padding_free`` the backbone runs the batch as one packed row of its real tokens
(``muco.model.packing``); the embeddings are the padded forward's up to float rounding. A backbone sharded
with FSDP2 runs its vision tower on every rank whenever one rank's batch has images
(:func:`muco.model.sharding.vision_on_every_rank`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from muco.model.backbone import unwrap_qwen2vl
from muco.model.packing import pack_inputs
from muco.model.pixels import pixels_to_model, vision_dtype
from muco.model.pooling import EmbeddingPooler, PooledEmbeddings
from muco.model.sharding import vision_on_every_rank

MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")


class Embedder(nn.Module):
    """One shared encoder for queries, targets and negatives."""

    def __init__(self, backbone: nn.Module, emb_token_id: int, padding_free: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.pooler = EmbeddingPooler(emb_token_id)
        self.padding_free = padding_free

    def forward(
        self, inputs: Mapping[str, torch.Tensor], expected: int | torch.Tensor, keys: Sequence[str] | None = None
    ) -> PooledEmbeddings:
        kwargs = {k: inputs[k] for k in MODEL_INPUT_KEYS if k in inputs}
        if "pixel_values" in kwargs:
            kwargs["pixel_values"] = pixels_to_model(kwargs["pixel_values"], vision_dtype(self.backbone))
        flat_index = None
        if self.padding_free and "attention_mask" in kwargs:
            packed = pack_inputs(unwrap_qwen2vl(self.backbone).get_rope_index, kwargs)
            kwargs, flat_index = packed.inputs, packed.flat_index
        with vision_on_every_rank(self.backbone, "pixel_values" in kwargs, kwargs["input_ids"].device):
            hidden = self.backbone(**kwargs, use_cache=False).last_hidden_state
        return self.pooler(hidden, inputs["input_ids"], expected, keys, flat_index)
