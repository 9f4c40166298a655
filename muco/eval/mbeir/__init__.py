"""M-BEIR evaluation (docs/method.md §12b, docs/evaluation.md "M-BEIR"): the released UniIR file formats, MuCo
query/candidate texts with the M-BEIR instructions, exact chunked search over the global and local pools,
Recall@k and the modality-group aggregate.

``evaluate_mbeir(encode_fn, load_mbeir_config("configs/eval/mbeir.yaml"))`` runs everything in one call with
the same ``encode_fn`` as the MMEB harness (``MuCoEncoder.encode_user_texts``); ``muco eval --benchmark mbeir``
adds result files, reruns and per-task failures.
"""

from muco.eval.mbeir.aggregate import aggregate, format_table
from muco.eval.mbeir.data import (
    MBeirCandidate,
    MBeirQuery,
    Qrels,
    read_instructions,
    read_pool,
    read_qrels,
    read_queries,
)
from muco.eval.mbeir.harness import (
    POOLS,
    MBeirTask,
    MBeirTaskResult,
    build_store,
    encode_queries,
    evaluate_mbeir,
    global_pool_candidates,
    load_mbeir_task,
    needs_local_pools,
    rank_queries,
    score_mbeir_task,
)
from muco.eval.mbeir.search import CandidateStore, PoolIndex, first_relevant_ranks, recall_at
from muco.eval.mbeir.tasks import (
    GROUPS,
    TASK_MODALITIES,
    MBeirConfig,
    MBeirTaskSpec,
    load_mbeir_config,
    select_mbeir_tasks,
)
from muco.eval.mbeir.text import candidate_user_text, format_string, pick_instruction, query_user_text

__all__ = [
    "GROUPS", "POOLS", "TASK_MODALITIES", "CandidateStore", "MBeirCandidate", "MBeirConfig", "MBeirQuery",
    "MBeirTask", "MBeirTaskResult", "MBeirTaskSpec", "PoolIndex", "Qrels", "aggregate", "build_store",
    "candidate_user_text", "encode_queries", "evaluate_mbeir", "first_relevant_ranks", "format_string",
    "format_table", "global_pool_candidates", "load_mbeir_config", "load_mbeir_task", "needs_local_pools",
    "pick_instruction", "query_user_text", "rank_queries", "read_instructions", "read_pool", "read_qrels",
    "read_queries", "recall_at", "score_mbeir_task", "select_mbeir_tasks",
]
