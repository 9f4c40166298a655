"""Pictures of retrieval for TensorBoard, drawn from scored MMEB-format tasks (:class:`TaskScores`).

Three views of the same fixed subset, the first ``n`` queries of each task (the task files' order, so the
subset is the same at every validation and the pictures can be compared over training):

- an embedding projector of the queries, each shown by its image thumbnail (a text tile when it has none),
  with its task, gold label and whether top-1 hit as metadata;
- a grid of retrieval examples: per row a query, then its top-``k`` candidates, framed green when relevant
  and red when not;
- histograms, per task, of each query's positive similarity and its hardest negative's.

Nothing here encodes: the scores are those the validation metrics were computed from.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from muco.eval.harness import TaskScores
from muco.inputs.rgb import to_rgb

HIT, MISS, PAPER, INK = (40, 170, 70), (210, 50, 50), (245, 245, 240), (30, 30, 30)


@lru_cache(maxsize=256)
def _image(path: Path, size: int) -> Image.Image:
    with Image.open(path) as im:
        im = to_rgb(im)
        im.thumbnail((size, size))
    tile = Image.new("RGB", (size, size), PAPER)
    tile.paste(im, ((size - im.width) // 2, (size - im.height) // 2))
    return tile


def tile(path: Path | None, text: str, size: int) -> Image.Image:
    """A ``size`` x ``size`` picture of an item: its image scaled to fit, else its text, wrapped."""
    if path is not None:
        try:
            return _image(path, size).copy()
        except OSError:  # the metrics were computed from it, so only a file replaced since then lands here
            text = f"[unreadable image] {text}"
    im = Image.new("RGB", (size, size), PAPER)
    font = ImageFont.load_default()
    chars = max(4, size // 6)
    lines = textwrap.wrap(" ".join(text.split()), chars)[: max(1, size // 11)]
    ImageDraw.Draw(im).multiline_text((2, 2), "\n".join(lines), fill=INK, font=font, spacing=1)
    return im


def framed(im: Image.Image, color: tuple[int, int, int], width: int = 3) -> Image.Image:
    out = im.copy()
    ImageDraw.Draw(out).rectangle([0, 0, im.width - 1, im.height - 1], outline=color, width=width)
    return out


def retrieval_grid(scored: TaskScores, rows: Sequence[int], k: int = 5, size: int = 64) -> np.ndarray:
    """HWC uint8: for each query in ``rows``, the query, a gap, then its top-``k`` candidates (best first),
    framed green when relevant and red when not."""
    gap = size // 4
    width = size * (k + 1) + gap
    grid = Image.new("RGB", (width, size * max(1, len(rows))), (255, 255, 255))
    for r, qi in enumerate(rows):
        grid.paste(tile(scored.query_paths[qi], scored.query_texts[qi], size), (0, r * size))
        ids, scores, relevant = scored.lists[qi], scored.scores[qi], scored.relevant(qi)
        for c, j in enumerate(scores.argsort(descending=True, stable=True)[:k].tolist()):
            cand = int(ids[j])
            im = tile(scored.cand_paths[cand], scored.cand_texts[cand], size)
            grid.paste(framed(im, HIT if relevant[j] else MISS), (size + gap + c * size, r * size))
    return np.asarray(grid)


def positive_and_hardest_negative(scored: TaskScores, rows: Sequence[int] | None = None
                                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query (of ``rows``, default all): its best relevant score and its best irrelevant one (queries whose
    list holds no irrelevant candidate have no hardest negative and are left out of the second)."""
    rows = range(len(scored.lists)) if rows is None else rows
    pos, neg = [], []
    for qi in rows:
        s, r = scored.scores[qi], scored.relevant(qi)
        pos.append(s[r].max())
        if (~r).any():
            neg.append(s[~r].max())
    empty = torch.empty(0)
    return (torch.stack(pos) if pos else empty), (torch.stack(neg) if neg else empty)


def projector_inputs(tasks: Sequence[TaskScores], n: int, size: int = 32
                     ) -> tuple[torch.Tensor, list[list[str]], torch.Tensor]:
    """(embeddings [N, d], metadata rows [task, gold label, top-1 hit], thumbnails [N, 3, size, size] in [0, 1])
    of the first ``n`` queries of every task."""
    mats, meta, thumbs = [], [], []
    for t in tasks:
        rows = range(min(n, len(t.lists)))
        for qi in rows:
            ids, s = t.lists[qi], t.scores[qi]
            gold = t.cand_texts[int(ids[0])]
            hit = bool(t.relevant(qi)[int(s.argmax())])
            meta.append([t.task.name, " ".join(gold.split())[:60] or "(empty)", "hit" if hit else "miss"])
            thumbs.append(np.asarray(tile(t.query_paths[qi], t.query_texts[qi], size)))
        mats.append(t.queries[: len(rows)])
    if not meta:
        return torch.empty(0, 0), [], torch.empty(0, 3, size, size)
    images = torch.from_numpy(np.stack(thumbs)).permute(0, 3, 1, 2).float() / 255.0
    return torch.cat(mats), meta, images


def log_pictures(writer: Any, tasks: Sequence[TaskScores], step: int, n: int = 16, grid_rows: int = 4,
                 k: int = 5) -> None:
    """Write the three views of the first ``n`` queries of each task to a TensorBoard ``SummaryWriter``:
    ``val_pictures/<task>`` (the grid of the first ``grid_rows``), ``val_similarity/<task>/{positive,
    hardest_negative}`` and the projector (tag ``val_queries``)."""
    for t in tasks:
        rows = range(min(n, len(t.lists)))
        if not rows:
            continue
        writer.add_image(f"val_pictures/{t.task.name}", retrieval_grid(t, rows[:grid_rows], k), step,
                         dataformats="HWC")
        pos, neg = positive_and_hardest_negative(t, rows)
        writer.add_histogram(f"val_similarity/{t.task.name}/positive", pos, step)
        if len(neg):
            writer.add_histogram(f"val_similarity/{t.task.name}/hardest_negative", neg, step)
    mat, meta, images = projector_inputs(tasks, n)
    if meta:
        writer.add_embedding(mat, metadata=meta, label_img=images, global_step=step, tag="val_queries",
                             metadata_header=["task", "label", "top1"])


__all__ = ["log_pictures", "positive_and_hardest_negative", "projector_inputs", "retrieval_grid", "tile"]
