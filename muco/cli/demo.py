"""`make demo`: build the digit shards (if missing) -> train (`muco fit`, configs/demo.yaml) -> evaluate the
held-out MMEB-format tasks before and after (`muco eval`) -> print a results table and where the logs are.

Extra arguments are passed to the fit config, e.g. `python -m muco.demo --trainer.max_steps 50`.
`python -m muco.demo pairs [root]` instead writes the demo's fine-tuning pairs (``<root>/pairs/{train,val}/``,
for configs/demo_finetune.yaml) from the demo split under ``root`` (default data/demo).
`python -m muco.demo finegrained [root]` writes the fine-grained benchmark (:mod:`muco.demo.finegrained`, default
data/finegrained) for configs/finegrained.yaml and the rounds arms of benchmarks/bench_rounds.py.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from muco.demo.build import build_demo_data, demo_ready

ROOT = Path("data/demo")
CONFIG = "configs/demo.yaml"


def evaluate_module(module, tasks_yaml: Path, policy: str) -> dict[str, float]:
    """Precision@1 per task of a module as it is now (used for the untrained model)."""
    from muco.encoder import MuCoEncoder
    from muco.eval import evaluate_tasks, load_task, load_task_list

    encoder = MuCoEncoder.from_parts(module.tokenizer, module.embedder.backbone, policy)
    tasks = [load_task(s) for s in load_task_list(tasks_yaml)]
    return {k: v["precision@1"] for k, v in evaluate_tasks(encoder.encode_user_texts, tasks, 64).items()}


def results_table(before: dict[str, float], after: dict[str, float]) -> str:
    names = list(after)
    rows = [("task", "untrained P@1", "trained P@1")]
    rows += [(n, f"{before.get(n, float('nan')):.3f}", f"{after[n]:.3f}") for n in names]
    mean = lambda d: sum(d[n] for n in names) / len(names)  # noqa: E731
    rows.append(("overall (mean over tasks)", f"{mean(before):.3f}", f"{mean(after):.3f}"))
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{r[0]:<{w[0]}}  {r[1]:>{w[1]}}  {r[2]:>{w[2]}}" for r in rows)


def main(argv: list[str] | None = None) -> int:
    from muco.cli.eval import main as eval_main
    from muco.cli.fit import build_cli, resume_path

    extra = list(sys.argv[1:] if argv is None else argv)
    if extra[:1] == ["pairs"]:
        from muco.demo.pairs import build_demo_pairs

        print(build_demo_pairs(extra[1] if len(extra) > 1 else str(ROOT)))
        return 0
    if extra[:1] == ["finegrained"]:
        from muco.demo.finegrained import build_finegrained

        print(build_finegrained(extra[1] if len(extra) > 1 else "data/finegrained"))
        return 0
    t0 = time.perf_counter()
    if not demo_ready(ROOT):
        print(f"[demo] writing the digit shards and eval tasks to {ROOT}/ ...", flush=True)
        build_demo_data(ROOT)
    tasks = ROOT / "eval" / "tasks.yaml"

    cli = build_cli(["--config", CONFIG, *extra], run=False)
    policy = cli.model.eval_image_policy
    print("[demo] evaluating the untrained model on the held-out digits ...", flush=True)
    before = evaluate_module(cli.model, tasks, policy)

    run_dir = Path(cli.trainer.default_root_dir)
    print("[demo] training (muco fit --config configs/demo.yaml) ...", flush=True)
    # like `muco fit`: an interrupted demo continues from its run directory (rm -rf runs/demo to start over)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=resume_path(str(run_dir), None))
    ckpt = cli.trainer.checkpoint_callback.last_model_path or str(run_dir / "checkpoints" / "last.ckpt")

    print(f"[demo] muco eval --model {ckpt} --tasks {tasks} ...", flush=True)
    out = run_dir / "eval"
    code = eval_main(["--model", ckpt, "--tasks", str(tasks), "--output", str(out), "--image-policy", policy,
                      "--overwrite"])
    if code != 0:
        return code
    after = {k: v["precision@1"] for k, v in json.loads((out / "summary.json").read_text())["tasks"].items()}
    (run_dir / "eval_untrained.json").write_text(json.dumps(before, indent=2) + "\n")

    print("\n" + results_table(before, after))
    print(f"\n[demo] done in {time.perf_counter() - t0:.0f} s. checkpoint: {ckpt}")
    print(f"[demo] TensorBoard: tensorboard --logdir {run_dir}   (train/, val/, perf/ curves)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
