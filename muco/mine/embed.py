"""Embedding for mining: every query turn as in training, every unique target text once.

**Queries.** Each sample's query sequence is the K-turn pretraining sequence (``PRETRAIN`` template, the image in
front of turn 1) built by the training collator, with the record's turns in their STORED order and, for every
turn, its FIRST candidate query. Training draws a random order and a random candidate per epoch; mining fixes
this one canonical choice so a sidecar is reproducible and its ``turn`` field is the stored turn index. A run that
trained with K < 7 turns per sequence is mined with its own K (``turns_per_sequence``): the stored turns are cut
into consecutive sequences of K turns, each with the image in its first turn, so no turn sits at a position
the model never trained.

**Training's draws** (``draws=TrainDraws(seed, epoch, ...)``, ``muco mine --query-draws train``). Instead of the
canonical choice, each sample's first query sequence is the one the training decoder draws for it in data epoch
``epoch`` of a run with data seed ``seed`` (:meth:`muco.data.m3t.decode.M3TDecoder.draw`: the same K turns, their
order and candidate queries), so the next round's negatives are mined for the sequences it will train on. When
K is below the record's turn count, the turns not drawn in that epoch are still mined (a later epoch of the round
draws them): in further sequences of up to K turns, in stored order with their first candidate query (the
canonical choice). Either way the pooled rows are put back in stored turn order per sample, so a sidecar row is
still keyed by (key, stored turn) and training looks negatives up unchanged. With ``turn_order="batch"`` training
permutes whole batches after decoding (an order mining cannot know), so the drawn subset is mined in stored order.

Images are decoded with the training data's ``load_image`` under the training image policy.

**Targets (the corpus).** Every unique target text once, with the single-turn template ``BASE(t)`` (text only,
as stored). ``BASE(t) == PRETRAIN([t])``, so this is exactly a target's embedding as the first turn of a
training target sequence.

Shards are read with the training stream's tar reader: in the order given, every rank reading every shard and
decoding only its share. Bad samples are skipped with the stream's counted, rate-limited warning naming the shard
and the key.

**Batches do not depend on the process count.** A model's output for a row changes in its last bits with the
other rows of its batch (padding, kernel shapes), so batches are fixed first and shared out whole: query batch
``j`` of shard ``s`` is positions ``[j * batch_size, (j + 1) * batch_size)`` of that shard (bad samples leave
it short) and belongs to rank ``(s + j) % world``; target batches are runs of ``batch_size`` texts in
:func:`embed_texts`' order (longest first) over all texts, batch ``b`` to rank ``b % world``
(:func:`text_share`). So every embedding, and the sidecar, is the same bit for bit for any number of processes
or DataLoader workers.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from muco.data.images import load_image
from muco.data.m3t.collate import PretrainCollator, PretrainSample
from muco.data.m3t.decode import M3TDecoder, record_and_image
from muco.data.m3t.records import M3TRecord
from muco.data.skips import SkipLog
from muco.data.stream import MAX_CONSECUTIVE_FAILURES
from muco.data.tar_reader import TarReader
from muco.encoder import MuCoEncoder
from muco.inputs.image_policy import ImagePolicy
from muco.mine.dist import Lockstep

log = logging.getLogger("muco.mine")


def canonical_turns(record: M3TRecord) -> tuple[list[str], list[str]]:
    """(queries, targets) in stored turn order, each turn's first candidate query."""
    return [t.queries[0] for t in record.turns], [t.target for t in record.turns]


@dataclass(frozen=True)
class TrainDraws:
    """Mine the query turns training draws in data epoch ``epoch`` of a run with data seed ``seed``, K turns per
    sequence (``turns_per_sequence``; None: all of a record's turns) and ``turn_order`` (``data.records``)."""

    seed: int
    epoch: int
    turn_order: str = "sample"

    def decoder(self, image_policy: ImagePolicy, turns: int) -> M3TDecoder:
        """The training decoder that draws K = ``turns`` turns (no length bounds or negatives: only its draw)."""
        return M3TDecoder(image_policy, turns, seed=self.seed, turn_order=self.turn_order)


@dataclass
class MineSample:
    """One sample to mine: its query ``sequences`` (collator inputs, embedded in this order), the stored turn
    index of each of their turns (sequence-major) and its targets in stored order."""

    key: str
    sequences: list[PretrainSample]
    turns: list[int]
    targets: list[str]


def mine_sequences(record: M3TRecord, image: Any, turns_per_sequence: int | None = None,
                   draws: TrainDraws | None = None, image_policy: ImagePolicy | None = None) -> MineSample:
    """The query sequences mined for ``record`` (see the module docstring): canonical runs of K stored turns,
    or (``draws``) the training decoder's draw for the epoch followed by runs of K of the undrawn turns."""
    queries, targets = canonical_turns(record)
    n = len(targets)
    k = turns_per_sequence or n
    first: list[int] = []
    runs: list[tuple[list[str], list[int]]] = []
    if draws is not None:
        if image_policy is None:
            raise ValueError("mining training's draws needs the image policy (the training decoder's)")
        # K above the record's turns: training skips such a sample; mining draws all of them (rows stay complete)
        drawn_q, _, first = draws.decoder(image_policy, min(k, n)).draw(record, draws.epoch)
        runs.append((drawn_q, first))
    drawn = set(first)
    rest = [i for i in range(n) if i not in drawn]
    runs += [([queries[i] for i in rest[j : j + k]], rest[j : j + k]) for j in range(0, len(rest), k)]
    seqs = [PretrainSample(key=record.key, image=image, queries=q, targets=[targets[i] for i in t])
            for q, t in runs]
    return MineSample(record.key, seqs, [i for _, t in runs for i in t], targets)


