"""MMEB-format tasks as a validation hook inside `fit`."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from torch import nn
from transformers import PreTrainedTokenizerBase

from muco.eval.aggregate import aggregate
from muco.eval.harness import TaskScores, score_task, task_result
from muco.eval.tasks import Task, load_task, load_task_list


@lru_cache(maxsize=4)
def _tasks(path: str, limit: int | None) -> tuple[list, tuple[Task, ...]]:
    specs = load_task_list(path)
    return specs, tuple(load_task(s, limit=limit) for s in specs)


def check_val_tasks(task_list: str, limit: int | None = 100) -> None:
    """Load the task list and every task's data now (before training), so a missing or malformed file fails at
    once with its name instead of at the first validation."""
    if not Path(task_list).is_file():
        raise FileNotFoundError(f"model.val_tasks={task_list} does not exist; point it at an MMEB-format task list "
                                "(e.g. configs/eval/mmeb.yaml) or set it to null")
    try:
        _tasks(task_list, limit)
    except (OSError, ValueError) as e:
        raise ValueError(f"model.val_tasks={task_list}: {e}") from e


def score_val_tasks(tokenizer: PreTrainedTokenizerBase, backbone: nn.Module, task_list: str, image_policy: str,
                    limit: int | None = 100, batch_size: int = 32) -> list[TaskScores]:
    """Every task of the list (its first ``limit`` queries) encoded with the training weights and scored."""
    from muco.encoder import MuCoEncoder

    _, tasks = _tasks(task_list, limit)
    encoder = MuCoEncoder.from_parts(tokenizer, backbone, image_policy)
    return [score_task(encoder.encode_user_texts, t, batch_size) for t in tasks]


def val_metrics(scored: list[TaskScores], task_list: str, limit: int | None = 100) -> dict[str, float]:
    """``val/<task>/precision@1`` per task plus ``val/overall`` (mean over tasks, as MMEB's overall)."""
    specs, _ = _tasks(task_list, limit)
    results = {t.task.name: task_result(t, 0.0).metrics for t in scored}
    out = {f"val/{name}/precision@1": m["precision@1"] for name, m in results.items()}
    agg = aggregate({k: v["precision@1"] for k, v in results.items()}, specs)
    out["val/overall"] = float(agg["overall"]["score"])
    return out


def run_val_tasks(tokenizer: PreTrainedTokenizerBase, backbone: nn.Module, task_list: str, image_policy: str,
                  limit: int | None = 100, batch_size: int = 32) -> dict[str, float]:
    """:func:`val_metrics` of :func:`score_val_tasks`."""
    return val_metrics(score_val_tasks(tokenizer, backbone, task_list, image_policy, limit, batch_size),
                       task_list, limit)
