"""Length bucketing (``data.length_bucketing``): off leaves the stream as it was; on, each worker's windows of
samples become batches of similar length in a seeded order, with the same samples per epoch, less padding, equal
batch counts across ranks, skips counted once and an exact resume from inside a window."""

from __future__ import annotations

import io
import json
import logging
import random
import tarfile
from collections import Counter
from dataclasses import asdict, fields
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from muco.data.datamodule import MuCoDataModule
from muco.data.length_buckets import LengthBuckets, text_tokens, visual_tokens
from muco.data.m3t.collate import PretrainCollator, PretrainSample
from muco.data.m3t.kind import M3TLength
from muco.data.pairs.collate import PairSample
from muco.data.pairs.kind import PairLength
from muco.data.position import WindowPosition, WorkerPosition
from muco.data.shards import ShardWriter, write_manifest
from muco.inputs.image_policy import ImagePolicy
from muco.objectives.base import sequence_counts
from tests.data.builders import m3t_data, pair_data
from tests.records import record_json

TINY = {"tokenizer": "tiny", "image_policy": "tiny"}
TURNS = 4


def varied_record(key: str, i: int) -> dict:
    """A record whose texts are 0-8 filler words longer per turn, by ``i``: lengths vary a lot between samples."""
    rec = record_json(key, TURNS)
    extra = " filler" * (5 * ((i * 7) % 9))
    for t in rec["turns"]:
        t["target"] += extra
        t["queries"] = [q + extra for q in t["queries"]]
    return rec


@pytest.fixture
def varied(tmp_path: Path, jpegs):
    """``make(n_shards, per_shard)`` -> (manifest path, keys) of M3T shards with varied text lengths."""

    def make(n_shards: int = 4, per_shard: int = 12) -> tuple[str, list[str]]:
        out = tmp_path / "varied"
        keys = [f"v{i:04d}" for i in range(n_shards * per_shard)]
        with ShardWriter(str(out / "varied-%06d.tar"), max_samples=per_shard) as w:
            for i, key in enumerate(keys):
                w.write(key, [("jpg", jpegs[i % len(jpegs)]), ("json", json.dumps(varied_record(key, i)).encode())])
        return str(write_manifest(out / "manifest.json", w.shards, turns=TURNS)), keys

    return make


def data(manifest: str, **kw) -> MuCoDataModule:
    kw = {"turns_per_sample": TURNS, "batch_size": 3, "num_workers": 0, "shuffle_buffer": 16, **TINY, **kw}
    dm = m3t_data(manifest, **kw)
    dm.setup("fit")
    return dm


def keys_of(batches) -> list[list[str]]:
    return [list(b["keys"]) for b in batches]


def efficiency(batches) -> float:
    counts = [sequence_counts([b[side]]) for b in batches for side in ("query", "target")]
    return sum(t for t, _ in counts) / sum(p for _, p in counts)


def test_off_keeps_the_stream_and_its_positions(varied):
    manifest, _ = varied()
    default = list(data(manifest).train_dataloader())  # the constructor without the option: as before
    off = list(data(manifest, length_bucketing=0).train_dataloader())
    assert keys_of(off) == keys_of(default)
    for a, b in zip(off, default):
        for side in ("query", "target"):
            for name, t in a[side].items():
                assert torch.equal(t, b[side][name])
        assert asdict(a["stats"].position) == asdict(b["stats"].position)
        assert set(asdict(a["stats"].position)) == {f.name for f in fields(WorkerPosition)}


def test_windows_of_one_batch_only_sort_within_each_batch(varied):
    manifest, _ = varied()
    off = keys_of(data(manifest).train_dataloader())
    one = keys_of(data(manifest, length_bucketing=1).train_dataloader())
    assert [sorted(b) for b in one] == [sorted(b) for b in off] and one != off


def recorded(dm: MuCoDataModule) -> tuple[list[dict], dict[str, int]]:
    """One epoch in-process, with the length key of every sample the buckets sorted."""
    ds = dm.make_dataset("train")
    lengths: dict[str, int] = {}
    key = ds.buckets.key
    ds.buckets.key = lambda s: lengths.setdefault(s.key, key(s))
    return list(DataLoader(ds, batch_size=None, num_workers=0)), lengths


