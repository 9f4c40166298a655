"""The shared pipeline (:mod:`muco.convert.pipeline`): any record kind's preparer, ordered output, rejects,
manifest, and no half-written shard when a conversion fails."""

from __future__ import annotations

import json
import tarfile

import pytest

from muco.convert import m3t
from muco.convert.m3t import convert_jsonl
from muco.convert.pipeline import ConvertOptions, prepared, rejected, run_conversion
from muco.data.records import RecordError


def test_failed_conversion_leaves_no_half_shard(tmp_path, m3t_jsonl, monkeypatch):
    path, root = m3t_jsonl
    real = m3t.prepare_line

    def fail_on_b(index, payload, key, opts):
        if '"key": "b"' in payload:
            raise RuntimeError("disk full")
        return real(index, payload, key, opts)

    monkeypatch.setattr(m3t, "prepare_line", fail_on_b)
    out = tmp_path / "o"
    with pytest.raises(RuntimeError, match="disk full"):
        convert_jsonl(path, root, str(out / "s-%03d.tar"), max_samples_per_shard=10)
    assert not list(out.glob("*.tar*"))  # the open shard was removed; nothing half-written remains


def prepare_text(index, payload, key, opts):
    """A minimal record kind: one text member per item; an empty text is a bad record."""
    if not payload:
        return rejected(index, key, RecordError(key, "text", "is empty", "empty"))
    return prepared(key, [("txt", payload.encode())])


def test_run_conversion_with_any_preparer(tmp_path):
    items = [(1, "one", "k1"), (2, "", "k2"), (3, "three", "k1"), (4, "four", "k4")]
    out = tmp_path / "o"
    s = run_conversion(prepare_text, items, str(out / "t-%03d.tar"), ConvertOptions(str(tmp_path)),
                       max_samples_per_shard=10, max_bytes_per_shard=1 << 20, workers=0, manifest=None,
                       rejects=None, overwrite=False, source="test", manifest_extra={"kind": "text"},
                       unit="item")
    assert (s.written, s.rejected, dict(s.reasons)) == (2, 2, {"empty": 1, "duplicate_key": 1})
    with tarfile.open(out / "t-000.tar") as tar:
        assert [m.name for m in tar.getmembers()] == ["k1.txt", "k4.txt"]
    rejects = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    assert [(r["item"], r["key"], r["reason"]) for r in rejects] == [(2, "k2", "empty"), (3, "k1", "duplicate_key")]
    assert rejects[0]["message"] == "item 2: record 'k2': text is empty"
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["kind"], manifest["num_samples"], manifest["rejected"]) == ("text", 2, 2)
