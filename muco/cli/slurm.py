"""`muco slurm submit`: write `<run_dir>/submit.sbatch` for a `muco fit` run and hand it to sbatch.

    muco slurm submit --config configs/m3t_2b.yaml --nodes 4 --tasks-per-node 8 --gpus-per-node 8 \\
        --time 24:00:00 --partition gpu [--sbatch qos=high ...] [--dry-run] [-- <extra muco fit arguments>]

The run directory is the run's `trainer.default_root_dir`, read from the config that `muco fit --print_config`
resolves (configs plus the extra arguments), or `--run-dir`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import yaml

from muco.slurm.sbatch import SubmitError, SubmitOptions, parse_sbatch_option, render_script, validate
from muco.train.run_dir import default_run_dir

SCRIPT_NAME = "submit.sbatch"
ROOT_DIR_FLAG = "--trainer.default_root_dir"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="muco slurm", description="Slurm jobs for muco runs.")
    sub = p.add_subparsers(dest="command", required=True, metavar="submit")
    s = sub.add_parser(
        "submit", help="write <run_dir>/submit.sbatch for `muco fit` and sbatch it",
        usage="muco slurm submit --config RUN.yaml [--config ...] --nodes N --tasks-per-node T [options] "
              "[-- <muco fit arguments>]",
        description="Write an sbatch script for `srun muco fit` (one task per device, SIGUSR1 before the time "
                    "limit, requeue, log appended in the run directory) into the run directory and submit it. "
                    "Arguments after `--` go to `muco fit` unchanged.")
    s.add_argument("--config", action="append", default=[], help="run config (repeatable, as for muco fit)")
    s.add_argument("--nodes", type=int, required=True, help="nodes (trainer.num_nodes comes from the allocation)")
    s.add_argument("--tasks-per-node", type=int, required=True,
                   help="tasks per node = devices per node (trainer.devices)")
    s.add_argument("--gpus-per-node", type=int, help="GPUs per node (#SBATCH --gpus-per-node)")
    s.add_argument("--cpus-per-task", type=int, help="CPUs per task; also the default OMP_NUM_THREADS")
    s.add_argument("--time", help="time limit, HH:MM:SS or D-HH:MM:SS")
    s.add_argument("--partition", help="partition")
    s.add_argument("--account", help="account")
    s.add_argument("--signal-lead", type=int, default=120, metavar="SECONDS",
                   help="send SIGUSR1 this long before the time limit: muco fit checkpoints and requeues "
                        "(Slurm may send it up to 60 s earlier; default: %(default)s)")
    s.add_argument("--sbatch", action="append", default=[], metavar="KEY=VALUE",
                   help="any other sbatch option, written as #SBATCH --KEY=VALUE (repeatable; a bare KEY for a "
                        "flag); use --sbatch=--KEY=VALUE or KEY=VALUE")
    s.add_argument("--run-dir", help="run directory (default: trainer.default_root_dir of the config)")
    s.add_argument("--dry-run", action="store_true", help="print the script; write and submit nothing")
    s.set_defaults(fit_args=[])
    return p


def split_fit_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """Everything after the first `--` goes to `muco fit` untouched."""
    if "--" in argv:
        at = argv.index("--")
        return argv[:at], argv[at + 1:]
    return argv, []


def names_root_dir(fit_args: Sequence[str]) -> bool:
    return any(a == ROOT_DIR_FLAG or a.startswith(ROOT_DIR_FLAG + "=") for a in fit_args)


def resolved_root_dir(python: str, configs: Sequence[str], fit_args: Sequence[str]) -> str | None:
    """`trainer.default_root_dir` as the real `muco fit` parser resolves it (this also checks the config)."""
    cmd = [python, "-m", "muco", "fit", *(x for c in configs for x in ("--config", c)), *fit_args,
           "--print_config"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        errors = [ln for ln in lines if "error" in ln.lower()]   # the parser's message, not a warning after it
        why = (errors or lines or [f"exit {proc.returncode}"])[-1]
        raise SubmitError(f"muco fit rejects the config: {why}")
    try:
        config = yaml.safe_load(proc.stdout) or {}
    except yaml.YAMLError as e:
        raise SubmitError(f"cannot read the resolved config from muco fit --print_config: {e}") from e
    root = (config.get("trainer") or {}).get("default_root_dir")
    return None if root in (None, "") else str(root)


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to a temp file next to `path`, then rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o755)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sbatch_exe() -> str:
    exe = shutil.which("sbatch")
    if exe is None:
        raise SubmitError("sbatch not found: run this on a Slurm login node, or use --dry-run to see the script")
    return exe


def sbatch(script: Path, workdir: str) -> str:
    """Submit; the job id."""
    proc = subprocess.run([sbatch_exe(), "--parsable", str(script)], capture_output=True, text=True, cwd=workdir)
    if proc.returncode != 0:
        err = " ".join((proc.stderr or proc.stdout).split()) or f"exit {proc.returncode}"
        raise SubmitError(f"sbatch failed: {err}")
    return proc.stdout.strip().split(";")[0]   # --parsable: "<id>" or "<id>;<cluster>"


def submit(args: argparse.Namespace) -> int:
    fit_args = list(args.fit_args)
    workdir = os.getcwd()
    python = os.path.abspath(sys.executable)   # not resolved: a venv's python must stay the venv's
    if not args.config:
        raise SubmitError("no --config given: muco slurm submit --config <run.yaml> --nodes N --tasks-per-node T")
    for c in args.config:
        if not Path(c).is_file():
            raise SubmitError(f"--config {c}: no such file")
    if args.run_dir and names_root_dir(fit_args):
        raise SubmitError(f"--run-dir and {ROOT_DIR_FLAG} after `--` both name the run directory: give one")
    options = dict(
        configs=tuple(args.config), nodes=args.nodes, tasks_per_node=args.tasks_per_node,
        gpus_per_node=args.gpus_per_node, cpus_per_task=args.cpus_per_task, time=args.time,
        partition=args.partition, account=args.account, signal_lead=args.signal_lead,
        extra_sbatch=tuple(parse_sbatch_option(s) for s in args.sbatch), fit_args=tuple(fit_args),
        python=python, workdir=workdir)
    # the cheap checks before the slow one (the config parse imports torch)
    validate(SubmitOptions(run_dir=workdir, **options))
    if not args.dry_run:
        sbatch_exe()

    root = resolved_root_dir(python, args.config, fit_args)   # always: a bad config fails now, not in the queue
    if args.run_dir:
        root = args.run_dir
    if root is None:  # what `muco fit` picks too (the job is then given it explicitly, so both always agree)
        root = default_run_dir(list(args.config))
    run_dir = os.path.abspath(os.path.expanduser(root))
    opts = SubmitOptions(run_dir=run_dir, **options)
    text = render_script(opts)
    if args.dry_run:
        sys.stdout.write(text)
        print(f"# dry run: nothing written or submitted (would write {run_dir}/{SCRIPT_NAME})", file=sys.stderr)
        return 0
    script = Path(run_dir) / SCRIPT_NAME
    write_atomic(script, text)
    job_id = sbatch(script, workdir)
    print(job_id)
    print(f"muco slurm: submitted job {job_id}; script {script}; log {run_dir}/slurm-{job_id}.out",
          file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    own, fit_args = split_fit_args(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(own)
    args.fit_args = fit_args
    try:
        if args.command == "submit":
            return submit(args)
    except SubmitError as e:
        print(f"muco slurm {args.command}: {e}", file=sys.stderr)
        return 2
    return 2
