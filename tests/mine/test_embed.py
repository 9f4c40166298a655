"""Mining's shard reading and embedding: stored turn order and first candidates, the strided split, skips,
and embeddings equal to the training path's."""

from __future__ import annotations

import logging

import pytest
import torch

from muco.data.images import load_image
from muco.data.m3t.collate import PretrainCollator, PretrainSample
from muco.data.shards import read_manifest
from muco.inputs.image_policy import ImagePolicy
from muco.inputs.sequence import SequenceEncoder
from muco.inputs.templates import pretrain_template
from muco.mine.embed import MineStream, embed_queries, embed_texts, text_order, text_share

POLICY = ImagePolicy.preset("tiny")


def _stream(tok, manifest, batch_size=5, rank=0, world=1) -> MineStream:
    return MineStream(read_manifest(manifest).urls, PretrainCollator(tok, POLICY), POLICY, batch_size, rank, world)


def test_stored_order_first_candidates_and_skips(tiny_tok, mine_shards, caplog):
    manifest, records = mine_shards
    with caplog.at_level(logging.WARNING, logger="muco.data"):
        batches = list(_stream(tiny_tok, manifest))
    final = batches.pop()
    assert final["final"] and final["stats"]["skipped"] == 1
    assert any("bad0001" in r.getMessage() and "train-000001.tar" in r.getMessage() for r in caplog.records)
    keys = [k for b in batches for k in b["keys"]]
    assert keys == [k for k, _ in records]  # shard order, then position
    assert [t for b in batches for t in b["targets"]] == [[t["target"] for t in r["turns"]] for _, r in records]
    assert batches[0]["order"].tolist()[:2] == [[0, 0], [0, 1]] and batches[0]["num_turns"].tolist() == [3] * 5
    text = tiny_tok.decode(batches[0]["query"]["input_ids"][0])
    at = [text.index(f"s0000 q{i} c0?") for i in range(3)]
    assert at == sorted(at) and "c1?" not in text  # stored order, first candidate each turn


def _batches(tok, manifest, batch_size: int, rank: int, world: int) -> list[tuple[tuple[int, int], ...]]:
    """(shard, position) of the samples of each batch a rank embeds."""
    return [tuple(map(tuple, b["order"].tolist())) for b in _stream(tok, manifest, batch_size, rank, world)
            if "keys" in b]


