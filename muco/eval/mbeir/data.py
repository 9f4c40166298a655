"""Readers of the released M-BEIR files (TIGER-Lab/M-BEIR, as UniIR's loaders read them).

- **Queries** (``query/test/mbeir_<dataset>_task<N>_test.jsonl``), one JSON object a line: ``qid``
  (``"<dataset_id>:<n>"``), ``query_txt`` (str or null), ``query_img_path`` (str or null, relative to the data
  root), ``query_modality`` (``text``, ``image``, ``image,text``), ``query_src_content``, ``pos_cand_list`` and
  ``neg_cand_list`` (dids), ``task_id``.
- **Candidate pools** (``cand_pool/local/mbeir_<dataset>_task<N>[_test]_cand_pool.jsonl`` and the global
  ``cand_pool/global/mbeir_union_test_cand_pool.jsonl``): ``did`` (``"<dataset_id>:<n>"``), ``txt``, ``img_path``,
  ``modality``, ``src_content``.
- **Qrels** (``qrels/test/mbeir_<dataset>_task<N>_test_qrels.txt``): ``qid 0 did relevance task_id`` per line,
  whitespace-separated; relevance > 0 marks a relevant candidate (the task id column may be absent).
- **Instructions** (``instructions/query_instructions.tsv``): a header line, then tab-separated rows
  ``query_modality, cand_modality, dataset, dataset_id, instruction, instruction, ...`` (empty cells ignored).

A modality written ``text,image`` is read as ``image,text`` (the dataset card uses one spelling, the loaders the
other). ``query_src_content``, ``neg_cand_list`` and ``src_content`` are not used by the evaluation and not kept.
Anything unusable raises :class:`muco.eval.errors.EvalDataError` whose message names the file and line.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from muco.eval.errors import EvalDataError
from muco.eval.mbeir.tasks import IMAGE_TEXT, MODALITIES

_ID_RE = re.compile(r"\d+:\d+")
_SPELLINGS = {m: m for m in MODALITIES} | {"text,image": IMAGE_TEXT}


@dataclass(frozen=True)
class MBeirQuery:
    """One query line; ``image_path`` relative to the image root."""

    qid: str
    text: str
    image_path: str | None
    modality: str
    task_id: int | None
    positives: tuple[str, ...]

    @property
    def dataset_id(self) -> str:
        """The dataset id of the qid, which keys the instruction table (as in UniIR)."""
        return self.qid.split(":")[0]


@dataclass(frozen=True)
class MBeirCandidate:
    """One candidate-pool line; ``image_path`` relative to the image root."""

    did: str
    text: str
    image_path: str | None
    modality: str


def _fail(file: Path, line: int, reason: str, what: str) -> EvalDataError:
    return EvalDataError(f"line {line}: {reason}", file=file, what=what)


def _lines(path: Path, what: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) of the non-blank lines; a missing or unreadable file is one clear error."""
    if not path.is_file():
        reason = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise EvalDataError(reason, file=path, what=what)
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if line.strip():
                    yield n, line
    except UnicodeDecodeError as e:
        raise EvalDataError(f"not UTF-8 text ({e.reason} at byte {e.start})", file=path, what=what) from e
    except OSError as e:
        raise EvalDataError(f"cannot read it ({type(e).__name__}: {e})", file=path, what=what) from e


def _objects(path: Path, what: str) -> Iterator[tuple[int, dict[str, Any]]]:
    for n, line in _lines(path, what):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise _fail(path, n, f"not valid JSON ({e.msg} at column {e.colno})", what) from e
        if not isinstance(obj, dict):
            raise _fail(path, n, f"expected a JSON object, got {type(obj).__name__}", what)
        yield n, obj


def _text(obj: dict, key: str, fail: Callable[[str], EvalDataError]) -> str:
    value = obj.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise fail(f"{key} must be a string or null, got {type(value).__name__}")
    return value


def _id(obj: dict, key: str, fail: Callable[[str], EvalDataError]) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        raise fail(f"{key} must be a string '<dataset_id>:<n>', got {value!r}")
    return value


def normalize_modality(value: Any) -> str | None:
    """``text``, ``image`` or ``image,text`` (also read from ``text,image``); None when it is none of them."""
    return _SPELLINGS.get(value.replace(" ", "")) if isinstance(value, str) else None


def _modality(obj: dict, key: str, fail: Callable[[str], EvalDataError]) -> str:
    m = normalize_modality(obj.get(key))
    if m is None:
        raise fail(f"{key} must be one of {list(MODALITIES)}, got {obj.get(key)!r}")
    return m


