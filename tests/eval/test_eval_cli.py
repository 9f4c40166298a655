"""`muco eval` end to end on an exported tiny model: files, summary, reuse of finished tasks."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from muco.cli.eval import main
from muco.eval.harness import evaluate_task
from muco.eval.tasks import load_task, load_task_list

LABELS = [["person", "cat", "cup"], ["cat", "person", "cup"], ["cup", "cat", "rocket"]]
CLS = [{"qry_inst": "<|image_1|>\nRepresent the given image for classification", "qry_text": "",
        "qry_img_path": f"{i}.png", "tgt_inst": "", "tgt_text": labels, "tgt_img_path": [""] * len(labels)}
       for i, labels in enumerate(LABELS)]
CAPTIONS = [("an astronaut", ["0.png", "1.png", "3.png"]), ("a rocket", ["3.png", "0.png", "2.png"])]
T2I = [{"qry_inst": "Find me an everyday image that matches the given caption:", "qry_text": cap,
        "qry_img_path": "", "tgt_inst": "<|image_1|>\nRepresent the given image.", "tgt_text": ["", "", ""],
        "tgt_img_path": paths}
       for cap, paths in CAPTIONS]


@pytest.fixture(scope="module")
def setup(tiny_encoder, image_dir, tmp_path_factory):
    from muco.export import export
    from muco.inputs.image_policy import ImagePolicy

    root = tmp_path_factory.mktemp("mmeb")
    model = export(tiny_encoder.backbone, tiny_encoder.tokenizer, ImagePolicy.preset("tiny"), root / "model")
    (root / "Toy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in CLS))
    (root / "Ret").mkdir()
    pq.write_table(pa.Table.from_pylist(T2I), root / "Ret" / "test-00000-of-00001.parquet")
    tasks = root / "tasks.yaml"
    tasks.write_text(f"root: {root}\ndefaults: {{image_root: {image_dir}}}\ntasks:\n"
                     "  - {name: Toy, meta_task: classification, split: ind, data: Toy.jsonl}\n"
                     "  - {name: Ret, meta_task: retrieval, split: ood, data: Ret, candidates: image}\n"
                     "  - {name: Gone, meta_task: grounding, split: ood, data: nowhere,"
                     " candidates: image_caption}\n")
    return model, tasks, root


def args(model, tasks, out, *extra):
    return ["--model", str(model), "--tasks", str(tasks), "--output", str(out), "--device", "cpu",
            "--image-policy", "tiny", "--batch-size", "2", *extra]


def test_eval_cli_end_to_end(setup, tmp_path, capsys, monkeypatch):
    model, tasks, _ = setup
    out = tmp_path / "out"
    # a task without data fails alone: the others are scored, the run exits 1 and says which task and why
    assert main(args(model, tasks, out)) == 1
    err = capsys.readouterr().err
    assert "task Gone" in err and "does not exist" in err and "--skip-missing" in err
    failed = json.loads((out / "summary.json").read_text())["failed"]
    assert list(failed) == ["Gone"] and failed["Gone"]["file"] == str(setup[2] / "nowhere")

    # --skip-missing: the same run without a failure (exit 0), still a partial aggregate
    assert main(args(model, tasks, out, "--skip-missing")) == 0
    table = capsys.readouterr().out
    assert "Overall (2/3)" in table and "Toy" in table
    summary = json.loads((out / "summary.json").read_text())
    assert summary["overall"]["n"] == 2 and summary["meta_tasks"]["grounding"]["score"] is None
    assert summary["failed"] == {} and summary["skipped"] == {"Gone": f"data {setup[2] / 'nowhere'} does not exist"}
    toy = json.loads((out / "Toy.json").read_text())
    assert (toy["num_queries"], toy["num_candidates"], toy["meta_task"]) == (3, 4, "classification")
    preds = (out / "Ret.pred.jsonl").read_text().splitlines()
    assert len(preds) == 2 and set(json.loads(preds[0])) == {"query", "gold_rank", "top1"}

    # the same numbers as the harness called directly on the exported model
    from muco.encoder import MuCoEncoder

    enc = MuCoEncoder.from_pretrained(model, image_policy="tiny")
    for spec in load_task_list(tasks)[:2]:
        direct = evaluate_task(enc.encode_user_texts, load_task(spec), batch_size=3)
        assert summary["tasks"][spec.name] == pytest.approx(direct.metrics, abs=1e-6)

    # finished tasks with the same settings are reused: no model is loaded again
    def no_load(*a, **k):
        raise AssertionError("model loaded although every task was done")

    monkeypatch.setattr("muco.train.checkpoint.load_encoder", no_load)
    assert main(args(model, tasks, out, "--skip-missing")) == 0
    with pytest.raises(AssertionError, match="model loaded"):
        main(args(model, tasks, out, "--skip-missing", "--only", "Toy", "--limit", "2"))


# --- one bad task between two good ones (issue 12, fault 9) -------------------------------------------------

def _png_bytes(image_dir, i: int) -> bytes:
    return (image_dir / f"{i}.png").read_bytes()


BREAK = {
    # kind: (how to break the bad task, what its failure record names)
    "missing_image": lambda imgs, data: (imgs / "1.png").unlink(),
    "truncated_image": lambda imgs, data: (imgs / "1.png").write_bytes(
        (imgs / "1.png").read_bytes()[: (imgs / "1.png").stat().st_size // 2]),
    "corrupt_image": lambda imgs, data: (imgs / "1.png").write_bytes(b"not a png at all" * 8),
    "missing_data": lambda imgs, data: data.unlink(),
    "malformed_data": lambda imgs, data: data.write_text(
        json.dumps(CLS[0]) + "\n" + json.dumps(CLS[1])[:-9] + "\n" + json.dumps(CLS[2]) + "\n"),
}
REASON = {"missing_image": "image file not found", "truncated_image": "truncated",
          "corrupt_image": "not an image", "missing_data": "does not exist", "malformed_data": "not valid JSON"}


def bad_task_list(root, image_dir, tmp_path):
    """Toy (good), Bad (its own image folder and data file), Ret (good): in that order."""
    imgs = tmp_path / "bad_images"
    imgs.mkdir()
    for i in range(3):
        (imgs / f"{i}.png").write_bytes(_png_bytes(image_dir, i))
    data = tmp_path / "Bad.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in CLS))
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text(f"root: {root}\ndefaults: {{image_root: {image_dir}}}\ntasks:\n"
                     "  - {name: Toy, meta_task: classification, split: ind, data: Toy.jsonl}\n"
                     f"  - {{name: Bad, meta_task: classification, split: ood, data: {data}, image_root: {imgs}}}\n"
                     "  - {name: Ret, meta_task: retrieval, split: ood, data: Ret, candidates: image}\n")
    return tasks, imgs, data


@pytest.fixture
def evaluated(monkeypatch):
    """The names of the tasks `muco eval` runs through the harness."""
    import muco.cli.eval as cli

    names: list[str] = []

    def spy(encode_fn, task, *a, **k):
        names.append(task.name)
        return evaluate_task(encode_fn, task, *a, **k)

    monkeypatch.setattr(cli, "evaluate_task", spy)
    return names


@pytest.mark.parametrize("kind", list(BREAK))
def test_a_bad_task_between_good_ones_fails_alone_and_is_retried(setup, image_dir, tmp_path, capsys, evaluated,
                                                                 kind):
    model, _, root = setup
    tasks, imgs, data = bad_task_list(root, image_dir, tmp_path)
    BREAK[kind](imgs, data)
    out = tmp_path / "out"

    assert main(args(model, tasks, out)) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    # both good tasks were scored, the bad one is recorded with its reason, row and file
    assert {"Toy", "Ret"} <= set(evaluated)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["tasks"]) == {"Toy", "Ret"}
    assert (out / "Toy.json").is_file() and (out / "Ret.json").is_file() and not (out / "Bad.json").exists()
    failure = summary["failed"]["Bad"]
    assert REASON[kind] in failure["reason"] and "Bad" in failure["message"]
    if kind.endswith("image"):
        assert failure["row"] == 1 and failure["column"] == "qry_img_path"
        assert failure["file"] == str(imgs / "1.png")
        assert f"task Bad, row 1 (qry_img_path), image {imgs / '1.png'}" in failure["message"]
    else:
        assert failure["file"] == str(data)
        assert failure["row"] == (1 if kind == "malformed_data" else None)
    assert failure["message"] in err and "\n" not in failure["message"]
    # the aggregate says which task is missing instead of silently averaging fewer tasks
    assert summary["overall"]["n"] == 2 and summary["overall"]["expected"] == 3
    assert summary["overall"]["partial"] is True and summary["overall"]["missing"] == ["Bad"]
    assert summary["complete"] is False
    assert summary["overall"]["score"] == pytest.approx(
        (summary["tasks"]["Toy"]["precision@1"] + summary["tasks"]["Ret"]["precision@1"]) / 2)
    table = (out / "results.txt").read_text()
    assert "Overall (2/3)" in table and failure["message"] in table

    # fix the bad task and run again: only it is evaluated, and the run is complete
    (imgs / "1.png").write_bytes(_png_bytes(image_dir, 1))
    data.write_text("".join(json.dumps(r) + "\n" for r in CLS))
    evaluated.clear()
    assert main(args(model, tasks, out)) == 0
    assert evaluated == ["Bad"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed"] == {} and summary["complete"] is True
    assert set(summary["tasks"]) == {"Toy", "Bad", "Ret"} and summary["overall"]["n"] == 3
    assert summary["overall"]["partial"] is False and summary["overall"]["missing"] == []


def test_no_model_is_loaded_when_no_task_has_data(setup, tmp_path, capsys, monkeypatch):
    model, _, root = setup
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text(f"root: {root}\ntasks:\n  - {{name: Gone, meta_task: grounding, split: ood, data: nowhere}}\n")

    def no_load(*a, **k):
        raise AssertionError("model loaded although no task has data")

    monkeypatch.setattr("muco.train.checkpoint.load_encoder", no_load)
    assert main(args(model, tasks, tmp_path / "out")) == 1
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert list(summary["failed"]) == ["Gone"] and summary["overall"]["score"] is None
    assert "1 of 1 task(s) failed" in capsys.readouterr().err


def test_each_result_is_printed_once(setup, tmp_path):
    """What a terminal shows (stdout and stderr of the real command): one line per result, the table row of a
    scored task and the message of a failed one; the per-task log records come with --verbose."""
    import os
    import re
    import subprocess
    import sys

    model, tasks, _ = setup
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")

    def console(*extra: str) -> tuple[int, list[str]]:
        res = subprocess.run([sys.executable, "-m", "muco", "eval", *args(model, tasks, tmp_path / "out", *extra)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, timeout=300)
        return res.returncode, res.stdout.splitlines()

    def naming(lines: list[str], name: str) -> list[str]:
        return [ln for ln in lines if re.search(rf"\b{name}\b", ln)]

    code, lines = console()
    assert code == 1, "\n".join(lines[-30:])
    message = json.loads((tmp_path / "out" / "summary.json").read_text())["failed"]["Gone"]["message"]
    for name in ("Toy", "Ret"):
        assert len(naming(lines, name)) == 1, "\n".join(lines)
    assert len([ln for ln in lines if message in ln]) == 1, "\n".join(lines)
    assert message in (tmp_path / "out" / "results.txt").read_text()  # the file keeps it under its table

    code, lines = console("--verbose", "--overwrite")
    # the record as it finished, the table's row, and the timing table's row
    assert code == 1 and len(naming(lines, "Toy")) == 3, "\n".join(lines)
    assert (tmp_path / "out" / "timing.txt").read_text().splitlines()[2].split()[:4] == ["Toy", "3", "4", "4"]


@pytest.mark.slow
def test_two_processes_give_the_one_process_results(setup, tmp_path):
    """`--devices 2` (two gloo processes, each encoding every other batch) writes what one process writes: the
    same metrics, gold ranks and top-1 predictions, bit for bit; the timing table follows the results."""
    from tests.train.conftest import REPO, run_muco

    model, tasks, _ = setup
    outs = {}
    for name, extra in (("one", ()), ("two", ("--devices", "2"))):
        outs[name] = tmp_path / name
        res = run_muco("eval", *args(model, tasks, outs[name], "--only", "Toy,Ret", *extra), cwd=REPO)
        assert res.returncode == 0, res.stderr[-3000:]
        assert ("items/s, 2 processes" in res.stderr) == (name == "two"), res.stderr[-3000:]
        assert "total" in (outs[name] / "timing.txt").read_text()
    for task in ("Toy", "Ret"):
        one, two = (json.loads((outs[n] / f"{task}.json").read_text()) for n in ("one", "two"))
        assert two["metrics"] == one["metrics"] and two["num_candidates"] == one["num_candidates"]
        assert (outs["two"] / f"{task}.pred.jsonl").read_text() == (outs["one"] / f"{task}.pred.jsonl").read_text()
    summaries = [json.loads((outs[n] / "summary.json").read_text()) for n in ("one", "two")]
    assert summaries[0]["overall"] == summaries[1]["overall"]
