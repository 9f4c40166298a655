"""The MMEB harness: de-duplicate candidates, encode in batches, rank each query's own list by cosine.

``encode_fn(user_texts, images) -> Tensor[n, d]`` is the only model interface. ``user_texts`` are the ``u`` of
``BASE(u)`` (already normalised by :func:`muco.eval.text.to_user_text`, image placeholders as ``IMG``) and
``images`` holds one PIL image or None per text. ``MuCoEncoder.encode_user_texts`` has exactly this signature;
a training module can pass ``MuCoEncoder.from_parts(tokenizer, backbone, policy).encode_user_texts``. The
harness calls it with at most ``batch_size`` items and L2-normalises what it returns.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from muco.distributed import gather_objects, rank_world
from muco.eval.errors import EvalDataError, image_error
from muco.eval.metrics import gold_rank, ranking_metrics
from muco.eval.tasks import Task
from muco.eval.text import candidates, query_text, to_user_text
from muco.inputs.rgb import to_rgb

log = logging.getLogger(__name__)

EncodeFn = Callable[[list[str], list[Image.Image | None]], torch.Tensor]
ImageLoader = Callable[[Path], Image.Image]


def load_image(path: Path) -> Image.Image:
    """RGB image, fully read so the file handle is closed (the encoder applies the resolution policy)."""
    with Image.open(path) as im:
        return to_rgb(im)


@dataclass
class TaskResult:
    name: str
    metrics: dict[str, float]
    num_queries: int
    num_candidates: int  # distinct candidates, each encoded once
    num_candidate_refs: int  # entries over all candidate lists
    name_conflicts: int  # same name but different text/image: the first one was kept
    seconds: float
    gold_ranks: list[int] = field(default_factory=list)
    top1: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        """Everything except the per-query lists."""
        d = asdict(self)
        d.pop("gold_ranks")
        d.pop("top1")
        return d


class RankFailure(RuntimeError):
    """Another process failed while encoding the same items (its message is the cause)."""

    def __init__(self, rank: int, message: str) -> None:
        super().__init__(f"{message} (on rank {rank})")


class EmbeddingCache:
    """Embeddings of items already encoded, by (user text, image path): tasks that share candidates (the same
    class names, the same image pool) encode them once per run. Only valid for one model and image policy."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, Path | None], torch.Tensor] = {}
        self.hits = 0

    def __len__(self) -> int:
        return len(self.rows)


def encode_items(
    encode_fn: EncodeFn,
    texts: Sequence[str],
    image_paths: Sequence[Path | None],
    batch_size: int,
    load: ImageLoader = load_image,
    cache: EmbeddingCache | None = None,
    progress: str | None = None,
) -> torch.Tensor:
    """Embeddings [n, d] (fp32, L2-normalised, CPU) in input order; images are read one batch ahead.

    With several processes (torch.distributed initialised, every rank calling with the same items), rank r
    encodes batches r, r + W, ... of the single-process batching and the embeddings are gathered: every item
    is encoded in the same batch as in one process, so the result is the same, bit for bit. Items found in
    ``cache`` are not encoded again; new ones are added to it. ``progress`` names a bar on rank 0 (items/s).
    """
    n = len(texts)
    if n != len(image_paths):
        raise ValueError(f"{n} texts but {len(image_paths)} image paths")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    keys = [(texts[i], image_paths[i]) for i in range(n)]
    known = {i: cache.rows[k] for i, k in enumerate(keys) if k in cache.rows} if cache is not None else {}
    todo = [i for i in range(n) if i not in known]
    # longest first: less padding per batch, and an out-of-memory shows up on the first batch
    order = sorted(todo, key=lambda i: (image_paths[i] is not None, len(texts[i])), reverse=True)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    rank, world = rank_world()
    mine = batches[rank::world]
    parts: list[tuple[list[int], torch.Tensor]] = []
    bar = tqdm(total=len(order), desc=progress, unit="item", leave=False,
               disable=progress is None or rank != 0 or not sys.stderr.isatty())
    error: Exception | None = None
    with ThreadPoolExecutor(max_workers=4) as pool, bar:

        def submit(batch: list[int]) -> list[Future | None]:
            return [pool.submit(load, image_paths[i]) if image_paths[i] is not None else None for i in batch]

        try:
            pending = submit(mine[0]) if mine else []
            for k, batch in enumerate(mine):
                futures, pending = pending, (submit(mine[k + 1]) if k + 1 < len(mine) else [])
                images = [f.result() if f is not None else None for f in futures]
                emb = encode_fn([texts[i] for i in batch], images)
                if emb.ndim != 2 or emb.shape[0] != len(batch):
                    raise ValueError(f"encode_fn returned shape {tuple(emb.shape)} for {len(batch)} items")
                parts.append((batch, F.normalize(emb.detach().float().cpu(), dim=-1)))
                bar.update(len(batch) * world)  # the other ranks advance at the same pace
        except Exception as e:
            if world == 1:
                raise
            error = e  # the other ranks wait in the gather below: reach it, then fail together
    if world > 1:
        gathered = gather_objects((parts, None if error is None else " ".join(str(error).split())))
        if error is not None:
            raise error
        failures = [(r, msg) for r, (_, msg) in enumerate(gathered) if msg is not None]
        if failures:
            raise RankFailure(*failures[0])
        parts = [p for ps, _ in gathered for p in ps]
    rows = [e for _, e in parts] + list(known.values())
    if not rows:
        return torch.empty(0, 0)
    out = torch.empty(n, rows[0].shape[-1])
    for batch, emb in parts:
        out[torch.tensor(batch)] = emb
    for i, e in known.items():
        out[i] = e
    if cache is not None:
        cache.hits += len(known)
        for batch, emb in parts:
            for i, e in zip(batch, emb):
                cache.rows[keys[i]] = e.clone()
    return out


