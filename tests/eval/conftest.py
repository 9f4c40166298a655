"""Fixtures for the evaluation tests: image files on disk and a tiny adapter-wrapped encoder."""

from __future__ import annotations

from pathlib import Path

import pytest


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
    from tests.adapted import adapted_tiny_backbone

    return MuCoEncoder.from_parts(tiny_tok, adapted_tiny_backbone(tiny_tok, seed=0), image_policy="tiny")
