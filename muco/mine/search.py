"""Exact top-k cosine search of query embeddings against a corpus shard, with one answer for any split.

**Scores.** A query-text score is :func:`pair_scores`: the fp32 embeddings' products in fp64 (exact), summed in
a fixed pairwise order, rounded to fp32. It is a function of the two vectors only: not of chunk sizes, shard
boundaries, the process count or the kernel a matmul picks for a shape, so a top-k merged from shards equals
the top-k over the whole corpus bit for bit, and so does the positive's score (``pos_sim``).

**Order (the tie rule).** Higher score first; equal scores: lower global corpus index first. :func:`rank_keys`
packs both into one int64 key, so ``torch.topk`` over keys has a single answer (:func:`merge_topk`).

**Search.** Scoring every corpus row that way would be slow, so candidates come from matmuls (fp32 on the CPU;
bf16 inputs with fp32 accumulation on CUDA) and only rows that can still enter the top-k are re-scored.
``eps`` bounds |matmul score - exact score| for a query over the shard (:func:`score_error_bounds`). Per
query, with ``L`` = max(the running k-th exact score, the k-th matmul score - eps), a lower bound of the final
k-th score, a row whose matmul score is below ``L - eps`` scores below ``L`` exactly and cannot enter, even on a
tie. The matmul pass keeps the ``kk`` best rows per query; when the kk-th of them is not below ``L - eps`` some
row that can enter may lie beyond them, and that query's pass is repeated with 4x ``kk`` (many equal or
near-equal scores around the k-th; mostly on a block's first shard, where no running k-th is known yet). So the
result is exact whatever the matmuls' rounding.

Memory: ``query_chunk x (corpus_chunk + kk)`` matmul scores (fewer queries per pass when ``kk`` grows past
:data:`CANDIDATE_ELEMS` per pass), plus :data:`RESCORE_ELEMS` fp64 products while re-scoring (GPU:
:data:`RESCORE_ELEMS_CUDA`). A corpus in CPU
memory travels to the device one ``corpus_chunk`` at a time; :meth:`Shard.prepare` puts it (fp32 rows and their
bf16 copy) on the GPU when it fits. Across processes: :mod:`muco.mine.ring`.
"""

from __future__ import annotations

import torch
from torch import Tensor

# products of query rows with their candidate rows held at once while re-scoring: on the CPU 2 MiB of fp64, so
# the pairwise sums stay in cache (7x faster than 64 MiB at a time); on a GPU more per kernel launch
RESCORE_ELEMS = 1 << 18
RESCORE_ELEMS_CUDA = 1 << 24
# candidate matmul scores kept per pass (queries x kk): bounds a pass when many scores are equal
CANDIDATE_ELEMS = 1 << 22
# global corpus indices must stay below this: they fill the low 32 bits of a rank key
MAX_INDEX = (1 << 32) - 1


