"""A tiny random-init Qwen2-VL with a LoRA adapter that is not a no-op, shared by encoder, export and eval tests."""

from __future__ import annotations

import torch
from torch import nn

from muco.model.backbone import AdapterConfig, BackboneConfig, build_backbone


def adapted_tiny_backbone(tok, seed: int, dropout: float = 0.0) -> nn.Module:
    """Non-zero LoRA B matrices and changed ``<|emb|>``/``<|mask|>`` rows (``TokenRows``' ``trainable_tokens_delta``
    holds the rows themselves), so adapter merging and loading make a difference; in eval mode."""
    m = build_backbone(BackboneConfig(preset="tiny", adapter=AdapterConfig(r=4, alpha=8, dropout=dropout)), tok)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_B" in name or "trainable_tokens_delta" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    return m.eval()