def _did_list(value: Any, key: str, fail: Callable[[str], EvalDataError]) -> tuple[str, ...]:
    """A list of dids; entries may also be ``{"did": ...}`` objects (the dataset card's notation)."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise fail(f"{key} must be a list of dids, got {type(value).__name__}")
    out = []
    for v in value:
        did = v.get("did") if isinstance(v, dict) else v
        if not isinstance(did, str) or not _ID_RE.fullmatch(did):
            raise fail(f"{key} holds {v!r}, not a did '<dataset_id>:<n>'")
        out.append(did)
    return tuple(out)


def read_queries(path: str | Path, limit: int | None = None) -> list[MBeirQuery]:
    """The first ``limit`` (all when None) queries of a query file, in file order; qids must be unique."""
    path = Path(path)
    out: list[MBeirQuery] = []
    seen: dict[str, int] = {}
    for n, obj in _objects(path, "queries"):
        if limit is not None and len(out) >= limit:
            break

        def fail(reason: str, n: int = n) -> EvalDataError:
            return _fail(path, n, reason, "queries")

        qid = _id(obj, "qid", fail)
        if qid in seen:
            raise fail(f"duplicate qid {qid} (first on line {seen[qid]})")
        seen[qid] = n
        text, image = _text(obj, "query_txt", fail), _text(obj, "query_img_path", fail) or None
        if not text.strip() and image is None:
            raise fail(f"query {qid} has neither query_txt nor query_img_path")
        task_id = obj.get("task_id")
        if task_id is not None and (isinstance(task_id, bool) or not isinstance(task_id, int)):
            raise fail(f"task_id must be an integer, got {task_id!r}")
        out.append(MBeirQuery(qid=qid, text=text, image_path=image, modality=_modality(obj, "query_modality", fail),
                              task_id=task_id, positives=_did_list(obj.get("pos_cand_list"), "pos_cand_list", fail)))
    return out


def read_pool(path: str | Path, limit: int | None = None, keep: Collection[str] = ()) -> list[MBeirCandidate]:
    """The candidates of a pool file in file order; dids must be unique within the file.

    With ``limit``: only the first ``limit`` candidates plus those whose did is in ``keep`` (smoke runs keep the
    relevant candidates of their queries, so a limited pool still holds what they look for).
    """
    path = Path(path)
    out: list[MBeirCandidate] = []
    seen: dict[str, int] = {}
    for n, obj in _objects(path, "pool"):
        def fail(reason: str, n: int = n) -> EvalDataError:
            return _fail(path, n, reason, "pool")

        did = _id(obj, "did", fail)
        if did in seen:
            raise fail(f"duplicate did {did} (first on line {seen[did]})")
        seen[did] = n
        if limit is not None and len(seen) > limit and did not in keep:
            continue
        text, image = _text(obj, "txt", fail), _text(obj, "img_path", fail) or None
        if not text.strip() and image is None:
            raise fail(f"candidate {did} has neither txt nor img_path")
        out.append(MBeirCandidate(did=did, text=text, image_path=image, modality=_modality(obj, "modality", fail)))
    return out


@dataclass(frozen=True)
class Qrels:
    """Relevant dids per qid (relevance > 0), and the task id the qrels give each qid (None if absent)."""

    relevant: dict[str, tuple[str, ...]]
    task_ids: dict[str, int | None]


def read_qrels(path: str | Path) -> Qrels:
    """A qrels file: ``qid 0 did relevance [task_id]`` per line."""
    path = Path(path)
    relevant: dict[str, list[str]] = {}
    task_ids: dict[str, int | None] = {}
    for n, line in _lines(path, "qrels"):
        parts = line.split()
        if len(parts) not in (4, 5):
            raise _fail(path, n, f"expected 'qid 0 did relevance [task_id]', got {line.strip()!r}", "qrels")
        qid, _, did, rel = parts[:4]
        if not _ID_RE.fullmatch(qid) or not _ID_RE.fullmatch(did):
            raise _fail(path, n, f"qid and did must look like '<dataset_id>:<n>', got {qid!r} and {did!r}", "qrels")
        try:
            score = int(rel)
            task = int(parts[4]) if len(parts) == 5 else None
        except ValueError:
            raise _fail(path, n, f"relevance and task_id must be integers, got {line.strip()!r}", "qrels") from None
        if qid in task_ids and task_ids[qid] != task:
            raise _fail(path, n, f"qid {qid} has task_id {task} here but {task_ids[qid]} on an earlier line", "qrels")
        task_ids[qid] = task
        if score > 0 and did not in relevant.setdefault(qid, []):
            relevant[qid].append(did)
    return Qrels(relevant={q: tuple(d) for q, d in relevant.items()}, task_ids=task_ids)


InstructionTable = dict[tuple[str, str, str], tuple[str, ...]]


def read_instructions(path: str | Path) -> InstructionTable:
    """``(dataset_id, query_modality, cand_modality) -> instructions`` from ``query_instructions.tsv``."""
    path = Path(path)
    table: InstructionTable = {}
    for n, line in _lines(path, "instructions"):
        if n == 1:
            continue  # the header
        parts = [p.strip() for p in line.rstrip("\r\n").split("\t")]
        prompts = tuple(p for p in parts[4:] if p)
        if len(parts) < 5 or not prompts:
            raise _fail(path, n, "expected tab-separated query_modality, cand_modality, dataset, dataset_id and at "
                        f"least one instruction, got {len(parts)} column(s)", "instructions")
        qm, cm = normalize_modality(parts[0]), normalize_modality(parts[1])
        if qm is None or cm is None or not parts[3].isdigit():
            raise _fail(path, n, f"bad key ({parts[0]!r}, {parts[1]!r}, dataset_id {parts[3]!r}): modalities must be "
                        f"in {list(MODALITIES)} and the dataset id an integer", "instructions")
        table[(parts[3], qm, cm)] = prompts
    return table
