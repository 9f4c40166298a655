"""The rounds file: parsing, errors that name the key, τ per round and the difficulty schedule per round."""

from __future__ import annotations

import pytest

from muco.rounds.config import RoundsConfig, RoundsConfigError, round_temperatures

BASE = {
    "run_dir": "runs/r",
    "fit": {"config": ["configs/tiny.yaml"], "args": ["--trainer.enable_progress_bar", "false"]},
    "rounds": [{"max_steps": 10}, {"max_steps": 5}, {"max_steps": 5}, {"max_steps": 5}],
    "negatives": {
        "schedule": [{"from_round": 2, "band": [30, 100]}, {"from_round": 3, "band": [5, 30], "per_turn": 2},
                     {"from_round": 4, "band": [1, 10]}],
        "mine": {"shards": "data/x/manifest.json", "top_k": 100},
    },
    "temperature": {"mode": "cosine", "tau_start": 0.05, "tau_end": 0.02},
    "eval": {"tasks": "tasks.yaml"},
}


def test_rounds_file_gives_the_configured_schedule_per_round():
    cfg = RoundsConfig.from_dict(BASE)
    assert [r.max_steps for r in cfg.rounds] == [10, 5, 5, 5]
    assert cfg.schedule.at(1) is None
    assert [cfg.schedule.at(r) for r in (2, 3, 4)] == [((30, 100), 1), ((5, 30), 2), ((1, 10), 1)]
    # round r mines for round r+1 whenever round r+1 draws negatives
    assert [cfg.needs_mining_after(r) for r in (1, 2, 3, 4)] == [True, True, True, False]
    assert cfg.mine.shards == ["data/x/manifest.json"] and cfg.mine.margin == 0.05
    assert cfg.fit_args == ["--trainer.enable_progress_bar", "false"]


def test_fit_commands_carry_the_round_settings(tmp_path):
    from muco.rounds.runner import RoundsRunner

    fit = {**BASE["fit"], "launcher": ["srun", "-N2"]}
    cfg = RoundsConfig.from_dict({**BASE, "run_dir": str(tmp_path), "fit": fit})
    runner = RoundsRunner(cfg, python="python")
    first, third = runner.fit_command(1), runner.fit_command(3)
    assert first[:5] == ["srun", "-N2", "python", "-m", "muco"] and "--model.init_args.init_from" not in first
    assert "--data.init_args.records.init_args.negatives" not in first
    assert third[third.index("--model.init_args.init_from") + 1] == str(tmp_path / "round2/fit/checkpoints/last.ckpt")
    negs = third[third.index("--data.init_args.records.init_args.negatives") + 1]
    assert negs == '{"sidecar": "%s", "band": [5, 30], "per_turn": 2}' % (tmp_path / "round2" / "negatives")
    assert third[third.index("--model.init_args.temperature") + 1] == "0.0275"  # cosine 0.05 -> 0.02, 2/3 of the way
    last = runner.fit_command(4)
    assert last[last.index("--model.init_args.temperature") + 1] == "0.02"
    assert runner.mine_command(2)[runner.mine_command(2).index("--output") + 1] == str(tmp_path / "round2/negatives")


def test_temperature_per_round():
    cos = round_temperatures({"mode": "cosine", "tau_start": 0.05, "tau_end": 0.02}, 3)
    assert cos == pytest.approx([0.05, 0.035, 0.02])
    lin = round_temperatures({"mode": "linear", "tau_start": 0.08, "tau_end": 0.02}, 4)
    assert lin == pytest.approx([0.08, 0.06, 0.04, 0.02])
    assert round_temperatures({"mode": "constant", "tau_start": 0.02}, 2) == pytest.approx([0.02, 0.02])
    assert round_temperatures({"mode": "linear", "tau_start": 0.05, "tau_end": 0.02}, 1) == pytest.approx([0.05])


@pytest.mark.parametrize("change, message", [
    ({"run_dir": None}, "set run_dir"),
    ({"fit": {"config": []}}, "set fit.config"),
    ({"rounds": []}, "rounds must be a non-empty list"),
    ({"rounds": [{"max_steps": 0}]}, r"rounds\[1\].max_steps must be a positive integer"),
    ({"rounds": [{"max_steps": 5, "steps": 3}]}, r"rounds\[1\]: unknown keys \['steps'\]"),
    ({"rounds": [{"max_steps": 5}]}, "a stage from round 4 but only 1 rounds"),
    ({"negatives": {"schedule": [{"from_round": 2, "band": [10, 5]}], "mine": {"shards": "x"}}},
     "negatives.schedule"),
    ({"negatives": {"schedule": [{"from_round": 2, "band": [1, 5]}]}}, "negatives.mine.shards"),
    ({"temperature": {"mode": "exp", "tau_start": 0.05}}, "temperature: unknown temperature schedule mode"),
    ({"temperature": {"mode": "linear"}}, "temperature needs tau_start"),
    ({"budget": 3}, r"unknown keys \['budget'\]"),
])
def test_bad_rounds_files_name_the_problem(change, message):
    raw = {**BASE, **change}
    raw = {k: v for k, v in raw.items() if v is not None}
    with pytest.raises(RoundsConfigError, match=message):
        RoundsConfig.from_dict(raw)


def test_missing_rounds_file(tmp_path):
    with pytest.raises(RoundsConfigError, match="does not exist"):
        RoundsConfig.load(tmp_path / "nope.yaml")
