"""The sbatch script of a `muco fit` run: built from `SubmitOptions`, no I/O.

One Slurm task per device, started through `srun` so Lightning's `SLURMEnvironment` takes the ranks from Slurm
(`--ntasks-per-node` is what it needs). `--signal=USR1@<lead>` without `B:` reaches the srun tasks, where
Lightning saves an hpc checkpoint into the run directory and requeues the job (`--requeue`); the restarted job
runs the same command in the same run directory and continues from there. The log appends across restarts
(`--open-mode=append`). Site settings (QOS, constraints, memory, ...) come in through `extra_sbatch`.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import PurePath

# most seconds --signal accepts before the end of the job (a 16-bit field in Slurm)
MAX_SIGNAL_LEAD = 65535
# options with a flag of their own in `muco slurm submit` (one source of truth for each)
OWN_FLAGS = {"nodes": "--nodes", "N": "--nodes", "ntasks-per-node": "--tasks-per-node",
             "gpus-per-node": "--gpus-per-node", "cpus-per-task": "--cpus-per-task", "c": "--cpus-per-task",
             "time": "--time", "t": "--time", "partition": "--partition", "p": "--partition",
             "account": "--account", "A": "--account", "signal": "--signal-lead"}
# Lightning's SLURMEnvironment ignores jobs with these names (it treats them as interactive shells)
INTERACTIVE_NAMES = {"bash", "interactive"}
_TIME = re.compile(r"^(?:(\d+)-)?(\d+):([0-5]\d):([0-5]\d)$")
_KEY = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")


class SubmitError(ValueError):
    """A submission that cannot work; the message is one line for the user."""


@dataclass(frozen=True)
class SubmitOptions:
    configs: tuple[str, ...]          # --config files of `muco fit`, as given (relative to `workdir`)
    run_dir: str                      # absolute: trainer.default_root_dir of the run
    nodes: int
    tasks_per_node: int               # one task per device
    python: str                       # absolute interpreter that has muco installed
    workdir: str                      # absolute submit directory (--chdir): configs hold relative paths
    gpus_per_node: int | None = None
    cpus_per_task: int | None = None
    time: str | None = None           # [D-]HH:MM:SS
    partition: str | None = None
    account: str | None = None
    signal_lead: int = 120            # seconds before the time limit that SIGUSR1 is sent
    extra_sbatch: tuple[tuple[str, str | None], ...] = ()   # (key, value) -> #SBATCH --key=value
    fit_args: tuple[str, ...] = field(default_factory=tuple)  # extra `muco fit` arguments, passed last


def time_seconds(text: str) -> int:
    """Seconds in a Slurm time limit written `HH:MM:SS` or `D-HH:MM:SS`."""
    m = _TIME.match(text.strip())
    if not m:
        raise SubmitError(f"--time {text!r}: expected HH:MM:SS or D-HH:MM:SS, e.g. 04:00:00 or 1-12:00:00")
    days, hours, minutes, seconds = (int(g) if g else 0 for g in m.groups())
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def parse_sbatch_option(text: str) -> tuple[str, str | None]:
    """`KEY=VALUE` (or a bare `KEY` for a flag such as `exclusive`) -> (key, value); leading dashes are dropped."""
    key, sep, value = text.partition("=")
    key = key.strip().lstrip("-")
    if not _KEY.match(key):
        raise SubmitError(f"--sbatch {text!r}: expected KEY=VALUE, e.g. --sbatch qos=high or --sbatch mem=0")
    if key in OWN_FLAGS:
        raise SubmitError(f"--sbatch {text!r}: use {OWN_FLAGS[key]} for that")
    if "\n" in value:
        raise SubmitError(f"--sbatch {key}: the value must be one line")
    return key, (value if sep else None)


def validate(opts: SubmitOptions) -> None:
    if not opts.configs:
        raise SubmitError("no --config given: muco slurm submit --config <run.yaml> ...")
    if opts.nodes < 1:
        raise SubmitError(f"--nodes {opts.nodes}: must be at least 1")
    if opts.tasks_per_node < 1:
        raise SubmitError(f"--tasks-per-node {opts.tasks_per_node}: must be at least 1 (one task per device)")
    if opts.gpus_per_node is not None and opts.gpus_per_node < 1:
        raise SubmitError(f"--gpus-per-node {opts.gpus_per_node}: must be at least 1")
    if opts.gpus_per_node is not None and opts.gpus_per_node != opts.tasks_per_node:
        raise SubmitError(f"--tasks-per-node {opts.tasks_per_node} with --gpus-per-node {opts.gpus_per_node}: "
                          "muco runs one task per device, make them equal")
    if opts.cpus_per_task is not None and opts.cpus_per_task < 1:
        raise SubmitError(f"--cpus-per-task {opts.cpus_per_task}: must be at least 1")
    if not 1 <= opts.signal_lead <= MAX_SIGNAL_LEAD:
        raise SubmitError(f"--signal-lead {opts.signal_lead}: must be between 1 and {MAX_SIGNAL_LEAD} seconds")
    if opts.time is not None and time_seconds(opts.time) <= opts.signal_lead:
        raise SubmitError(f"--time {opts.time} is not longer than --signal-lead {opts.signal_lead} s: the job "
                          "would be told to checkpoint before it starts")
    for path in (opts.run_dir, opts.python, opts.workdir):
        if not PurePath(path).is_absolute():
            raise SubmitError(f"internal: {path!r} must be an absolute path")


def job_name(run_dir: str) -> str:
    name = PurePath(run_dir).name or "muco"
    return f"muco-{name}" if name in INTERACTIVE_NAMES else name


NUM_NODES = "$SLURM_JOB_NUM_NODES"   # left for the shell: the node count of the allocation


def fit_command(opts: SubmitOptions) -> list[str]:
    """The per-task command (without srun); the `NUM_NODES` item is expanded by the job's shell."""
    cmd = [opts.python, "-m", "muco", "fit"]
    for config in opts.configs:
        cmd += ["--config", config]
    cmd += ["--trainer.num_nodes", NUM_NODES, "--trainer.devices", str(opts.tasks_per_node),
            "--trainer.default_root_dir", opts.run_dir, *opts.fit_args]
    return cmd


