"""Pair streaming: seeded masked counterparts and negatives drawn in the data path, pair DataModule options."""

from __future__ import annotations

import json

import pytest
import torch

from muco.convert.pairs import convert_pairs
from muco.data.pairs.collate import EMPTY_NEGATIVE
from muco.data.seeds import sample_rng
from muco.inputs.templates import IMG, MASK_TOKEN, base_template, finetune_template
from muco.inputs.tokenizer import SpecialTokenIds
from tests.data.builders import pair_data

CAPTION = "a handwritten digit five"


def write_pairs(tmp_path, photos, n: int, per_shard: int, prefix: str = "pair") -> str:
    """``n`` pair records with an image query, a text positive and (every third one without) negatives."""
    img = tmp_path / "imgs"
    img.mkdir(exist_ok=True)
    photos[0].save(img / "p0.png")
    lines = []
    for i in range(n):
        negs = [] if i % 3 == 2 else [{"text": f"wrong {i} a"}, {"text": f"wrong {i} b", "image": "p0.png"}]
        lines.append({"key": f"{prefix}{i}", "query": {"text": "What digit is written here?", "image": "p0.png",
                                                         "caption": CAPTION},
                      "positive": {"text": "five."}, "negatives": negs})
    src = tmp_path / f"{prefix}.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    convert_pairs(src, img, str(tmp_path / prefix / "s-%06d.tar"), max_samples_per_shard=per_shard, overwrite=True)
    return str(tmp_path / prefix / "manifest.json")


def squeeze_image(ids: torch.Tensor, mask: torch.Tensor, image_pad: int) -> list[int]:
    """Real tokens of a row, its run of image pads collapsed back to the single placeholder."""
    out: list[int] = []
    for t in ids[mask.bool()].tolist():
        if not (t == image_pad and out and out[-1] == image_pad):
            out.append(t)
    return out


def test_masked_counterpart_equals_hand_derived_string(tmp_path, photos, tiny_tok):
    manifest = write_pairs(tmp_path, photos, n=7, per_shard=8)
    # sample_rng(seed=7, epoch=2, "pair6") draws 0.375, 0.622, 0.893, 0.304, 0.216, 0.766, 0.703, 0.734, 0.617,
    # 0.536, 0.225, 0.544, then randrange(2) for the negative
    draws = sample_rng(7, 2, "pair6")
    assert [round(draws.random(), 3) for _ in range(12)] == [0.375, 0.622, 0.893, 0.304, 0.216, 0.766, 0.703,
                                                             0.734, 0.617, 0.536, 0.225, 0.544]
    # positive "five.\n": 0.375 < 0.5 -> the whole counterpart is one <|mask|>.
    # query counterpart "Image description: a handwritten digit five\nWhat digit is written here?\n":
    # 0.622 >= 0.5 -> word masking; words Image .893 keep | description: .304 mask | a .216 mask (run collapses)
    # | handwritten .766 | digit .703 | five\nWhat .734 | digit .617 | is .536 keep | written .225 mask |
    # here?\n .544 keep
    masked_pos = MASK_TOKEN
    masked_qry = f"Image {MASK_TOKEN} handwritten digit five\nWhat digit is {MASK_TOKEN} here?\n"
    dm = pair_data(manifest, batch_size=7, num_workers=0, resampled=False, shuffle_buffer=0, seed=7,
                        samples_per_epoch=7, tokenizer="tiny")
    dm.setup("fit")
    dm._shared_epoch.set_value(2)
    batch = next(iter(dm.make_dataset("train")))
    i = batch["keys"].index("pair6")
    pad = SpecialTokenIds.from_tokenizer(tiny_tok).image_pad
    tok = lambda s: tiny_tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    q = squeeze_image(batch["query"]["input_ids"][i], batch["query"]["attention_mask"][i], pad)
    assert q == tok(finetune_template(IMG + "\nWhat digit is written here?\n", masked_pos))
    t = batch["target"]["input_ids"][i][batch["target"]["attention_mask"][i].bool()].tolist()
    assert t == tok(finetune_template("five.\n", masked_qry))
    # the drawn negative (either of the two) is encoded single-turn; pair2/pair5 have none: masked placeholder
    n = squeeze_image(batch["negative"]["input_ids"][i], batch["negative"]["attention_mask"][i], pad)
    assert n in (tok(base_template("wrong 6 a\n")), tok(base_template(IMG + "\nwrong 6 b\n")))
    valid = dict(zip(batch["keys"], batch["negative_valid"].tolist()))
    assert valid == {f"pair{k}": k % 3 != 2 for k in range(7)}
    j = batch["keys"].index("pair2")
    assert batch["negative"]["input_ids"][j][batch["negative"]["attention_mask"][j].bool()].tolist() == tok(
        base_template(EMPTY_NEGATIVE))
    assert batch["stats"].epoch == 2 and batch["stats"].skipped == 0


