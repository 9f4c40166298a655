"""Candidate embeddings and exact top-k search over a pool, and Recall@k as M-BEIR defines it.

Every distinct candidate of a run (the global pool and the local pools, keyed by did) is embedded once into a
:class:`CandidateStore`; a pool is a set of store rows (:class:`PoolIndex`). Rows are kept in fp16, as UniIR
stores its candidate embeddings: 5.6 M global candidates x 1,536 dims (MuCo-2B) are 17 GB, x 3,584 (MuCo-7B)
40 GB.

The search is :func:`muco.mine.search.chunked_topk` (exact top-k, never a full score matrix), handed in as the
``topk`` of a :class:`PoolIndex`: this package cannot import :mod:`muco.mine` itself, because ``muco.mine``
imports ``muco.train``, which imports ``muco.eval`` (tests/test_architecture.py keeps the packages acyclic).
``muco eval`` passes it; so do the tests. Any function with its signature works.

Recall@k (UniIR's ``compute_recall_at_k``, the one its tables use): 1 when at least one relevant candidate is
among the top k, else 0, averaged over queries; it is a hit rate, not the fraction of relevant candidates found.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from array import array
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from muco.eval.errors import EvalDataError, image_error
from muco.eval.harness import EncodeFn, ImageLoader, encode_items, load_image
from muco.eval.mbeir.data import MBeirCandidate
from muco.eval.mbeir.text import candidate_user_text

log = logging.getLogger(__name__)

RETRIEVE_K = 50  # candidates kept per query: enough for every Recall@k reported
RECALL_KS = (1, 5, 10, 20, 50)  # UniIR reports R@1/5/10, and R@10/20/50 for the fashion tasks
STORE_DTYPE = torch.float16

# (queries [nq, d], corpus [nc, d], k, query_chunk=..., corpus_chunk=..., device=...) -> (scores, indices) [nq, k']
TopkFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


class CandidateStore:
    """The distinct candidates of a run and their embeddings (row ``i`` <-> ``dids[i]``).

    A did added twice must carry the same text and image both times (UniIR indexes candidates by did, so two
    different candidates under one did would make the pools ambiguous).
    """

    def __init__(self, image_root: Path | None = None) -> None:
        self.image_root = image_root
        self.dids: list[str] = []
        self.index: dict[str, int] = {}
        self.texts: list[str] = []
        self.paths: list[str | None] = []
        self.sources = array("H")  # per row: index into source_files, for error messages
        self.source_files: list[Path] = []
        self.emb: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.dids)

    def _path(self, rel: str | None) -> str | None:
        if not rel:
            return None
        # normalised as Path does it: the loader gets Path(p), and errors look p up again by its str
        return str(Path(rel) if self.image_root is None else self.image_root / rel)

    def add(self, cands: Iterable[MBeirCandidate], source: Path) -> torch.Tensor:
        """Register a pool's candidates; returns their store rows (int64) in the pool's order."""
        if source not in self.source_files:
            self.source_files.append(source)
        src = self.source_files.index(source)
        rows = array("q")
        for c in cands:
            try:
                text = candidate_user_text(c)
            except ValueError as e:
                raise EvalDataError(str(e), file=source, what="pool") from e
            path = self._path(c.image_path)
            j = self.index.get(c.did)
            if j is None:
                j = self.index[c.did] = len(self.dids)
                self.dids.append(c.did)
                self.texts.append(text)
                self.paths.append(path)
                self.sources.append(src)
                self.emb = None  # new rows: embed again
            elif (self.texts[j], self.paths[j]) != (text, path):
                raise EvalDataError(f"did {c.did} has a different txt or img_path than the same did in "
                                    f"{self.source_files[self.sources[j]]}", file=source, what="pool")
            rows.append(j)
        return torch.frombuffer(rows, dtype=torch.int64).clone() if rows else torch.empty(0, dtype=torch.int64)

    def _origin(self, path: str) -> str:
        """Where an image comes from, for error messages: the first did that references it, and its pool."""
        try:
            j = self.paths.index(path)
        except ValueError:
            return "a candidate's img_path"
        return f"img_path of did {self.dids[j]} in {self.source_files[self.sources[j]]}"

    def _block_key(self, start: int, end: int, cache_key: str) -> str:
        h = hashlib.sha256(cache_key.encode("utf-8"))
        for j in range(start, end):
            h.update(f"\0{self.dids[j]}\0{self.texts[j]}\0{self.paths[j] or ''}".encode())
        return h.hexdigest()

    def embed(self, encode_fn: EncodeFn, batch_size: int = 32, load: ImageLoader = load_image,
              cache_dir: Path | None = None, cache_key: str = "", block_size: int = 32768,
              reuse: bool = True) -> torch.Tensor:
        """Embed every row (fp16, L2-normalised) in blocks of ``block_size``; returns ``self.emb``.

        With ``cache_dir`` each finished block is saved there (``cand-<block>.pt``) under a key made of
        ``cache_key`` (the caller's model settings) and the block's dids, texts and image paths, so a run that
        stopped half-way resumes at the first missing block. Missing images of the blocks still to encode are
        found before anything is encoded.
        """
        n = len(self)
        starts = list(range(0, n, block_size))
        keys = [self._block_key(s, min(s + block_size, n), cache_key) for s in starts]
        cached: dict[int, torch.Tensor] = {}
        if cache_dir is not None and reuse:
            for b, key in enumerate(keys):
                f = cache_dir / f"cand-{b:05d}.pt"
                if f.is_file():
                    try:  # memory-mapped: a resumed global pool is not held twice in memory
                        stored = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
                    except Exception:  # a damaged block is computed again
                        continue
                    if stored.get("key") == key:
                        cached[b] = stored["emb"]
        todo = [b for b in range(len(starts)) if b not in cached]
        missing = [p for b in todo for p in self.paths[starts[b]:starts[b] + block_size]
                   if p is not None and not os.path.isfile(p)]
        if missing:
            more = f" (and {len(missing) - 1} more missing)" if len(missing) > 1 else ""
            raise EvalDataError(f"{self._origin(missing[0])}: image file not found{more}", file=missing[0],
                                what="image")

        def located(path: Path) -> Image.Image:
            try:
                return load(path)
            except Exception as e:
                err = image_error(e, path)
                raise EvalDataError(f"{self._origin(str(path))}: {err.reason}", file=path, what="image") from e

        if cached:
            log.info("candidates: %d of %d blocks reused from %s", len(cached), len(starts), cache_dir)
        out: torch.Tensor | None = None
        t0, done = time.perf_counter(), 0
        for b, s in enumerate(starts):
            e = min(s + block_size, n)
            if b in cached:
                emb = cached[b]
            else:
                paths = [Path(p) if p is not None else None for p in self.paths[s:e]]
                emb = encode_items(encode_fn, self.texts[s:e], paths, batch_size, located).to(STORE_DTYPE)
                done += e - s
                if cache_dir is not None:
                    cache_dir.mkdir(parents=True, exist_ok=True)
                    tmp = cache_dir / f"cand-{b:05d}.pt.tmp"
                    torch.save({"key": keys[b], "emb": emb}, tmp)
                    os.replace(tmp, cache_dir / f"cand-{b:05d}.pt")
                rate = done / max(time.perf_counter() - t0, 1e-9)
                log.info("candidates: %d / %d embedded (%.1f per s)", e, n, rate)
            if out is None:
                out = torch.empty(n, emb.shape[1], dtype=STORE_DTYPE)
            out[s:e] = emb
        self.emb = out if out is not None else torch.empty(0, 0, dtype=STORE_DTYPE)
        return self.emb


@dataclass
class PoolIndex:
    """One pool's rows of a store and their embeddings, on the search device when they fit."""

    name: str
    rows: torch.Tensor  # int64 store rows
    emb: torch.Tensor  # [len(rows), d]
    member: torch.Tensor  # bool over all store rows: in this pool
    topk: TopkFn  # muco.mine.search.chunked_topk

    @classmethod
    def build(cls, name: str, store: CandidateStore, rows: torch.Tensor, topk: TopkFn,
              device: str | torch.device | None = None) -> PoolIndex:
        if store.emb is None:
            raise ValueError("embed the store before building a pool index")
        rows = torch.unique(rows, sorted=True)  # a pool is a set; sorted rows make a contiguous range cheap
        n = len(rows)
        if n and int(rows[-1]) - int(rows[0]) == n - 1:
            emb = store.emb[int(rows[0]):int(rows[0]) + n]  # a view: the global pool is not copied
        else:
            emb = store.emb[rows]
        if device is not None and torch.device(device).type != "cpu":
            try:
                emb = emb.to(device)  # moved once, not once per query chunk
            except torch.OutOfMemoryError:
                log.warning("pool %s (%d x %d) does not fit on %s; it stays in CPU memory and is streamed in "
                            "chunks", name, n, emb.shape[1], device)
        member = torch.zeros(len(store), dtype=torch.bool)
        member[rows] = True
        return cls(name=name, rows=rows, emb=emb, member=member, topk=topk)

    def __len__(self) -> int:
        return len(self.rows)

    def search(self, queries: torch.Tensor, k: int = RETRIEVE_K, device: str | torch.device | None = None,
               query_chunk: int = 1024, corpus_chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``k`` (scores [nq, k'], store rows [nq, k']) per query, best first; exact, chunked."""
        scores, idx = self.topk(queries, self.emb, k, query_chunk=query_chunk, corpus_chunk=corpus_chunk,
                                device=device if device is not None else self.emb.device)
        return scores, self.rows[idx]


def first_relevant_ranks(top: Sequence[Sequence[str]], relevant: Sequence[Collection[str]]) -> list[int | None]:
    """Per query: the 1-based rank of the first relevant did in its retrieved list, None when none is there."""
    if len(top) != len(relevant):
        raise ValueError(f"{len(top)} retrieved lists but {len(relevant)} relevance sets")
    out: list[int | None] = []
    for dids, rel in zip(top, relevant):
        rel = set(rel)
        out.append(next((r for r, d in enumerate(dids, start=1) if d in rel), None))
    return out


def recall_at(ranks: Sequence[int | None], ks: Iterable[int] = RECALL_KS) -> dict[str, float]:
    """``recall@k``: the fraction of queries with a relevant candidate in their top k (M-BEIR's Recall@k)."""
    if not ranks:
        raise ValueError("no queries")
    return {f"recall@{k}": sum(r is not None and r <= k for r in ranks) / len(ranks) for k in sorted(set(ks))}
