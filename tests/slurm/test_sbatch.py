"""The sbatch script of `muco slurm submit`: its text, its checks, and the command line (no cluster needed)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from muco.cli import slurm as cli
from muco.slurm.sbatch import (
    SubmitError,
    SubmitOptions,
    fit_command,
    job_name,
    parse_sbatch_option,
    render_script,
    time_seconds,
)

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny.yaml")

BASE = SubmitOptions(configs=("configs/m3t_2b.yaml", "configs/strategy/fsdp.yaml"), run_dir="/scratch/runs/m3t 2b",
                     nodes=4, tasks_per_node=8, python="/opt/venv/bin/python", workdir="/home/me/muco")


def directives(text: str) -> list[str]:
    return [ln.removeprefix("#SBATCH ") for ln in text.splitlines() if ln.startswith("#SBATCH ")]


def srun_line(text: str) -> list[str]:
    (line,) = [ln for ln in text.splitlines() if ln.startswith("srun ")]
    return shlex.split(line)


def test_minimal_script_has_the_preemption_setup_and_the_fit_command():
    text = render_script(BASE)
    assert text.startswith("#!/bin/bash\n")
    assert directives(text) == [
        "--job-name='m3t 2b'",
        "--nodes=4",
        "--ntasks-per-node=8",
        "--signal=USR1@120",          # no B: (the srun tasks must get it)
        "--requeue",
        "--open-mode=append",
        "--output='/scratch/runs/m3t 2b/slurm-%j.out'",
        "--chdir=/home/me/muco",
    ]
    assert srun_line(text) == [
        "srun", "--kill-on-bad-exit=1", "/opt/venv/bin/python", "-m", "muco", "fit",
        "--config", "configs/m3t_2b.yaml", "--config", "configs/strategy/fsdp.yaml",
        "--trainer.num_nodes", "$SLURM_JOB_NUM_NODES", "--trainer.devices", "8",
        "--trainer.default_root_dir", "/scratch/runs/m3t 2b",
    ]
    assert '--trainer.num_nodes "$SLURM_JOB_NUM_NODES"' in text   # expanded by the job's shell
    assert "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}" in text
    assert "export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}" in text
    assert not any(ln.startswith("export NCCL_DEBUG") for ln in text.splitlines())
    assert "SLURM_RESTART_COUNT=${SLURM_RESTART_COUNT:-0}" in text
    for forbidden in ("--gpus-per-node", "--cpus-per-task", "--time", "--partition", "--account", "B:"):
        assert forbidden not in text
    subprocess.run(["bash", "-n"], input=text, text=True, check=True)   # valid bash


def test_every_option_reaches_the_script_and_site_options_come_last():
    opts = replace(BASE, gpus_per_node=8, cpus_per_task=12, time="1-12:00:00", partition="gpu", account="proj x",
                   signal_lead=300, extra_sbatch=(("qos", "high"), ("exclusive", None), ("comment", "a b")),
                   fit_args=("--trainer.max_steps", "100", "--data.init_args.negatives", "{band: [1, 5]}"))
    text = render_script(opts)
    assert directives(text) == [
        "--job-name='m3t 2b'", "--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=12",
        "--time=1-12:00:00", "--partition=gpu", "--account='proj x'", "--signal=USR1@300", "--requeue",
        "--open-mode=append", "--output='/scratch/runs/m3t 2b/slurm-%j.out'", "--chdir=/home/me/muco",
        "--qos=high", "--exclusive", "--comment='a b'",
    ]
    assert "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-12}" in text
    cmd = srun_line(text)
    assert cmd[:3] == ["srun", "--kill-on-bad-exit=1", "--cpus-per-task=12"]   # srun >= 22.05 needs it again
    assert cmd[-4:] == ["--trainer.max_steps", "100", "--data.init_args.negatives", "{band: [1, 5]}"]
    assert cmd[3:] == fit_command(opts)
    subprocess.run(["bash", "-n"], input=text, text=True, check=True)


def test_job_name_avoids_names_lightning_takes_for_interactive_shells():
    assert job_name("/runs/m3t_2b") == "m3t_2b"
    assert job_name("/runs/bash") == "muco-bash"
    assert job_name("/runs/interactive") == "muco-interactive"


@pytest.mark.parametrize("text,seconds", [("00:10:00", 600), ("48:00:00", 172800), ("1-00:00:30", 86430)])
def test_time_limits(text, seconds):
    assert time_seconds(text) == seconds


@pytest.mark.parametrize("change,message", [
    (dict(configs=()), "no --config"),
    (dict(nodes=0), "--nodes 0"),
    (dict(tasks_per_node=0), "--tasks-per-node 0"),
    (dict(time="90"), "--time '90': expected HH:MM:SS"),
    (dict(time="1:2:3"), "expected HH:MM:SS"),
    (dict(time="00:01:00"), "not longer than --signal-lead 120"),
    (dict(gpus_per_node=4), "make them equal"),
    (dict(cpus_per_task=0), "--cpus-per-task 0"),
    (dict(signal_lead=0), "--signal-lead 0"),
])
def test_bad_options_are_refused_in_one_line(change, message):
    with pytest.raises(SubmitError) as e:
        render_script(replace(BASE, **change))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_sbatch_passthrough_options():
    assert parse_sbatch_option("qos=high") == ("qos", "high")
    assert parse_sbatch_option("--mem=0") == ("mem", "0")
    assert parse_sbatch_option("constraint=a100&ib") == ("constraint", "a100&ib")
    assert parse_sbatch_option("exclusive") == ("exclusive", None)
    with pytest.raises(SubmitError, match="use --nodes"):
        parse_sbatch_option("nodes=2")
    with pytest.raises(SubmitError, match="use --time"):
        parse_sbatch_option("time=01:00:00")
    with pytest.raises(SubmitError, match="expected KEY=VALUE"):
        parse_sbatch_option("=x")


# ---------------------------------------------------------------- the command line, in-process


@pytest.fixture
def no_parse(monkeypatch):
    """Skip the `muco fit --print_config` subprocess (its own test below runs it for real)."""
    calls = []

    def fake(python, configs, fit_args):
        calls.append((python, list(configs), list(fit_args)))
        return "runs/from-config"

    monkeypatch.setattr(cli, "resolved_root_dir", fake)
    return calls


def fake_sbatch(tmp_path: Path, body: str, monkeypatch) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = bin_dir / "sbatch"
    exe.write_text("#!/bin/bash\n" + body)
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return bin_dir


def test_submit_writes_the_script_into_the_run_dir_and_prints_the_job_id(tmp_path, monkeypatch, capsys, no_parse):
    fake_sbatch(tmp_path, 'echo "$@" > "$(dirname "$0")/args"; echo "4242;cluster"\n', monkeypatch)
    monkeypatch.chdir(tmp_path)
    rc = cli.main(["submit", "--config", TINY, "--nodes", "2", "--tasks-per-node", "1",
                   "--sbatch", "qos=low", "--", "--trainer.max_steps", "3"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert out.out.strip() == "4242"
    run_dir = tmp_path / "runs" / "from-config"    # relative to the submit directory, made absolute
    script = run_dir / "submit.sbatch"
    assert script.read_text() == render_script(SubmitOptions(
        configs=(TINY,), run_dir=str(run_dir), nodes=2, tasks_per_node=1, python=os.path.abspath(sys.executable),
        workdir=str(tmp_path), extra_sbatch=(("qos", "low"),), fit_args=("--trainer.max_steps", "3")))
    assert (tmp_path / "bin" / "args").read_text().split() == ["--parsable", str(script)]
    assert [p.name for p in run_dir.iterdir()] == ["submit.sbatch"]    # no temp file left behind
    assert no_parse == [(os.path.abspath(sys.executable), [TINY], ["--trainer.max_steps", "3"])]


def test_run_dir_flag_wins_and_dry_run_writes_nothing(tmp_path, monkeypatch, capsys, no_parse):
    monkeypatch.setenv("PATH", str(tmp_path))      # no sbatch: fine for a dry run
    rc = cli.main(["submit", "--config", TINY, "--nodes", "1", "--tasks-per-node", "2", "--run-dir",
                   str(tmp_path / "mine"), "--dry-run"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "#SBATCH --ntasks-per-node=2" in out.out
    assert f"--trainer.default_root_dir {tmp_path / 'mine'}" in out.out
    assert not (tmp_path / "mine").exists()


@pytest.mark.parametrize("argv,message", [
    (["--nodes", "1", "--tasks-per-node", "1"], "no --config given"),
    (["--config", "nope.yaml", "--nodes", "1", "--tasks-per-node", "1"], "--config nope.yaml: no such file"),
    (["--config", TINY, "--nodes", "0", "--tasks-per-node", "1"], "--nodes 0: must be at least 1"),
    (["--config", TINY, "--nodes", "1", "--tasks-per-node", "0"], "--tasks-per-node 0: must be at least 1"),
    (["--config", TINY, "--nodes", "1", "--tasks-per-node", "1", "--time", "2h"], "--time '2h': expected"),
    (["--config", TINY, "--nodes", "1", "--tasks-per-node", "1", "--sbatch", "ntasks-per-node=3"],
     "use --tasks-per-node"),
    (["--config", TINY, "--nodes", "1", "--tasks-per-node", "1", "--run-dir", "a", "--",
      "--trainer.default_root_dir", "b"], "both name the run directory"),
])
def test_command_line_errors_are_one_line_with_exit_2(argv, message, capsys, no_parse):
    assert cli.main(["submit", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert no_parse == []      # refused before the slow config parse


def test_missing_sbatch_says_where_to_run(tmp_path, monkeypatch, capsys, no_parse):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert cli.main(["submit", "--config", TINY, "--nodes", "1", "--tasks-per-node", "1"]) == 2
    err = capsys.readouterr().err
    assert "sbatch not found" in err and "login node" in err and "--dry-run" in err


def test_sbatch_failure_shows_its_stderr(tmp_path, monkeypatch, capsys, no_parse):
    fake_sbatch(tmp_path, 'echo "sbatch: error: Invalid partition name specified" >&2; exit 1\n', monkeypatch)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["submit", "--config", TINY, "--nodes", "1", "--tasks-per-node", "1"]) == 2
    err = capsys.readouterr().err
    assert "sbatch failed: sbatch: error: Invalid partition name specified" in err and err.count("\n") == 1


def test_a_config_the_parser_rejects_fails_at_submit_time(tmp_path):
    fake_python = tmp_path / "python"
    fake_python.write_text("#!/bin/bash\necho 'noise' >&2\necho 'error: Key \"trainer.max_stepz\" is not expected' >&2"
                           "\necho 'a warning after it' >&2\nexit 2\n")
    fake_python.chmod(0o755)
    with pytest.raises(SubmitError, match='muco fit rejects the config: error: Key "trainer.max_stepz"'):
        cli.resolved_root_dir(str(fake_python), [TINY], ["--trainer.max_stepz", "3"])


# ---------------------------------------------------------------- through `python -m muco`, real config parse


def test_dry_run_through_muco_reads_the_run_dir_from_the_resolved_config(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PATH=os.path.dirname(sys.executable))   # no sbatch on PATH
    proc = subprocess.run(
        [sys.executable, "-m", "muco", "slurm", "submit", "--config", TINY, "--nodes", "2", "--tasks-per-node", "1",
         "--time", "00:30:00", "--signal-lead", "90", "--dry-run", "--",
         "--trainer.default_root_dir", "runs/dry", "--trainer.max_steps", "7"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    run_dir = tmp_path / "runs" / "dry"
    text = proc.stdout
    assert f"#SBATCH --output={run_dir}/slurm-%j.out" in text
    assert f"#SBATCH --chdir={tmp_path}" in text
    assert "#SBATCH --job-name=dry" in text and "#SBATCH --signal=USR1@90" in text
    assert "#SBATCH --time=00:30:00" in text
    cmd = srun_line(text)
    assert cmd[cmd.index("--trainer.default_root_dir") + 1] == str(run_dir)
    assert cmd[-4:] == ["--trainer.default_root_dir", "runs/dry", "--trainer.max_steps", "7"]
    assert not run_dir.exists()
