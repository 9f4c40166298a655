"""Task lists: which MMEB datasets to run, with meta-task, IND/OOD split, data, image root and text parser.

YAML layout (see ``configs/eval/mmeb.yaml``)::

    root: /data/mmeb                 # relative paths below resolve against it; `$VARS` are expanded
    defaults: {image_root: image-tasks}
    tasks:
      - {name: ImageNet-1K, meta_task: classification, split: ind, parser: image_cls,
         data: MMEB_Test_Instruct/ImageNet-1K}

``root`` itself may be relative (to the working directory) and can be overridden on the command line.
``parser`` names the released evaluation's rules for the task's texts (:mod:`muco.eval.text`); it decides the
candidate mode (``candidates``). Without it, :func:`default_parser` picks one from the meta-task and the
candidate mode.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from muco.eval.data import load_queries
from muco.eval.errors import EvalDataError
from muco.eval.text import CANDIDATE_MODES, PARSER_CANDIDATES, PARSERS, MMEBQuery

META_TASKS = ("classification", "vqa", "retrieval", "grounding")
SPLITS = ("ind", "ood")
_KEYS = {"name", "meta_task", "split", "data", "image_root", "candidates", "parser"}
# text candidates: the parser of each meta-task's MMEB datasets (image candidates: one parser per mode)
_TEXT_PARSERS = {"classification": "image_cls", "vqa": "image_qa", "retrieval": "image_i2t"}
_VAR_RE = re.compile(r"\$(?:(\w+)|\{(\w+)\})")


def default_parser(meta_task: str, candidates: str | None = None) -> str:
    """The parser of a task that names none, as MMEB assigns them (configs/eval/mmeb.yaml names each one).

    ``image`` candidates: ``image_t2i``; ``image_caption``: ``image_i2i_vg``; ``text``: ``image_cls`` for
    classification, ``image_qa`` for vqa, ``image_i2t`` for retrieval. Without a candidate mode: grounding is
    ``image_i2i_vg``, the other meta-tasks as with ``text``.
    """
    if candidates is None:
        candidates = "image_caption" if meta_task == "grounding" else "text"
    if candidates == "image":
        return "image_t2i"
    if candidates == "image_caption":
        return "image_i2i_vg"
    if candidates == "text" and meta_task in _TEXT_PARSERS:
        return _TEXT_PARSERS[meta_task]
    raise ValueError(f"no default parser for meta_task {meta_task!r} with {candidates!r} candidates; "
                     f"set `parser:` to one of {PARSERS}")


@dataclass(frozen=True)
class TaskSpec:
    """One dataset of a task list. ``data`` / ``image_root`` are resolved paths (None for in-memory tasks).

    ``parser`` and ``candidates`` are set from each other: the parser's candidate mode, or
    :func:`default_parser` of the meta-task and the candidate mode; given both, they must agree.
    """

    name: str
    meta_task: str
    split: str
    candidates: str | None = None  # None: the parser's
    data: Path | None = None
    image_root: Path | None = None
    parser: str | None = None  # None: default_parser(meta_task, candidates)

    def __post_init__(self) -> None:
        if self.meta_task not in META_TASKS:
            raise ValueError(f"task {self.name}: meta_task must be one of {META_TASKS}, "
                             f"got {self.meta_task!r}")
        if self.split not in SPLITS:
            raise ValueError(f"task {self.name}: split must be one of {SPLITS}, got {self.split!r}")
        if self.candidates is not None and self.candidates not in CANDIDATE_MODES:
            raise ValueError(
                f"task {self.name}: candidates must be one of {CANDIDATE_MODES}, got {self.candidates!r}"
            )
        if self.parser is None:
            try:
                object.__setattr__(self, "parser", default_parser(self.meta_task, self.candidates))
            except ValueError as e:
                raise ValueError(f"task {self.name}: {e}") from None
        if self.parser not in PARSER_CANDIDATES:
            raise ValueError(f"task {self.name}: parser must be one of {PARSERS}, got {self.parser!r}")
        if self.candidates is None:
            object.__setattr__(self, "candidates", PARSER_CANDIDATES[self.parser])
        if PARSER_CANDIDATES[self.parser] != self.candidates:
            raise ValueError(f"task {self.name}: parser {self.parser} builds {PARSER_CANDIDATES[self.parser]!r} "
                             f"candidates, but candidates is {self.candidates!r}")


@dataclass
class Task:
    """A task spec with its loaded queries; a query without a parser gets the spec's (its texts follow it)."""

    spec: TaskSpec
    queries: list[MMEBQuery]

    def __post_init__(self) -> None:
        self.queries = [q if q.parser is not None else replace(q, parser=self.spec.parser) for q in self.queries]

    @property
    def name(self) -> str:
        return self.spec.name


def expand_variables(path: str | Path, value: str, key: str) -> str:
    """``value`` (the ``key`` setting of the task list ``path``) with its environment variables expanded; an unset
    one is a one-line error naming it and the fix (for the ``root`` key: or ``--root``)."""
    unset = [bare or braced for bare, braced in _VAR_RE.findall(value) if (bare or braced) not in os.environ]
    if unset:
        var = unset[0]
        fix = f"export {var}=DIR" + (" (the data root) or pass --root DIR" if key == "root" else "")
        raise ValueError(f"{path}: {key} {value!r} needs the environment variable {var}, which is not set; {fix}")
    return os.path.expandvars(value)


def _resolve(path: str | Path, root: Path, value: str | None, key: str) -> Path | None:
    if value is None:
        return None
    p = Path(expand_variables(path, str(value), key)).expanduser()
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
    root_path = Path(expand_variables(path, str(base), "root")).expanduser()
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
        parser, candidates = e.get("parser"), e.get("candidates")
        specs.append(TaskSpec(
            name=str(e["name"]), meta_task=str(e["meta_task"]).lower(), split=str(e["split"]).lower(),
            candidates=None if candidates is None else str(candidates),
            data=_resolve(path, root_path, e["data"], "data"),
            image_root=_resolve(path, root_path, e.get("image_root", "."), "image_root"),
            parser=None if parser is None else str(parser),
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
        queries = load_queries(spec.data, limit=limit, parser=spec.parser)
    except EvalDataError as e:
        raise e.in_task(spec.name) from e
    except FileNotFoundError as e:
        reason = "does not exist" if not spec.data.exists() else str(e).replace(f" in {spec.data}", "")
        raise EvalDataError(reason, task=spec.name, file=spec.data, what="data") from e
    except OSError as e:  # unreadable file or directory
        raise EvalDataError(f"cannot read it ({type(e).__name__}: {e})", task=spec.name, file=spec.data,
                            what="data") from e
    return Task(spec=spec, queries=queries)
