"""The `muco` command: `fit` / `validate` (LightningCLI, :mod:`muco.cli.fit`) and the tools, one module each.

This package is the outermost layer: its modules parse command lines and call the library; no library module
imports them (``tests/test_architecture.py`` checks it).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence

from muco import __version__

# tool subcommands: name -> (module with `main(argv) -> int`, one-line help)
TOOLS: dict[str, tuple[str, str]] = {
    "data": ("muco.cli.data", "`muco data convert | merge-manifests | download`: records -> webdataset shards"),
    "eval": ("muco.cli.eval", "evaluate a checkpoint or an exported model: MMEB-format tasks, or M-BEIR "
                         "(--benchmark mbeir); --devices N splits the work over N processes"),
    "export": ("muco.cli.export", "merge the adapter and write a Hugging Face-format directory"),
    "mine": ("muco.cli.mine", "mine hard negatives for every query turn of a shard set (a sidecar for training)"),
    "rounds": ("muco.cli.rounds", "train in rounds: fit -> eval -> mine negatives with that model -> next round"),
    "slurm": ("muco.cli.slurm", "`muco slurm submit`: write and sbatch a preemption-safe job for a muco fit run"),
}
TRAINING = {
    "fit": "train: muco fit --config configs/<run>.yaml [--trainer.max_steps N ...]",
    "validate": "run the validation loop of a config on a checkpoint (--ckpt_path)",
}


def usage() -> str:
    lines = [f"muco {__version__}: multi-turn contrastive training of Qwen2-VL embedders", "",
             "usage: muco <command> [options]   (muco <command> --help for its options)", "", "commands:"]
    lines += [f"  {k:<9} {v}" for k, v in TRAINING.items()]
    lines += [f"  {k:<9} {v[1]}" for k, v in TOOLS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from_process = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version", "version"):
        print(f"muco {__version__}")
        return 0
    if argv[0] in TOOLS:
        module = importlib.import_module(TOOLS[argv[0]][0])
        return int(module.main(argv[1:]) or 0)
    if argv[0] not in TRAINING:
        print(f"muco: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    try:
        from muco.cli.fit import build_cli

        build_cli(None if from_process else argv)
    except Exception as e:
        if os.environ.get("MUCO_DEBUG", "") not in ("", "0"):
            raise
        print(f"muco {argv[0]}: error: {user_message(e)}\n(MUCO_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1
    return 0


def user_message(exc: BaseException) -> str:
    """The message a user needs from an exception chain: the outermost exception raised by muco's own code (a
    config or data error with its fix, possibly wrapped by jsonargparse or Lightning, possibly wrapping a
    library's error), else the outermost one."""
    chain, seen = [], set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__ or e.__context__
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # muco/

    def raised_by_muco(err: BaseException) -> bool:
        tb = err.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        return tb is not None and os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(package + os.sep)

    ours = [err for err in chain if raised_by_muco(err)]
    chosen = ours[0] if ours else chain[0]
    text = " ".join(str(chosen).split()) or type(chosen).__name__
    return text if ours else f"{type(chosen).__name__}: {text}"



if __name__ == "__main__":
    sys.exit(main())