def test_batches_are_cut_from_sorted_windows_in_a_shuffled_order(varied):
    manifest, keys = varied()  # 48 samples, one pass: 16 batches of 3, windows of 4 batches
    batches, lengths = recorded(data(manifest, resampled=False, length_bucketing=4))
    got = keys_of(batches)
    assert len(got) == 16 and sorted(k for b in got for k in b) == keys  # every sample once
    shuffled = 0
    for start in range(0, 16, 4):
        window = [[lengths[k] for k in b] for b in got[start : start + 4]]
        assert all(b == sorted(b) for b in window)  # ascending within a batch
        ranges = sorted((b[0], b[-1]) for b in window)
        assert all(hi <= lo for (_, hi), (lo, _) in zip(ranges, ranges[1:]))  # the window's batches do not overlap
        shuffled += [b[0] for b in window] != sorted(b[0] for b in window)
    assert shuffled  # delivered in a random order, not short to long
    assert {b["stats"].worker for b in batches} == {"r0w0"}


def test_less_padding_on_varied_lengths(varied):
    manifest, _ = varied()
    off = list(data(manifest, resampled=False).train_dataloader())
    on = list(data(manifest, resampled=False, length_bucketing=4).train_dataloader())
    assert sorted(k for b in keys_of(on) for k in b) == sorted(k for b in keys_of(off) for k in b)
    assert efficiency(on) > 1.1 * efficiency(off), (efficiency(on), efficiency(off))


def test_same_samples_per_epoch_and_equal_batch_counts_across_ranks(varied):
    manifest, _ = varied(n_shards=3, per_shard=10)
    kw = dict(batch_size=2, num_workers=2, samples_per_epoch=40, shuffle_buffer=8)  # 5 batches per worker
    for rank in (0, 1):
        runs = {}
        for window in (0, 3):  # 3 + 2 batches per worker with windows of 3: the last window is cut to fit
            ds = data(manifest, length_bucketing=window, **kw).make_dataset("train", rank=rank, world_size=2)
            assert len(ds) == 10
            runs[window] = keys_of(DataLoader(ds, batch_size=None, num_workers=2))
            assert len(runs[window]) == 10
        assert Counter(k for b in runs[3] for k in b) == Counter(k for b in runs[0] for k in b)
        assert runs[3] != runs[0]


def test_seeded_and_deterministic(varied):
    manifest, _ = varied()
    kw = dict(samples_per_epoch=36, length_bucketing=3)
    def two_epochs(dm: MuCoDataModule) -> list[list[list[str]]]:
        loader = dm.train_dataloader()  # taken like training takes batches: the DataModule counts the epochs
        return [keys_of(dm.on_before_batch_transfer(b, 0) for b in loader) for _ in range(2)]

    epochs = two_epochs(data(manifest, **kw))
    assert epochs[0] != epochs[1]  # each epoch its own shuffle and window orders
    assert two_epochs(data(manifest, **kw)) == epochs
    assert keys_of(data(manifest, seed=1, **kw).train_dataloader()) != epochs[0]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resume_inside_a_window_continues_with_the_next_batch(varied, workers):
    """Resumed after k batches (inside and at the end of windows of 3): the rest of the epoch, the same batches
    with the same turn draws, the round-robin continuing at the right worker."""
    manifest, _ = varied()
    kw = dict(batch_size=2, num_workers=workers, samples_per_epoch=24, length_bucketing=3, turn_order="batch",
              persistent_workers=False)
    full = list(data(manifest, **kw).train_dataloader())
    assert len(full) == 12
    for k in (1, 4, 6, 11):
        dm = data(manifest, **kw)
        it = iter(dm.train_dataloader())
        for _ in range(k):
            dm.on_before_batch_transfer(next(it), 0)
        state = dm.state_dict()
        del it  # stop its workers now (not persistent), not while a later test runs
        assert all(set(p) == {f.name for f in fields(WindowPosition)} for p in state["ranks"][0]["workers"] if p)
        resumed = data(manifest, **kw)
        resumed.load_state_dict(state)
        rest = list(resumed.train_dataloader())
        assert keys_of(rest) == keys_of(full[k:])
        for a, b in zip(rest, full[k:]):
            assert torch.equal(a["target_text_id"], b["target_text_id"])
            assert torch.equal(a["query"]["input_ids"], b["query"]["input_ids"])
            assert asdict(a["stats"].position) == asdict(b["stats"].position)


