"""The M-BEIR harness: load a task, build the pools, embed each distinct candidate once, search, score.

Steps, each usable alone (``muco eval --benchmark mbeir`` runs them with per-task failure handling;
:func:`evaluate_mbeir` runs them all and raises on the first error):

1. :func:`load_mbeir_task`: queries (first ``limit``), their relevant dids from the qrels, query texts with
   instructions, and the task's local pool.
2. :func:`global_pool_candidates`: the global pool, from the released union file or as the union of every
   task's local pool (which is how UniIR built that file and its embeddings).
3. :func:`build_store`: register the global pool first and then the local pools (a local pool is a subset of
   the global one in the released data, so nothing is embedded twice), then :meth:`CandidateStore.embed`.
4. :func:`score_mbeir_task`: embed the queries, exact top-k against each :class:`PoolIndex`, Recall@k.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from PIL import Image

from muco.eval.errors import EvalDataError, image_error
from muco.eval.harness import EncodeFn, ImageLoader, encode_items, load_image
from muco.eval.mbeir.data import (
    InstructionTable,
    MBeirCandidate,
    MBeirQuery,
    read_instructions,
    read_pool,
    read_qrels,
    read_queries,
)
from muco.eval.mbeir.search import (
    RECALL_KS,
    RETRIEVE_K,
    CandidateStore,
    PoolIndex,
    TopkFn,
    first_relevant_ranks,
    recall_at,
)
from muco.eval.mbeir.tasks import MBeirConfig, MBeirTaskSpec
from muco.eval.mbeir.text import instruction_for, query_user_text

log = logging.getLogger(__name__)

POOLS = ("global", "local")
TOP_SAVED = 10  # retrieved dids kept per query in the prediction file


@dataclass
class MBeirTask:
    """A task's queries with their relevant dids and user texts, and its local pool."""

    spec: MBeirTaskSpec
    queries: list[MBeirQuery]
    relevant: list[tuple[str, ...]]
    query_texts: list[str]
    query_paths: list[Path | None]
    pool: list[MBeirCandidate]

    @property
    def name(self) -> str:
        return self.spec.name


def load_mbeir_task(spec: MBeirTaskSpec, config: MBeirConfig, instructions: InstructionTable,
                    limit: int | None = None, with_pool: bool = True) -> MBeirTask:
    """Read and check one task; any problem raises :class:`EvalDataError` naming the task, file and line/qid.

    A query must have a relevant candidate in the qrels, and a query's ``task_id`` (and the qrels' task id
    column) must be the task's. With ``limit``, the local pool is its first ``limit`` candidates plus the
    relevant ones of the kept queries.
    """
    try:
        queries = read_queries(spec.queries, limit=limit)
        if not queries:
            raise EvalDataError("has no queries", file=spec.queries, what="queries")
        qrels = read_qrels(spec.qrels)
        relevant, texts, paths = [], [], []
        for q in queries:
            rel = qrels.relevant.get(q.qid)
            if not rel:
                raise EvalDataError(f"no relevant candidate for qid {q.qid} (relevance > 0)", file=spec.qrels,
                                    what="qrels")
            for task_id, where, what in ((q.task_id, spec.queries, "queries"),
                                         (qrels.task_ids.get(q.qid), spec.qrels, "qrels")):
                if task_id is not None and task_id != spec.task_id:
                    raise EvalDataError(f"qid {q.qid} has task_id {task_id}, but the task list says {spec.task_id}",
                                        file=where, what=what)
            try:
                texts.append(query_user_text(q, instruction_for(instructions, q, spec.cand_modality,
                                                                config.instruction_choice)))
            except ValueError as e:
                raise EvalDataError(f"qid {q.qid}: {e}", file=spec.queries, what="queries") from e
            relevant.append(rel)
            paths.append(config.image_root / q.image_path if q.image_path else None)
        keep = {d for rel in relevant for d in rel} if limit is not None else ()
        pool = read_pool(spec.pool, limit=limit, keep=keep) if with_pool else []
        if with_pool and not pool:
            raise EvalDataError("has no candidates", file=spec.pool, what="pool")
    except EvalDataError as e:
        raise e.in_task(spec.name) from e
    return MBeirTask(spec=spec, queries=queries, relevant=relevant, query_texts=texts, query_paths=paths, pool=pool)


