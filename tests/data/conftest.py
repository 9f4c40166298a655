"""Fixtures for the data tests: small real JPEGs, records in the project schema, shards written on the fly."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from muco.data.shards import ShardWriter, write_manifest


def jpeg(im: Image.Image, quality: int = 85) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def record_json(key: str, turns: int = 7, cands: int = 2) -> dict:
    """Texts name their key, turn and candidate, so tests can check pairing and candidate choice."""
    return {
        "turns": [
            {"task": f"task{i}", "queries": [f"{key} q{i} c{j}?" for j in range(cands)],
             "target": f"{key} t{i}"}
            for i in range(turns)
        ],
        "caption": f"a dense caption of {key}",
    }


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="session")
def rec_json():
    """The ``record_json(key, turns=7, cands=2)`` factory."""
    return record_json


@pytest.fixture(scope="session")
def jpegs(photos) -> list[bytes]:
    """Real photos (scikit-image), at most 96 px, as JPEG bytes."""
    return [jpeg(p) for p in photos]


@pytest.fixture
def make_shards(tmp_path: Path, jpegs):
    """``make(name, n_shards, per_shard, turns)`` -> (brace pattern, keys, manifest path)."""
    import json

    def make(name: str = "train", n_shards: int = 8, per_shard: int = 4, turns: int = 7,
             key_prefix: str | None = None) -> tuple[str, list[str], Path]:
        out = tmp_path / name
        prefix = key_prefix or name
        keys = [f"{prefix}{i:04d}" for i in range(n_shards * per_shard)]
        with ShardWriter(str(out / f"{name}-%06d.tar"), max_samples=per_shard) as w:
            for i, key in enumerate(keys):
                rec = json.dumps(record_json(key, turns)).encode()
                w.write(key, [("jpg", jpegs[i % len(jpegs)]), ("json", rec)])
        manifest = write_manifest(out / "manifest.json", w.shards, turns=turns)
        pattern = str(out / f"{name}-{{000000..{n_shards - 1:06d}}}.tar")
        return pattern, keys, manifest

    return make
