"""Hard-negative rounds inside one ``muco fit``: a Lightning callback that, at every round boundary, mines with
the current weights on all ranks of the job (the code of ``muco mine``), swaps the DataModule's mined negatives
and carries on: one job, no restarts, the model never re-read from disk.

A round is ``epochs_per_round`` data epochs of ``data.samples_per_epoch`` samples; the difficulty schedule says
which rank band each round draws (the same stages as a rounds file: ``from_round`` >= 2, round 1 trains with the
data config as given). When the first data epoch of round r+1 begins (the DataModule's epoch listener, before its
workers start: every batch of round r is trained) and round r+1 draws negatives (with ``remine: false`` only
before the first such round), every rank embeds its share of the training shards' query turns and target texts,
and rank 0 writes the sidecar to ``<run dir>/rounds/after_round<r>/``: the same file ``muco mine`` writes for a
checkpoint of these weights. Every rank then loads it and the epoch draws from it. Lightning rebuilds the train
dataloader every epoch (``trainer.reload_dataloaders_every_n_epochs`` is set to 1), so no worker keeps old ones.
Rounds count data epochs, not the trainer's: resumed from a checkpoint written at an epoch's last batch,
Lightning numbers the following epochs one higher than the uninterrupted run.

The callback's state (the round the next batch trains in, the sidecars mined so far) is part of every
checkpoint, so a preempted job resumes in its round with the same negatives and τ; resumed at a round's last
batch, it mines when the next epoch begins, with the same weights. Mining does not move the training random
state (it runs under a forked RNG).

Under FSDP2 (``ModelParallelStrategy``) every forward of the sharded model needs every rank, while each rank
mines its own share: mining keeps the ranks' forwards in step (:class:`muco.mine.dist.Lockstep`) and runs the
vision tower on every rank whenever one rank's batch has images (:func:`muco.model.sharding.vision_on_every_rank`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from muco.rounds.schedule import DifficultySchedule

log = logging.getLogger("muco.rounds")

__all__ = ["InFitRounds"]

# `mine` settings: those of `muco mine`, spelled as MineConfig's fields
MINE_DEFAULTS: dict[str, Any] = {"shards": None, "top_k": 100, "margin": 0.05, "max_ratio": None, "extra": None,
                                 "batch_size": 16, "query_chunk": 1024, "corpus_chunk": 16384, "num_workers": 0,
                                 "autocast": None, "query_draws": "canonical"}
AUTOCAST_OF_PRECISION = {"bf16-mixed": "bfloat16", "16-mixed": "float16"}


class InFitRounds(Callback):
    """Rounds of mined hard negatives inside one fit (``trainer.callbacks`` in YAML).

    Args:
        epochs_per_round: epochs of ``data.samples_per_epoch`` samples per round.
        schedule: difficulty stages, ``[{from_round: 2, band: [11, 30], per_turn: 1}, ...]`` (from round 2 on).
        mine: settings of ``muco mine`` (``top_k``, ``margin`` (negative: off), ``max_ratio``, ``extra``,
            ``batch_size``, ``query_chunk``, ``corpus_chunk``, ``num_workers``, ``autocast``, ``shards``);
            ``shards`` defaults to ``data.train_shards`` and ``autocast`` to the trainer's precision;
            ``query_draws: train`` mines the turns and candidate queries the next round's first data epoch draws
            (with ``data.seed``) instead of the stored order and first candidates (``canonical``).
        remine: False mines once, before the first round with negatives, and every later round reuses it.
        temperatures: τ per round (the last one for later rounds); needs a fixed ``model.temperature``.
        output: the folder of the run directory the sidecars go to.
    """

    def __init__(self, epochs_per_round: int, schedule: Sequence[Mapping[str, Any]],
                 mine: Mapping[str, Any] | None = None, remine: bool = True,
                 temperatures: Sequence[float] | None = None, output: str = "rounds") -> None:
        if isinstance(epochs_per_round, bool) or not isinstance(epochs_per_round, int) or epochs_per_round < 1:
            raise ValueError(f"InFitRounds.epochs_per_round must be an integer >= 1, got {epochs_per_round!r}")
        try:
            self.schedule = DifficultySchedule(schedule)
        except (TypeError, ValueError) as e:
            raise ValueError(f"InFitRounds.schedule: {e}") from e
        first = self.schedule.first_round()
        if first is None or first < 2:
            raise ValueError("InFitRounds.schedule: give stages with from_round >= 2 (round 1 trains with the "
                             f"data config's own negatives), got {self.schedule.to_list()}")
        unknown = set(mine or {}) - set(MINE_DEFAULTS)
        if unknown:
            raise ValueError(f"InFitRounds.mine: unknown keys {sorted(unknown)}; expected some of "
                             f"{sorted(MINE_DEFAULTS)}")
        if (mine or {}).get("query_draws", "canonical") not in ("canonical", "train"):
            raise ValueError(f"InFitRounds.mine.query_draws must be canonical or train, got {mine['query_draws']!r}")
        if not isinstance(remine, bool):
            raise ValueError(f"InFitRounds.remine must be true or false, got {remine!r}")
        taus = list(temperatures or [])
        if not all(isinstance(t, (int, float)) and math.isfinite(t) and t > 0 for t in taus):
            raise ValueError(f"InFitRounds.temperatures must be positive numbers, got {temperatures!r}")
        self.epochs_per_round, self.remine, self.temperatures = epochs_per_round, remine, [float(t) for t in taus]
        self.mine = {**MINE_DEFAULTS, **(mine or {})}
        self.output = output
        self.round = 1  # the round the next training batch belongs to
        self.sidecars: dict[int, str] = {}  # round r -> the sidecar mined with its final weights
        self._data_negatives: Any = None  # the data config's own negatives (round 1, and rounds without a stage)
        self._trainer: Trainer | None = None

    # -- Lightning --------------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        dm = trainer.datamodule
        if not hasattr(dm, "use_negatives") or not hasattr(getattr(dm, "records", None), "use_negatives"):
            raise ValueError("InFitRounds needs muco's DataModule with M3T records (data.records: "
                             "muco.data.m3t.kind.M3TRecords)")
        temperature = getattr(pl_module, "temperature", None)
        if self.temperatures and (temperature is None or temperature.learnable or temperature.schedule is not None):
            raise ValueError("InFitRounds.temperatures sets a fixed τ per round; remove model.learnable_temperature "
                             "and model.temperature_schedule, or the temperatures")
        if self.mine["shards"] is None and dm.train_weights is not None:
            raise ValueError("InFitRounds.mine.shards: data.train_shards mixes several sources; name the one to "
                             "mine for")
        if trainer.reload_dataloaders_every_n_epochs not in (0, 1):
            raise ValueError("InFitRounds swaps negatives at epoch ends, so the train dataloader must be rebuilt "
                             "every epoch; remove trainer.reload_dataloaders_every_n_epochs")
        trainer.reload_dataloaders_every_n_epochs = 1
        self._trainer = trainer
        self._data_negatives = dm.records.negatives
        # data epochs, not the trainer's: resumed at an epoch's last batch, Lightning numbers epochs one higher
        dm.add_epoch_listener(lambda epoch: self._enter(trainer, pl_module, epoch))
        self._apply(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"round": self.round, "sidecars": {str(r): p for r, p in self.sidecars.items()},
                "epochs_per_round": self.epochs_per_round}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # restored after setup() and before the first train dataloader: the resumed round applies from the start
        if state_dict.get("epochs_per_round", self.epochs_per_round) != self.epochs_per_round:
            raise ValueError(f"InFitRounds.epochs_per_round={self.epochs_per_round} but the checkpoint's run used "
                             f"{state_dict['epochs_per_round']}; a resumed run keeps its rounds")
        self.round = int(state_dict["round"])
        self.sidecars = {int(r): str(p) for r, p in state_dict.get("sidecars", {}).items()}
        if self._trainer is not None:
            self._apply(self._trainer, self._trainer.lightning_module)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        pl_module.log("rounds/round", float(self.round), batch_size=1)

    def _enter(self, trainer: Trainer, pl_module: LightningModule, epoch: int) -> None:
        """A training iterator of data epoch ``epoch`` begins: make the negatives and τ those of its round. In a
        new round the current weights are the previous round's final ones (every batch before this epoch was
        trained): mine with them first if the new round needs it."""
        round_ = epoch // self.epochs_per_round + 1
        if round_ == self.round:
            return
        finished = round_ - 1
        if self.schedule.mines_after(finished, self.remine) and finished not in self.sidecars:
            self.sidecars[finished] = self._mine(trainer, pl_module, finished)
        self.round = round_
        self._apply(trainer, pl_module)

    # -- rounds -----------------------------------------------------------------------------------------
    def negatives(self, round_: int) -> Any:
        """Round ``round_``'s ``data.records.negatives``: the schedule's stage with its sidecar, else the data
        config's own."""
        if self.schedule.at(round_) is None:
            return self._data_negatives
        return self.schedule.negatives_for(round_, self.sidecars.get(self.schedule.sidecar_round(round_, self.remine)))

    def _apply(self, trainer: Trainer, pl_module: LightningModule) -> None:
        r = self.round
        negatives = self.negatives(r)
        trainer.datamodule.use_negatives(negatives)
        if self.temperatures:
            pl_module.temperature.tau.fill_(self.temperatures[min(r, len(self.temperatures)) - 1])
        if trainer.is_global_zero:
            what = "in-batch negatives" if negatives is None else (
                f"negatives ranks {negatives.band[0]}-{negatives.band[1]} of {negatives.sidecar}, "
                f"{negatives.per_turn} per turn")
            log.info("round %d (from epoch %d): %s, tau %.4g", r, (r - 1) * self.epochs_per_round, what,
                     float(pl_module.temperature.value))

    def _mine(self, trainer: Trainer, pl_module: LightningModule, finished: int) -> str:
        """Mine with the weights at the end of round ``finished`` on every rank; the sidecar's path."""
        from muco.data.shards import resolve_shards
        from muco.encoder import MuCoEncoder
        from muco.mine.pipeline import MineConfig, mine_with, search_settings

        dm, m = trainer.datamodule, self.mine
        shard_set = resolve_shards(m["shards"] if m["shards"] is not None else dm.train_shards)
        out = Path(trainer.default_root_dir) / self.output / f"after_round{finished}"
        autocast = m["autocast"] or AUTOCAST_OF_PRECISION.get(str(trainer.precision), "none")
        margin = m["margin"]
        cfg = MineConfig(
            model=f"the weights after round {finished} (step {trainer.global_step})", shards=tuple(shard_set.urls),
            output=out, top_k=m["top_k"], margin=None if margin is None or margin < 0 else margin,
            max_ratio=m["max_ratio"], extra=m["extra"], image_policy=dm.image_policy,
            turns_per_sequence=dm.records.turns_per_sample, autocast=autocast, batch_size=m["batch_size"],
            query_chunk=m["query_chunk"], corpus_chunk=m["corpus_chunk"], num_workers=m["num_workers"],
            num_samples=shard_set.num_samples, progress=False, query_draws=m["query_draws"], draw_seed=dm.seed,
            draw_epoch=finished * self.epochs_per_round, turn_order=dm.records.turn_order)  # the next round's epoch
        wanted = {"model": f"{Path(trainer.default_root_dir).resolve()} after round {finished}",
                  "global_step": trainer.global_step, **search_settings(cfg)}
        encoder = MuCoEncoder(pl_module.tokenizer, pl_module.embedder, dm.image_policy, autocast_dtype=(
            None if autocast == "none" else autocast))
        if trainer.is_global_zero:
            log.info("round %d over at step %d: mining negatives for round %d into %s", finished,
                     trainer.global_step, finished + 1, out)
        devices = [pl_module.device] if pl_module.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # the training RNG stream is not moved by mining
            summary = mine_with(encoder, cfg, wanted)
        if summary is not None and trainer.logger is not None:
            stats = {f"rounds/mined_{k}": float(summary[k]) for k in ("mean_pos_sim", "mean_neg_sim")
                     if summary.get(k) is not None}
            stats["rounds/mined_turns_short"] = float(summary["turns_short"])
            trainer.logger.log_metrics(stats, step=trainer.global_step)
        return str(out)