class MineStream(IterableDataset):
    """One pass over the shards in a fixed order, yielding collated batches of this rank's share of samples:
    batch ``j`` of shard ``s`` (positions ``[j * batch_size, (j + 1) * batch_size)``, bad samples left out) when
    ``(s + j) % world == rank``; a batch never spans two shards.

    Each batch is the training collator's output (``query``, ``num_turns``, ``keys``) plus ``order`` [b, 2]
    (shard index, position in the shard) and ``targets`` (stored-order target texts per sample). The last item
    of every worker is ``{"final": True, "stats": {...}}`` with its skip count. Composed of the training data's
    stages: the tar reader, the M3T record check, image decoding and the pretraining collator.
    """

    def __init__(self, urls: Sequence[str], collator: PretrainCollator, image_policy: ImagePolicy,
                 batch_size: int, rank: int = 0, world_size: int = 1, turns_per_sequence: int | None = None,
                 draws: TrainDraws | None = None) -> None:
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if turns_per_sequence is not None and turns_per_sequence < 1:
            raise ValueError(f"turns_per_sequence must be >= 1, got {turns_per_sequence}")
        self.urls, self.collator, self.image_policy, self.batch_size = list(urls), collator, image_policy, batch_size
        self.mine_rank, self.mine_world = rank, world_size
        self.turns_per_sequence, self.draws = turns_per_sequence, draws
        self.skipped = self.samples = 0
        self._failures = 0
        self._wid = ""
        self._skip_log = SkipLog()
        self._read_tar = TarReader(self._tar_error, "the shards")  # a bound method: picklable into spawn workers

    def decode(self, raw: dict[str, Any]) -> MineSample:
        record, image = record_and_image(raw)
        return mine_sequences(record, load_image(image, self.image_policy), self.turns_per_sequence, self.draws,
                              self.image_policy)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        w, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        wid = self._wid = f"mine-r{self.mine_rank}w{w}"
        urls = self.urls
        for s in range(w, len(urls), nw):
            buf: list[tuple[MineSample, int, int]] = []
            for pos, raw in enumerate(self._read_tar(urls[s], wid)):
                if pos % self.batch_size == 0 and buf:  # batch (s, pos // batch_size - 1) is complete
                    yield from self._mine_batch(buf, wid)
                    buf = []
                if (s + pos // self.batch_size) % self.mine_world != self.mine_rank:
                    continue
                try:
                    sample = self.decode(raw)
                except Exception as e:  # one bad sample costs that sample only
                    self._skip(wid, urls[s], raw.get("__key__"), f"{type(e).__name__}: {e}")
                    continue
                self._failures = 0
                buf.append((sample, s, pos))
            if buf:
                yield from self._mine_batch(buf, wid)
        self._skip_log.close(wid, self.skipped)
        yield {"final": True, "stats": {"skipped": self.skipped, "samples": self.samples, "worker": wid}}

    def _tar_error(self, url: str, key: str | None, reason: str) -> None:
        self._skip(self._wid, url, key, reason)

    def _skip(self, wid: str, url: str, key: str | None, err: object) -> None:
        self.skipped += 1
        self._failures += 1
        self._skip_log(wid, url, key, err, self.skipped)
        if self._failures >= MAX_CONSECUTIVE_FAILURES:  # fail loudly instead of spinning over bad data
            raise RuntimeError(f"worker {wid}: {self._failures} samples in a row failed; last: {key!r} of "
                               f"{url}: {err}")

    def _mine_batch(self, buf: list[tuple[MineSample, int, int]], wid: str) -> Iterator[dict[str, Any]]:
        try:
            batch = self.collator([seq for b in buf for seq in b[0].sequences])
        except Exception:  # decode validated each sample; isolate the one the collator refuses
            if len(buf) > 1:
                for one in buf:
                    yield from self._mine_batch([one], wid)
                return
            s, url = buf[0], self.urls[buf[0][1]]
            self._skip(wid, url, s[0].key, "collation failed")
            return
        batch.pop("target", None)
        batch.pop("target_text_id", None)
        # sequences (what the embedder checks) vs samples (what mining records); sequences of one sample are
        # consecutive, so the pooled rows are sample-major; ``stored_rows`` puts each sample's rows back in
        # stored turn order (the identity for the canonical choice)
        batch["sequence_keys"], batch["sequence_turns"] = batch["keys"], batch["num_turns"]
        batch["keys"] = [b[0].key for b in buf]
        batch["num_turns"] = torch.tensor([len(b[0].targets) for b in buf], dtype=torch.long)
        rows, offset = [], 0
        for b in buf:
            pooled_row = {t: offset + j for j, t in enumerate(b[0].turns)}
            rows += [pooled_row[t] for t in range(len(b[0].targets))]
            offset += len(b[0].turns)
        batch["stored_rows"] = torch.tensor(rows, dtype=torch.long)
        batch["order"] = torch.tensor([[s, pos] for _, s, pos in buf], dtype=torch.long)
        batch["targets"] = [b[0].targets for b in buf]
        self.samples += len(buf)
        yield batch


@dataclass
class QueryEmbeddings:
    """This rank's samples: ``emb`` [n_turns, d] sample-major in stored turn order; per sample ``order``
    [n, 2] (shard, position), ``keys``, ``targets`` (stored order) and ``num_turns`` [n]."""

    emb: Tensor
    order: Tensor
    keys: list[str]
    targets: list[list[str]]
    num_turns: Tensor
    skipped: int


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def embed_queries(encoder: MuCoEncoder, stream: MineStream, num_workers: int = 0, total: int | None = None,
                  progress: bool = True, lockstep: Lockstep | None = None) -> QueryEmbeddings:
    """Pool every query turn of this rank's samples (inference mode, eval mode); ``lockstep`` keeps the forwards
    in step with the other ranks' (a sharded model)."""
    loader = DataLoader(stream, batch_size=None, num_workers=num_workers)
    device, embedder = encoder.device, encoder.embedder.eval()
    embs, orders, keys, targets, turns = [], [], [], [], []
    skipped = 0
    bar = tqdm(total=total, desc="mine: queries", unit="sample", disable=not progress, dynamic_ncols=True)
    with torch.inference_mode(), _autocast(device, encoder.autocast_dtype), bar:
        for batch in loader:
            if batch.get("final"):
                skipped += batch["stats"]["skipped"]
                continue
            if lockstep is not None:
                lockstep.step()
            inputs = {k: v.to(device) for k, v in batch["query"].items()}
            pooled = embedder(inputs, expected=batch["sequence_turns"].to(device), keys=batch["sequence_keys"])
            embs.append(pooled.emb.float().cpu()[batch["stored_rows"]])
            orders.append(batch["order"])
            keys += batch["keys"]
            targets += batch["targets"]
            turns.append(batch["num_turns"])
            bar.update(len(batch["keys"]))
        if lockstep is not None:
            lockstep.drain()
    if not embs:
        return QueryEmbeddings(torch.empty(0, encoder.dim), torch.empty(0, 2, dtype=torch.long), [], [],
                               torch.empty(0, dtype=torch.long), skipped)
    return QueryEmbeddings(torch.cat(embs), torch.cat(orders), keys, targets, torch.cat(turns), skipped)


def text_order(texts: Sequence[str]) -> Tensor:
    """The order :func:`embed_texts` embeds ``texts`` in: longest first (characters), equal lengths in list
    order (similar lengths per batch: little padding)."""
    lengths = torch.tensor([len(t) for t in texts], dtype=torch.long)
    return torch.sort(-lengths, stable=True).indices


def text_share(texts: Sequence[str], batch_size: int, rank: int = 0, world: int = 1) -> Tensor:
    """The rows of ``texts`` (ascending) that ``rank`` embeds: batch ``b`` of :func:`text_order`, runs of
    ``batch_size``, belongs to rank ``b % world``. :func:`embed_texts` of these rows with the same
    ``batch_size`` forms exactly those batches, so a text's embedding does not depend on ``world``."""
    if not 0 <= rank < world or batch_size < 1:
        raise ValueError(f"need 0 <= rank < world and batch_size >= 1, got {rank}, {world}, {batch_size}")
    order = text_order(texts)
    batch = torch.arange(len(order)) // batch_size
    return order[batch % world == rank].sort().values


def embed_texts(encoder: MuCoEncoder, texts: Sequence[str], batch_size: int = 32,
                progress: bool = True, lockstep: Lockstep | None = None) -> Tensor:
    """``BASE(t)`` embeddings [n, d] of target texts ``t`` as stored (fp32, normalised, CPU), in batches of
    ``batch_size`` in :func:`text_order`; ``lockstep`` keeps the forwards in step with the other ranks'."""
    fillers = 0 if lockstep is None else lockstep.fillers_after(-(-len(texts) // batch_size))
    out = torch.empty(len(texts), encoder.dim)
    order = text_order(texts).tolist()
    block = batch_size * 16
    with tqdm(total=len(texts), desc="mine: targets", unit="text", disable=not progress,
              dynamic_ncols=True) as bar:
        for start in range(0, len(order), block):
            idx = order[start : start + block]
            out[torch.tensor(idx, dtype=torch.long)] = encoder.encode_user_texts(
                [texts[i] for i in idx], [None] * len(idx), batch_size)
            bar.update(len(idx))
    if lockstep is not None:
        lockstep.fill(fillers)
    return out
