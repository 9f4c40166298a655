"""`muco data`: the data tools, one subcommand each: `convert` (:mod:`muco.cli.convert`), `merge-manifests` (joins
the parts of a `convert --part I/N`) and `download` (:mod:`muco.cli.download`). `muco data <convert arguments>`
without a subcommand is `muco data convert`, as it was before there were others."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence

# subcommand -> (module, its entry point, one-line help); imported only when run
COMMANDS: dict[str, tuple[str, str, str]] = {
    "convert": ("muco.cli.convert", "main",
                "records (M3T parquet / JSONL, MMEB-train pairs) -> webdataset shards; resumable, --part I/N for "
                "array jobs"),
    "merge-manifests": ("muco.cli.convert", "merge_main",
                        "join the part manifests of a `convert --part I/N` into the dataset manifest and rejects"),
    "download": ("muco.cli.download", "main",
                 "fetch the images named by a parquet's URLs (img2dataset) into a directory convert reads"),
}


def usage() -> str:
    lines = ["usage: muco data <command> [options]   (muco data <command> --help for its options)", "",
             "commands:"]
    lines += [f"  {name:<16} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "`muco data <convert options>` without a command is `muco data convert`."]
    return "\n".join(lines)


def entry(command: str) -> Callable[[list[str]], int] | None:
    """The ``main(argv)`` of a subcommand; None when its module is not part of this installation."""
    module_name, function, _ = COMMANDS[command]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:  # a missing dependency of the module: the user needs to see it
            raise
        return None
    return getattr(module, function)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(usage(), file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command, rest = (argv[0], argv[1:]) if argv[0] in COMMANDS else ("convert", argv)
    run = entry(command)
    if run is None:
        print(f"muco data {command}: not available in this installation of muco", file=sys.stderr)
        return 2
    return int(run(rest) or 0)


__all__ = ["COMMANDS", "entry", "main", "usage"]
