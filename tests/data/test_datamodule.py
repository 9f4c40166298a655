from __future__ import annotations

import io
import json
import logging
import tarfile
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from muco.data.datamodule import MuCoDataModule
from tests.data.builders import m3t_data

TINY = {"tokenizer": "tiny", "image_policy": "tiny"}


def keys_of(loader) -> list[str]:
    return [k for b in loader for k in b["keys"]]


def rank_loader(dm: MuCoDataModule, rank: int, world: int, workers: int) -> DataLoader:
    return DataLoader(dm.make_dataset("train", rank=rank, world_size=world), batch_size=None,
                      num_workers=workers)


def test_batches_are_model_inputs(make_shards):
    pattern, keys, _ = make_shards(n_shards=2, per_shard=4)
    dm = m3t_data(pattern, batch_size=3, num_workers=0, turns_per_sample=4, samples_per_epoch=6, **TINY)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) >= {"query", "target", "num_turns", "keys", "stats"}
    assert batch["num_turns"].tolist() == [4, 4, 4]
    assert set(batch["query"]) >= {"input_ids", "attention_mask", "pixel_values", "image_grid_thw"}
    assert "pixel_values" not in batch["target"]  # targets are text only
    stats = batch["stats"]
    assert {k: getattr(stats, k) for k in ("skipped", "worker", "samples", "epoch", "train")} == {
        "skipped": 0, "worker": "r0w0", "samples": 3, "epoch": 0, "train": True}
    assert asdict(stats.position) == {"raw": 3, "skipped": 0, "samples": 3, "batches": 1, "batch_no": 0}
    assert set(batch["keys"]) <= set(keys)


def test_two_ranks_two_workers_split_disjointly(make_shards):
    pattern, keys, _ = make_shards(n_shards=8, per_shard=4)
    dm = m3t_data(pattern, batch_size=2, num_workers=2, resampled=False, **TINY)
    dm.setup("fit")
    seen = {}
    for rank in (0, 1):
        batches = list(rank_loader(dm, rank, 2, workers=2))
        assert {b["stats"].worker for b in batches} == {f"r{rank}w0", f"r{rank}w1"}
        seen[rank] = [k for b in batches for k in b["keys"]]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == keys  # every sample exactly once


def test_non_resampled_epoch_of_one_pass_has_no_duplicates(make_shards):
    pattern, keys, manifest = make_shards(n_shards=8, per_shard=4)
    dm = m3t_data(str(manifest), batch_size=2, num_workers=2, resampled=False, shuffle_buffer=50, **TINY)
    dm.setup("fit")  # samples_per_epoch = 32 from the manifest: one pass; the pass repeats only after it
    seen = [keys_of(rank_loader(dm, rank, 2, workers=2)) for rank in (0, 1)]
    assert [len(s) for s in seen] == [16, 16]
    assert sorted(seen[0] + seen[1]) == keys  # the shuffle buffer never pulls in the next pass


def test_spawned_workers_split_by_the_explicit_rank(make_shards):
    """Spawned workers inherit no process group: the split must not rely on one (split_by_node would not split)."""
    pattern, keys, manifest = make_shards(n_shards=4, per_shard=2)
    dm = m3t_data(str(manifest), batch_size=2, num_workers=1, resampled=False, **TINY)
    dm.setup("fit")
    ds = dm.make_dataset("train", rank=1, world_size=2)
    loader = DataLoader(ds, batch_size=None, num_workers=1, multiprocessing_context="spawn")
    got = keys_of(loader)
    assert len(got) == len(set(got)) == 4  # this rank's half (2 of 4 shards), each sample once
    ref = keys_of(rank_loader(dm, 1, 2, workers=0))
    assert sorted(got) == sorted(ref)  # the same shards as in-process