def _image_path(root: Path | None, rel: str | None) -> Path | None:
    if not rel:
        return None
    return Path(rel) if root is None else root / rel


def _located_loader(task: Task, load: ImageLoader, origin: dict[Path, tuple[int, str]]) -> ImageLoader:
    """``load`` whose errors name the task, the first row and column that reference the image, and the file."""
    def located(path: Path) -> Image.Image:
        try:
            return load(path)
        except Exception as e:
            row, column = origin.get(path, (None, None))
            raise image_error(e, path, task=task.name, row=row, column=column) from e

    return located


def _check_images_exist(task: Task, origin: dict[Path, tuple[int, str]]) -> None:
    """Every referenced image is a file, checked before anything is encoded; names the first missing one."""
    missing = [p for p in origin if not p.is_file()]
    if missing:
        first = min(missing, key=lambda p: origin[p][0])
        cause = IsADirectoryError(first) if first.is_dir() else FileNotFoundError(first)
        reason = image_error(cause, first).reason
        if len(missing) > 1:
            reason += f" (and {len(missing) - 1} more missing image{'s' if len(missing) > 2 else ''})"
        row, column = origin[first]
        raise EvalDataError(reason, task=task.name, row=row, column=column, file=first, what="image")


@dataclass
class TaskScores:
    """A task encoded and scored: what the metrics, the result files and the validation pictures read.

    ``lists[i]`` indexes query i's candidates into the distinct candidates (``cand_*``; the first entry is the
    gold one), ``scores[i]`` are their cosines with query i, in list order.
    """

    task: Task
    queries: torch.Tensor  # [n, d] L2-normalised
    candidates: torch.Tensor  # [m, d] L2-normalised, one row per distinct candidate name
    lists: list[torch.Tensor]
    scores: list[torch.Tensor]
    cand_names: list[str]
    cand_texts: list[str]
    cand_paths: list[Path | None]
    query_texts: list[str]
    query_paths: list[Path | None]
    refs: int
    conflicts: int

    def relevant(self, i: int) -> torch.Tensor:
        """Query i's gold mask over its list: same index <=> same name as the gold candidate."""
        return self.lists[i] == self.lists[i][0]


