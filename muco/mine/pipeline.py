"""The mining pipeline: embed every query turn of a shard set with a trained model, search the unique target
texts, keep the filtered nearest ones per turn and write the sidecar of :mod:`muco.data.m3t.sidecar`.

``mine(MineConfig(...))`` runs it (in ``devices`` processes: DDP, gloo on CPU; each embeds its share of the
samples and keeps its share of the unique targets' embeddings; its query turns visit every rank's share in a
ring (:mod:`muco.mine.ring`); rank 0 writes the sidecar, equal to the single-process one). :func:`settings` is
what makes a finished sidecar reusable and :func:`is_complete` whether a directory already holds one made with
them. ``muco mine`` (:mod:`muco.cli.mine`) is the command.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from muco.data.m3t.sidecar import MANIFEST, SidecarError, read_sidecar_manifest, write_sidecar
from muco.data.m3t.turns import TURN_ORDERS
from muco.data.shards import is_remote
from muco.distributed import gather_objects
from muco.encoder import MuCoEncoder, eval_mode
from muco.inputs.image_policy import PRESETS
from muco.mine.dist import Lockstep, barrier, gather_rows, world
from muco.mine.search import Shard
from muco.mine.select import REASONS, SelectConfig, mine_negatives, normalized_ids
from muco.mine.summary import summarize
from muco.model.sharding import is_sharded
from muco.train.checkpoint import datamodule_hparams, load_encoder

log = logging.getLogger("muco.mine")

AUTOCAST = ("none", "bfloat16", "float16")
QUERY_DRAWS = ("canonical", "train")
CANONICAL_QUERY_TURNS = "stored order, first candidate query"


@dataclass(frozen=True)
class MineConfig:
    """One mining run.

    Attributes:
        model: a ``.ckpt`` of a muco run or an exported model directory.
        shards: the shard URLs, in order (``muco.data.shards.resolve_shards(...).urls``; one data source).
        output: the sidecar directory to write.
        top_k: negatives kept per query turn.
        margin: drop likely false negatives, ``sim > pos_sim - margin`` (None: off).
        max_ratio: also drop candidates with ``sim > max_ratio * pos_sim`` (None: off).
        extra: candidates searched beyond ``top_k`` + turns per sample (None: ``2 * top_k``).
        image_policy: an image policy preset, or None for the model's own (see :func:`resolve_image_policy`).
        turns_per_sequence: query turns per sequence, None for all of a record's turns in one
            (see :func:`resolve_turns_per_sequence`).
        autocast: ``none``, ``bfloat16`` or ``float16``.
        batch_size: samples (queries) / texts (targets) per forward.
        query_chunk: query turns per search chunk.
        corpus_chunk: target texts per search chunk.
        num_workers: DataLoader workers reading and decoding shards.
        num_samples: the shard set's sample count when known (progress bars only).
        progress: show progress bars (rank 0).
        query_draws: ``canonical`` (stored order, first candidate query) or ``train``: the turns, order and
            candidate queries training draws in data epoch ``draw_epoch`` with data seed ``draw_seed`` and
            ``turn_order`` (:class:`muco.mine.embed.TrainDraws`; undrawn turns in further, canonical sequences).
        draw_seed / draw_epoch / turn_order: the training data's ``seed``, the data epoch to draw for and its
            ``data.records.turn_order`` (``train`` only).
    """

    model: str | os.PathLike
    shards: Sequence[str]
    output: str | os.PathLike
    top_k: int = 100
    margin: float | None = 0.05
    max_ratio: float | None = None
    extra: int | None = None
    image_policy: str | None = None
    turns_per_sequence: int | None = None
    autocast: str = "none"
    batch_size: int = 16
    query_chunk: int = 1024
    corpus_chunk: int = 16384
    num_workers: int = 2
    num_samples: int | None = None
    progress: bool = True
    query_draws: str = "canonical"
    draw_seed: int = 0
    draw_epoch: int = 0
    turn_order: str = "sample"

    def __post_init__(self) -> None:
        for name in ("top_k", "batch_size", "query_chunk", "corpus_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_workers < 0 or (self.extra is not None and self.extra < 0):
            raise ValueError(f"num_workers and extra must be >= 0, got {self.num_workers} and {self.extra}")
        if self.margin is not None and self.margin < 0:
            raise ValueError(f"margin must be None (off) or >= 0, got {self.margin}")
        if self.turns_per_sequence is not None and self.turns_per_sequence < 1:
            raise ValueError(f"turns_per_sequence must be None (all) or >= 1, got {self.turns_per_sequence}")
        if self.autocast not in AUTOCAST:
            raise ValueError(f"autocast must be one of {AUTOCAST}, got {self.autocast!r}")
        if self.query_draws not in QUERY_DRAWS:
            raise ValueError(f"query_draws must be one of {QUERY_DRAWS}, got {self.query_draws!r}")
        if self.draw_epoch < 0:
            raise ValueError(f"draw_epoch must be >= 0, got {self.draw_epoch}")
        if self.turn_order not in TURN_ORDERS:
            raise ValueError(f"turn_order must be one of {TURN_ORDERS}, got {self.turn_order!r}")
        if self.image_policy is not None and self.image_policy not in PRESETS:
            raise ValueError(f"image_policy must be None (the model's own) or one of {sorted(PRESETS)}, got "
                             f"{self.image_policy!r}")


def resolve_image_policy(model: str | os.PathLike, choice: str) -> str | None:
    """A preset name, or None for the model's own policy (``choice="model"``); ``choice="train"``: the training
    data's policy recorded in the checkpoint, else ``pretrain``."""
    if choice == "model":
        return None
    if choice != "train":
        return choice
    hp = datamodule_hparams(model)
    if isinstance(hp.get("image_policy"), str) and hp["image_policy"] in PRESETS:
        return hp["image_policy"]
    return "pretrain"