def global_pool_candidates(config: MBeirConfig, tasks: Mapping[str, MBeirTask], instructions: InstructionTable,
                           limit: int | None = None) -> tuple[list[MBeirCandidate], Path]:
    """The global pool and the file it is named after.

    Without ``limit`` and with ``global_pool`` set: that file (the released ``mbeir_union_test_cand_pool.jsonl``).
    Otherwise the union of the local pools of **every** task of the list (``tasks`` holds the ones already
    loaded; the others are read here), so ``--only`` never shrinks the global pool; with ``limit`` that is the
    union of the limited local pools (tasks without data left out), which keeps a smoke run small.
    """
    if config.global_pool is not None and limit is None:
        return read_pool(config.global_pool), config.global_pool
    seen: set[str] = set()
    out: list[MBeirCandidate] = []
    for spec in config.tasks:
        if spec.name in tasks and tasks[spec.name].pool:
            pool = tasks[spec.name].pool
        elif limit is None:
            pool = read_pool(spec.pool)  # a full global pool needs every task's pool: a missing one is an error
        elif not all(p.is_file() for p in (spec.queries, spec.pool, spec.qrels)):
            log.warning("global pool of this limited run: %s has no data and is left out", spec.name)
            continue
        else:
            pool = load_mbeir_task(spec, config, instructions, limit=limit).pool
        for c in pool:
            if c.did not in seen:
                seen.add(c.did)
                out.append(c)
    return out, config.root / "<union of the local pools>"


def needs_local_pools(config: MBeirConfig, pools: Sequence[str], limit: int | None) -> bool:
    """Whether the tasks' local pools must be read: for the local search, or to make the global pool."""
    return "local" in pools or config.global_pool is None or limit is not None


def build_store(image_root: Path | None, tasks: Sequence[MBeirTask],
                global_pool: tuple[Sequence[MBeirCandidate], Path] | None = None,
                ) -> tuple[CandidateStore, torch.Tensor | None, dict[str, torch.Tensor]]:
    """A store with the global pool's candidates first, then the local pools'; returns (store, global rows,
    local rows per task name)."""
    store = CandidateStore(image_root)
    glob = store.add(*global_pool) if global_pool is not None else None
    local = {t.name: store.add(t.pool, t.spec.pool) for t in tasks}
    return store, glob, local


@dataclass
class MBeirTaskResult:
    """Recall@k of one task per pool, with per-query ranks and top candidates."""

    name: str
    dataset: str
    task_id: int
    group: str
    metric: str  # the primary metric, recall@5 or recall@10
    metrics: dict[str, dict[str, float]]  # pool -> recall@k
    num_queries: int
    pool_sizes: dict[str, int]
    unreachable: dict[str, int]  # pool -> queries with no relevant candidate in that pool
    seconds: float
    qids: list[str] = field(default_factory=list)
    ranks: dict[str, list[int | None]] = field(default_factory=dict)  # 1-based, None beyond RETRIEVE_K
    top: dict[str, list[list[str]]] = field(default_factory=dict)

    def score(self, pool: str) -> float | None:
        """The primary metric in ``pool`` (None when the pool was not searched)."""
        return self.metrics.get(pool, {}).get(self.metric)

    def summary(self) -> dict:
        """Everything except the per-query lists."""
        d = asdict(self)
        for k in ("qids", "ranks", "top"):
            d.pop(k)
        return d


def _located_loader(task: MBeirTask, load: ImageLoader) -> ImageLoader:
    def located(path: Path) -> Image.Image:
        try:
            return load(path)
        except Exception as e:
            qid = task.queries[task.query_paths.index(path)].qid
            err = image_error(e, path)
            raise EvalDataError(f"query_img_path of qid {qid} in {task.spec.queries}: {err.reason}",
                                task=task.name, file=path, what="image") from e

    return located


def encode_queries(encode_fn: EncodeFn, task: MBeirTask, batch_size: int = 32,
                   load: ImageLoader = load_image) -> torch.Tensor:
    """Query embeddings [n, d] (fp32, L2-normalised); a missing query image is found before encoding."""
    for q, p in zip(task.queries, task.query_paths):
        if p is not None and not p.is_file():
            raise EvalDataError(f"query_img_path of qid {q.qid} in {task.spec.queries}: image file not found",
                                task=task.name, file=p, what="image")
    return encode_items(encode_fn, task.query_texts, task.query_paths, batch_size, _located_loader(task, load))