def test_resampled_every_rank_gets_the_same_number_of_batches(make_shards):
    pattern, _, _ = make_shards(n_shards=3, per_shard=5)  # 15 samples: shards are drawn with replacement
    dm = m3t_data(pattern, batch_size=2, num_workers=2, samples_per_epoch=40, shuffle_buffer=8, **TINY)
    dm.setup("fit")
    per_rank = {}
    for rank in (0, 1):
        ds = dm.make_dataset("train", rank=rank, world_size=2)
        assert len(ds) == 10  # 40 // (2 ranks * 2 images)
        loader = DataLoader(ds, batch_size=None, num_workers=2)
        per_rank[rank] = [tuple(b["keys"]) for b in loader]
        counts = Counter(b for b in per_rank[rank])
        assert len(per_rank[rank]) == 10 and sum(counts.values()) == 10
    assert per_rank[0] != per_rank[1]  # seeds differ per rank


def consume(dm: MuCoDataModule, loader) -> list[list[str]]:
    """Iterate like training does: the DataModule's batch hook records each batch's data position."""
    return [dm.on_before_batch_transfer(b, 0)["keys"] for b in loader]


def test_epochs_reseed_and_a_resplit_resume_moves_on(make_shards, caplog):
    pattern, _, manifest = make_shards(n_shards=4, per_shard=4)
    kw = dict(batch_size=4, num_workers=1, samples_per_epoch=16, shuffle_buffer=16, **TINY)
    dm = m3t_data(str(manifest), **kw)
    dm.setup("fit")
    loader = dm.train_dataloader()  # persistent worker: the epoch reaches it through shared memory
    epochs = [[k for b in consume(dm, loader) for k in b] for _ in range(3)]
    assert [len(e) for e in epochs] == [16, 16, 16]
    assert epochs[0] != epochs[1] != epochs[2]
    state = dm.state_dict()
    assert (state["epoch"], state["samples_seen"], state["world_size"], state["num_workers"]) == (2, 48, 1, 1)
    assert state["ranks"][0]["batches"] == 4

    again = m3t_data(str(manifest), **kw)  # same seed: the same stream, epoch by epoch
    again.setup("fit")
    assert keys_of(again.train_dataloader()) == epochs[0]

    # a checkpoint of epoch 1 written with 2 workers: the stream is re-split, so it moves on to epoch 2
    resumed = m3t_data(str(manifest), **kw)
    resumed.setup("fit")
    one = {**state, "epoch": 1, "num_workers": 2, "ranks": [{**state["ranks"][0], "epoch": 1}]}
    with caplog.at_level(logging.WARNING, logger="muco.data"):
        resumed.load_state_dict(one)
    assert "the stream is re-split" in caplog.text
    batches = list(resumed.train_dataloader())
    assert batches[0]["stats"].epoch == 2  # the next epoch's seed, not a replay of epoch 1
    assert [k for b in batches for k in b["keys"]] == epochs[2]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_epoch_continues_with_the_next_batch(make_shards, workers):
    """Resume mid-epoch from the state after k batches: the rest of the epoch, in the same order, with the same
    turn draws; with 2 workers the round-robin continues at the worker whose batch came next."""
    _, _, manifest = make_shards(n_shards=4, per_shard=4)
    kw = dict(batch_size=2, num_workers=workers, samples_per_epoch=16, shuffle_buffer=8, turn_order="batch",
              **TINY)
    dm = m3t_data(str(manifest), **kw)
    dm.setup("fit")
    full = list(dm.train_dataloader())
    assert len(full) == 8
    for k in (3, 5):
        dm = m3t_data(str(manifest), **kw)
        dm.setup("fit")
        it = iter(dm.train_dataloader())
        for _ in range(k):
            dm.on_before_batch_transfer(next(it), 0)
        state = dm.state_dict()
        resumed = m3t_data(str(manifest), **kw)
        resumed.setup("fit")
        resumed.load_state_dict(state)
        rest = list(resumed.train_dataloader())
        assert [b["keys"] for b in rest] == [b["keys"] for b in full[k:]]
        for a, b in zip(rest, full[k:]):
            assert torch.equal(a["target_text_id"], b["target_text_id"])  # the same turns, in the same order
            assert torch.equal(a["query"]["input_ids"], b["query"]["input_ids"])



