from __future__ import annotations

import json

import pytest

from muco.data.pairs.records import PairRecord, Side, strip_markers
from muco.data.records import RecordError


def stored(**over) -> dict:
    obj = {"query": {"text": "What is shown?\n", "image": "qry.jpg", "caption": "a cat on a mat"},
           "positive": {"text": "a cat.", "image": None, "caption": None},
           "negatives": [{"text": "a dog.", "image": None}, {"text": "", "image": "neg0.png"}]}
    obj.update(over)
    return obj


def _err(obj, key="k1", stored_form=True) -> RecordError:
    with pytest.raises(RecordError) as e:
        PairRecord.from_json(key, obj, stored=stored_form)
    return e.value


def test_round_trip_keeps_everything():
    rec = PairRecord.from_json("k1", json.dumps(stored()).encode())
    assert rec.query == Side("What is shown?\n", "qry.jpg", "a cat on a mat")
    assert rec.negatives == [Side("a dog."), Side("", "neg0.png")]
    assert json.loads(rec.to_json_bytes()) == stored()
    assert rec.images() == [("query", "qry.jpg"), ("negatives[1]", "neg0.png")]


def test_image_without_caption_is_rejected_with_the_reason():
    obj = stored()
    obj["query"]["caption"] = None
    e = _err(obj)
    assert e.reason == "missing_caption" and e.field == "query.caption"
    assert "record 'k1': query.caption is missing" in str(e) and "masked counterpart" in str(e)


@pytest.mark.parametrize("bad, field, reason", [
    ({"query": {"text": "x <|emb|>"}}, "query.text", "reserved"),
    ({"positive": {"text": "a", "caption": "has <|mask|>"}}, "positive.caption", "reserved"),
    ({"negatives": [{"text": "<|im_end|>"}]}, "negatives[0].text", "reserved"),
    ({"positive": {"text": "<|image_1|>\nhi"}}, "positive.text", "marker"),
    ({"positive": {"text": "  "}}, "positive.text", "empty"),
    ({"negatives": [{"text": "a", "caption": "c"}]}, "negatives[0]", "type"),
    ({"positive": {"text": "a", "image": "../x.jpg", "caption": "c"}}, "positive.image", "type"),
    ({"negatives": "a dog"}, "negatives", "type"),
    ({"turns": []}, "json", "kind"),
])
def test_bad_fields_are_named(bad, field, reason):
    e = _err(stored(**bad))
    assert (e.field, e.reason) == (field, reason), str(e)


def test_keys_and_missing_sides():
    assert _err(stored(), key="a.b").reason == "key"
    obj = stored()
    del obj["positive"]
    assert _err(obj).field == "positive"
    # conversion form: image fields are paths, not member names
    obj = stored()
    obj["query"]["image"] = "sub/dir/img 1.jpg"
    assert PairRecord.from_json("k1", obj, stored=False).query.image == "sub/dir/img 1.jpg"


def test_strip_markers_anywhere():
    assert strip_markers("<|image_1|>\nRepresent the image.") == "Represent the image."
    assert strip_markers("<|image_1|> Find it") == "Find it"
    assert strip_markers("Look: <|image_1|>what is it") == "Look: what is it"
    assert strip_markers("no marker") == "no marker"
