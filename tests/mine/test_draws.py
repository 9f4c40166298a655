"""Mining with training's draws (``query_draws="train"``): the query sequences are the training decoder's draws for
(seed, epoch, key), rows stay keyed by stored turn, other epochs draw otherwise, 2 processes equal 1, and the
canonical default is unchanged; plus the rank-movement report of :mod:`muco.mine.stability`."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from muco.cli.mine import main
from muco.data.m3t.collate import PretrainCollator
from muco.data.m3t.kind import M3TRecords
from muco.data.m3t.records import M3TRecord
from muco.data.m3t.sidecar import iter_sidecar_rows, read_sidecar_manifest
from muco.data.shards import read_manifest
from muco.inputs.image_policy import ImagePolicy
from muco.mine.embed import MineStream, TrainDraws, embed_queries
from muco.mine.pipeline import CANONICAL_QUERY_TURNS, MineConfig, mine, settings
from muco.mine.stability import movement_table, rank_movement
from tests.mine.conftest import TURNS, mine_config
from tests.mine.test_mine_cli import _args
from tests.mined import write_sidecar
from tests.train.conftest import REPO, run_muco

POLICY = ImagePolicy.preset("tiny")
SEED, EPOCH = 7, 3


def _raw(key: str, rec: dict, image: bytes) -> dict:
    return {"__key__": key, "json": json.dumps(rec).encode(), "jpg": image}


def _stream(tok, manifest, k: int | None, draws: TrainDraws | None, batch_size: int = 4) -> MineStream:
    return MineStream(read_manifest(manifest).urls, PretrainCollator(tok, POLICY), POLICY, batch_size,
                      turns_per_sequence=k, draws=draws)


@pytest.mark.parametrize(("k", "turn_order"), [(2, "sample"), (3, "sample"), (2, "batch")])
def test_train_draws_are_the_training_decoders(tiny_tok, mine_shards, jpegs_of_records, k, turn_order):
    """The first sequence of every sample is what training's decoder (built by the record kind, as the
    DataModule builds it) draws for (seed, epoch, key); the undrawn turns follow canonically in runs of K."""
    manifest, records = mine_shards
    training = M3TRecords(turns_per_sample=k, turn_order=turn_order).decoder(POLICY, SEED, True, None)
    stream = _stream(tiny_tok, manifest, k, TrainDraws(SEED, EPOCH, turn_order))
    for (key, rec), image in zip(records, jpegs_of_records):
        raw = _raw(key, rec, image)
        want = training(raw, EPOCH)
        got = stream.decode(raw)
        first = got.sequences[0]
        assert (first.queries, first.targets) == (want.queries, want.targets)
        assert got.turns[:k] == want.turns and sorted(got.turns) == list(range(TURNS))
        rest = got.turns[k:]
        assert rest == sorted(rest) and [q for s in got.sequences[1:] for q in s.queries] == [
            rec["turns"][t]["queries"][0] for t in rest]  # undrawn turns: stored order, first candidate
        assert got.targets == [t["target"] for t in rec["turns"]]  # rows stay in stored turn order


def test_epochs_and_seeds_draw_differently(tiny_tok, mine_shards, jpegs_of_records):
    manifest, records = mine_shards

    def draws(seed: int, epoch: int) -> list:
        stream = _stream(tiny_tok, manifest, 2, TrainDraws(seed, epoch))
        out = []
        for (key, rec), image in zip(records, jpegs_of_records):
            s = stream.decode(_raw(key, rec, image))
            out.append((s.turns, [q for seq in s.sequences for q in seq.queries]))
        return out

    e0 = draws(SEED, 0)
    assert e0 == draws(SEED, 0)  # a pure function of (seed, epoch, key)
    assert e0 != draws(SEED, 1) and e0 != draws(SEED + 1, 0)
    canonical = _stream(tiny_tok, manifest, 2, None)
    first = canonical.decode(_raw(*records[0], jpegs_of_records[0]))
    assert first.turns == [0, 1, 2] and [s.queries for s in first.sequences] == [
        [t["queries"][0] for t in records[0][1]["turns"][:2]], [records[0][1]["turns"][2]["queries"][0]]]


def test_pooled_rows_go_back_to_stored_turn_order(tiny_ckpt, mine_shards):
    """One turn per sequence: a turn's embedding depends only on its own query, so with train draws every
    undrawn turn's row equals the canonical row of the same stored turn, and the drawn turn's equals it exactly
    when training drew the first candidate."""
    from muco.train.checkpoint import load_encoder

    manifest, records = mine_shards
    encoder = load_encoder(tiny_ckpt, image_policy="tiny")
    tok = encoder.tokenizer
    canon = embed_queries(encoder, _stream(tok, manifest, 1, None), progress=False)
    drawn = embed_queries(encoder, _stream(tok, manifest, 1, TrainDraws(SEED, EPOCH)), progress=False)
    assert drawn.keys == canon.keys and drawn.targets == canon.targets
    training = M3TRecords(turns_per_sample=1).decoder(POLICY, SEED, True, None)
    differ = 0
    for i, (key, rec) in enumerate(records):
        (query,), _, (turn,) = training.draw(M3TRecord.from_json(key, json.dumps(rec).encode()), EPOCH)
        for t in range(TURNS):
            same = torch.allclose(drawn.emb[TURNS * i + t], canon.emb[TURNS * i + t], atol=1e-5)
            assert same == (t != turn or query == rec["turns"][t]["queries"][0])
            differ += not same
    assert differ > 0


def test_canonical_is_the_default_and_its_settings_are_unchanged(pipeline_mined):
    cfg, _ = pipeline_mined
    assert cfg.query_draws == "canonical"
    assert settings(cfg)["query_turns"] == CANONICAL_QUERY_TURNS == "stored order, first candidate query"
    assert read_sidecar_manifest(cfg.output)["settings"]["query_turns"] == CANONICAL_QUERY_TURNS
    # the draw settings do not enter a canonical sidecar's settings
    assert settings(dataclasses.replace(cfg, draw_seed=3, draw_epoch=2)) == settings(cfg)
    train = settings(dataclasses.replace(cfg, query_draws="train", draw_seed=3, draw_epoch=2))
    assert train["query_turns"] == {"draws": "train", "seed": 3, "epoch": 2, "turn_order": "sample",
                                    "undrawn turns": CANONICAL_QUERY_TURNS}
    for bad, match in [({"query_draws": "random"}, "query_draws"), ({"draw_epoch": -1}, "draw_epoch"),
                       ({"turn_order": "x"}, "turn_order")]:
        with pytest.raises(ValueError, match=match):
            MineConfig("m.ckpt", ["a.tar"], cfg.output, **bad)


@pytest.fixture(scope="module")
def mined_draws(tiny_ckpt, mine_shards, tmp_path_factory):
    """`muco mine --query-draws train` (K = 2, seed 5, epoch 1) in 1 and in 2 processes."""
    manifest, _ = mine_shards
    root = tmp_path_factory.mktemp("mined_draws")
    draws = ("--query-draws", "train", "--draw-epoch", "1", "--draw-seed", "5", "--turns-per-sequence", "2")
    for name, extra in (("one", ()), ("two", ("--devices", "2"))):
        res = run_muco(*_args(tiny_ckpt, manifest, root / name, *draws, *extra), cwd=REPO)
        assert res.returncode == 0, res.stderr[-3000:]
    return root


@pytest.mark.slow
def test_train_draws_two_processes_equal_one_and_the_pipeline(mined_draws, tiny_ckpt, mine_shards, pipeline_mined):
    manifest, records = mine_shards
    one, two = list(iter_sidecar_rows(mined_draws / "one")), list(iter_sidecar_rows(mined_draws / "two"))
    assert len(one) == len(records) * TURNS and one == two
    assert [(r["key"], r["turn"]) for r in one] == [(k, t) for k, _ in records for t in range(TURNS)]
    assert read_sidecar_manifest(mined_draws / "one") == read_sidecar_manifest(mined_draws / "two")
    cfg = mine_config(tiny_ckpt, manifest, mined_draws / "pipeline", query_draws="train", draw_seed=5,
                      draw_epoch=1, turns_per_sequence=2)
    mine(cfg, "cpu")
    assert list(iter_sidecar_rows(cfg.output)) == one
    assert read_sidecar_manifest(mined_draws / "one")["settings"] == settings(cfg)
    # the draws moved some negatives (else the option would be pointless on these shards)
    canon = rank_movement(pipeline_mined[0].output, mined_draws / "one")
    assert canon["turns"] == len(one) and canon["jaccard@10"] < 1


def test_train_draws_need_an_epoch_and_a_seed(tiny_ckpt, mine_shards, tmp_path):
    manifest, _ = mine_shards
    with pytest.raises(SystemExit):  # argparse: --draw-epoch missing
        main(_args(tiny_ckpt, manifest, tmp_path / "out", "--query-draws", "train")[1:])
    with pytest.raises(SystemExit, match="records no training data seed"):  # the fixture checkpoint has none
        main(_args(tiny_ckpt, manifest, tmp_path / "out", "--query-draws", "train", "--draw-epoch", "0")[1:])
    with pytest.raises(SystemExit):
        main(_args(tiny_ckpt, manifest, tmp_path / "out", "--draw-epoch", "0")[1:])
    assert not (tmp_path / "out").exists()


def test_draw_seed_and_turn_order_come_from_the_checkpoint(tmp_path):
    from muco.mine.pipeline import resolve_draw_seed

    path = tmp_path / "k.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}, "datamodule_hyper_parameters": {
        "seed": 11, "records": {"class_path": "muco.data.m3t.kind.M3TRecords",
                                "init_args": {"turns_per_sample": 2, "turn_order": "batch"}}}}, path)
    assert resolve_draw_seed(path) == (11, "batch")
    assert resolve_draw_seed(path, 4) == (4, "batch")
    assert resolve_draw_seed(tmp_path, 4) == (4, "sample")  # an exported directory: the seed must be given
    with pytest.raises(ValueError, match="records no training data seed"):
        resolve_draw_seed(tmp_path)


def test_in_fit_rounds_accept_query_draws():
    from muco.rounds.in_fit import MINE_DEFAULTS, InFitRounds

    assert MINE_DEFAULTS["query_draws"] == "canonical"
    stage = [{"from_round": 2, "band": [1, 4], "per_turn": 1}]
    assert InFitRounds(1, stage, mine={"query_draws": "train"}).mine["query_draws"] == "train"
    with pytest.raises(ValueError, match="query_draws"):
        InFitRounds(1, stage, mine={"query_draws": "both"})


# -- rank movement -----------------------------------------------------------------------------------------
def _side(tmp_path, name, rows):
    from muco.data.m3t.sidecar import load_sidecar

    return load_sidecar(write_sidecar(tmp_path / name, rows))


def test_rank_movement_identical_and_disjoint(tmp_path):
    a = {("s1", 0): [f"a{i}" for i in range(12)], ("s1", 1): ["x", "y"], ("s2", 0): []}
    same = rank_movement(_side(tmp_path, "a", a), write_sidecar(tmp_path / "a2", a))  # a directory works too
    assert same == {"turns": 3, "turns_compared": 2, "only_a": 0, "only_b": 0, "jaccard@10": 1.0,
                    "recall@10": 1.0, "mean_abs_rank_change": 0.0, "shared_negatives": 14, "same_rank1": 1.0}
    b = {key: [f"b{t}" for t in texts] for key, texts in a.items()}
    apart = rank_movement(_side(tmp_path, "a", a), _side(tmp_path, "b", b))
    assert apart["jaccard@10"] == apart["recall@10"] == apart["same_rank1"] == 0.0
    assert apart["mean_abs_rank_change"] is None and apart["shared_negatives"] == 0


def test_rank_movement_partial(tmp_path):
    a = {("s1", 0): ["p", "q", "r", "s"], ("s1", 1): ["x"]}
    b = {("s1", 0): ["q", "p", "t", "u"], ("s9", 0): ["z"]}
    m = rank_movement(_side(tmp_path, "a", a), _side(tmp_path, "b", b), k=2)
    # top-2 {p, q} vs {q, p}: the same set; ranks p 1->2, q 2->1 (r, s not in b)
    assert m["turns"] == 1 and m["only_a"] == 1 and m["only_b"] == 1
    assert m["jaccard@2"] == m["recall@2"] == 1.0 and m["same_rank1"] == 0.0 and m["mean_abs_rank_change"] == 1.0
    m4 = rank_movement(_side(tmp_path, "a", a), _side(tmp_path, "b", b), k=4)
    assert m4["jaccard@4"] == pytest.approx(2 / 6, abs=1e-4) and m4["recall@4"] == 0.5
    table = movement_table({"a vs b": m4}, k=4)
    assert "a vs b" in table and "0.3333" in table and "jaccard@4" in table.splitlines()[0]
    with pytest.raises(ValueError):
        rank_movement(a, b, k=0)
