"""Validation pictures: the retrieval grid marks hits and misses, the similarity split, the projector inputs, and
what a real SummaryWriter records."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from muco.eval.harness import TaskScores
from muco.eval.pictures import HIT, MISS, log_pictures, positive_and_hardest_negative, projector_inputs, retrieval_grid
from muco.eval.tasks import Task, TaskSpec


def scored(image_dir, n_queries: int = 3) -> TaskScores:
    """Query 0 ranks its gold (candidate 0) first; query 1 ranks it third; query 2's list is only golds."""
    spec = TaskSpec(name="digits", meta_task="classification", split="ind")
    lists = [torch.tensor([0, 1, 2, 3]), torch.tensor([1, 0, 2, 3]), torch.tensor([2, 2])][:n_queries]
    scores = [torch.tensor([0.9, 0.5, 0.4, 0.1]), torch.tensor([0.3, 0.8, 0.6, 0.2]),
              torch.tensor([0.7, 0.7])][:n_queries]
    images = sorted(image_dir.glob("*.png"))
    return TaskScores(
        task=Task(spec, []), queries=F.normalize(torch.randn(n_queries, 8), dim=-1),
        candidates=F.normalize(torch.randn(4, 8), dim=-1), lists=lists, scores=scores,
        cand_names=["zero", "one", "two", "three"], cand_texts=["zero", "one", "two", "three"],
        cand_paths=[None] * 4, query_texts=[f"<|image_pad|> which digit? {i}" for i in range(n_queries)],
        query_paths=[images[i] for i in range(n_queries)], refs=10, conflicts=0)


def frame_color(grid: np.ndarray, row: int, col: int, size: int = 64) -> tuple[int, ...]:
    x = size + size // 4 + col * size  # query, gap, then the candidates
    return tuple(int(v) for v in grid[row * size + 1, x + size // 2])  # on the top edge of the frame


def test_the_grid_shows_each_query_then_its_top_k_framed_by_relevance(image_dir):
    s = scored(image_dir)
    grid = retrieval_grid(s, [0, 1], k=3)
    assert grid.shape == (2 * 64, 64 * 4 + 16, 3) and grid.dtype == np.uint8
    # query 0: gold first (hit), then two misses; query 1: its gold "one" scores 0.3, below "zero" and "two"
    assert [frame_color(grid, 0, c) for c in range(3)] == [HIT, MISS, MISS]
    assert [frame_color(grid, 1, c) for c in range(3)] == [MISS, MISS, HIT]
    assert grid[:64, :64].std() > 10  # the query's image, not a blank tile


def test_positive_and_hardest_negative_similarities(image_dir):
    pos, neg = positive_and_hardest_negative(scored(image_dir))
    assert torch.allclose(pos, torch.tensor([0.9, 0.3, 0.7]))
    assert torch.allclose(neg, torch.tensor([0.5, 0.8]))  # query 2 has no negative to be hardest


def test_projector_takes_the_first_n_queries_with_their_labels_and_thumbnails(image_dir):
    s = scored(image_dir)
    mat, meta, images = projector_inputs([s], n=2, size=16)
    assert torch.equal(mat, s.queries[:2])
    assert meta == [["digits", "zero", "hit"], ["digits", "one", "miss"]]
    assert images.shape == (2, 3, 16, 16) and 0 <= images.min() and images.max() <= 1


def test_a_summary_writer_records_images_histograms_and_the_projector(image_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(tmp_path)) as writer:
        log_pictures(writer, [scored(image_dir)], step=7, n=3)
    ea = EventAccumulator(str(tmp_path), size_guidance={"images": 0, "histograms": 0})
    ea.Reload()
    tags = ea.Tags()
    assert tags["images"] == ["val_pictures/digits"]
    assert sorted(tags["histograms"]) == ["val_similarity/digits/hardest_negative", "val_similarity/digits/positive"]
    assert ea.Histograms("val_similarity/digits/positive")[0].histogram_value.num == 3
    assert ea.Images("val_pictures/digits")[0].step == 7
    config = (tmp_path / "projector_config.pbtxt").read_text()
    assert 'tensor_name: "val_queries:00007"' in config and "sprite" in config
    assert (tmp_path / "00007" / "val_queries" / "metadata.tsv").read_text().splitlines() == [
        "task\tlabel\ttop1", "digits\tzero\thit", "digits\tone\tmiss", "digits\ttwo\thit"]
