from __future__ import annotations

import copy
import json

import pytest

from muco.data.m3t.records import M3TRecord, Negative, Turn, turns_from_lists
from muco.data.records import RecordError, strip_image_marker


def test_json_round_trip_keeps_everything(rec_json):
    obj = rec_json("k1", turns=7, cands=3)
    obj["negatives"] = [{"text": "not this"}, {"text": "nor this", "image": "neg/1.jpg"}]
    rec = M3TRecord.from_json("k1", json.dumps(obj).encode(), image=b"\xff\xd8", expected_turns=7)
    assert rec.turns[2] == Turn("task2", ["k1 q2 c0?", "k1 q2 c1?", "k1 q2 c2?"], "k1 t2")
    assert rec.caption == "a dense caption of k1"
    assert rec.negatives == [Negative("not this"), Negative("nor this", "neg/1.jpg")]
    assert json.loads(rec.to_json_bytes()) == obj


def test_negatives_absent_stay_absent_and_caption_may_be_null(rec_json):
    obj = rec_json("k2")
    obj["caption"] = None
    rec = M3TRecord.from_json("k2", obj)
    assert rec.negatives is None and rec.caption is None
    assert set(rec.to_json()) == {"turns", "caption"}


def _err(obj, key="rk", expected_turns=None) -> RecordError:
    with pytest.raises(RecordError) as e:
        M3TRecord.from_json(key, obj, expected_turns=expected_turns)
    return e.value


@pytest.mark.parametrize(
    "mutate, field, reason",
    [
        (lambda o: o["turns"][3].update(queries="just a string"), "turns[3].queries", "type"),
        (lambda o: o["turns"][1].update(queries=[]), "turns[1].queries", "empty"),
        (lambda o: o["turns"][4]["queries"].__setitem__(1, "   "), "turns[4].queries[1]", "empty"),
        (lambda o: o["turns"][0].update(target=""), "turns[0].target", "empty"),
        (lambda o: o["turns"][2].update(target=7), "turns[2].target", "type"),
        (lambda o: o["turns"][5].update(target="the answer <|emb|>"), "turns[5].target", "reserved"),
        (lambda o: o["turns"][6]["queries"].__setitem__(0, "<|im_start|>x"), "turns[6].queries[0]",
         "reserved"),
        (lambda o: o["turns"][0]["queries"].__setitem__(0, "a <|image_1|> b"), "turns[0].queries[0]",
         "marker"),
        (lambda o: o.update(caption=""), "caption", "empty"),
        (lambda o: o.update(caption="<|mask|> caption"), "caption", "reserved"),
        (lambda o: o.update(negatives=[{"text": ""}]), "negatives[0].text", "empty"),
        (lambda o: o.update(turns="nope"), "turns", "type"),
        (lambda o: o.update(turn=[]), "json", "type"),
        (lambda o: o["turns"][0].pop("target"), "turns[0]", "type"),
    ],
)
def test_validation_names_key_and_field(mutate, field, reason, rec_json):
    obj = copy.deepcopy(rec_json("rk"))
    mutate(obj)
    err = _err(obj)
    assert err.key == "rk" and err.field == field and err.reason == reason
    assert "'rk'" in str(err) and field in str(err)


def test_wrong_turn_count_only_when_expected(rec_json):
    obj = rec_json("rk", turns=5)
    assert len(M3TRecord.from_json("rk", obj).turns) == 5
    err = _err(obj, expected_turns=7)
    assert err.reason == "turn_count" and "5 turns, expected 7" in str(err)


@pytest.mark.parametrize("key", ["a.b", "dir/x", "", " sp", "_lead"])
def test_bad_keys_are_rejected(key, rec_json):
    assert _err(rec_json("x"), key=key).reason == "key"


def test_invalid_json_bytes():
    err = _err(b"{not json")
    assert err.reason == "json" and err.field == "json"


def test_strip_image_marker():
    assert strip_image_marker("<|image_1|>\nWhat is it?") == "What is it?"
    assert strip_image_marker("<|image_1|>What is it?") == "What is it?"
    assert strip_image_marker("What is <|image_1|> it?") == "What is <|image_1|> it?"  # only a leading one
    assert strip_image_marker("plain") == "plain"


def test_turns_from_lists_strips_markers_and_keeps_candidates():
    turns = turns_from_lists("k", [["<|image_1|>\nA?", "<|image_1|>B?"], "<|image_1|>\nC?"], ["a", "c"],
                             ("cls", "ret"))
    assert turns == [Turn("cls", ["A?", "B?"], "a"), Turn("ret", ["C?"], "c")]
    with pytest.raises(RecordError, match="qry\\[0\\]\\[1\\]"):
        turns_from_lists("k", [["ok", 3]], ["a"], ())
    with pytest.raises(RecordError, match="2 vs 1 turns"):
        turns_from_lists("k", [["a"], ["b"]], ["a"], ())
