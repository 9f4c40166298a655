"""`muco fit` end to end on the tiny model: logging, loss, checkpoints, resume, config errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.train.conftest import REPO, read_scalars

CONFIG = str(REPO / "configs" / "tiny.yaml")


def data_args(demo: Path) -> list[str]:
    return [f"--data.init_args.train_shards={demo}/train/manifest.json",
            f"--data.init_args.val_shards={demo}/val/manifest.json"]


def start_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if "run directory:" in ln]


@pytest.mark.slow
def test_fit_logs_metrics_and_loss_falls(muco_cli, demo_data, tmp_path):
    # one validation at the end, with MMEB-format tasks and their pictures
    res = muco_cli("fit", "--config", CONFIG, *data_args(demo_data), "--trainer.max_steps=30",
                   "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false",
                   "--trainer.val_check_interval=30", f"--model.init_args.val_tasks={demo_data}/eval/tasks.yaml",
                   "--model.init_args.val_task_limit=6", "--model.init_args.val_pictures=3", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "runs" / "tiny"  # the run directory: logs, config and checkpoints, no version_N
    assert (run / "config.yaml").exists(), "the resolved config is saved next to the logs"
    assert (run / "checkpoints" / "last.ckpt").is_file() and not list(run.glob("version_*"))
    scalars = read_scalars(run)
    for key in ("train/loss", "train/lr", "train/temperature", "train/pos_sim", "train/hardest_neg_sim",
                "train/masked_frac", "train/grad_norm", "train/skipped_samples", "perf/images_per_s",
                "perf/pairs_per_s", "perf/tokens_per_s", "perf/pairs_per_s_device", "perf/data_wait_frac",
                "perf/token_efficiency"):
        assert key in scalars, f"{key} missing from {sorted(scalars)}"
    # texts of different lengths: some padding in every batch, never more positions than real tokens
    assert all(0 < v < 1 for _, v in scalars["perf/token_efficiency"])
    loss = [v for _, v in scalars["train/loss"]]
    assert len(loss) == 30
    assert sum(loss[-5:]) / 5 < sum(loss[:5]) / 5 - 0.2, loss
    # 7 turns per image: 6 of every row's columns are masked (same image, other turn)
    assert scalars["train/temperature"][-1][1] == torch.tensor(0.02).item()
    masked = scalars["train/masked_frac"][-1][1]
    assert abs(masked - 6 / (8 * 7)) < 1e-6
    # the validation's pictures: a retrieval grid and similarity histograms per task, one projector
    tasks = [t["name"] for t in yaml.safe_load((demo_data / "eval" / "tasks.yaml").read_text())["tasks"]]
    assert "val/overall" in scalars and all(f"val/{t}/precision@1" in scalars for t in tasks)
    ea = EventAccumulator(str(run), size_guidance={"images": 0, "histograms": 0})
    ea.Reload()
    assert sorted(ea.Tags()["images"]) == sorted(f"val_pictures/{t}" for t in tasks)
    assert {f"val_similarity/{t}/positive" for t in tasks} <= set(ea.Tags()["histograms"])
    assert [e.step for e in ea.Images(f"val_pictures/{tasks[0]}")] == [30]
    meta = (run / "00030" / "val_queries" / "metadata.tsv").read_text().splitlines()
    assert len(meta) == 1 + 3 * len(tasks) and (run / "projector_config.pbtxt").is_file()


@pytest.mark.slow
def test_resume_continues_at_the_right_step_with_optimizer_state(muco_cli, demo_data, tmp_path):
    common = ["fit", "--config", CONFIG, *data_args(demo_data), "--trainer.enable_progress_bar=false",
              "--data.init_args.batch_size=4", "--trainer.log_every_n_steps=1"]
    first = muco_cli(*common, "--trainer.max_steps=10", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    run = tmp_path / "runs" / "tiny"
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 10
    adam_steps = {float(s["step"]) for s in last["optimizer_states"][0]["state"].values()}
    assert adam_steps == {10.0}
    assert any("DataModule" in k for k in last), f"no data-module state in {sorted(last)}"

    # the README's resume command: the same command, here with a higher max_steps
    second = muco_cli(*common, "--trainer.max_steps=15", "--ckpt_path=last", cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from" in second.stderr and "last.ckpt" in second.stderr
    start = start_lines(second.stderr)
    assert start == [f"[muco] run directory: {run.resolve()} (checkpoints/, TensorBoard events, skipped.jsonl); "
                     f"resuming from {run / 'checkpoints' / 'last.ckpt'} (its newest checkpoint)"], start
    resumed = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert resumed["global_step"] == 15
    # Adam's step counters went on from 10: the optimizer state was restored, not rebuilt
    assert {float(s["step"]) for s in resumed["optimizer_states"][0]["state"].values()} == {15.0}
    steps = sorted({s for s, _ in read_scalars(run)["train/loss"]})
    assert steps == list(range(15)), "one TensorBoard directory holds both parts of the run"


def test_ckpt_path_last_without_a_checkpoint_fails_early(muco_inprocess, demo_data, tmp_path):
    res = muco_inprocess("fit", "--config", CONFIG, *data_args(demo_data), "--ckpt_path=last", cwd=tmp_path)
    assert res.returncode != 0
    assert "holds no checkpoint to resume" in res.stderr


def test_the_run_directory_defaults_to_the_first_config_also_with_the_fsdp2_config(muco_inprocess, demo_data,
                                                                                   tmp_path):
    # configs/strategy/fsdp.yaml holds a ${...}: jsonargparse's omegaconf+ mode then drops the parsed list of
    # --config files, so the default run directory is taken from the command line
    conf = yaml.safe_load(Path(CONFIG).read_text())
    del conf["trainer"]["default_root_dir"]
    (tmp_path / "my_run.yaml").write_text(yaml.safe_dump(conf))
    for strategy in ([], ["--config", str(REPO / "configs" / "strategy" / "fsdp.yaml")]):
        res = muco_inprocess("fit", "--config", str(tmp_path / "my_run.yaml"), *strategy, *data_args(demo_data),
                             "--trainer.devices=1", "--ckpt_path=last", cwd=tmp_path)
        assert res.returncode == 1, res.stderr[-2000:]
        assert "runs/my_run holds no checkpoint to resume" in res.stderr, (strategy, res.stderr[-2000:])


def test_config_typo_fails_with_jsonargparse_message(muco_inprocess, demo_data, tmp_path):
    res = muco_inprocess("fit", "--config", CONFIG, *data_args(demo_data), "--trainer.max_stepz=3", cwd=tmp_path)
    assert res.returncode != 0
    assert "max_stepz" in res.stderr and "error" in res.stderr.lower()
    assert "Traceback" not in res.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  init_args:\n    temprature: 0.05\n")
    res = muco_inprocess("fit", "--config", CONFIG, "--config", str(bad), *data_args(demo_data), cwd=tmp_path)
    assert res.returncode != 0 and "temprature" in res.stderr and "Traceback" not in res.stderr


def test_errors_are_one_line_with_the_fix_and_no_traceback(muco_inprocess, demo_data, tmp_path):
    (tmp_path / "bad.ckpt").write_bytes(b"cut short")
    cases = {
        "--model.init_args.backbone.preset=nope": "unknown backbone preset 'nope'; choose one of",
        f"--model.init_args.init_from={demo_data}/train/train-000000.tar": "is not a checkpoint file",
        f"--ckpt_path={tmp_path / 'bad.ckpt'}": "is not a complete checkpoint",
        "--model.init_args.val_tasks=nowhere.yaml": "model.val_tasks=nowhere.yaml does not exist",
        "--trainer.default_root_dir=/proc/muco-run": "the run directory /proc/muco-run is not writable",
    }
    for arg, message in cases.items():
        res = muco_inprocess("fit", "--config", CONFIG, *data_args(demo_data), "--trainer.max_steps=1", arg,
                             cwd=tmp_path)
        assert res.returncode == 1, (arg, res.stderr[-2000:])
        assert "Traceback" not in res.stderr, (arg, res.stderr[-2000:])
        line = next(ln for ln in res.stderr.splitlines() if ln.startswith("muco fit: error: "))
        assert message in line, (arg, line)
    assert not (tmp_path / "runs" / "tiny" / "checkpoints").exists(), "nothing was trained"


def test_the_message_is_muco_s_own_through_library_wrappers():
    from muco.cli import user_message
    from muco.inputs.tokenizer import build_tokenizer
    from muco.model.backbone import BackboneConfig, build_backbone

    try:
        try:
            build_backbone(BackboneConfig(preset="nope"), build_tokenizer("tiny"))
        except ValueError as inner:
            raise ValueError("Does not validate against any of the Union subtypes\nGiven value: ...") from inner
    except ValueError as wrapped:
        assert user_message(wrapped).startswith("unknown backbone preset 'nope'")
    try:
        int("x")
    except ValueError as plain:  # nothing of muco's: the library's message, with its type
        assert user_message(plain) == "ValueError: invalid literal for int() with base 10: 'x'"


@pytest.mark.slow
def test_a_short_run_says_where_it_lives_shows_its_steps_and_logs_no_hp_metric(muco_cli, demo_data, tmp_path):
    res = muco_cli("fit", "--config", CONFIG, *data_args(demo_data), "--trainer.max_steps=2",
                   "--trainer.log_every_n_steps=1", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    run = (tmp_path / "runs" / "tiny").resolve()
    # one line at the start: the run directory, absolute, and that the run starts fresh
    assert start_lines(res.stderr) == [
        f"[muco] run directory: {run} (checkpoints/, TensorBoard events, skipped.jsonl); starting fresh"]
    # the progress bar counts steps out of max_steps; Lightning's default read "Epoch 0/-2" (max_epochs -1)
    shown = res.stdout + res.stderr
    assert "epoch 0, step 2/2" in shown and "/-2" not in shown, shown[-3000:]
    # TensorBoard: the module's metrics, without the logger's placeholder hp_metric (-1)
    scalars = read_scalars(run)
    assert "train/loss" in scalars and "hp_metric" not in scalars, sorted(scalars)
    assert sorted(scalars).count("train/lr") == 1 and not [k for k in scalars if k.startswith("lr-")]


def test_fit_help_has_muco_s_optimizer_settings_only(muco_inprocess, demo_data, tmp_path):
    res = muco_inprocess("fit", "--help", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "--model.help" in res.stdout  # muco's model.optim is under model.init_args
    assert "--optimizer" not in res.stdout and "--lr_scheduler" not in res.stdout
    res = muco_inprocess("fit", "--config", CONFIG, *data_args(demo_data), "--optimizer=Adam", "--trainer.max_steps=1",
                   cwd=tmp_path)
    assert res.returncode != 0 and "--optimizer" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "runs" / "tiny" / "checkpoints").exists()


def progress_bars(demo_data, tmp_path, *args):
    from lightning.pytorch.callbacks import ProgressBar

    from muco.cli.fit import build_cli

    cli = build_cli(["--config", CONFIG, *data_args(demo_data), f"--trainer.default_root_dir={tmp_path / 'run'}",
                     *args], run=False)
    return [c for c in cli.trainer.callbacks if isinstance(c, ProgressBar)]


def test_the_cli_adds_its_progress_bar_unless_the_config_has_one_or_none(demo_data, tmp_path):
    from lightning.pytorch.callbacks import TQDMProgressBar

    from muco.train.progress import StepProgressBar

    assert [type(b) for b in progress_bars(demo_data, tmp_path)] == [StepProgressBar]
    assert progress_bars(demo_data, tmp_path, "--trainer.enable_progress_bar=false") == []
    own = progress_bars(demo_data, tmp_path, "--trainer.callbacks+=lightning.pytorch.callbacks.TQDMProgressBar")
    assert [type(b) for b in own] == [TQDMProgressBar]