def score_task(encode_fn: EncodeFn, task: Task, batch_size: int = 32, load: ImageLoader = load_image,
               cache: EmbeddingCache | None = None, progress: bool = False) -> TaskScores:
    """Encode each distinct candidate and every query once and score every query's own list (candidates found
    in ``cache`` are not encoded again; see :func:`encode_items` for several processes and ``progress``).

    A missing, truncated or corrupt image raises :class:`muco.eval.errors.EvalDataError` naming the task, the
    (first) row and column that reference it, and the file; missing files are found before anything is encoded.
    """
    root, mode = task.spec.image_root, task.spec.candidates
    index: dict[str, int] = {}
    c_text: list[str] = []
    c_path: list[Path | None] = []
    c_name: list[str] = []
    lists: list[torch.Tensor] = []
    origin: dict[Path, tuple[int, str]] = {}  # image -> the first (row, column) that references it
    refs = conflicts = 0
    q_text: list[str] = []
    for qi, q in enumerate(task.queries):
        try:
            cands = candidates(q, mode)
            if not cands:
                raise ValueError("has no candidates")
            texts = [to_user_text(c.text) for c in cands]
            q_text.append(to_user_text(query_text(q)))
        except ValueError as e:  # a row the MMEB string rules cannot use
            raise EvalDataError(str(e), task=task.name, row=qi) from e
        if q.qry_img_path:
            origin.setdefault(_image_path(root, q.qry_img_path), (qi, "qry_img_path"))
        ids = []
        for k, (c, text) in enumerate(zip(cands, texts)):  # image candidates: the k-th of tgt_img_path
            path = _image_path(root, c.image_path)
            j = index.get(c.name)
            if j is None:
                j = index[c.name] = len(c_text)
                c_text.append(text)
                c_path.append(path)
                c_name.append(c.name)
                if path is not None:
                    origin.setdefault(path, (qi, f"tgt_img_path[{k}]"))
            elif (c_text[j], c_path[j]) != (text, path):
                conflicts += 1
            ids.append(j)
        refs += len(ids)
        lists.append(torch.tensor(ids))
    if conflicts:
        log.warning("%s: %d candidate entries share a name with a different text/image; the first was kept",
                    task.name, conflicts)

    _check_images_exist(task, origin)
    load = _located_loader(task, load, origin)
    cand = encode_items(encode_fn, c_text, c_path, batch_size, load, cache,
                        f"{task.name}: candidates" if progress else None)
    q_path = [_image_path(root, q.qry_img_path) for q in task.queries]
    qry = encode_items(encode_fn, q_text, q_path, batch_size, load, None, f"{task.name}: queries" if progress else None)
    scores = [cand[ids] @ qry[qi] for qi, ids in enumerate(lists)]
    return TaskScores(task=task, queries=qry, candidates=cand, lists=lists, scores=scores, cand_names=c_name,
                      cand_texts=c_text, cand_paths=c_path, query_texts=q_text, query_paths=q_path, refs=refs,
                      conflicts=conflicts)


def task_result(scored: TaskScores, seconds: float) -> TaskResult:
    """Metrics, gold ranks and top-1 names of a scored task."""
    relevant = [scored.relevant(i) for i in range(len(scored.lists))]
    ranks = [gold_rank(s, r) for s, r in zip(scored.scores, relevant)]
    top1 = [scored.cand_names[int(ids[int(s.argmax())])] for ids, s in zip(scored.lists, scored.scores)]
    return TaskResult(
        name=scored.task.name, metrics=ranking_metrics(scored.scores, relevant), num_queries=len(scored.lists),
        num_candidates=len(scored.cand_texts), num_candidate_refs=scored.refs, name_conflicts=scored.conflicts,
        seconds=seconds, gold_ranks=ranks, top1=top1,
    )


def evaluate_task(
    encode_fn: EncodeFn, task: Task, batch_size: int = 32, load: ImageLoader = load_image,
    cache: EmbeddingCache | None = None, progress: bool = False,
) -> TaskResult:
    """:func:`score_task`, then the metrics of :func:`task_result`."""
    start = time.perf_counter()
    result = task_result(score_task(encode_fn, task, batch_size, load, cache, progress), 0.0)
    result.seconds = time.perf_counter() - start
    log.info("%s: %d queries, %d distinct candidates, P@1 %.4f (%.1f s)", task.name, result.num_queries,
             result.num_candidates, result.metrics["precision@1"], result.seconds)
    return result


def evaluate_tasks(
    encode_fn: EncodeFn, tasks: Sequence[Task], batch_size: int = 32
) -> dict[str, dict[str, float]]:
    """Metrics per task name; usable as a validation hook inside training (see the module docstring)."""
    return {t.name: evaluate_task(encode_fn, t, batch_size).metrics for t in tasks}