def search_dtype(device: str | torch.device) -> torch.dtype:
    """What the candidate matmuls multiply on ``device``: bf16 on CUDA (tensor cores), fp32 elsewhere."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def pair_scores(queries: Tensor, rows: Tensor) -> Tensor:
    """Scores ``[b, m]`` fp32 of ``queries`` [b, d] with their own ``rows`` [b, m, d]: the fp32 inputs'
    products in fp64 (exact), summed pairwise in a fixed order (each level adds neighbours, an odd last element
    is carried), rounded to fp32. Every step is one IEEE operation, so the result depends on the two vectors
    only (not on b, m, the device or a kernel's blocking)."""
    x = queries.float().double()[:, None, :] * rows.float().double()
    if x.shape[-1] == 0:
        return x.new_zeros(x.shape[:-1]).float()
    while x.shape[-1] > 1:
        n = x.shape[-1] // 2 * 2
        y = x[..., 0:n:2] + x[..., 1:n:2]
        x = torch.cat([y, x[..., n:]], -1) if x.shape[-1] > n else y
    return x[..., 0].float()


def rank_keys(scores: Tensor, indices: Tensor) -> Tensor:
    """int64 keys, larger = better: score descending, then global index ascending; ``indices < 0`` (no
    candidate) lowest. ``scores`` must not be NaN; indices below :data:`MAX_INDEX`."""
    bits = (scores.float() + 0.0).contiguous().view(torch.int32).long()  # + 0.0: -0.0 becomes +0.0
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # negative floats: larger magnitude, smaller key
    keys = (bits << 32) + (MAX_INDEX - 1 - indices)
    return torch.where(indices < 0, torch.iinfo(torch.long).min, keys)


def merge_topk(scores: Tensor, indices: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` best columns of each row under the tie rule (``scores``/``indices`` [b, m], -1 = empty)."""
    top = rank_keys(scores, indices).topk(min(k, scores.shape[1]), dim=1).indices  # distinct keys: one answer
    return scores.gather(1, top), indices.gather(1, top)


def empty_topk(rows: int, k: int, device: str | torch.device = "cpu") -> tuple[Tensor, Tensor]:
    """A running top-k with nothing in it yet: scores -inf, indices -1."""
    return (torch.full((rows, k), float("-inf"), device=device),
            torch.full((rows, k), -1, dtype=torch.long, device=device))


def fp32_accumulation(device: str | torch.device, dtype: torch.dtype) -> bool:
    """Whether candidate matmuls of ``dtype`` inputs on ``device`` accumulate and return fp32 (the only
    rounding is then the inputs' and an fp32 sum's): fp32 when matmuls may not use TF32/bf16; bf16 on CUDA
    when torch has ``mm(..., out_dtype=float32)``, and on the CPU, where bf16 inputs are multiplied in fp32."""
    if dtype in (torch.float32, torch.float64):
        return (torch.get_float32_matmul_precision() == "highest"
                and not (torch.device(device).type == "cuda" and torch.backends.cuda.matmul.allow_tf32))
    if torch.device(device).type != "cuda":
        return True
    if "cuda" not in _MM_FP32_OUT:  # probed once: not every torch build has mm(..., out_dtype)
        try:
            a = torch.ones(2, 2, device=device, dtype=dtype)
            torch.mm(a, a, out_dtype=torch.float32)
            _MM_FP32_OUT["cuda"] = True
        except (TypeError, RuntimeError, NotImplementedError):
            _MM_FP32_OUT["cuda"] = False
    return _MM_FP32_OUT["cuda"]


_MM_FP32_OUT: dict[str, bool] = {}


def _matmul_scores(q: Tensor, c: Tensor, fp32_out: bool) -> Tensor:
    """``q @ c.T`` as fp32; bf16 inputs accumulate in fp32 when ``fp32_out`` (CUDA: ``out_dtype``; CPU: the
    bf16 values multiplied as fp32, the same arithmetic, for tests of the bf16 path)."""
    if q.dtype == torch.float32:
        return q @ c.T
    if fp32_out:
        return torch.mm(q, c.T, out_dtype=torch.float32) if q.is_cuda else q.float() @ c.float().T
    return (q @ c.T).float()


def score_error_bounds(queries: Tensor, shard: Shard, dtype: torch.dtype, fp32_out: bool) -> Tensor:
    """``[b]``: for each query, a bound on |candidate matmul score - :func:`pair_scores`| over the shard's rows.

    With ``q~``/``c~`` the inputs rounded to ``dtype``: ``|q~.c~ - q.c| <= |q~| |c~ - c| + |q~ - q| |c|``
    (Cauchy-Schwarz), plus an fp32 sum's ``d 2^-24 |q~| |c~|`` and the exact score's final rounding; the
    rounding-error norms are measured (the shard's largest, :meth:`Shard.rounding_error`). Both terms get a
    margin (1.01x, 2x). Without fp32 accumulation (bf16 output, bf16 partial sums, TF32) another
    ``2^-6 |q| |c|``: twice an output rounding plus a partial sum's."""
    q = queries.float()
    cn, dc = shard.norm_max, shard.rounding_error(dtype)
    qt = q.to(dtype).float()
    eps = (1.01 * (qt.norm(dim=1) * dc + (qt - q).norm(dim=1) * cn)
           + 2.0 * (shard.dim + 4) * 2.0**-24 * qt.norm(dim=1) * (cn + dc))
    if not fp32_out:
        eps = eps + 2.0**-6 * q.norm(dim=1) * cn
    return eps


class Shard:
    """Corpus rows held by one process: ``emb`` [n, d] fp32 (exact scores come from it) and ``index`` [n] their
    global corpus rows, strictly increasing: given, or ``start + step * j`` (a strided share: start = rank,
    step = world size; a contiguous one: start = offset). ``search`` [n, d] is what the candidate matmuls read
    (``emb`` itself or its bf16 copy). Embeddings must be finite."""

    def __init__(self, emb: Tensor, start: int = 0, step: int = 1, search: Tensor | None = None,
                 index: Tensor | None = None) -> None:
        if emb.dim() != 2:
            raise ValueError(f"need corpus rows [n, d], got {tuple(emb.shape)}")
        if start < 0 or step < 1:
            raise ValueError(f"need start >= 0 and step >= 1, got {start} and {step}")
        n = emb.shape[0]
        if index is None:
            index = start + step * torch.arange(n)
        index = index.long()
        if index.shape != (n,) or bool((index[1:] <= index[:-1]).any()) or (n and int(index[0]) < 0):
            raise ValueError("index must hold one global row >= 0 per corpus row, strictly increasing")
        if n and int(index[-1]) >= MAX_INDEX - 1:
            raise ValueError(f"global corpus indices must stay below {MAX_INDEX - 1}")
        if search is not None and search.shape != emb.shape:
            raise ValueError(f"search copy {tuple(search.shape)} differs from the rows {tuple(emb.shape)}")
        self.norm_max = 0.0  # the largest row norm: the matmul error bound's scale
        for r in range(0, n, 1 << 16):  # in chunks: no fp32 or bool copy of a large (e.g. fp16) corpus
            norms = emb[r : r + (1 << 16)].float().norm(dim=1)
            if not bool(torch.isfinite(norms).all()):  # a NaN or inf anywhere in a row makes its norm one
                raise ValueError("corpus embeddings must be finite")
            self.norm_max = max(self.norm_max, float(norms.max()))
        self.emb, self.index = emb, index.to(emb.device)
        self.search = emb if search is None else search
        self._rounding: dict[torch.dtype, float] = {}
        self.widths: dict[tuple, int] = {}  # the candidate pass's first width per kind of search (speed only)

    @classmethod
    def prepare(cls, emb: Tensor, index: Tensor, device: str | torch.device = "cpu") -> Shard:
        """The shard of rows ``index`` for searches on ``device``. CUDA: a bf16 copy for the matmuls, and both
        on the GPU when they take under half its free memory (else both stay in CPU memory: the copy travels
        chunk by chunk and re-scored rows are gathered on the CPU)."""
        device = torch.device(device)
        emb = emb.float()
        if device.type != "cuda":
            return cls(emb, index=index)
        if emb.numel() * 6 < 0.5 * torch.cuda.mem_get_info(device)[0]:
            emb = emb.to(device)
        return cls(emb, search=emb.to(search_dtype(device)), index=index)

    def __len__(self) -> int:
        return self.emb.shape[0]

    @property
    def dim(self) -> int:
        return self.emb.shape[1]

    def rounding_error(self, dtype: torch.dtype) -> float:
        """The largest ``|c~ - c|`` over the rows: ``c`` a row as scored exactly, ``c~`` what a matmul of
        ``dtype`` multiplies (the search copy's row rounded to ``dtype``); measured once per dtype."""
        if self.search is self.emb and dtype in (torch.float32, torch.float64):
            return 0.0  # fp16/bf16/fp32 rows become fp32 exactly
        if dtype not in self._rounding:
            worst = 0.0
            for r in range(0, len(self), 1 << 16):
                c = self.emb[r : r + (1 << 16)].float()
                ct = self.search[r : r + (1 << 16)].to(dtype).float()
                worst = max(worst, float((ct - c).norm(dim=1).max()))
            self._rounding[dtype] = worst
        return self._rounding[dtype]

    def global_index(self, local: Tensor) -> Tensor:
        return self.index[local.to(self.index.device)].to(local.device)

    def local_index(self, global_idx: Tensor) -> Tensor:
        """The local row of each global index held here, -1 for the others."""
        g = global_idx.to(self.index.device)
        local = torch.searchsorted(self.index, g).clamp(max=max(len(self) - 1, 0))
        held = (self.index[local] == g) if len(self) else torch.zeros_like(g, dtype=torch.bool)
        return torch.where(held, local, -1).to(global_idx.device)


def _candidates(qs: Tensor, shard: Shard, kk: int, corpus_chunk: int, dtype: torch.dtype,
                fp32_out: bool) -> tuple[Tensor, Tensor]:
    """The ``kk`` best matmul scores of each query over the shard, best first, with local rows."""
    best_s: Tensor | None = None
    best_i: Tensor | None = None
    for cs in range(0, len(shard), corpus_chunk):
        c = shard.search[cs : cs + corpus_chunk].to(device=qs.device, dtype=dtype, non_blocking=True)
        s, i = _matmul_scores(qs, c, fp32_out).topk(min(kk, c.shape[0]), dim=1)
        i += cs
        if best_s is None:
            best_s, best_i = s, i
            continue
        cat_s, cat_i = torch.cat([best_s, s], 1), torch.cat([best_i, i], 1)
        best_s, pos = cat_s.topk(min(kk, cat_s.shape[1]), dim=1)
        best_i = cat_i.gather(1, pos)
    assert best_s is not None and best_i is not None
    return best_s, best_i


def _rescore_merge(q: Tensor, shard: Shard, cand_s: Tensor, cand_i: Tensor, line: Tensor, best_s: Tensor,
                   best_i: Tensor) -> tuple[Tensor, Tensor]:
    """Exact scores of the candidates with a matmul score >= ``line`` (a prefix: best first), merged into the
    running top-k, at most :data:`RESCORE_ELEMS` products at a time."""
    k = best_s.shape[1]
    budget = RESCORE_ELEMS_CUDA if q.is_cuda else RESCORE_ELEMS
    count = (cand_s >= line[:, None]).sum(1)
    cols = max(1, budget // shard.dim)  # candidates per query at a time
    step = max(1, budget // (min(max(1, int(count.max())), cols) * shard.dim))
    out_s, out_i = best_s.clone(), best_i.clone()
    for r in range(0, q.shape[0], step):
        sl = slice(r, r + step)
        m = int(count[sl].max())
        for c in range(0, m, cols):
            local = cand_i[sl, c : min(c + cols, m)]
            take = cand_s[sl, c : min(c + cols, m)] >= line[sl, None]
            rows = shard.emb[local.to(shard.emb.device)].to(device=q.device, dtype=torch.float32)
            s = torch.where(take, pair_scores(q[sl], rows), float("-inf"))
            g = torch.where(take, shard.global_index(local), -1)
            out_s[sl], out_i[sl] = merge_topk(torch.cat([out_s[sl], s], 1), torch.cat([out_i[sl], g], 1), k)
    return out_s, out_i


def search_shard(queries: Tensor, shard: Shard, best_s: Tensor, best_i: Tensor, corpus_chunk: int = 16384,
                 dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """Merge the shard into each query's running top-k (``best_s`` [b, k] exact scores, ``best_i`` [b, k]
    global indices, in rule order, -inf / -1 where empty; on the queries' device): the exact top-k of
    (running ∪ shard) under the tie rule. ``dtype``: the candidate matmuls' (default :func:`search_dtype`)."""
    b, k, n = queries.shape[0], best_s.shape[1], len(shard)
    if b == 0 or k == 0 or n == 0:
        return best_s, best_i
    dtype = dtype or search_dtype(queries.device)
    q = queries.float()
    if not bool(torch.isfinite(q.norm(dim=1)).all()):
        raise ValueError("query embeddings must be finite")
    qs = q.to(dtype)
    fp32_out = fp32_accumulation(q.device, dtype)
    eps = score_error_bounds(q, shard, dtype, fp32_out)
    floor = best_s[:, -1]  # the running k-th exact score (-inf while fewer than k)
    best_s, best_i = best_s.clone(), best_i.clone()
    # (queries, kk): room for near-ties below the k-th; 4x more for the queries whose kk-th is not below the line.
    # The first kk is the one that sufficed for most queries of the previous call of the same kind (a repeated
    # pass costs a matmul pass, a wider one only a wider top-k); it changes the speed, never the result.
    kind = (k, dtype, bool(torch.isfinite(floor).all()))
    start = shard.widths.get(kind, min(n, k + k // 2 + 16))
    pending = [(torch.arange(b, device=q.device), start)]
    finished: dict[int, int] = {}
    while pending:
        rows, kk = pending.pop()
        step = max(1, CANDIDATE_ELEMS // kk)  # huge kk (a big group of equal scores): fewer queries at a time
        for r in range(0, rows.numel(), step):
            sub = rows[r : r + step]
            cand_s, cand_i = _candidates(qs[sub], shard, kk, corpus_chunk, dtype, fp32_out)
            e = eps[sub]
            lower = floor[sub] if kk < k else torch.maximum(floor[sub], cand_s[:, k - 1] - e)
            line = lower - e
            done = (cand_s[:, -1] < line) if kk < n else torch.ones_like(line, dtype=torch.bool)
            if bool(done.any()):
                d = sub[done]
                best_s[d], best_i[d] = _rescore_merge(q[d], shard, cand_s[done], cand_i[done], line[done],
                                                      best_s[d], best_i[d])
                finished[kk] = finished.get(kk, 0) + d.numel()
            if not bool(done.all()):
                pending.append((sub[~done], min(n, 4 * kk)))
    if finished.get(start, 0) < 0.9 * b:  # next time start where 90% of these queries were done (at most 16x wider)
        enough = next(w for w in sorted(finished) if sum(c for v, c in finished.items() if v <= w) >= 0.9 * b)
        shard.widths[kind] = min(enough, 16 * start)
    return best_s, best_i


def positive_scores(queries: Tensor, global_idx: Tensor, shard: Shard, out: Tensor) -> None:
    """Write into ``out`` [b] the exact score of each query with its global corpus row where the shard holds it."""
    local = shard.local_index(global_idx.to(queries.device))
    held = (local >= 0).nonzero(as_tuple=True)[0]
    if held.numel():
        rows = shard.emb[local[held].to(shard.emb.device)].to(device=queries.device, dtype=torch.float32)
        out[held] = pair_scores(queries[held], rows[:, None, :])[:, 0].to(out.device)


def chunked_topk(
    queries: Tensor,
    corpus: Tensor | Shard,
    k: int,
    query_chunk: int = 1024,
    corpus_chunk: int = 16384,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """The ``k`` best :func:`pair_scores` of each query over ``corpus`` (a tensor [nc, d] or a :class:`Shard`),
    in rule order (score descending, then lower global index).

    Returns ``(scores [nq, k'] fp32, indices [nq, k'] int64)`` on the CPU with ``k' = min(k, nc)``; indices are
    global (the shard's ``start + step * row``). Exact for any chunk sizes; ``dtype`` is the candidate
    matmuls' (default: bf16 on CUDA, fp32 elsewhere), which changes the speed, not the result.
    """
    shard = corpus if isinstance(corpus, Shard) else Shard(corpus)
    if queries.dim() != 2 or queries.shape[1] != shard.dim:
        raise ValueError(f"need queries [nq, d] and corpus [nc, d], got {tuple(queries.shape)} and "
                         f"{tuple(shard.emb.shape)}")
    if k < 1 or query_chunk < 1 or corpus_chunk < 1:
        raise ValueError(f"k, query_chunk and corpus_chunk must be >= 1, got {k}, {query_chunk}, {corpus_chunk}")
    nq = queries.shape[0]
    k = min(k, len(shard))
    device = torch.device(device) if device is not None else queries.device
    out_s = torch.empty(nq, k, dtype=torch.float32)
    out_i = torch.empty(nq, k, dtype=torch.long)
    if nq == 0 or k == 0:
        return out_s, out_i
    with torch.no_grad():
        for qs in range(0, nq, query_chunk):
            q = queries[qs : qs + query_chunk].to(device=device, dtype=torch.float32)
            s, i = search_shard(q, shard, *empty_topk(q.shape[0], k, device), corpus_chunk, dtype)
            out_s[qs : qs + q.shape[0]] = s.cpu()
            out_i[qs : qs + q.shape[0]] = i.cpu()
    return out_s, out_i
