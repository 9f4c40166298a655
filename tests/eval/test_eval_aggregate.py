"""Aggregation against hand-computed tables; the plain-text result table."""

from __future__ import annotations

import pytest

from muco.eval.aggregate import aggregate, format_table
from muco.eval.tasks import META_TASKS, TaskSpec

SPECS = [
    TaskSpec("A", "classification", "ind"), TaskSpec("B", "classification", "ood"),
    TaskSpec("C", "vqa", "ind"),
    TaskSpec("D", "retrieval", "ind"), TaskSpec("E", "retrieval", "ood"), TaskSpec("F", "retrieval", "ood"),
    TaskSpec("G", "grounding", "ood"),
]
SCORES = {"A": 0.5, "B": 0.7, "C": 0.2, "D": 0.4, "E": 0.6, "F": 0.8, "G": 0.9}


def test_hand_computed_table():
    agg = aggregate(SCORES, SPECS)
    meta = {m: agg["meta_tasks"][m]["score"] for m in META_TASKS}
    assert meta == pytest.approx({"classification": 0.6, "vqa": 0.2, "retrieval": 0.6, "grounding": 0.9})
    assert agg["splits"]["ind"]["score"] == pytest.approx((0.5 + 0.2 + 0.4) / 3)
    assert agg["splits"]["ood"]["score"] == pytest.approx((0.7 + 0.6 + 0.8 + 0.9) / 4)
    # Overall is the mean over datasets (4.1 / 7), not over the meta-task scores (2.3 / 4)
    assert agg["overall"]["score"] == pytest.approx(4.1 / 7)
    assert agg["overall"]["score"] != pytest.approx(sum(meta.values()) / 4)
    assert agg["overall"]["n"] == agg["overall"]["expected"] == 7
    assert agg["meta_tasks"]["retrieval"]["n"] == 3


def test_method_md_check_with_muco_7b_meta_scores():
    # 36 datasets whose scores equal their meta-task score give (68.3*10 + 71.9*10 + 73.7*12 + 90.9*4)/36
    counts = {"classification": 10, "vqa": 10, "retrieval": 12, "grounding": 4}
    meta = {"classification": 0.683, "vqa": 0.719, "retrieval": 0.737, "grounding": 0.909}
    specs = [TaskSpec(f"{m}{i}", m, "ind" if i % 2 else "ood") for m, n in counts.items() for i in range(n)]
    agg = aggregate({s.name: meta[s.meta_task] for s in specs}, specs)
    assert round(100 * agg["overall"]["score"], 1) == 73.6
    assert round(100 * sum(meta.values()) / 4, 1) == 76.2  # what averaging meta-tasks would wrongly give


def test_partial_results_and_unknown_tasks():
    agg = aggregate({"A": 1.0, "C": 0.0}, SPECS)
    assert agg["meta_tasks"]["grounding"] == {"score": None, "n": 0, "expected": 1, "partial": True,
                                              "missing": ["G"]}
    assert agg["overall"] == {"score": 0.5, "n": 2, "expected": 7, "partial": True,
                              "missing": ["B", "D", "E", "F", "G"]}
    assert agg["meta_tasks"]["vqa"]["partial"] is False and agg["meta_tasks"]["vqa"]["missing"] == []
    assert aggregate(SCORES, SPECS)["overall"]["partial"] is False
    with pytest.raises(ValueError, match="not in the task list"):
        aggregate({"Z": 1.0}, SPECS)


def test_format_table_is_aligned_and_holds_the_aggregates():
    results = {k: {"precision@1": v, "hit@5": 1.0, "mrr": v, "ndcg@10": v}
               for k, v in SCORES.items() if k != "G"}
    table = format_table(results, SPECS)
    lines = table.splitlines()
    assert lines[0].split() == ["dataset", "meta-task", "split", "precision@1", "hit@5", "mrr", "ndcg@10"]
    col_end = lines[0].index("precision@1") + len("precision@1")
    row_a = next(line for line in lines if line.startswith("A "))
    assert row_a[col_end - 4 : col_end] == "50.0"  # right-aligned under its header
    overall = next(line for line in lines if line.startswith("Overall"))
    assert overall.startswith("Overall (6/7)") and overall[col_end - 4 : col_end] == "53.3"
    grounding = next(line for line in lines if line.startswith("Visual grounding"))
    assert grounding.rstrip().endswith("-")
    assert next(line for line in lines if line.startswith("G ")).split()[3] == "-"
    assert lines[-1] == "partial: 6 of 7 datasets scored; the aggregates average only those. Not scored: G"
    assert "partial" not in format_table({k: {"precision@1": v} for k, v in SCORES.items()}, SPECS)


def test_format_table_marks_and_lists_failed_tasks():
    results = {k: {"precision@1": v} for k, v in SCORES.items() if k not in "BG"}
    table = format_table(results, SPECS, failed={"G": "task G, row 3 (qry_img_path), image /x.png: image file "
                                                      "not found"})
    lines = table.splitlines()
    assert next(line for line in lines if line.startswith("G ")).split()[3] == "FAILED"
    assert next(line for line in lines if line.startswith("B ")).split()[3] == "-"
    assert lines[-2:] == [
        "partial: 5 of 7 datasets scored; the aggregates average only those. Not scored: B, G (failed)",
        "FAILED G: task G, row 3 (qry_img_path), image /x.png: image file not found",
    ]
