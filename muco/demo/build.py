"""Writes the demo data under `data/demo/`: train/held-out shards (via the converter) and MMEB-format tasks."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from muco.convert.m3t import convert_jsonl
from muco.demo.digits import eval_tasks, load_digits_images, record, split

EVAL_META = {"Digits-CLS": "classification", "Digits-VQA": "vqa", "Digits-I2T": "retrieval",
             "Digits-T2I": "retrieval"}
EVAL_CANDIDATES = {"Digits-CLS": "text", "Digits-VQA": "text", "Digits-I2T": "text", "Digits-T2I": "image"}


def demo_ready(root: str | Path) -> bool:
    root = Path(root)
    return all((root / p).exists() for p in ("train/manifest.json", "val/manifest.json", "eval/tasks.yaml"))


def write_split(root: Path, name: str, records: Iterable[dict[str, Any]], samples_per_shard: int, what: str,
                **convert: Any) -> None:
    """``records`` (images under ``root/images``) -> ``root/<name>.jsonl`` -> the shards ``root/<name>/``; a
    rejected record is a bug in the generator, so it fails the build (``what`` names the data)."""
    jsonl = root / f"{name}.jsonl"
    with open(jsonl, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    summary = convert_jsonl(jsonl, root / "images", str(root / name / f"{name}-%06d.tar"),
                            max_samples_per_shard=samples_per_shard, overwrite=True, **convert)
    if summary.rejected:
        raise RuntimeError(f"{what} data: {summary.rejected} records rejected; see {root / name}")


def write_tasks(root: Path, tasks: Mapping[str, list[dict[str, Any]]], meta: Mapping[str, str],
                candidates: Mapping[str, int], header: str) -> None:
    """Each task's rows as ``root/eval/<task>.jsonl`` and their MMEB-format task list ``root/eval/tasks.yaml``
    (images under ``root/images``); ``header`` is the list's comment line."""
    tasks_dir = root / "eval"
    tasks_dir.mkdir(exist_ok=True)
    specs = []
    for name, rows in tasks.items():
        with open(tasks_dir / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        specs.append({"name": name, "meta_task": meta[name], "split": "ind", "candidates": candidates[name],
                      "data": f"eval/{name}.jsonl"})
    with open(tasks_dir / "tasks.yaml", "w", encoding="utf-8") as f:
        f.write(f"# {header}\n")
        yaml.safe_dump({"root": str(root.resolve()), "defaults": {"image_root": "."}, "tasks": specs}, f,
                       sort_keys=False)


def build_demo_data(root: str | Path = "data/demo", seed: int = 0, samples_per_shard: int = 250) -> Path:
    """Reproducible from `seed`: the same split, records and task rows every time."""
    root = Path(root)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    digits = load_digits_images()
    train, test = split(digits, seed=seed)
    for d in digits:
        d.image.save(images / f"{d.key}.png")
    for name, part in (("train", train), ("val", test)):
        write_split(root, name, ({**record(d), "image": f"{d.key}.png"} for d in part), samples_per_shard, "demo")
    write_tasks(root, eval_tasks(test, "images", seed=seed), EVAL_META, EVAL_CANDIDATES,
                "held-out handwritten digits in MMEB_Test_Instruct format (written by muco.demo.build)")
    return root
