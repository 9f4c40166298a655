"""MMEB-format evaluation: task data, string rules, harness, metrics, aggregation and the `muco eval` CLI.

Inside training, call ``evaluate_tasks(encode_fn, tasks, batch_size)`` with
``encode_fn = MuCoEncoder.from_parts(tokenizer, backbone, image_policy).encode_user_texts`` (see
``muco.eval.harness`` for the ``encode_fn`` contract) and tasks from ``load_task(spec, limit)``.
"""

from muco.eval.aggregate import aggregate, format_table
from muco.eval.errors import EvalDataError
from muco.eval.harness import EncodeFn, TaskResult, evaluate_task, evaluate_tasks
from muco.eval.tasks import META_TASKS, Task, TaskSpec, load_task, load_task_list, select_tasks
from muco.eval.text import MMEBQuery

__all__ = [
    "META_TASKS", "EncodeFn", "EvalDataError", "MMEBQuery", "Task", "TaskResult", "TaskSpec", "aggregate",
    "evaluate_task", "evaluate_tasks", "format_table", "load_task", "load_task_list", "select_tasks",
]