def salted_shard(tmp_path: Path, jpegs) -> str:
    """good0-good1, 2 bad samples, good2-good3, 1 bad, good4-good7: texts of varied lengths."""
    path = tmp_path / "salted-000000.tar"
    with tarfile.open(path, "w") as tar:
        def add(key: str, members: list[tuple[str, bytes]]) -> None:
            for ext, blob in members:
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))

        def rec(key: str, i: int) -> bytes:
            return json.dumps(varied_record(key, i)).encode()

        def good(i: int) -> None:
            add(f"good{i}", [("jpg", jpegs[i % len(jpegs)]), ("json", rec(f"good{i}", i))])

        for i in range(2):
            good(i)
        add("corrupt", [("jpg", b"\xff\xd8\xff not a JPEG"), ("json", rec("corrupt", 0))])
        add("nojson", [("jpg", jpegs[0])])
        for i in range(2, 4):
            good(i)
        add("badjson", [("jpg", jpegs[1]), ("json", b'{"turns": [')])
        for i in range(4, 8):
            good(i)
    return str(path)


def test_a_resumed_window_counts_its_skips_once_and_logs_them_once(tmp_path, jpegs, caplog):
    shard = salted_shard(tmp_path, jpegs)
    kw = dict(batch_size=2, resampled=False, shuffle_buffer=0, samples_per_epoch=8, length_bucketing=2)
    dm = data(shard, **kw)
    full = [dm.on_before_batch_transfer(b, 0) for b in dm.train_dataloader()]
    assert sorted(k for b in keys_of(full) for k in b) == [f"good{i}" for i in range(8)]
    # window 0 (4 good samples) reads 6 raw samples, 2 of them bad; window 1 one more bad sample
    assert [b["stats"].skipped_total for b in full] == [2, 2, 3, 3]
    dm = data(shard, **kw)
    it = iter(dm.train_dataloader())
    dm.on_before_batch_transfer(next(it), 0)
    state = dm.state_dict()
    pos = state["ranks"][0]["workers"][0]
    assert (pos["raw"], pos["skipped"], pos["window_raw"], pos["window_batches"]) == (6, 2, 0, 1)
    resumed = data(shard, **kw)
    resumed.load_state_dict(state)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="muco.data"):
        rest = [resumed.on_before_batch_transfer(b, 0) for b in resumed.train_dataloader()]
    assert keys_of(rest) == keys_of(full[1:])
    # the window's bad samples were logged before the checkpoint; the next window's one is new
    assert [r.args[0] for r in caplog.records] == ["badjson"]
    assert [b["stats"].skipped_total for b in rest] == [2, 3, 3]
    assert [asdict(b["stats"].position) for b in rest] == [asdict(b["stats"].position) for b in full[1:]]


def test_pairs_bucket_too(tmp_path, photos):
    from tests.data.pairs.test_stream import write_pairs

    manifest = write_pairs(tmp_path, photos, n=12, per_shard=6)
    kw = dict(batch_size=3, num_workers=0, resampled=False, shuffle_buffer=0, tokenizer="tiny", image_policy="tiny")
    off, on = (pair_data(manifest, length_bucketing=w, **kw) for w in (0, 4))
    for dm in (off, on):
        dm.setup("fit")
    a, b = (keys_of(dm.train_dataloader()) for dm in (off, on))
    assert sorted(k for x in a for k in x) == sorted(k for x in b for k in x) and len(b) == 4


