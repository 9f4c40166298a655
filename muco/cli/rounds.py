"""`muco rounds --config <rounds.yaml>`: train in rounds, mining hard negatives with each round's model."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from muco.rounds.config import RoundsConfig, RoundsConfigError
from muco.rounds.runner import PhaseFailed, RoundsRunner, results_table


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="muco rounds", description=__doc__.split("\n")[0].split(": ", 1)[-1])
    p.add_argument("--config", required=True, help="rounds file (see muco/rounds/config.py, configs/demo_rounds.yaml)")
    p.add_argument("--dry-run", action="store_true", help="print the fit / eval / mine commands, run nothing")
    args = p.parse_args(argv)
    try:
        cfg = RoundsConfig.load(args.config)
    except RoundsConfigError as e:
        print(f"muco rounds: {e}", file=sys.stderr)
        return 2
    runner = RoundsRunner(cfg, dry_run=args.dry_run)
    try:
        results = runner.run()
    except PhaseFailed as e:
        print(f"muco rounds: {e}", file=sys.stderr)
        return 1
    if results:
        print("\n" + results_table(results))
        for res in results:
            if res.get("mined"):
                print(f"mined with round {res['round']}'s model: {json.dumps(res['mined'])}")
        print(f"\n[rounds] results: {cfg.run_dir / 'summary.json'}; TensorBoard: tensorboard --logdir {cfg.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
