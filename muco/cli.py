"""The `muco` command: LightningCLI for training (`fit`, `validate`) plus data, eval and export tools."""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Sequence

from muco import __version__

# tool subcommands: name -> (module with `main(argv) -> int`, one-line help)
TOOLS: dict[str, tuple[str, str]] = {
    "data": ("muco.data.convert_cli", "`muco data convert`: M3T parquet / JSONL records -> webdataset shards"),
    "eval": ("muco.eval.cli", "run MMEB-format evaluation on a checkpoint or an exported model"),
    "export": ("muco.export", "merge the adapter and write a Hugging Face-format directory"),
    "mine": ("muco.mine.cli", "mine hard negatives for every query turn of a shard set (a sidecar for training)"),
    "rounds": ("muco.rounds.cli", "train in rounds: fit -> eval -> mine negatives with that model -> next round"),
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


def register_resolvers() -> None:
    """`${mul:a,b}` for configs (e.g. FSDP's data_parallel_size = devices x num_nodes)."""
    import warnings

    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("mul"):
        with warnings.catch_warnings():  # omegaconf 2.4 deprecates the name, not the behaviour
            warnings.simplefilter("ignore")
            OmegaConf.register_new_resolver("mul", lambda a, b: int(a) * int(b))


def show_muco_logs() -> None:
    """Print muco's INFO lines (data split per rank, mined negatives found, init_from) like Lightning's own;
    leaves logging alone when the caller configured a handler already."""
    log = logging.getLogger("muco")
    if log.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("[muco] %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)


def build_cli(argv: Sequence[str] | None, run: bool = True):
    """LightningCLI on `argv` (None: the process's own command line); `run=False` parses and instantiates
    without a subcommand, for callers that drive the trainer themselves (the demo)."""
    import jsonargparse
    from lightning.pytorch import LightningDataModule
    from lightning.pytorch.cli import LightningCLI

    from muco.train.module import MuCoModule

    class MuCoCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            # one tokenizer for model and data
            parser.link_arguments("model.init_args.tokenizer", "data.init_args.tokenizer")

    # `omegaconf+` resolves ${...} after overrides are merged; absolute paths need this setting (STACK.md §8)
    jsonargparse.set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
    register_resolvers()
    show_muco_logs()
    return MuCoCLI(
        MuCoModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_kwargs={"parser_mode": "omegaconf+"},
        save_config_kwargs={"overwrite": True},
        args=None if argv is None else list(argv),
        run=run,
    )


def main(argv: Sequence[str] | None = None) -> int:
    from_process = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version", "version"):
        print(f"muco {__version__}")
        return 0
    if argv[0] == "data" and len(argv) > 1 and argv[1] == "convert":
        argv = ["data"] + argv[2:]  # `muco data convert ...` reads better; `convert` is the only data tool
    if argv[0] in TOOLS:
        module = importlib.import_module(TOOLS[argv[0]][0])
        return int(module.main(argv[1:]) or 0)
    if argv[0] not in TRAINING:
        print(f"muco: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    build_cli(None if from_process else argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
