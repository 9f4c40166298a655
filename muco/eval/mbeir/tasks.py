"""M-BEIR task definitions and the task-list YAML (``configs/eval/mbeir.yaml``).

Task ids and modalities follow UniIR's numbering (``src/data/preprocessing/utils.py``, ``MBEIR_TASK``), which is
what the released files carry (``task_id`` of a query line, the fifth qrels column, the ``task<N>`` of file names):
ids 0-4 and 6-8; id 5 (image -> image,text) exists in the numbering but has no dataset. The paper's 1-based "task
1..8" are these eight in order.

YAML layout::

    root: ${MBEIR_ROOT}                    # relative paths resolve against it; `$VARS` are expanded
    instructions: instructions/query_instructions.tsv
    global_pool: cand_pool/global/mbeir_union_test_cand_pool.jsonl   # optional (default: union of the pools)
    instruction_choice: per_query          # per_query | first | none
    tasks:
      - {name: visualnews_task0, dataset: VisualNews, task_id: 0, k: 5,
         queries: query/test/mbeir_visualnews_task0_test.jsonl,
         pool: cand_pool/local/mbeir_visualnews_task0_cand_pool.jsonl,
         qrels: qrels/test/mbeir_visualnews_task0_test_qrels.txt}

Image paths inside the data files are relative to ``image_root`` (default: ``root``, as in the released layout
where they start with ``mbeir_images/``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from muco.eval.tasks import expand_variables

TEXT, IMAGE, IMAGE_TEXT = "text", "image", "image,text"
MODALITIES = (TEXT, IMAGE, IMAGE_TEXT)

# task id -> (query modality, candidate modality), UniIR's MBEIR_TASK without the unused id 5
TASK_MODALITIES: dict[int, tuple[str, str]] = {
    0: (TEXT, IMAGE),
    1: (TEXT, TEXT),
    2: (TEXT, IMAGE_TEXT),
    3: (IMAGE, TEXT),
    4: (IMAGE, IMAGE),
    6: (IMAGE_TEXT, TEXT),
    7: (IMAGE_TEXT, IMAGE),
    8: (IMAGE_TEXT, IMAGE_TEXT),
}
_SHORT = {TEXT: "t", IMAGE: "i", IMAGE_TEXT: "(i,t)"}

# single-modal (S) or multimodal (M) query -> candidate, as UniIR's and the MuCo paper's tables group the 16 tasks
GROUPS = ("S->S", "S->M", "M->S", "M->M")

# how a query's instruction is picked among the table's (usually four) for its dataset and modalities
INSTRUCTION_CHOICES = ("per_query", "first", "none")

_TOP_KEYS = {"root", "instructions", "global_pool", "image_root", "instruction_choice", "tasks"}
_TASK_KEYS = {"name", "dataset", "task_id", "queries", "pool", "qrels", "k"}


def modality_group(query_modality: str, cand_modality: str) -> str:
    """``S->S`` .. ``M->M``: S is one modality (text or image), M is image and text together."""
    side = {TEXT: "S", IMAGE: "S", IMAGE_TEXT: "M"}
    return f"{side[query_modality]}->{side[cand_modality]}"


@dataclass(frozen=True)
class MBeirTaskSpec:
    """One (dataset, task) pair of the task list; paths are resolved."""

    name: str
    dataset: str
    task_id: int
    queries: Path
    pool: Path
    qrels: Path
    k: int = 5

    def __post_init__(self) -> None:
        if self.task_id not in TASK_MODALITIES:
            raise ValueError(f"task {self.name}: task_id must be one of {sorted(TASK_MODALITIES)} (UniIR's "
                             f"numbering; 5 is unused), got {self.task_id!r}")
        if self.k < 1:
            raise ValueError(f"task {self.name}: k must be >= 1, got {self.k}")

    @property
    def query_modality(self) -> str:
        return TASK_MODALITIES[self.task_id][0]

    @property
    def cand_modality(self) -> str:
        return TASK_MODALITIES[self.task_id][1]

    @property
    def group(self) -> str:
        return modality_group(self.query_modality, self.cand_modality)

    @property
    def kind(self) -> str:
        """``t->i``, ``(i,t)->t``, ...: the task in the notation of the paper's tables."""
        return f"{_SHORT[self.query_modality]}->{_SHORT[self.cand_modality]}"

    @property
    def metric(self) -> str:
        """The task's primary metric: ``recall@5``, or ``recall@10`` for Fashion200K and FashionIQ."""
        return f"recall@{self.k}"