def shell_line(cmd: list[str]) -> str:
    """`cmd` quoted for bash, except the `NUM_NODES` placeholder at its own position (fit_command's)."""
    at = cmd.index(NUM_NODES) if NUM_NODES in cmd else -1
    return " ".join(f'"{a}"' if i == at else shlex.quote(a) for i, a in enumerate(cmd))


def render_script(opts: SubmitOptions) -> str:
    """The whole sbatch script; deterministic for given options."""
    validate(opts)
    q = shlex.quote
    directives: list[str] = [
        f"--job-name={q(job_name(opts.run_dir))}",
        f"--nodes={opts.nodes}",
        f"--ntasks-per-node={opts.tasks_per_node}",
    ]
    if opts.gpus_per_node is not None:
        directives.append(f"--gpus-per-node={opts.gpus_per_node}")
    if opts.cpus_per_task is not None:
        directives.append(f"--cpus-per-task={opts.cpus_per_task}")
    if opts.time is not None:
        directives.append(f"--time={opts.time.strip()}")
    if opts.partition is not None:
        directives.append(f"--partition={q(opts.partition)}")
    if opts.account is not None:
        directives.append(f"--account={q(opts.account)}")
    directives += [
        f"--signal=USR1@{opts.signal_lead}",   # no B: the tasks (Lightning) must get it, not the batch shell
        "--requeue",
        "--open-mode=append",
        f"--output={q(opts.run_dir + '/slurm-%j.out')}",
        f"--chdir={q(opts.workdir)}",
    ]
    # site options last, so they may also refine ours (e.g. --output)
    directives += [f"--{k}" if v is None else f"--{k}={q(v)}" for k, v in opts.extra_sbatch]

    srun = ["srun", "--kill-on-bad-exit=1"]
    if opts.cpus_per_task is not None:
        # srun of Slurm 22.05+ no longer takes --cpus-per-task from the allocation: pass it on
        srun.append(f"--cpus-per-task={opts.cpus_per_task}")
    threads = opts.cpus_per_task or 1
    lines = [
        "#!/bin/bash",
        "# Written by `muco slurm submit`; submit again with: sbatch " + q(opts.run_dir + "/submit.sbatch"),
        *(f"#SBATCH {d}" for d in directives),
        "",
        "# defaults; a value set in the submitting shell wins (sbatch exports its environment)",
        f"export OMP_NUM_THREADS=${{OMP_NUM_THREADS:-{threads}}}",
        "export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}",
        "# NCCL_DEBUG is left alone: export NCCL_DEBUG=INFO before submitting to see NCCL's setup",
        "",
        'echo "muco: job ${SLURM_JOB_ID} SLURM_RESTART_COUNT=${SLURM_RESTART_COUNT:-0}'
        ' nodes=${SLURM_JOB_NODELIST} start=$(date -u +%Y-%m-%dT%H:%M:%SZ)"',
        "",
        # one line, so a copy-paste of it runs the same thing
        shell_line([*srun, *fit_command(opts)]),
        "",
    ]
    return "\n".join(lines)