def rank_queries(task: MBeirTask, queries: torch.Tensor, store: CandidateStore, indexes: Mapping[str, PoolIndex],
                 device: str | torch.device | None = None, seconds: float = 0.0) -> MBeirTaskResult:
    """Search every pool in ``indexes`` with ready query embeddings and score the task."""
    spec = task.spec
    metrics, ranks, top, sizes, unreachable = {}, {}, {}, {}, {}
    for pool, index in indexes.items():
        _, rows = index.search(queries, RETRIEVE_K, device=device)
        dids = [[store.dids[r] for r in row] for row in rows.tolist()]
        ranks[pool] = first_relevant_ranks(dids, task.relevant)
        metrics[pool] = recall_at(ranks[pool], (*RECALL_KS, spec.k))
        top[pool] = [d[:TOP_SAVED] for d in dids]
        sizes[pool] = len(index)
        unreachable[pool] = sum(not any(d in store.index and bool(index.member[store.index[d]]) for d in rel)
                                for rel in task.relevant)
    return MBeirTaskResult(name=spec.name, dataset=spec.dataset, task_id=spec.task_id, group=spec.group,
                           metric=spec.metric, metrics=metrics, num_queries=len(task.queries), pool_sizes=sizes,
                           unreachable=unreachable, seconds=seconds, qids=[q.qid for q in task.queries],
                           ranks=ranks, top=top)


def score_mbeir_task(encode_fn: EncodeFn, task: MBeirTask, store: CandidateStore,
                     indexes: Mapping[str, PoolIndex], batch_size: int = 32,
                     device: str | torch.device | None = None, load: ImageLoader = load_image) -> MBeirTaskResult:
    """Encode the task's queries and rank them against each pool of ``indexes`` (name -> index)."""
    start = time.perf_counter()
    queries = encode_queries(encode_fn, task, batch_size, load)
    result = rank_queries(task, queries, store, indexes, device)
    result.seconds = time.perf_counter() - start
    log.info("%s: %d queries, %s", task.name, result.num_queries,
             ", ".join(f"{p} {result.metric} {result.score(p):.4f} of {result.pool_sizes[p]}" for p in indexes))
    return result


def evaluate_mbeir(encode_fn: EncodeFn, config: MBeirConfig, topk: TopkFn,
                   specs: Sequence[MBeirTaskSpec] | None = None, pools: Sequence[str] = POOLS,
                   limit: int | None = None, batch_size: int = 32, device: str | torch.device | None = None,
                   instructions: InstructionTable | None = None, cache_dir: Path | None = None,
                   cache_key: str = "") -> dict[str, MBeirTaskResult]:
    """Every step for ``specs`` (default: all tasks of ``config``); raises on the first error.

    ``topk``: :func:`muco.mine.search.chunked_topk` (see :mod:`muco.eval.mbeir.search` for why it is passed in).
    """
    bad = set(pools) - set(POOLS)
    if bad or not pools:
        raise ValueError(f"pools must be among {POOLS}, got {list(pools)}")
    specs = list(config.tasks if specs is None else specs)
    if instructions is None:
        instructions = read_instructions(config.instructions)
    tasks = [load_mbeir_task(s, config, instructions, limit=limit, with_pool=needs_local_pools(config, pools, limit))
             for s in specs]
    glob = (global_pool_candidates(config, {t.name: t for t in tasks}, instructions, limit)
            if "global" in pools else None)
    store, glob_rows, local_rows = build_store(config.image_root, tasks if "local" in pools else [], glob)
    store.embed(encode_fn, batch_size, cache_dir=cache_dir, cache_key=cache_key)
    shared = {"global": PoolIndex.build("global", store, glob_rows, topk, device)} if glob_rows is not None else {}
    out = {}
    for t in tasks:
        indexes = dict(shared)
        if "local" in pools:
            indexes["local"] = PoolIndex.build(t.name, store, local_rows[t.name], topk, device)
        out[t.name] = score_mbeir_task(encode_fn, t, store, indexes, batch_size, device)
    return out