def resolve_turns_per_sequence(model: str | os.PathLike, choice: str | int) -> int | None:
    """None (all of a record's turns in one sequence) or K: ``choice`` is ``"all"``, K >= 1, or ``"train"``
    (the checkpoint's ``data.records.turns_per_sample``, else all)."""
    if choice == "all":
        return None
    if choice == "train":
        k = trained_turns_per_sample(datamodule_hparams(model))
        return k if isinstance(k, int) and k >= 1 else None
    if isinstance(choice, int) and not isinstance(choice, bool) and choice >= 1:
        return choice
    raise ValueError(f"turns per sequence must be train, all or a positive number, got {choice!r}")


def trained_turns_per_sample(data_hparams: dict[str, Any]) -> Any:
    """``turns_per_sample`` of the training data: in the record kind's settings (``records.init_args``), or at
    the top level in checkpoints written before record kinds existed; None when not recorded."""
    records = data_hparams.get("records")
    if isinstance(records, dict) and isinstance(records.get("init_args"), dict):
        return records["init_args"].get("turns_per_sample")
    return data_hparams.get("turns_per_sample")


def resolve_draw_seed(model: str | os.PathLike, seed: int | None = None) -> tuple[int, str]:
    """(data seed, turn order) of the training run for ``query_draws="train"``: ``seed`` when given, else the
    checkpoint's ``data.seed``; the turn order is the checkpoint's ``data.records.turn_order`` (else ``sample``,
    the default). A model without a recorded seed (an exported directory) needs ``seed``."""
    hp = datamodule_hparams(model)
    records = hp.get("records")
    order = records["init_args"].get("turn_order") if isinstance(records, dict) and isinstance(
        records.get("init_args"), dict) else hp.get("turn_order")
    order = order if order in TURN_ORDERS else "sample"
    if seed is None:
        seed = hp.get("seed")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"{model} records no training data seed (data.seed); give the seed to draw with")
    return seed, order


def model_fingerprint(path: str | os.PathLike) -> list[int]:
    """[total size, newest mtime in ns] of a model file or of the files of a model directory."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    return [sum(f.stat().st_size for f in files), max((f.stat().st_mtime_ns for f in files), default=0)]


def settings(cfg: MineConfig) -> dict:
    """What makes a finished sidecar reusable (batch sizes, chunks and process counts do not change it)."""
    model = Path(cfg.model).resolve()
    return {"model": str(model), "model_fingerprint": model_fingerprint(model), **search_settings(cfg)}


def search_settings(cfg: MineConfig) -> dict:
    """:func:`settings` without the model: what was searched, and how."""
    return {"shards": [u if is_remote(u) else os.path.abspath(u) for u in cfg.shards],  # URLs stay URLs
            "top_k": cfg.top_k, "margin": cfg.margin,
            "max_ratio": cfg.max_ratio, "extra": cfg.extra, "image_policy": cfg.image_policy or "model",
            "autocast": cfg.autocast, "query_turns": query_turns(cfg),
            "turns_per_sequence": cfg.turns_per_sequence or "all"}


def query_turns(cfg: MineConfig) -> str | dict:
    """The sidecar settings' record of which query turns were mined: the canonical string (as before draws
    existed, so older sidecars stay reusable), or training's draws with their seed, epoch and turn order."""
    if cfg.query_draws == "canonical":
        return CANONICAL_QUERY_TURNS
    return {"draws": "train", "seed": cfg.draw_seed, "epoch": cfg.draw_epoch, "turn_order": cfg.turn_order,
            "undrawn turns": CANONICAL_QUERY_TURNS}


