"""Fixtures for the data tests: small real JPEGs, records in the project schema, shards written on the fly."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from muco.data.shards import ShardWriter, write_manifest
from tests.records import record_json


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


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
