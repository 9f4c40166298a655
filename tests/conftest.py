"""Shared fixtures: offline tokenizers, tiny models and small real images."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from tests.records import jpeg, record_json

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files holding a ``slow`` test run first, each file's tests still together and in order: `make test`'s
    pytest-xdist workers take one file at a time (``--dist loadfile``), so the long files start early and the
    short ones fill the end instead of one worker finishing a long file alone."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow)


@pytest.fixture(scope="session")
def tiny_tok():
    from muco.inputs.tokenizer import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(scope="session")
def qwen_tok():
    """The real Qwen2 vocabulary, offline (about 2 s to build: once per session)."""
    from muco.inputs.tokenizer import qwen_offline_tokenizer

    return qwen_offline_tokenizer()


@pytest.fixture(scope="session")
def photos() -> list[Image.Image]:
    """Small real photos from scikit-image's bundled data."""
    from skimage import data

    out = []
    for name in ("astronaut", "chelsea", "coffee", "rocket", "camera", "horse"):
        arr = np.asarray(getattr(data, name)())
        if arr.dtype == bool:
            arr = arr.astype(np.uint8) * 255
        im = Image.fromarray(arr).convert("RGB")
        im.thumbnail((96, 96))
        out.append(im)
    return out


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """The demo's digit shards and eval tasks, written once per test session (about 2 s)."""
    from muco.demo.build import build_demo_data

    return build_demo_data(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="session")
def rec_json():
    """The ``tests.records.record_json(key, turns=7, cands=2)`` factory."""
    return record_json


@pytest.fixture(scope="session")
def jpegs(photos) -> list[bytes]:
    """Real photos (scikit-image), at most 96 px, as JPEG bytes."""
    return [jpeg(p) for p in photos]