def test_batches_are_shared_out_whole(tiny_tok, mine_shards):
    manifest, records = mine_shards
    one = _batches(tiny_tok, manifest, 2, 0, 1)
    assert len({o for b in one for o in b}) == len(records) == sum(map(len, one))
    assert all(len({(s, p // 2) for s, p in b}) == 1 for b in one)  # a batch: one run of positions in one shard
    for world in (2, 3):
        shares = [_batches(tiny_tok, manifest, 2, r, world) for r in range(world)]
        assert sorted(b for share in shares for b in share) == sorted(one)  # the same batches, each on one rank
        assert all((s + p // 2) % world == r for r, share in enumerate(shares) for b in share for s, p in b)
    with pytest.raises(ValueError, match="outside world size"):
        _stream(tiny_tok, manifest, 2, 2, 2)


def test_text_share_is_whole_batches_of_the_global_order():
    texts = [f"t{i}" + "x" * ((i * 7) % 11) for i in range(23)]
    order = text_order(texts).tolist()
    assert [len(texts[i]) for i in order] == sorted(map(len, texts), reverse=True)
    batches = {tuple(order[b : b + 3]) for b in range(0, 23, 3)}
    for world in (1, 2, 3, 5):
        shares = [text_share(texts, 3, r, world) for r in range(world)]
        assert sorted(i for sh in shares for i in sh.tolist()) == list(range(23))
        for sh in shares:  # embed_texts of a share forms exactly global batches
            sub = [sh.tolist()[j] for j in text_order([texts[i] for i in sh.tolist()]).tolist()]
            assert {tuple(sub[b : b + 3]) for b in range(0, len(sub), 3)} <= batches
    with pytest.raises(ValueError):
        text_share(texts, 3, 2, 2)


@pytest.fixture(scope="module")
def encoder(tiny_ckpt):
    from muco.train.checkpoint import load_encoder

    return load_encoder(tiny_ckpt, image_policy="tiny")


def test_embeddings_equal_the_training_path(encoder, mine_shards, jpegs_of_records):
    manifest, records = mine_shards
    q = embed_queries(encoder, _stream(encoder.tokenizer, manifest, batch_size=4), progress=False)
    assert q.emb.shape == (len(records) * 3, 128) and q.skipped == 1 and q.keys == [k for k, _ in records]
    q1 = embed_queries(encoder, _stream(encoder.tokenizer, manifest, batch_size=1), progress=False)
    assert torch.allclose(q.emb, q1.emb, atol=1e-5)  # batching does not change an embedding
    # sample 3 by hand: the training collator on its stored-order, first-candidate sequence
    key, rec = records[3]
    sample = PretrainSample(key, load_image(jpegs_of_records[3], POLICY), [t["queries"][0] for t in rec["turns"]],
                            [t["target"] for t in rec["turns"]])
    batch = PretrainCollator(encoder.tokenizer, POLICY)([sample])
    with torch.no_grad():
        want = encoder.embedder.eval()(batch["query"], expected=3).emb
    assert torch.allclose(q.emb[9:12], want, atol=1e-5)
    # targets: BASE(t) == PRETRAIN([t]), the first turn of a training target sequence
    texts = [t["target"] for t in rec["turns"]]
    inputs = SequenceEncoder(encoder.tokenizer, POLICY)([pretrain_template([t]) for t in texts], [None] * 3)
    with torch.no_grad():
        want = encoder.embedder(inputs, expected=1).emb
    assert torch.allclose(embed_texts(encoder, texts, batch_size=2, progress=False), want, atol=1e-5)


def test_embeddings_do_not_depend_on_the_process_count(encoder, mine_shards):
    """Whole batches per rank: every rank's query and target embeddings equal the single process's bit for bit."""
    manifest, records = mine_shards
    tok = encoder.tokenizer
    one = embed_queries(encoder, _stream(tok, manifest, batch_size=3), progress=False)
    row = {o: 3 * i for i, o in enumerate(map(tuple, one.order.tolist()))}
    texts = sorted({t for ts in one.targets for t in ts})
    all_texts = embed_texts(encoder, texts, batch_size=4, progress=False)
    for r in range(2):
        part = embed_queries(encoder, _stream(tok, manifest, 3, r, 2), progress=False)
        rows = torch.tensor([row[o] + t for o in map(tuple, part.order.tolist()) for t in range(3)])
        assert len(rows) and torch.equal(part.emb, one.emb[rows])
        share = text_share(texts, 4, r, 2)
        assert torch.equal(embed_texts(encoder, [texts[i] for i in share.tolist()], 4, False), all_texts[share])


def test_runs_of_k_turns_equal_the_training_sequences_of_k_turns(encoder, mine_shards, jpegs_of_records):
    """A model trained with K=2 is mined with 2-turn sequences: turns (0, 1) and (2,), each with the image."""
    manifest, records = mine_shards
    stream = MineStream(read_manifest(manifest).urls, PretrainCollator(encoder.tokenizer, POLICY), POLICY, 4,
                        turns_per_sequence=2)
    q = embed_queries(encoder, stream, progress=False)
    assert q.emb.shape == (len(records) * 3, 128) and q.num_turns.tolist() == [3] * len(records)
    assert q.keys == [k for k, _ in records]
    key, rec = records[3]
    image = load_image(jpegs_of_records[3], POLICY)
    qs, ts = [t["queries"][0] for t in rec["turns"]], [t["target"] for t in rec["turns"]]
    batch = PretrainCollator(encoder.tokenizer, POLICY)([PretrainSample(key, image, qs[:2], ts[:2]),
                                                         PretrainSample(key, image, qs[2:], ts[2:])])
    with torch.no_grad():
        want = encoder.embedder.eval()(batch["query"], expected=batch["num_turns"]).emb
    assert torch.allclose(q.emb[9:12], want, atol=1e-5)
    whole = embed_queries(encoder, _stream(encoder.tokenizer, manifest, batch_size=4), progress=False)
    assert torch.allclose(q.emb[9:11], whole.emb[9:11], atol=1e-5)  # turns 1-2: the same prefix
    assert not torch.allclose(q.emb[11], whole.emb[11], atol=1e-3)  # turn 3 now opens its own sequence


def test_mine_stream_pickles_into_spawned_workers():
    import pickle

    from muco.data.tar_reader import TarReader
    from muco.inputs.image_policy import ImagePolicy
    from muco.mine.embed import MineStream

    stream = pickle.loads(pickle.dumps(MineStream(["a.tar"], None, ImagePolicy.preset("tiny"), 2)))  # type: ignore[arg-type]
    assert isinstance(stream._read_tar, TarReader) and stream._read_tar.on_error.__self__ is stream


def test_shards_over_http_stream_what_local_ones_do(tiny_tok, mine_shards, caplog):
    """A remote manifest (a real HTTP server on the loopback address): the same batches, the same skip."""
    from muco.mine.pipeline import MineConfig, settings
    from tests.http_server import http_server

    manifest, records = mine_shards
    local = [b for b in _stream(tiny_tok, manifest) if "keys" in b]
    with http_server(manifest.parent) as served, caplog.at_level(logging.WARNING, logger="muco.data"):
        remote = list(_stream(tiny_tok, served.url("manifest.json")))
        urls = read_manifest(served.url("manifest.json")).urls
    final = remote.pop()
    assert final["stats"]["skipped"] == 1 and any("bad0001" in r.getMessage() for r in caplog.records)
    assert [b["keys"] for b in remote] == [b["keys"] for b in local]
    assert all(torch.equal(r["query"]["input_ids"], lo["query"]["input_ids"]) for r, lo in zip(remote, local))
    # a sidecar's settings keep the URLs as they are (no local path made of them)
    assert settings(MineConfig(model=manifest, shards=urls, output=manifest.parent))["shards"] == urls
