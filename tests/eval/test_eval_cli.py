"""`muco eval` end to end on an exported tiny model: files, summary, reuse of finished tasks."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from muco.eval.cli import main
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
    from muco.data.image_policy import ImagePolicy
    from muco.export import export

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
    assert main(args(model, tasks, out)) == 2  # missing data is reported before any model is loaded
    assert "Gone" in capsys.readouterr().err

    assert main(args(model, tasks, out, "--skip-missing")) == 0
    table = capsys.readouterr().out
    assert "Overall (2/3)" in table and "Toy" in table
    summary = json.loads((out / "summary.json").read_text())
    assert summary["overall"]["n"] == 2 and summary["meta_tasks"]["grounding"]["score"] is None
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

    monkeypatch.setattr("muco.encoder.load_encoder", no_load)
    assert main(args(model, tasks, out, "--skip-missing")) == 0
    with pytest.raises(AssertionError, match="model loaded"):
        main(args(model, tasks, out, "--skip-missing", "--only", "Toy", "--limit", "2"))