def test_draws_are_reproducible_and_change_with_the_epoch(tmp_path, photos):
    manifest = write_pairs(tmp_path, photos, n=16, per_shard=16)

    def texts(epoch):
        dm = pair_data(manifest, batch_size=16, num_workers=0, resampled=False, shuffle_buffer=0,
                            samples_per_epoch=16, tokenizer="tiny")
        dm.setup("fit")
        dm._shared_epoch.set_value(epoch)
        b = next(iter(dm.make_dataset("train")))
        order = sorted(range(16), key=lambda k: b["keys"][k])
        return [b["target"]["input_ids"][k].tolist() + b["negative"]["input_ids"][k].tolist() for k in order]

    assert texts(0) == texts(0)
    assert texts(0) != texts(1)


def test_datamodule_splits_ranks_and_counts_bad_samples(tmp_path, photos, make_shards):
    manifest = write_pairs(tmp_path, photos, n=16, per_shard=4)
    dm = pair_data(manifest, batch_size=2, num_workers=0, resampled=False, shuffle_buffer=0,
                        samples_per_epoch=16, tokenizer="tiny", mask_ratio=0.0, full_mask_prob=0.0)
    dm.setup("fit")
    keys = []
    for rank in (0, 1):
        batches = list(dm.make_dataset("train", rank=rank, world_size=2))
        assert len(batches) == 4  # 16 // (2 ranks * 2)
        keys.append({k for b in batches for k in b["keys"]})
    assert not keys[0] & keys[1] and len(keys[0] | keys[1]) == 16
    # no masking: the counterparts are shown in full
    b = batches[0]
    assert MASK_TOKEN not in tiny_decode(dm, b["target"]["input_ids"][0])
    # M3T shards are refused with a pointer to the pair converter
    _, _, m3t = make_shards("m3t", n_shards=2, per_shard=2)
    with pytest.raises(ValueError, match="--kind pairs"):
        pair_data(str(m3t), samples_per_epoch=4, tokenizer="tiny").setup("fit")


def test_bad_pair_is_skipped_and_counted(tmp_path, photos, caplog):
    from muco.data.shards import ShardWriter

    manifest = write_pairs(tmp_path, photos, n=3, per_shard=3)
    bad = {"query": {"text": "q", "image": "qry.jpg", "caption": "c"}, "positive": {"text": "p"}, "negatives": []}
    with ShardWriter(str(tmp_path / "bad-%06d.tar")) as w:  # the query image member is missing
        w.write("broken", [("json", json.dumps(bad).encode())])
    dm = pair_data([manifest, str(tmp_path / "bad-000000.tar")], batch_size=1, num_workers=0,
                        resampled=False, shuffle_buffer=0, samples_per_epoch=4, tokenizer="tiny")
    dm.setup("fit")
    batches = list(dm.make_dataset("train"))  # 4 good samples need a second pass: the bad one was read
    assert {k for b in batches for k in b["keys"]} == {"pair0", "pair1", "pair2"}
    assert batches[-1]["stats"].skipped >= 1
    assert "skipped sample 'broken'" in caplog.text and "missing image member .qry.jpg" in caplog.text


def tiny_decode(dm, ids) -> str:
    return dm.collator.encoder.tokenizer.decode(ids)