def test_a_resume_reads_past_trained_samples_without_decoding_them(tmp_path, jpegs, rec_json, caplog):
    """The 5 bad samples sit between good2 and good3: resumed after good3, they are read past (not decoded: no
    new skip, no warning) and the skip count carries over."""
    shards, good = _salted_shards(tmp_path, jpegs, rec_json)
    kw = dict(batch_size=1, num_workers=0, resampled=False, shuffle_buffer=0, samples_per_epoch=14, **TINY)
    dm = m3t_data(shards[:1], **kw)
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    taken = [dm.on_before_batch_transfer(next(it), 0)["keys"][0] for _ in range(4)]
    assert taken == ["good0", "good1", "good2", "good3"]  # good3 came after the 5 bad samples
    state = dm.state_dict()
    assert state["ranks"][0]["workers"][0]["skipped"] == 5 and state["ranks"][0]["workers"][0]["raw"] == 9
    resumed = m3t_data(shards[:1], **kw)
    resumed.setup("fit")
    resumed.load_state_dict(state)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="muco.data"):
        batch = resumed.on_before_batch_transfer(next(iter(resumed.train_dataloader())), 0)
    assert batch["keys"] == ["good4"] and caplog.records == []
    assert batch["stats"].skipped_total == 5

def test_manifest_gives_the_epoch_length_and_weights_mix_sources(make_shards):
    a, _, man_a = make_shards("a", n_shards=2, per_shard=8)
    b, _, man_b = make_shards("b", n_shards=2, per_shard=8)
    dm = m3t_data(str(man_a), batch_size=4, num_workers=0, **TINY)
    dm.setup("fit")
    assert dm.train_config.samples_per_epoch == 16  # from the manifest
    assert len(dm.train_dataloader()) == 4
    dm = m3t_data([str(man_a), b], train_weights=[3.0, 1.0], batch_size=4, num_workers=0,
                       samples_per_epoch=400, **TINY)
    dm.setup("fit")
    src = Counter(k[0] for k in keys_of(dm.train_dataloader()))
    assert src["a"] + src["b"] == 400
    assert 0.65 < src["a"] / 400 < 0.85  # weight 3:1 per sample


