"""`muco rounds` end to end on the demo digits with the tiny model: round 1 (in-batch), mining with round 1's
model, round 2 with those negatives; the run directory layout, the results, and continuing a stopped run."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml

from muco.rounds.config import RoundsConfig
from muco.rounds.runner import RoundsRunner, results_table
from tests.train.conftest import REPO, read_scalars


def rounds_file(tmp_path, demo_data) -> RoundsConfig:
    shards = f"{demo_data}/val/manifest.json"  # 297 samples: quick to mine
    raw = {
        "run_dir": str(tmp_path / "run"),
        "fit": {"config": [str(REPO / "configs" / "tiny.yaml")],
                "args": ["--data.init_args.train_shards", shards, "--data.init_args.val_shards", "null",
                         "--data.init_args.samples_per_epoch", "200", "--data.init_args.batch_size", "4",
                         "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "1"]},
        "rounds": [{"max_steps": 5}, {"max_steps": 5}],
        "negatives": {"schedule": [{"from_round": 2, "band": [2, 6], "per_turn": 1}],
                      # the barely trained model puts every text close to every query: no margin filter here
                      "mine": {"shards": shards, "top_k": 8, "margin": -1,
                               "args": ["--num-workers", "0", "--no-progress"]}},
        "temperature": {"mode": "linear", "tau_start": 0.05, "tau_end": 0.03},
        "eval": {"tasks": f"{demo_data}/eval/tasks.yaml", "args": ["--image-policy", "tiny", "--limit", "20"]},
    }
    path = tmp_path / "rounds.yaml"
    path.write_text(yaml.safe_dump(raw))
    return RoundsConfig.load(path)


class Recorder:
    """Runs each phase for real (a `muco` subprocess) and remembers which ones ran."""

    def __init__(self, cwd) -> None:
        self.cwd, self.commands = cwd, []

    def __call__(self, cmd: list[str]) -> int:
        self.commands.append(cmd)
        return subprocess.run(cmd, cwd=self.cwd, check=False).returncode


@pytest.mark.slow
def test_two_rounds_mine_between_them_and_continue_where_stopped(tmp_path, demo_data):
    cfg = rounds_file(tmp_path, demo_data)
    rec = Recorder(tmp_path)
    results = RoundsRunner(cfg, run=rec).run()
    assert [c[3] for c in rec.commands] == ["fit", "eval", "mine", "fit", "eval"]

    run = cfg.run_dir
    assert [r["round"] for r in results] == [1, 2]
    assert json.loads((run / "summary.json").read_text()) == results
    r1, r2 = results
    assert r1["negatives"] is None and r2["negatives"]["band"] == [2, 6]
    assert r2["negatives"]["sidecar"] == str(run / "round1" / "negatives")
    assert (r1["temperature"], r2["temperature"]) == pytest.approx((0.05, 0.03))
    for r in results:  # every round evaluated on the held-out tasks
        assert set(r["eval"]) == {"Digits-CLS", "Digits-VQA", "Digits-I2T", "Digits-T2I"}
        assert all(0 <= v <= 1 for v in r["eval"].values())
        assert (run / f"round{r['round']}" / "fit" / "checkpoints" / "last.ckpt").is_file()
    assert r1["mined"]["query_turns"] > 0 and "mine_s" in r1["times"] and "mine_s" not in r2["times"]
    assert "Digits-CLS" in results_table(results)

    # round 2 started from round 1's weights, with its mined negatives and its own τ
    saved = yaml.safe_load((run / "round2" / "fit" / "config.yaml").read_text())
    assert saved["model"]["init_args"]["init_from"] == str(run / "round1" / "fit" / "checkpoints" / "last.ckpt")
    assert saved["data"]["init_args"]["records"]["init_args"]["negatives"]["band"] == [2, 6]
    scalars = read_scalars(run / "round2" / "fit")
    assert scalars["train/neg_valid_frac"][-1][1] > 0.5  # the samples found their mined negatives
    assert scalars["train/temperature"][-1][1] == pytest.approx(0.03)
    assert "train/neg_sim" not in read_scalars(run / "round1" / "fit")

    # a finished run does nothing again
    rec.commands.clear()
    RoundsRunner(cfg, run=rec).run()
    assert rec.commands == []
    # a run stopped after round 2's fit: only round 2's eval runs
    (run / "round2" / "round.json").unlink()
    phases = json.loads((run / "round2" / "phases.json").read_text())
    (run / "round2" / "phases.json").write_text(json.dumps({"fit_s": phases["fit_s"]}))
    RoundsRunner(cfg, run=rec).run()
    assert [c[3] for c in rec.commands] == ["eval"]
    # a fit stopped midway is the same command in the same run directory: muco fit resumes it by itself
    cmd = RoundsRunner(cfg).fit_command(2)
    assert cmd[cmd.index("--trainer.default_root_dir") + 1] == str(run / "round2" / "fit")


def test_a_failed_phase_stops_with_a_message_and_keeps_finished_work(tmp_path, demo_data):
    from muco.rounds.runner import PhaseFailed

    cfg = rounds_file(tmp_path, demo_data)
    with pytest.raises(PhaseFailed, match="round 1: `muco fit` exited with 3"):
        RoundsRunner(cfg, run=lambda cmd: 3).run()
    assert not (cfg.run_dir / "round1" / "round.json").exists()
