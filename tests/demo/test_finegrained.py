"""The fine-grained benchmark: deterministic scenes, enough distinct targets, candidate lists one detail apart,
shards through the real DataModule, random negatives in the sidecar format, static (`remine: false`) rounds and
the in-fit rounds config."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml

from muco.data.m3t.sidecar import load_sidecar, read_sidecar_manifest
from muco.demo import finegrained as fg
from muco.rounds.config import RoundsConfig, RoundsConfigError
from muco.rounds.random_negatives import random_negatives, read_targets
from muco.rounds.runner import RoundsRunner
from tests.data.builders import m3t_data
from tests.train.conftest import read_scalars, run_muco

REPO = Path(__file__).resolve().parents[2]
SMALL = {"train_scenes": 120, "val_scenes": 20, "eval_queries": 24, "samples_per_shard": 50}


@pytest.fixture(scope="module")
def fg_small(tmp_path_factory) -> Path:
    return fg.build_finegrained(tmp_path_factory.mktemp("fg"), seed=0, **SMALL)


@pytest.fixture(scope="module")
def renderers():
    return fg.renderers(0)


def test_the_build_is_a_function_of_the_seed(fg_small, tmp_path):
    again = fg.build_finegrained(tmp_path / "again", seed=0, **SMALL)
    for rel in ("train.jsonl", "val.jsonl", "eval/FG-I2T.jsonl", "eval/FG-T2I.jsonl", "eval/FG-CLS.jsonl",
                "images/fgtrain00007.png", "images/fg_t2i_0030_c5.png"):
        assert (again / rel).read_bytes() == (fg_small / rel).read_bytes(), rel
    for name in ("train", "val"):
        a = json.loads((again / name / "manifest.json").read_text())["shards"]
        b = json.loads((fg_small / name / "manifest.json").read_text())["shards"]
        assert [s["sha256"] for s in a] == [s["sha256"] for s in b]
    other = fg.scene_records("train", 20, fg.renderers(1)[0], random.Random(1))
    assert [r for r, _ in other] != [json.loads(x) for x in (fg_small / "train.jsonl").read_text().splitlines()[:20]]


def test_the_default_training_set_has_thousands_of_distinct_targets(renderers):
    records = [r for r, _ in fg.scene_records("train", 3000, renderers[0], random.Random(0))]
    targets = {t["target"] for r in records for t in r["turns"]}
    captions = {r["caption"] for r in records}
    assert len(captions) >= 2500 and len(targets) >= 3000
    # a demo batch (64 scenes, 3 turns each) sees at most 192 targets: under 10 % of them
    assert 64 * 3 <= 0.1 * len(targets)
    assert all(len(r["turns"]) == len(fg.TURNS) and r["turns"][0]["target"] == r["caption"] + "\n" for r in records)
    assert all(fg.caption(fg.parse_caption(c)) == c for c in captions)  # one caption per scene and back


def test_every_candidate_list_has_one_answer_and_the_rest_one_detail_away(renderers):
    items = fg.eval_items(renderers[1], random.Random(1), 200)
    assert [sum(it.task == t for it in items) for t in fg.TASKS] == [200, 200, 200]
    kinds = set()
    for it in items:
        assert len(it.candidates) == len(it.truths) == fg.N_CANDIDATES
        truth, others = it.truths[0], it.truths[1:]
        assert truth not in others and len(set(others)) == len(others)
        if it.task == "FG-T2I":
            assert it.question == fg.caption(truth) and it.candidates[0] == it.query
            assert [p.scene for p in it.candidates] == it.truths
            assert all(fg.scene_differences(truth, s) == 1 for s in others)
        elif it.task == "FG-I2T":
            assert it.query.scene == truth and len(set(it.candidates)) == fg.N_CANDIDATES
            assert [fg.parse_caption(c) for c in it.candidates] == it.truths
            assert all(fg.scene_differences(truth, s) == 1 for s in others)
        elif it.question == fg.COUNT_QUESTION:
            kinds.add("count")
            assert truth == tuple(o.digit for o in it.query.scene)
            assert [fg.parse_count(c) for c in it.candidates] == it.truths
            assert all(fg.sequence_differences(truth, s) == 1 for s in others)
        else:
            kinds.add("cell")
            assert it.question == fg.CELL_QUESTION.format(fg.CELLS[truth.cell]) and truth in it.query.scene
            assert [fg.parse_object(c) for c in it.candidates] == [(o.digit, o.colour, o.size) for o in it.truths]
            assert all(fg.scene_differences((truth,), (o,)) == 1 for o in others)
    assert kinds == {"count", "cell"}


def test_written_tasks_put_the_answer_first_among_8_and_name_no_training_scene(fg_small):
    spec = yaml.safe_load((fg_small / "eval" / "tasks.yaml").read_text())
    assert [t["name"] for t in spec["tasks"]] == list(fg.TASKS)
    train_caps = {json.loads(x)["caption"] for x in (fg_small / "train.jsonl").read_text().splitlines()}
    for name in fg.TASKS:
        rows = [json.loads(x) for x in (fg_small / "eval" / f"{name}.jsonl").read_text().splitlines()]
        assert len(rows) == SMALL["eval_queries"]
        for row in rows:
            assert len(row["tgt_text"]) == len(row["tgt_img_path"]) == fg.N_CANDIDATES
            paths = [p for p in [row["qry_img_path"], *row["tgt_img_path"]] if p]
            assert all((fg_small / p).is_file() for p in paths)
            if name == "FG-I2T":
                gold, *rest = (fg.parse_caption(t) for t in row["tgt_text"])
                assert all(fg.scene_differences(gold, s) == 1 for s in rest)
                assert not set(row["tgt_text"]) & train_caps  # neither the truth nor a distractor was trained on
            elif name == "FG-T2I":
                assert row["qry_text"] not in train_caps and len(set(row["tgt_img_path"])) == fg.N_CANDIDATES


def test_shards_and_random_negatives_load_through_the_datamodule(fg_small, tmp_path):
    manifest = fg_small / "train" / "manifest.json"
    samples = read_targets(str(manifest))
    assert len(samples) == SMALL["train_scenes"]
    summary = random_negatives(str(manifest), tmp_path / "rand", top_k=5, seed=3)
    assert summary["query_turns"] == SMALL["train_scenes"] * len(fg.TURNS) and summary["turns_short"] == 0
    again = random_negatives(str(manifest), tmp_path / "again", top_k=5, seed=3)
    assert again == summary
    assert (tmp_path / "rand" / "part-00000.jsonl.gz").read_bytes() == \
        (tmp_path / "again" / "part-00000.jsonl.gz").read_bytes()
    assert read_sidecar_manifest(tmp_path / "rand")["top_k"] == 5
    mined = load_sidecar(tmp_path / "rand")
    for key, targets in samples:
        for turn in range(len(targets)):
            negs = mined[(key, turn)]
            assert [n.rank for n in negs] == [1, 2, 3, 4, 5]
            assert not {n.text for n in negs} & set(targets)  # never the positive, nor a sibling target

    dm = m3t_data(str(manifest), batch_size=8, num_workers=0, tokenizer="tiny", image_policy="tiny",
                  samples_per_epoch=16, turns_per_sample=3,
                  negatives={"sidecar": str(tmp_path / "rand"), "band": [1, 5], "per_turn": 1})
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert len(batch["keys"]) == 8 and batch["num_turns"].tolist() == [3] * 8
    assert batch["negative_valid"].all()
    assert (batch["negative_text_id"] != batch["target_text_id"]).all()


def test_static_rounds_mine_once_and_reuse_that_sidecar(tmp_path, capsys):
    raw = yaml.safe_load((REPO / "configs" / "rounds_static.yaml").read_text())
    raw["run_dir"] = str(tmp_path / "run")
    cfg = RoundsConfig.from_dict(raw)
    assert not cfg.remine and [cfg.needs_mining_after(r) for r in (1, 2, 3)] == [True, False, False]
    RoundsRunner(cfg, dry_run=True).run()
    out = capsys.readouterr().out
    phases = [line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("[rounds] round")]
    assert phases == ["fit", "eval", "mine", "fit", "eval", "fit", "eval"]
    side = str(tmp_path / "run" / "round1" / "negatives")
    fits = [line for line in out.splitlines() if line.startswith("$ ") and " fit " in line]
    assert side not in fits[0] and side in fits[1] and side in fits[2]

    dynamic = RoundsConfig.from_dict({**raw, "negatives": {**raw["negatives"], "remine": True}})
    assert [dynamic.needs_mining_after(r) for r in (1, 2, 3)] == [True, True, False]
    assert RoundsRunner(dynamic).fit_command(3)[-1].find(str(tmp_path / "run" / "round2" / "negatives")) > 0
    with pytest.raises(RoundsConfigError, match="remine"):
        RoundsConfig.from_dict({**raw, "negatives": {**raw["negatives"], "remine": "no"}})


def test_every_arm_trains_the_same_steps(tmp_path):
    steps = set()
    for arm in ("inbatch", "random", "static", "dynamic", "curriculum"):
        cfg = RoundsConfig.load(REPO / "configs" / f"rounds_{arm}.yaml")
        steps.add(tuple(r.max_steps for r in cfg.rounds))
        assert cfg.fit_configs == ["configs/demo.yaml", "configs/finegrained.yaml"]
        if cfg.mine is not None:
            assert cfg.mine.margin < 0  # no false-negative filter: see the rounds files
    assert len(steps) == 1


@pytest.mark.slow
def test_the_static_arm_runs_end_to_end(fg_small, tmp_path):
    """configs/rounds_static.yaml really starts: fit on the demo + fine-grained configs, mine, then two rounds
    trained on that one sidecar (2 steps each, on the small build; the eval phase is left out for time, it is
    `muco eval` on the FG tasks, which test_written_tasks checks)."""
    from tests.train.conftest import run_muco

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "finegrained").symlink_to(fg_small)
    (tmp_path / "configs").symlink_to(REPO / "configs")
    raw = yaml.safe_load((REPO / "configs" / "rounds_static.yaml").read_text())
    raw["rounds"] = [{"max_steps": 2}] * 3
    raw.pop("eval")
    raw["fit"]["args"] += ["--data.init_args.samples_per_epoch", "16", "--data.init_args.batch_size", "8",
                           "--data.init_args.num_workers", "0",
                           "--trainer.val_check_interval", "null"]
    (tmp_path / "static.yaml").write_text(yaml.safe_dump(raw))
    res = run_muco("rounds", "--config", "static.yaml", cwd=tmp_path, timeout=600)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    run = tmp_path / raw["run_dir"]
    assert (run / "round1" / "negatives").is_dir() and not (run / "round2" / "negatives").exists()
    assert len(list(run.glob("round3/**/last.ckpt"))) == 1


def test_the_in_fit_config_mines_at_the_round_boundary_and_trains_round_2(fg_small, tmp_path):
    # configs/finegrained_in_fit.yaml as shipped, on the small build, one step per round
    configs = [a for name in ("demo", "finegrained", "finegrained_in_fit")
               for a in ("--config", str(REPO / "configs" / f"{name}.yaml"))]
    res = run_muco("fit", *configs,
                   "--data.init_args.train_shards", str(fg_small / "train" / "manifest.json"),
                   "--data.init_args.val_shards", str(fg_small / "val" / "manifest.json"),
                   "--model.init_args.val_tasks", str(fg_small / "eval" / "tasks.yaml"),
                   "--model.init_args.val_task_limit", "8", "--trainer.limit_val_batches", "1",
                   "--data.init_args.batch_size", "8", "--data.init_args.samples_per_epoch", "8",
                   "--data.init_args.num_workers", "0", "--trainer.max_steps", "2", "--trainer.log_every_n_steps", "1",
                   "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path / "run"),
                   cwd=tmp_path, timeout=400)
    assert res.returncode == 0, res.stderr[-4000:]
    sidecar = tmp_path / "run" / "rounds" / "after_round1"
    assert read_sidecar_manifest(sidecar)["num_query_turns"] == SMALL["train_scenes"] * len(fg.TURNS)
    negs = dict(read_scalars(tmp_path / "run")["train/neg_valid_frac"])
    assert list(negs) == [1] and negs[1] > 0.5  # round 2 (step 2) drew the mined negatives, round 1 none