def _salted_shards(tmp_path: Path, jpegs, rec_json) -> tuple[list[str], list[str]]:
    """One shard with each kind of bad sample between good ones, and one truncated shard."""
    good: list[str] = []
    salted = tmp_path / "salted-000000.tar"
    with tarfile.open(salted, "w") as tar:
        def add(key, members):
            for ext, data in members:
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))

        def rec(key, **kw):
            return json.dumps(rec_json(key, **kw)).encode()

        for i in range(3):
            add(f"good{i}", [("jpg", jpegs[i]), ("json", rec(f"good{i}"))])
            good.append(f"good{i}")
        add("corrupt", [("jpg", b"\xff\xd8\xff garbage, not a JPEG"), ("json", rec("corrupt"))])
        add("nojson", [("jpg", jpegs[0])])
        add("fiveturns", [("jpg", jpegs[1]), ("json", rec("fiveturns", turns=5))])
        empty = rec_json("emptyq")
        empty["turns"][2]["queries"][0] = ""
        add("emptyq", [("jpg", jpegs[2]), ("json", json.dumps(empty).encode())])
        add("badjson", [("jpg", jpegs[2]), ("json", b'{"turns": [')])
        for i in range(3, 5):
            add(f"good{i}", [("jpg", jpegs[i]), ("json", rec(f"good{i}"))])
            good.append(f"good{i}")
    trunc = tmp_path / "salted-000001.tar"
    with tarfile.open(trunc, "w") as tar:
        for i in range(5, 8):
            for ext, data in [("jpg", jpegs[i % len(jpegs)]), ("json", rec(f"good{i}"))]:
                info = tarfile.TarInfo(f"good{i}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    with tarfile.open(trunc) as tar:
        cut = tar.getmember("good7.jpg")
    good += ["good5", "good6"]  # good7 is cut in half
    data = trunc.read_bytes()
    trunc.write_bytes(data[: cut.offset_data + cut.size // 2])
    return [str(salted), str(trunc)], good


def test_bad_samples_are_skipped_counted_and_logged(tmp_path, jpegs, rec_json, caplog):
    shards, good = _salted_shards(tmp_path, jpegs, rec_json)
    dm = m3t_data(shards, batch_size=1, num_workers=0, resampled=False, **TINY)
    dm.setup("fit")
    ds = dm.make_dataset("train")
    with caplog.at_level(logging.WARNING, logger="muco.data"):
        batches = list(DataLoader(ds, batch_size=None, num_workers=0))
    assert sorted(k for b in batches for k in b["keys"]) == sorted(good)  # every good sample arrives
    # corrupt JPEG, missing json, 5 turns, empty query, bad JSON, truncated tar: each counted once
    assert (ds.position.skipped, ds.position.samples) == (6, 7)
    assert max(b["stats"].skipped for b in batches) <= 6
    # warnings name shard and key; rate-limited: the first 5 in full, the 6th within 30 s suppressed
    bad = {"corrupt": 0, "nojson": 0, "fiveturns": 0, "emptyq": 0, "badjson": 0, "good7": 1}
    assert len(caplog.records) == 6
    # the pass ends with the count of warnings held back, so no skip goes unmentioned
    assert caplog.records[-1].getMessage() == "worker r0w0: 1 more skipped samples not shown (6 skipped in this pass)"
    for rec in caplog.records[:-1]:
        msg = rec.getMessage()
        key = msg.split("'")[1]
        assert msg.startswith(f"skipped sample '{key}' of shard {shards[bad[key]]}: ")


def test_skip_log_is_rate_limited(caplog, monkeypatch):
    from muco.data import skips as skip_log

    clock = [100.0]
    monkeypatch.setattr(skip_log.time, "monotonic", lambda: clock[0])
    skip = skip_log.SkipLog(first=2, interval=10.0)
    with caplog.at_level(logging.WARNING, logger="muco.data"):
        for i in range(6):
            skip("r0w0", "s.tar", f"k{i}", "bad", i + 1)
        clock[0] += 11
        skip("r0w0", "s.tar", "k6", "bad", 7)
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 3 and "'k6'" in msgs[2] and "(4 similar warnings suppressed)" in msgs[2]


def test_bad_samples_do_not_stop_real_workers(tmp_path, jpegs, rec_json):
    shards, good = _salted_shards(tmp_path, jpegs, rec_json)
    dm = m3t_data(shards, batch_size=1, num_workers=2, resampled=False, **TINY)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert sorted(k for b in batches for k in b["keys"]) == sorted(good)
    assert {b["stats"].worker for b in batches} == {"r0w0", "r0w1"}


def test_validation_reads_everything_once_with_partial_batches(make_shards):
    train, _, _ = make_shards("train", n_shards=2, per_shard=4)
    val, val_keys, _ = make_shards("val", n_shards=3, per_shard=3)
    dm = m3t_data(train, val_shards=val, batch_size=4, num_workers=2, samples_per_epoch=8, **TINY)
    dm.setup("fit")
    assert sorted(keys_of(dm.val_dataloader())) == val_keys  # 9 samples: the partial batch is kept
    two = [keys_of(DataLoader(dm.make_dataset("val", r, 2), batch_size=None)) for r in (0, 1)]
    assert not set(two[0]) & set(two[1]) and sorted(two[0] + two[1]) == val_keys
    assert keys_of(dm.val_dataloader()) == keys_of(dm.val_dataloader())  # fixed order and turns


def test_pair_shards_given_to_the_m3t_datamodule_fail_early(tmp_path):
    rec = {"query": {"text": "a cat?", "image": None, "caption": None},
           "positive": {"text": "a cat.", "image": None, "caption": None}, "negatives": []}
    data = json.dumps(rec).encode()
    with tarfile.open(tmp_path / "pairs-000000.tar", "w") as tar:
        info = tarfile.TarInfo("p0000.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ValueError, match="holds fine-tuning pairs .*PairRecords"):
        _setup_error(train_shards=str(tmp_path / "pairs-000000.tar"))


def test_no_val_shards_means_no_validation_loop(make_shards):
    train, _, _ = make_shards("train", n_shards=2, per_shard=4)
    dm = m3t_data(train, val_shards=None, batch_size=4, num_workers=0, samples_per_epoch=8, **TINY)
    dm.setup("fit")
    assert dm.val_dataloader() == []  # Lightning then skips validation instead of failing mid-fit


def _setup_error(**kw):
    dm = m3t_data(**{"batch_size": 2, "num_workers": 0, "samples_per_epoch": 8, **TINY, **kw})
    return dm.setup("fit")


def test_early_errors(make_shards, tmp_path, monkeypatch):
    pattern, _, manifest = make_shards(n_shards=4, per_shard=2)
    with pytest.raises(FileNotFoundError, match="no shard matched"):
        _setup_error(train_shards=str(tmp_path / "nowhere-{000..003}.tar"))
    with pytest.raises(FileNotFoundError, match="do not exist.*brace range"):
        _setup_error(train_shards=pattern.replace("000003", "000009"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="manifest .* is invalid"):
        _setup_error(train_shards=str(bad))
    with pytest.raises(FileNotFoundError, match="manifest .* does not exist"):
        _setup_error(train_shards=str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match=r"turns_per_sample=8 but the records of data.train_shards have 7 turns"):
        _setup_error(train_shards=str(manifest), turns_per_sample=8)
    with pytest.raises(ValueError, match=r"turns_per_record=6 but the manifest .* says its records have 7 turns"):
        _setup_error(train_shards=str(manifest), turns_per_record=6)
    with pytest.raises(ValueError, match="smaller than world_size\\*batch_size"):
        _setup_error(train_shards=pattern, samples_per_epoch=1)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        _setup_error(train_shards=pattern, batch_size=0)
    with pytest.raises(ValueError, match="samples_per_epoch is required"):
        _setup_error(train_shards=pattern, samples_per_epoch=None)
    with pytest.raises(ValueError, match="one weight per source"):
        _setup_error(train_shards=[pattern], train_weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="unknown image policy"):
        _setup_error(train_shards=pattern, image_policy="huge")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="world_size\\*num_workers=6 shards per source.*has 4"):
        _setup_error(train_shards=str(manifest), resampled=False, num_workers=3)
    _setup_error(train_shards=str(manifest), resampled=False, num_workers=2)  # 4 shards are enough


def test_lightning_fit_epochs_checkpoint_and_resume(make_shards, tmp_path):
    from lightning.pytorch import LightningModule, Trainer

    class Probe(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen: list[tuple[int, int]] = []
            self.val_keys: list[str] = []

        def training_step(self, batch, batch_idx):
            self.seen.append((self.current_epoch, batch["stats"].epoch))
            return ((self.w - batch["num_turns"].float().mean()) ** 2).sum()

        def validation_step(self, batch, batch_idx):
            self.val_keys += batch["keys"]

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    train, _, _ = make_shards("train", n_shards=2, per_shard=4)
    val, val_keys, _ = make_shards("val", n_shards=1, per_shard=3)

    def run(max_epochs: int, ckpt: str | None = None) -> tuple[Probe, Trainer]:
        dm = m3t_data(train, val_shards=val, batch_size=2, num_workers=1, samples_per_epoch=6, **TINY)
        model = Probe()
        trainer = Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, logger=False,
                          enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                          num_sanity_val_steps=0, default_root_dir=tmp_path)
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt)
        return model, trainer

    model, trainer = run(2)
    assert model.seen == [(0, 0)] * 3 + [(1, 1)] * 3  # 6 // 2 batches per epoch; workers follow the epoch
    assert sorted(model.val_keys) == sorted(val_keys * 2)  # validated after each epoch, all samples
    ckpt = str(tmp_path / "last.ckpt")
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=True)["MuCoDataModule"]  # Lightning stores the DataModule's state
    assert (state["epoch"], state["samples_seen"], state["seed"]) == (1, 12, 0)
    assert state["ranks"][0]["batches"] == 3  # the epoch was complete: a resume starts the next one
    resumed, _ = run(3, ckpt)
    assert resumed.seen == [(2, 2)] * 3


# -- mined negatives ---------------------------------------------------------------------------------------
def _stored_turn(key: str, target_id: int) -> int:
    from muco.inputs.sequence import text_id

    return next(t for t in range(7) if text_id(f"{key} t{t}") == target_id)  # record_json's target texts


def test_mined_negatives_join_their_samples_and_turns(make_shards, tmp_path, caplog):
    from muco.inputs.sequence import text_id
    from tests.mined import neg_text, ranked_rows, write_sidecar

    pattern, keys, manifest = make_shards(n_shards=2, per_shard=4)
    with_negs = keys[:6]  # the other 2 samples are not in the sidecar: all their negatives are missing
    rows = ranked_rows(with_negs, range(7), top_k=12)
    for t in range(7):  # one turn of one sample has a negative above the band only: missing as well
        rows[(keys[0], t)] = rows[(keys[0], t)][:1] if t == 3 else rows[(keys[0], t)]
    sidecar = write_sidecar(tmp_path / "mined", rows)
    kw = dict(batch_size=4, num_workers=0, turns_per_sample=5, resampled=False, **TINY)  # each sample once
    dm = m3t_data(str(manifest), val_shards=pattern, **kw,
                       negatives={"sidecar": str(sidecar), "band": [3, 6], "per_turn": 2})
    with caplog.at_level(logging.INFO, logger="muco.data"):
        dm.setup("fit")
    assert "6 training samples of 8 (75.0%) have negatives in ranks 3-6" in caplog.text
    batches = list(dm.train_dataloader())
    assert len(batches) == 2 and sorted(keys_of(batches)) == keys
    seen = Counter()
    for b in batches:
        B, K, P = 4, 5, 2
        assert b["negative_num_turns"].tolist() == [K] * (B * P)
        assert b["negative_valid"].shape == b["negative_text_id"].shape == (B * P * K,)
        valid, nid = b["negative_valid"].view(B, P, K), b["negative_text_id"].view(B, P, K)
        for i, key in enumerate(b["keys"]):
            for k in range(K):
                turn = _stored_turn(key, int(b["target_text_id"][i * K + k]))
                band = {text_id(neg_text(key, turn, r)) for r in range(3, 7)}
                has = key in with_negs and not (key == keys[0] and turn == 3)
                assert valid[i, :, k].tolist() == [has, has]
                seen[has] += 1
                if has:  # two different negatives of this very sample and stored turn, from ranks 3..6
                    assert set(nid[i, :, k].tolist()) <= band and nid[i, 0, k] != nid[i, 1, k]
    assert seen[True] > 0 and seen[False] >= 10  # keys[6:] miss all their 2 x 5 negatives
    # validation batches have no negatives
    assert not any(k.startswith("negative") for b in dm.val_dataloader() for k in b)

    # reproducible, and switching negatives on does not change the drawn turns and queries
    again = m3t_data(str(manifest), **kw, negatives={"sidecar": str(sidecar), "band": [3, 6], "per_turn": 2})
    again.setup("fit")
    plain = m3t_data(str(manifest), **kw)
    plain.setup("fit")
    for a, b, c in zip(again.train_dataloader(), batches, plain.train_dataloader()):
        assert torch.equal(a["negative_text_id"], b["negative_text_id"])
        assert torch.equal(b["target_text_id"], c["target_text_id"])
        assert torch.equal(b["query"]["input_ids"], c["query"]["input_ids"])


def test_negatives_sidecar_errors_are_early_and_clear(make_shards, tmp_path):
    _, _, manifest = make_shards(n_shards=2, per_shard=4)

    def setup(sidecar):
        dm = m3t_data(str(manifest), batch_size=2, num_workers=0, **TINY, negatives={"sidecar": str(sidecar)})
        dm.setup("fit")

    with pytest.raises(FileNotFoundError, match=r"data.records.negatives.sidecar=.*nowhere' does not exist"):
        setup(tmp_path / "nowhere")
    (tmp_path / "half").mkdir()
    with pytest.raises(FileNotFoundError, match="has no manifest.json"):
        setup(tmp_path / "half")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "manifest.json").write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match=r"data.records.negatives.sidecar=.*bad' is not a readable negatives sidecar"):
        setup(bad)
    with pytest.raises(ValueError, match="band must be"):
        m3t_data(str(manifest), negatives={"sidecar": str(bad), "band": [0, 3]})