def test_length_keys_count_visual_tokens_and_text():
    policy = ImagePolicy.preset("tiny")
    small, big = Image.new("RGB", (56, 56)), Image.new("RGB", (112, 84))
    assert (visual_tokens(small, policy), visual_tokens(big, policy), visual_tokens(None, policy)) == (4, 12, 0)
    odd = Image.new("RGB", (50, 61))  # sized by the policy, as the decoder would
    assert visual_tokens(odd, policy) == visual_tokens(policy.prepare(odd.copy()), policy)
    assert text_tokens(["abcd" * 10, None, "xy"]) == 10
    m3t = M3TLength(policy)
    short = PretrainSample("a", small, ["q"] * 3, ["t"] * 3)
    assert m3t(short) < m3t(PretrainSample("b", big, ["q"] * 3, ["t"] * 3)) < m3t(
        PretrainSample("c", big, ["a long query" * 5] * 3, ["t"] * 3))
    pair = PairLength(policy)
    p = PairSample("p", "query", small, "positive", None, "<|mask|>", "<|mask|>")
    assert pair(p) < pair(PairSample("p", "query", small, "positive", big, "<|mask|>", "<|mask|>"))


def test_bucketing_errors():
    with pytest.raises(ValueError, match="window >= 1"):
        LengthBuckets(len, 0, 2)
    with pytest.raises(ValueError, match="whole number of batches"):
        LengthBuckets(len, 2, 2).batches(["a", "b", "c"], random.Random(0))
    assert [LengthBuckets(len, 3, 2).window_batches(i, 7) for i in range(4)] == [3, 3, 1, 3]


def test_negative_window_fails_in_setup(varied):
    manifest, _ = varied()
    with pytest.raises(ValueError, match="length_bucketing must be >= 0"):
        data(manifest, length_bucketing=-1)


def test_bucketed_and_mixed_batches_embed_samples_alike(tiny_tok, photos):
    """Padding hides nothing an embedding sees: each sample embedded in a batch of similar lengths (as length
    bucketing makes) equals the same sample embedded in a batch of mixed lengths."""
    from muco.inputs.tokenizer import SpecialTokenIds
    from muco.model.backbone import BackboneConfig, build_backbone
    from muco.model.embedder import Embedder

    torch.manual_seed(0)
    model = build_backbone(BackboneConfig(preset="tiny", attn_implementation="eager"), tiny_tok)
    embedder = Embedder(model, SpecialTokenIds.from_tokenizer(tiny_tok).emb).eval()
    policy = ImagePolicy.preset("tiny")
    samples = [PretrainSample(f"s{i}", policy.prepare(photos[i % len(photos)]),
                              [f"query {k} of {i}" + " more" * (4 * i) for k in range(3)],
                              [f"target {k} of {i}" + " words" * (3 * i) for k in range(3)]) for i in range(6)]
    collate = PretrainCollator(tiny_tok, policy)
    buckets = LengthBuckets(M3TLength(policy), window=2, batch_size=3)
    bucketed = buckets.batches(list(samples), random.Random(0))
    mixed = [[samples[0], samples[5], samples[2]], [samples[3], samples[1], samples[4]]]
    assert sorted(s.key for s in bucketed[0]) in (["s0", "s1", "s2"], ["s3", "s4", "s5"])

    def embed(batches: list[list[PretrainSample]]) -> tuple[dict[str, torch.Tensor], float]:
        out, cols = {}, []
        for batch in batches:
            b = collate(batch)
            with torch.no_grad():
                for side in ("query", "target"):
                    emb = embedder(b[side], b["num_turns"], b["keys"]).emb.view(len(batch), 3, -1)
                    out.update({(key, side): e for key, e in zip(b["keys"], emb)})
            cols.append(efficiency([b]))
        return out, sum(cols) / len(cols)

    (got, eff_b), (want, eff_m) = embed(bucketed), embed(mixed)
    assert eff_b > eff_m  # the bucketed batches really pad less
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=0)


def test_positions_restore_across_the_option():
    """A checkpoint from before the option was switched on (or off) resumes without error, at a window boundary
    (no exactness: the batches differ anyway)."""
    plain = {"raw": 9, "skipped": 2, "samples": 6, "batches": 3, "batch_no": 0}
    window = WindowPosition.restore(plain)
    assert (window.window_raw, window.window_skipped, window.window_batches) == (9, 2, 0)
    assert asdict(WorkerPosition.restore(asdict(window))) == plain
    assert WindowPosition.restore(asdict(window)) == window