def is_complete(out: str | os.PathLike, wanted: dict) -> bool:
    """``out`` holds a finished sidecar mined with the :func:`settings` ``wanted``."""
    out = Path(out)
    if not (out / MANIFEST).is_file():
        return False
    try:
        return read_sidecar_manifest(out).get("settings") == wanted
    except SidecarError:
        return False


def mine(cfg: MineConfig, device: str | torch.device | None = None, devices: int = 1) -> dict | None:
    """Mine ``cfg`` in ``devices`` processes (DDP when > 1: GPUs on cuda, gloo processes on cpu) on ``device``
    (default: cuda when available); returns the summary on rank 0 (None elsewhere).

    Processes are started by re-running the program (Lightning Fabric's launcher): whatever the caller did
    before this call, every rank does again.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if devices < 1:
        raise ValueError(f"devices must be >= 1, got {devices}")
    if devices > 1:
        from lightning.fabric import Fabric

        fabric = Fabric(accelerator="cuda" if device.type == "cuda" else "cpu", devices=devices, strategy="ddp")
        fabric.launch()
        device = fabric.device
    elif device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    return run(cfg, device)


def run(cfg: MineConfig, device: torch.device) -> dict | None:
    """One rank's work (torch.distributed already set up when more than one); the summary on rank 0."""
    kw = {} if cfg.image_policy is None else {"image_policy": cfg.image_policy}
    encoder = load_encoder(cfg.model, device=device,
                           autocast_dtype=None if cfg.autocast == "none" else cfg.autocast, **kw)
    return mine_with(encoder, cfg, settings(cfg))


def mine_with(encoder: MuCoEncoder, cfg: MineConfig, wanted: dict) -> dict | None:
    """One rank's mining with ``encoder`` as it is (a loaded model, or a training run's live one: the rounds
    inside ``muco fit``), recording ``wanted`` as the sidecar's settings; ``cfg.model`` only names the model in
    the log, and the encoder's own image policy and autocast are used. Every rank of torch.distributed's
    default group takes part (each embeds its own share; with an FSDP2-sharded model their forwards are kept
    in step, :class:`muco.mine.dist.Lockstep`); rank 0 writes the sidecar and gets the summary. The embedder's
    train/eval modes are as before when it returns."""
    with eval_mode(encoder.embedder):
        return _mine(encoder, cfg, wanted)