def _shard(path: Path, records: list[tuple[str, dict]], jpegs) -> str:
    with tarfile.open(path, "w") as tar:
        for i, (key, rec) in enumerate(records):
            for ext, data in (("jpg", jpegs[i % len(jpegs)]), ("json", json.dumps(rec).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


@pytest.mark.parametrize("first_turns", [8, 3])
def test_the_turn_count_is_the_sources_not_the_first_records(tmp_path, jpegs, rec_json, first_turns):
    """An odd first record is the one skipped; the 7-turn records after it all train."""
    from muco.data.shards import write_manifest

    good = [f"good{i}" for i in range(6)]
    records = [("odd", rec_json("odd", turns=first_turns))] + [(k, rec_json(k)) for k in good]
    url = _shard(tmp_path / "s-000000.tar", records, jpegs)
    manifest = write_manifest(tmp_path / "manifest.json", [{"name": url, "num_samples": 7}], turns=7)
    for spec, kw in ((str(manifest), {}), (url, {"turns_per_record": 7})):
        dm = m3t_data(spec, batch_size=2, num_workers=0, resampled=False, turns_per_sample=3,
                           samples_per_epoch=6, **kw, **TINY)
        dm.setup("fit")
        batches = list(dm.train_dataloader())
        assert sorted(keys_of(batches)) == good
        assert batches[-1]["stats"].skipped == 1


def test_empty_tars_stop_with_an_error_instead_of_spinning(tmp_path):
    """Valid tars without members, drawn with replacement forever: a clear error, quickly."""
    import time

    urls = []
    for i in range(3):
        with tarfile.open(tmp_path / f"empty-{i}.tar", "w"):
            pass
        urls.append(str(tmp_path / f"empty-{i}.tar"))
    dm = m3t_data(urls, batch_size=2, num_workers=0, resampled=True, samples_per_epoch=8, **TINY)
    dm.setup("fit")
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"1000 shards in a row held no sample .*check data.train_shards"):
        next(iter(dm.train_dataloader()))
    assert time.monotonic() - t0 < 30


def test_a_manifest_of_zero_samples_fails_in_setup(tmp_path):
    from muco.data.shards import write_manifest

    with tarfile.open(tmp_path / "e-0.tar", "w"):
        pass
    manifest = write_manifest(tmp_path / "manifest.json", [{"name": str(tmp_path / "e-0.tar"), "num_samples": 0}])
    with pytest.raises(ValueError, match="the manifests list 0 samples"):
        _setup_error(train_shards=str(manifest))


def test_length_bounds_skip_a_sample_instead_of_widening_its_batch(tmp_path, jpegs, rec_json):
    """One 4,000-character target would widen its whole batch tenfold: over the configured bounds it is skipped."""
    long_target = rec_json("long_target")
    long_target["turns"][2]["target"] = "word " * 800  # 4,000 characters
    long_sequence = rec_json("long_sequence")
    for t in long_sequence["turns"]:
        t["target"] = "y" * 900  # each text fine, the target sequence 7 x 900 characters
    good = [f"good{i}" for i in range(4)]
    url = _shard(tmp_path / "s-000000.tar", [("long_target", long_target), ("long_sequence", long_sequence)]
                 + [(k, rec_json(k)) for k in good], jpegs)
    dm = m3t_data(url, batch_size=1, num_workers=0, resampled=False, turns_per_sample=7,
                       max_text_chars=2000, max_sequence_chars=6000, **TINY)
    dm.setup("fit")
    ds = dm.make_dataset("train")
    batches = list(DataLoader(ds, batch_size=None, num_workers=0))
    assert sorted(keys_of(batches)) == good and ds.position.skipped == 2
    widest = max(b["target"]["input_ids"].shape[1] for b in batches)
    assert widest < 400  # tokens: the 4,000-character target never reached a batch
