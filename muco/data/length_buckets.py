"""Length bucketing, the stream's optional batching stage (``data.length_bucketing``): less padding per batch.

A padded batch computes every row at the width of its longest sequence, so samples of mixed lengths waste
positions (``perf/token_efficiency`` in training). With bucketing a worker takes a *window* of
``window * batch_size`` decoded samples as they leave the shuffle buffer, sorts them by a cheap length estimate
(the record kind's :meth:`~muco.data.kinds.RecordKind.length_key`), cuts the sorted run into batches of
similar lengths and delivers those batches in a seeded random order, so short and long batches stay mixed over
training. The window is the only new state: exact resume re-decodes the current window
(:class:`~muco.data.position.WindowPosition`).

Padding does not change an embedding (the attention mask hides it), so a bucketed batch embeds each sample as a
mixed one does; only which samples share a batch (in-batch negatives) changes, within a window.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from typing import Any

from PIL import Image

from muco.inputs.image_policy import FACTOR, ImagePolicy

# length_key(decoded sample) -> its estimated token count (only the order matters)
LengthKey = Callable[[Any], int]

CHARS_PER_TOKEN = 4  # a rough text estimate: the key only has to order samples, not count their tokens


def visual_tokens(image: Image.Image | None, policy: ImagePolicy) -> int:
    """Visual tokens of ``image`` under ``policy`` (one per 28x28 merged patch); 0 without an image. The
    stream's decoders bring images to their final size already; another image is sized by the policy."""
    if image is None:
        return 0
    w, h = image.size
    if not policy.is_final(image):
        (w, h), _ = policy.target(w, h)
    return (w // FACTOR) * (h // FACTOR)


def text_tokens(texts: Iterable[str | None]) -> int:
    """Estimated tokens of ``texts`` (characters / 4, without tokenising: the key runs on every sample)."""
    return sum(len(t) for t in texts if t) // CHARS_PER_TOKEN


class LengthBuckets:
    """Cuts a window of samples into batches of similar length, in a random order.

    ``window``: batches per window (``data.length_bucketing``); ``key``: the record kind's length estimate.
    """

    def __init__(self, key: LengthKey, window: int, batch_size: int) -> None:
        if window < 1 or batch_size < 1:
            raise ValueError(f"length bucketing needs window >= 1 and batch_size >= 1, got {window}, {batch_size}")
        self.key, self.window, self.batch_size = key, window, batch_size

    def window_batches(self, index: int, quota: int | None) -> int:
        """Batches in window ``index`` of a worker that delivers ``quota`` batches per epoch (None: unbounded).
        The last window is cut to the quota, so an epoch delivers every sample of the windows it reads, the same
        samples as without bucketing; past the quota (only after a batch failed to collate) windows are full."""
        if quota is None:
            return self.window
        left = quota - index * self.window
        return min(self.window, left) if left > 0 else self.window

    def batches(self, samples: list[Any], rng: random.Random) -> list[list[Any]]:
        """``samples`` (a whole number of batches) sorted by length, ties in arrival order, cut into batches,
        the batches shuffled by ``rng``."""
        bs = self.batch_size
        if len(samples) % bs:
            raise ValueError(f"a window of {len(samples)} samples is not a whole number of batches of {bs}")
        lengths = [self.key(s) for s in samples]
        order = sorted(range(len(samples)), key=lambda i: (lengths[i], i))
        out = [[samples[i] for i in order[j : j + bs]] for j in range(0, len(order), bs)]
        rng.shuffle(out)
        return out
