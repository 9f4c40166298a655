"""Reading MMEB splits (parquet / jsonl, both layouts) and task lists, including the shipped MMEB config."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from muco.eval.data import data_files, detect_layout, load_queries
from muco.eval.errors import EvalDataError
from muco.eval.tasks import Task, TaskSpec, default_parser, load_task, load_task_list, select_tasks
from muco.eval.text import MMEB_EVAL, MMEBQuery, candidates, query_text, to_user_text

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
    with pytest.raises(EvalDataError, match=r"bad.jsonl: unknown MMEB layout: columns \['qry_text'\]"):
        load_queries(bad)
    # the first row decides a JSONL file's layout; a later row without its columns fails as that row
    bad.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps({"qry_text": "x", "tgt_text": ["a"]}) + "\n")
    with pytest.raises(EvalDataError, match=r"^row 1, data .*bad.jsonl: lacks the MMEB_Test_Instruct columns "
                                            r"\['qry_inst'\]"):
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
    with pytest.raises(ValueError) as e:
        load_task_list(MMEB_YAML)
    assert str(e.value) == (f"{MMEB_YAML}: root '${{MMEB_ROOT}}' needs the environment variable MMEB_ROOT, which is "
                            "not set; export MMEB_ROOT=DIR (the data root) or pass --root DIR")
    assert load_task_list(MMEB_YAML, root=tmp_path)[0].data == tmp_path / "MMEB_Test_Instruct" / "ImageNet-1K"
    monkeypatch.setenv("MMEB_ROOT", str(tmp_path))
    assert load_task_list(MMEB_YAML)[0].data == tmp_path / "MMEB_Test_Instruct" / "ImageNet-1K"
    # a variable in a task's path is named the same way
    y = tmp_path / "t.yaml"
    y.write_text("root: r\ntasks:\n  - {name: A, meta_task: vqa, split: ind, data: $MMEB_SPLITS/a}\n")
    with pytest.raises(ValueError, match=r"data '\$MMEB_SPLITS/a' needs the environment variable MMEB_SPLITS, "
                                         r"which is not set; export MMEB_SPLITS=DIR$"):
        load_task_list(y)


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


# The parser of each dataset in the released evaluation (naver-ai/muco, eval_configs/image.yaml: dataset_parser)
OFFICIAL_PARSERS = {
    **dict.fromkeys(["ImageNet-1K", "N24News", "HatefulMemes", "VOC2007", "SUN397", "Place365", "ImageNet-A",
                     "ImageNet-R", "ObjectNet", "Country211"], "image_cls"),
    **dict.fromkeys(["OK-VQA", "A-OKVQA", "DocVQA", "InfographicsVQA", "ChartQA", "Visual7W", "ScienceQA",
                     "VizWiz", "GQA", "TextVQA"], "image_qa"),
    **dict.fromkeys(["MSCOCO_i2t", "VisualNews_i2t"], "image_i2t"),
    **dict.fromkeys(["VisDial", "MSCOCO_t2i", "VisualNews_t2i", "WebQA", "EDIS", "Wiki-SS-NQ"], "image_t2i"),
    **dict.fromkeys(["CIRR", "NIGHTS", "OVEN", "FashionIQ", "MSCOCO", "RefCOCO", "RefCOCO-Matching",
                     "Visual7W-Pointing"], "image_i2i_vg"),
}


def test_shipped_task_list_uses_the_released_parsers():
    specs = load_task_list(MMEB_YAML, root="/data/mmeb")
    assert {s.name: s.parser for s in specs} == OFFICIAL_PARSERS
    # and the defaults from meta-task and candidate mode agree with them
    assert all(default_parser(s.meta_task, s.candidates) == s.parser for s in specs)


def test_parser_and_candidates_in_task_lists(tmp_path):
    y = tmp_path / "t.yaml"
    y.write_text("root: r\ntasks:\n"
                 "  - {name: A, meta_task: retrieval, split: ind, data: a, parser: image_t2i}\n"
                 "  - {name: B, meta_task: retrieval, split: ind, data: b, candidates: image_caption}\n"
                 "  - {name: C, meta_task: grounding, split: ood, data: c}\n"
                 "  - {name: D, meta_task: vqa, split: ood, data: d}\n")
    assert [(s.parser, s.candidates) for s in load_task_list(y)] == [
        ("image_t2i", "image"), ("image_i2i_vg", "image_caption"), ("image_i2i_vg", "image_caption"),
        ("image_qa", "text")]
    y.write_text("tasks:\n  - {name: A, meta_task: retrieval, split: ind, data: a, parser: image_t2i, "
                 "candidates: text}\n")
    with pytest.raises(ValueError, match="task A: parser image_t2i builds 'image' candidates, but candidates is"):
        load_task_list(y)
    y.write_text("tasks:\n  - {name: A, meta_task: grounding, split: ind, data: a, candidates: text}\n")
    with pytest.raises(ValueError, match="task A: no default parser for meta_task 'grounding' with 'text'"):
        load_task_list(y)
    with pytest.raises(ValueError, match="parser must be one of"):
        TaskSpec("A", "vqa", "ind", parser="image_vqa")


# One query of ImageNet-1K (image_cls) and of MSCOCO_t2i (image_t2i) in each released layout
INSTRUCT_ROWS = {
    "ImageNet-1K": {"qry_inst": "<|image_1|>\nRepresent the given image for classification", "qry_text": "",
                    "qry_img_path": "ImageNet-1K/ILSVRC2012_val_00000001.JPEG", "tgt_inst": "",
                    "tgt_text": ["snake, serpent", "tabby cat"], "tgt_img_path": ["", ""]},
    "MSCOCO_t2i": {"qry_inst": "Find me an everyday image that matches the given caption:",
                   "qry_text": "A man with a red helmet on a small moped on a dirt road.", "qry_img_path": "",
                   "tgt_inst": "<|image_1|>\nRepresent the given image.", "tgt_text": ["", ""],
                   "tgt_img_path": ["MSCOCO_t2i/a.jpg", "MSCOCO_t2i/b.jpg"]},
}
MMEB_EVAL_ROWS = {
    "ImageNet-1K": {"qry_text": "<|image_1|>\nRepresent the given image for classification",
                    "qry_img_path": "ImageNet-1K/ILSVRC2012_val_00000001.JPEG",
                    "tgt_text": ["snake, serpent", "tabby cat"], "tgt_img_path": ["", ""]},
    "MSCOCO_t2i": {"qry_text": "Find me an everyday image that matches the given caption: "
                               "A man with a red helmet on a small moped on a dirt road.", "qry_img_path": "",
                   "tgt_text": ["<|image_1|>\nRepresent the given image."] * 2,
                   "tgt_img_path": ["MSCOCO_t2i/a.jpg", "MSCOCO_t2i/b.jpg"]},
}
EXPECTED_USER_TEXTS = {  # the released parsers' texts after the encoding step, for both layouts
    "ImageNet-1K": ("<|vision_start|><|image_pad|><|vision_end|>\nRepresent the given image for classification\n",
                    ["snake, serpent\n", "tabby cat\n"]),
    "MSCOCO_t2i": ("Find me an everyday image that matches the given caption: "
                   "A man with a red helmet on a small moped on a dirt road.\n",
                   ["<|vision_start|><|image_pad|><|vision_end|>\nRepresent the given image.\n"] * 2),
}


def test_both_released_layouts_load_and_give_the_same_texts(tmp_path, write_mmeb_parquet):
    parsers = {"ImageNet-1K": ("classification", None), "MSCOCO_t2i": ("retrieval", "image")}
    for name, (meta, cands) in parsers.items():
        a = write_mmeb_parquet(tmp_path / "MMEB_Test_Instruct" / name / "test-00000-of-00001.parquet",
                               [INSTRUCT_ROWS[name]], "MMEB_Test_Instruct")
        b = write_mmeb_parquet(tmp_path / "MMEB-eval" / name / "test-00000-of-00001.parquet",
                               [MMEB_EVAL_ROWS[name]], "MMEB-eval")
        assert pq.read_schema(b).field("tgt_text").type.value_type == pa.string()
        assert detect_layout(pq.read_schema(a).names) == "MMEB_Test_Instruct"
        assert detect_layout(pq.read_schema(b).names) == MMEB_EVAL
        spec = TaskSpec(name, meta, "ind", cands)
        got = []
        for path in (a.parent, b.parent):
            task = load_task(TaskSpec(name, meta, "ind", cands, data=path))
            (row,) = task.queries
            assert row.parser == spec.parser
            got.append((to_user_text(query_text(row)),
                        [to_user_text(c.text) for c in candidates(row, spec.candidates)]))
        assert got[0] == got[1] == EXPECTED_USER_TEXTS[name]
    (row,) = load_queries(tmp_path / "MMEB-eval" / "MSCOCO_t2i")
    assert (row.layout, row.qry_inst, row.qry_text, row.tgt_inst) == (
        MMEB_EVAL, MMEB_EVAL_ROWS["MSCOCO_t2i"]["qry_text"], "", "")


def test_layout_is_detected_per_file(tmp_path, write_mmeb_parquet):
    d = tmp_path / "ImageNet-1K"
    write_mmeb_parquet(d / "test-00000-of-00002.parquet", [INSTRUCT_ROWS["ImageNet-1K"]], "MMEB_Test_Instruct")
    write_mmeb_parquet(d / "test-00001-of-00002.parquet", [MMEB_EVAL_ROWS["ImageNet-1K"]], "MMEB-eval")
    a, b = load_queries(d, parser="image_cls")
    assert (a.layout, b.layout) == ("MMEB_Test_Instruct", MMEB_EVAL)
    assert query_text(a) == query_text(b)
    jl = tmp_path / "eval.jsonl"
    jl.write_text(json.dumps(MMEB_EVAL_ROWS["ImageNet-1K"]) + "\n")
    assert load_queries(jl, parser="image_cls")[0] == b


def test_an_unknown_layout_is_one_line_naming_the_columns(tmp_path):
    bad = tmp_path / "test-00000-of-00001.parquet"
    pq.write_table(pa.table({"query": ["a"], "positive": [["b"]], "qry_text": ["c"]}), bad)
    with pytest.raises(EvalDataError) as e:
        load_task(TaskSpec("X", "classification", "ind", data=tmp_path))
    assert str(e.value) == (
        f"task X, data {bad}: unknown MMEB layout: columns ['positive', 'qry_text', 'query']; expected "
        "MMEB_Test_Instruct (qry_inst, qry_text, qry_img_path, tgt_inst, tgt_text (list), tgt_img_path (list)) "
        "or MMEB-eval (qry_text, qry_img_path, tgt_text (list), tgt_img_path (list))")
    assert "\n" not in str(e.value) and e.value.row is None
    # tgt_inst without qry_inst is neither layout
    with pytest.raises(EvalDataError, match="unknown MMEB layout"):
        detect_layout(["qry_text", "qry_img_path", "tgt_inst", "tgt_text", "tgt_img_path"])


def test_a_task_gives_its_parser_to_hand_built_queries():
    row = MMEBQuery(qry_inst="<|image_1|> Represent it. ", qry_text="", qry_img_path="a.jpg", tgt_inst="",
                    tgt_text=("x",))
    task = Task(TaskSpec("Q", "vqa", "ind"), [row])
    assert task.queries[0].parser == "image_qa"
    assert query_text(task.queries[0]) == "<|image_pad|>\nRepresent it.\n"
