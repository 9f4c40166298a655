"""Fixtures for the evaluation tests: image files on disk and a tiny adapter-wrapped encoder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory, photos) -> Path:
    """Small real photos saved as PNG files named 0.png .. 5.png."""
    d = tmp_path_factory.mktemp("images")
    for i, im in enumerate(photos):
        im.resize((48, 40)).save(d / f"{i}.png")
    return d


@pytest.fixture(scope="session")
def tiny_encoder(tiny_tok):
    """MuCoEncoder over a random-init tiny Qwen2-VL with a LoRA adapter whose B matrices are non-zero."""
    from muco.encoder import MuCoEncoder
    from muco.model.backbone import AdapterConfig, BackboneConfig, build_backbone

    model = build_backbone(BackboneConfig(preset="tiny", adapter=AdapterConfig(r=4, alpha=8)), tiny_tok)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "trainable_tokens_delta" in name:  # the delta holds the rows themselves
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    return MuCoEncoder.from_parts(tiny_tok, model, image_policy="tiny")