@dataclass(frozen=True)
class MBeirConfig:
    """A parsed task list: data root, shared files and the tasks."""

    root: Path
    image_root: Path
    instructions: Path
    global_pool: Path | None
    instruction_choice: str
    tasks: tuple[MBeirTaskSpec, ...]


def _resolve(root: Path, value: str | Path, path: str | Path, what: str) -> Path:
    p = Path(expand_variables(path, str(value), what)).expanduser()
    return p if p.is_absolute() else root / p


def load_mbeir_config(path: str | Path, root: str | Path | None = None) -> MBeirConfig:
    """Parse an M-BEIR task list; ``root`` overrides the file's ``root:`` key. Bad keys raise one-line errors."""
    with open(path, encoding="utf-8") as f:
        cfg = yaml.safe_load(f) or {}
    if not isinstance(cfg, dict) or not isinstance(cfg.get("tasks"), list):
        raise ValueError(f"{path}: expected a mapping with a `tasks:` list")
    unknown = set(cfg) - _TOP_KEYS
    if unknown:
        raise ValueError(f"{path}: unknown top-level keys {sorted(unknown)}; allowed: {sorted(_TOP_KEYS)}")
    if "instructions" not in cfg:
        raise ValueError(f"{path}: missing `instructions:` (the query instruction table, "
                         "instructions/query_instructions.tsv in the released layout)")
    root_value = str(root if root is not None else cfg.get("root", "."))
    base = Path(expand_variables(path, root_value, "root")).expanduser()
    choice = str(cfg.get("instruction_choice", "per_query"))
    if choice not in INSTRUCTION_CHOICES:
        raise ValueError(f"{path}: instruction_choice must be one of {INSTRUCTION_CHOICES}, got {choice!r}")
    specs = []
    for i, e in enumerate(cfg["tasks"]):
        if not isinstance(e, dict):
            raise ValueError(f"{path}: task #{i} must be a mapping, got {e!r}")
        bad, missing = set(e) - _TASK_KEYS, _TASK_KEYS - {"k"} - set(e)
        if bad or missing:
            raise ValueError(f"{path}: task #{i} ({e.get('name')}): unknown keys {sorted(bad)}, "
                             f"missing keys {sorted(missing)}")
        try:
            task_id, k = int(e["task_id"]), int(e.get("k", 5))
        except (TypeError, ValueError):
            raise ValueError(f"{path}: task #{i} ({e.get('name')}): task_id and k must be integers") from None
        specs.append(MBeirTaskSpec(
            name=str(e["name"]), dataset=str(e["dataset"]), task_id=task_id, k=k,
            queries=_resolve(base, e["queries"], path, "queries"), pool=_resolve(base, e["pool"], path, "pool"),
            qrels=_resolve(base, e["qrels"], path, "qrels"),
        ))
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"{path}: duplicate task names {dupes}")
    glob = cfg.get("global_pool")
    return MBeirConfig(
        root=base, image_root=_resolve(base, cfg.get("image_root", "."), path, "image_root"),
        instructions=_resolve(base, cfg["instructions"], path, "instructions"),
        global_pool=None if glob in (None, "") else _resolve(base, glob, path, "global_pool"),
        instruction_choice=choice, tasks=tuple(specs),
    )


def select_mbeir_tasks(specs: Sequence[MBeirTaskSpec], names: Sequence[str] | None) -> list[MBeirTaskSpec]:
    """The specs named in ``names`` (all when None or empty), in task-list order."""
    if not names:
        return list(specs)
    known = {s.name for s in specs}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; the task list has {sorted(known)}")
    return [s for s in specs if s.name in set(names)]
