"""Task lists: which MMEB datasets to run, with meta-task, IND/OOD split, data, image root, candidate mode.

YAML layout (see ``configs/eval/mmeb.yaml``)::

    root: /data/mmeb                 # relative paths below resolve against it; `$VARS` are expanded
    defaults: {image_root: image-tasks}
    tasks:
      - {name: ImageNet-1K, meta_task: classification, split: ind,
         data: MMEB_Test_Instruct/ImageNet-1K, candidates: text}

``root`` itself may be relative (to the working directory) and can be overridden on the command line.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from muco.eval.data import load_queries
from muco.eval.errors import EvalDataError
from muco.eval.text import CANDIDATE_MODES, MMEBQuery

META_TASKS = ("classification", "vqa", "retrieval", "grounding")
SPLITS = ("ind", "ood")
_KEYS = {"name", "meta_task", "split", "data", "image_root", "candidates"}


@dataclass(frozen=True)
class TaskSpec:
    """One dataset of a task list. ``data`` / ``image_root`` are resolved paths (None for in-memory tasks)."""

    name: str
    meta_task: str
    split: str
    candidates: str = "text"
    data: Path | None = None
    image_root: Path | None = None

    def __post_init__(self) -> None:
        if self.meta_task not in META_TASKS:
            raise ValueError(f"task {self.name}: meta_task must be one of {META_TASKS}, "
                             f"got {self.meta_task!r}")
        if self.split not in SPLITS:
            raise ValueError(f"task {self.name}: split must be one of {SPLITS}, got {self.split!r}")
        if self.candidates not in CANDIDATE_MODES:
            raise ValueError(
                f"task {self.name}: candidates must be one of {CANDIDATE_MODES}, got {self.candidates!r}"
            )


@dataclass
class Task:
    """A task spec with its loaded queries."""

    spec: TaskSpec
    queries: list[MMEBQuery]

    @property
    def name(self) -> str:
        return self.spec.name


def _resolve(root: Path, value: str | None) -> Path | None:
    if value is None:
        return None
    p = Path(os.path.expandvars(str(value))).expanduser()
    return p if p.is_absolute() else root / p


def load_task_list(path: str | Path, root: str | Path | None = None) -> list[TaskSpec]:
    """Parse a task-list YAML; ``root`` overrides the file's ``root:`` key."""
    with open(path, encoding="utf-8") as f:
        cfg = yaml.safe_load(f) or {}
    if not isinstance(cfg, dict) or not isinstance(cfg.get("tasks"), list):
        raise ValueError(f"{path}: expected a mapping with a `tasks:` list")
    unknown = set(cfg) - {"root", "defaults", "tasks"}
    if unknown:
        raise ValueError(f"{path}: unknown top-level keys {sorted(unknown)}")
    base = root if root is not None else cfg.get("root", ".")
    expanded = os.path.expandvars(str(base))
    if "$" in expanded:
        raise ValueError(f"{path}: data root {base!r} names an unset environment variable; "
                         "set it or pass a root (--root)")
    root_path = Path(expanded).expanduser()
    defaults = cfg.get("defaults") or {}
    specs: list[TaskSpec] = []
    for i, entry in enumerate(cfg["tasks"]):
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: task #{i} must be a mapping, got {entry!r}")
        e = {**defaults, **entry}
        bad = set(e) - _KEYS
        missing = {"name", "meta_task", "split", "data"} - set(e)
        if bad or missing:
            raise ValueError(f"{path}: task #{i} ({e.get('name')}): unknown keys {sorted(bad)}, "
                             f"missing keys {sorted(missing)}")
        specs.append(TaskSpec(
            name=str(e["name"]), meta_task=str(e["meta_task"]).lower(), split=str(e["split"]).lower(),
            candidates=str(e.get("candidates", "text")), data=_resolve(root_path, e["data"]),
            image_root=_resolve(root_path, e.get("image_root", ".")),
        ))
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"{path}: duplicate task names {dupes}")
    return specs


def select_tasks(specs: Sequence[TaskSpec], names: Sequence[str] | None) -> list[TaskSpec]:
    """The specs named in ``names`` (all when None), in task-list order."""
    if not names:
        return list(specs)
    known = {s.name for s in specs}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; the task list has {sorted(known)}")
    wanted = set(names)
    return [s for s in specs if s.name in wanted]


def load_task(spec: TaskSpec, limit: int | None = None) -> Task:
    """The task with its queries; data that cannot be read raises :class:`EvalDataError` naming the task."""
    if spec.data is None:
        raise EvalDataError("has no data path", task=spec.name)
    try:
        queries = load_queries(spec.data, limit=limit)
    except EvalDataError as e:
        raise e.in_task(spec.name) from e
    except FileNotFoundError as e:
        reason = "does not exist" if not spec.data.exists() else str(e).replace(f" in {spec.data}", "")
        raise EvalDataError(reason, task=spec.name, file=spec.data, what="data") from e
    except OSError as e:  # unreadable file or directory
        raise EvalDataError(f"cannot read it ({type(e).__name__}: {e})", task=spec.name, file=spec.data,
                            what="data") from e
    return Task(spec=spec, queries=queries)
