"""Training in rounds (`muco rounds`): fit, evaluate, mine hard negatives with the current model, repeat."""

from muco.rounds.config import RoundsConfig, round_temperatures
from muco.rounds.runner import RoundsRunner

__all__ = ["RoundsConfig", "RoundsRunner", "round_temperatures"]
