"""Reading MMEB splits (parquet / jsonl) and task lists, including the shipped MMEB config."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from muco.eval.data import data_files, load_queries
from muco.eval.tasks import TaskSpec, load_task, load_task_list, select_tasks
from muco.eval.text import MMEBQuery

INST = "<|image_1|>\nRepresent the given image for classification"
ROWS = [
    {"qry_inst": INST, "qry_text": "", "qry_img_path": "ImageNet-1K/a.jpg", "tgt_inst": "",
     "tgt_text": ["cat", "dog"], "tgt_img_path": ["", ""]},
    {"qry_inst": INST, "qry_text": "", "qry_img_path": "ImageNet-1K/b.jpg", "tgt_inst": "",
     "tgt_text": ["dog", "cat"], "tgt_img_path": ["", ""]},
]
MMEB_YAML = Path(__file__).resolve().parents[2] / "configs" / "eval" / "mmeb.yaml"


def test_parquet_directory_and_jsonl_give_the_same_queries(tmp_path):
    d = tmp_path / "ImageNet-1K"
    d.mkdir()
    pq.write_table(pa.Table.from_pylist(ROWS[:1]), d / "test-00000-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(ROWS[1:]), d / "test-00001-of-00002.parquet")
    jl = tmp_path / "in.jsonl"
    jl.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    assert len(data_files(d)) == 2
    a, b = load_queries(d), load_queries(jl)
    assert a == b
    assert a[0] == MMEBQuery(qry_inst=ROWS[0]["qry_inst"], qry_text="", qry_img_path="ImageNet-1K/a.jpg",
                             tgt_inst="", tgt_text=("cat", "dog"), tgt_img_path=("", ""))
    assert load_queries(d, limit=1) == a[:1]


def test_missing_optional_columns_and_bad_input(tmp_path):
    jl = tmp_path / "t2i.jsonl"
    jl.write_text(json.dumps({"qry_inst": "Find an image:", "qry_text": "a dog", "tgt_text": ["x"]}) + "\n")
    (row,) = load_queries(jl)
    assert row.qry_img_path == "" and row.tgt_img_path == () and not row.has_image
    listy = tmp_path / "listy.jsonl"
    listy.write_text(json.dumps({"qry_inst": "x", "tgt_text": '["a", "b"]'}) + "\n"
                     + json.dumps({"qry_inst": "x", "tgt_text": "['a', 'b']"}) + "\n")
    with pytest.raises(ValueError, match="non-JSON"):
        load_queries(listy)
    assert load_queries(listy, limit=1)[0].tgt_text == ("a", "b")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"qry_text": "no instruction"}) + "\n")
    with pytest.raises(ValueError, match="lacks the MMEB columns"):
        load_queries(bad)
    with pytest.raises(FileNotFoundError):
        load_queries(tmp_path / "nope")


def test_shipped_mmeb_task_list_counts():
    specs = load_task_list(MMEB_YAML, root="/data/mmeb")
    assert len(specs) == 36
    counts = Counter(s.meta_task for s in specs)
    assert counts == {"classification": 10, "vqa": 10, "retrieval": 12, "grounding": 4}
    assert Counter(s.split for s in specs) == {"ind": 20, "ood": 16}
    by_name = {s.name: s for s in specs}
    assert by_name["ImageNet-1K"].data == Path("/data/mmeb/MMEB_Test_Instruct/ImageNet-1K")
    assert by_name["ImageNet-1K"].image_root == Path("/data/mmeb/image-tasks")
    # candidate modes follow the released parsers: cls/qa/i2t text, t2i image, i2i + grounding image_caption
    assert {s.candidates for s in specs if s.meta_task in ("classification", "vqa")} == {"text"}
    assert by_name["MSCOCO_i2t"].candidates == "text" and by_name["VisualNews_t2i"].candidates == "image"
    assert {s.candidates for s in specs if s.meta_task == "grounding"} == {"image_caption"}
    assert (by_name["MSCOCO"].split, by_name["RefCOCO"].split) == ("ind", "ood")
    ood_ret = {s.name for s in specs if s.meta_task == "retrieval" and s.split == "ood"}
    assert ood_ret == {"FashionIQ", "Wiki-SS-NQ", "OVEN", "EDIS"}


def test_root_from_environment_or_error(tmp_path, monkeypatch):
    monkeypatch.delenv("MMEB_ROOT", raising=False)
    with pytest.raises(ValueError, match="unset environment variable"):
        load_task_list(MMEB_YAML)
    monkeypatch.setenv("MMEB_ROOT", str(tmp_path))
    assert load_task_list(MMEB_YAML)[0].data == tmp_path / "MMEB_Test_Instruct" / "ImageNet-1K"


def test_task_list_validation_and_selection(tmp_path):
    y = tmp_path / "t.yaml"
    y.write_text("root: r\ntasks:\n"
                 "  - {name: A, meta_task: vqa, split: ind, data: a.jsonl, image_root: /imgs}\n"
                 "  - {name: B, meta_task: Grounding, split: OOD, data: /abs/b, candidates: image_caption}\n")
    a, b = load_task_list(y)
    assert a == TaskSpec("A", "vqa", "ind", "text", Path("r/a.jsonl"), Path("/imgs"))
    assert (b.meta_task, b.split, b.data, b.image_root) == ("grounding", "ood", Path("/abs/b"), Path("r"))
    assert [s.name for s in select_tasks([a, b], ["B"])] == ["B"]
    with pytest.raises(ValueError, match="unknown tasks"):
        select_tasks([a, b], ["C"])
    y.write_text("tasks:\n  - {name: A, meta_task: vqa, split: ind, data: a, colour: red}\n")
    with pytest.raises(ValueError, match="colour"):
        load_task_list(y)
    y.write_text("tasks:\n  - {name: A, meta_task: ocr, split: ind, data: a}\n")
    with pytest.raises(ValueError, match="meta_task"):
        load_task_list(y)
    y.write_text("tasks:\n  - {name: A, meta_task: vqa, split: ind, data: a}\n"
                 "  - {name: A, meta_task: vqa, split: ood, data: b}\n")
    with pytest.raises(ValueError, match="duplicate"):
        load_task_list(y)


def test_load_task_with_limit(tmp_path):
    jl = tmp_path / "x.jsonl"
    jl.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    task = load_task(TaskSpec("X", "classification", "ind", data=jl), limit=1)
    assert task.name == "X" and len(task.queries) == 1


def test_malformed_data_errors_name_the_file_line_and_row(tmp_path):
    from muco.eval.errors import EvalDataError

    good = json.dumps(ROWS[0])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good + "\n\n" + good[:-5] + "\n")
    with pytest.raises(EvalDataError) as e:
        load_queries(bad)
    assert (e.value.file, e.value.row) == (str(bad), 1)
    assert str(e.value) == (f"row 1, data {bad}: line 3 is not valid JSON "
                            f"(Expecting value at character {len(good) - 4})")
    raw = tmp_path / "latin1.jsonl"
    raw.write_bytes(good.encode() + b"\n" + good.replace("cat", "caf\xe9").encode("latin-1") + b"\n")
    with pytest.raises(EvalDataError, match=r"row 1, data .*latin1.jsonl: line 2 is not UTF-8"):
        load_queries(raw)
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not really parquet")
    with pytest.raises(EvalDataError, match="broken.parquet: cannot read the parquet file"):
        load_queries(broken)
    # a task names itself in every data error
    spec = TaskSpec("Toy", "classification", "ind", data=tmp_path / "nope")
    with pytest.raises(EvalDataError, match=r"^task Toy, data .*nope: does not exist$") as e:
        load_task(spec)
    assert (e.value.task, e.value.file, e.value.row) == ("Toy", str(tmp_path / "nope"), None)
    spec = TaskSpec("Toy", "classification", "ind", data=bad)
    with pytest.raises(EvalDataError, match=r"^task Toy, row 1, data .*bad.jsonl: line 3 is not valid JSON") as e:
        load_task(spec)
    assert (e.value.task, e.value.row) == ("Toy", 1)