def _mine(encoder: MuCoEncoder, cfg: MineConfig, wanted: dict) -> dict | None:
    from muco.data.m3t.collate import PretrainCollator
    from muco.mine.embed import MineStream, TrainDraws, embed_queries, embed_texts, text_share

    rank, size = world()
    device = encoder.device
    show = rank == 0 and cfg.progress
    if rank == 0:
        log.info("model %s on %s (%d process(es)), image policy %s, query turns per sequence: %s, query turns: %s",
                 cfg.model, device, size, encoder.image_policy, wanted["turns_per_sequence"], query_turns(cfg))
    draws = None if cfg.query_draws == "canonical" else TrainDraws(cfg.draw_seed, cfg.draw_epoch, cfg.turn_order)
    stream = MineStream(list(cfg.shards), PretrainCollator(encoder.tokenizer, encoder.image_policy),
                        encoder.image_policy, cfg.batch_size, rank, size, cfg.turns_per_sequence, draws)
    total = None if cfg.num_samples is None else -(-cfg.num_samples // size)
    # a training run's FSDP2-sharded model (the rounds inside `muco fit`): every forward needs every rank, so a
    # rank whose share is done runs an empty text until the others are done too
    lockstep = Lockstep(is_sharded(encoder.embedder.backbone), lambda: encoder.encode_user_texts([""], [None], 1))
    q = embed_queries(encoder, stream, cfg.num_workers, total, show, lockstep)

    # the corpus: every unique target text, sorted (the same order for any process count); each rank embeds and
    # keeps only its share (whole batches, the same for any process count), the query blocks visit every share
    texts = sorted(set().union(*gather_objects({t for ts in q.targets for t in ts})))
    rows = text_share(texts, cfg.batch_size, rank, size)
    shard = Shard.prepare(embed_texts(encoder, [texts[i] for i in rows.tolist()], cfg.batch_size, show, lockstep),
                          rows, device)
    if lockstep.enabled:
        fillers = sum(gather_objects(lockstep.fillers))
        if rank == 0:
            log.info("sharded model: %d forward(s) run only to keep the ranks in step", fillers)
    del rows
    index = {t: i for i, t in enumerate(texts)}
    max_turns = max(gather_objects(max((len(t) for t in q.targets), default=0)))
    pos_idx = torch.tensor([index[t] for ts in q.targets for t in ts], dtype=torch.long)
    same_idx = torch.full((len(pos_idx), max(max_turns, 1)), -1, dtype=torch.long)
    row = 0
    for ts in q.targets:
        same_idx[row : row + len(ts), : len(ts)] = torch.tensor([index[t] for t in ts])
        row += len(ts)
    select = SelectConfig(cfg.top_k, cfg.margin, cfg.max_ratio, cfg.extra)
    pos_sim, sel = mine_negatives(q.emb, shard, pos_idx, same_idx, normalized_ids(texts), select,
                                  cfg.query_chunk, cfg.corpus_chunk, device)
    del shard

    # to rank 0: per turn (shard, position, turn) + results; per sample the key
    turns = torch.cat([torch.arange(n) for n in q.num_turns.tolist()]) if len(q.keys) else torch.empty(0).long()
    turn_meta = torch.cat([q.order.repeat_interleave(q.num_turns, dim=0), turns[:, None]], 1)
    gathered = [torch.cat(gather_rows(x, dst=0) or [x[:0]]) for x in (turn_meta, pos_sim, sel.indices, sel.sims)]
    keys = [k for part in gather_objects(list(zip(q.order.tolist(), q.keys))) for k in part]
    filtered = gather_objects(sel.filtered)
    skipped = sum(gather_objects(q.skipped))
    summary = None
    if rank == 0:
        summary = _write(cfg, wanted, texts, keys, *gathered, {r: sum(f[r] for f in filtered) for r in REASONS},
                         skipped)
    barrier()
    return summary


def _write(cfg: MineConfig, wanted: dict, texts: list[str], keys: list, meta: torch.Tensor, pos_sim: torch.Tensor,
           indices: torch.Tensor, sims: torch.Tensor, filtered: dict, skipped: int) -> dict:
    """Rank 0: rows in canonical order (shard, position, stored turn), whatever the process count."""
    key_of = {tuple(o): k for o, k in keys}
    first: dict[str, tuple[int, int]] = {}
    for o in sorted(key_of):
        first.setdefault(key_of[o], o)
    dups = len(key_of) - len(first)
    if dups:
        log.warning("%d sample(s) repeat an earlier key; only the first occurrence of each key is mined", dups)
    meta_l = [tuple(m) for m in meta.tolist()]
    order = [i for i in sorted(range(len(meta_l)), key=meta_l.__getitem__)
             if first[key_of[meta_l[i][:2]]] == meta_l[i][:2]]
    sel = torch.tensor(order, dtype=torch.long)
    summary = summarize(pos_sim[sel], sims[sel], filtered, cfg.top_k)
    summary.update(samples=len(first), skipped_samples=skipped, duplicate_keys=dups, corpus_texts=len(texts))
    if summary["turns_short"]:
        log.warning("%d of %d query turns kept fewer than %d negatives (a small corpus, or raise --extra / lower "
                    "--margin)", summary["turns_short"], summary["query_turns"], cfg.top_k)

    def rows() -> Iterator[dict]:
        for i in order:
            s, p, t = meta_l[i]
            idx = [j for j in indices[i].tolist() if j >= 0]
            negs = [{"text": texts[j], "rank": r, "sim": round(v, 6)}
                    for r, (j, v) in enumerate(zip(idx, sims[i].tolist()), 1)]
            yield {"key": key_of[(s, p)], "turn": t, "pos_sim": round(float(pos_sim[i]), 6), "negatives": negs}

    write_sidecar(cfg.output, rows(), {"model": wanted["model"], "shards": wanted["shards"], "top_k": cfg.top_k,
                                       "margin": wanted["margin"], "summary": summary, "settings": wanted})
    return summary
