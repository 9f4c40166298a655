"""One image-resolution policy and one image path, shared by training and evaluation (docs/method.md §10).

``ImagePolicy.prepare`` takes any image to the policy's *final* size (sides multiples of 28 inside the
min/max pixel budget, exactly what Qwen2-VL's ``smart_resize`` would pick) in a single resize, and
``patchify`` cuts final-size images into uint8 patches in Qwen2-VL's patch order. Normalisation and the
temporal copy happen on the device (``muco.model.pixels``), where they are nearly free; in the DataLoader
workers they cost several times the JPEG decode, and shipping float32 patches with the temporal copy moves
8x the bytes of uint8 ones. The stock ``Qwen2VLImageProcessorPil`` (``image_processor``) stays the
reference: on a final-size image its ``pixel_values`` equal ``muco.model.pixels.pixels_to_model`` of ours
bit for bit (tests/data/test_pixels.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import astuple, dataclass

import numpy as np
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from muco.inputs.rgb import to_rgb

MIN_SIDE = 28  # patch 14 x merge 2: the smallest side the processor accepts
PATCH, MERGE = 14, 2
FACTOR = PATCH * MERGE
PATCH_DIM = 3 * PATCH * PATCH  # one uint8 patch: (channel, row, col), no temporal copy
MAX_ASPECT = 200  # smart_resize refuses more extreme aspect ratios
_FINAL = "muco_final_size"  # PIL ``info`` key: (policy fields, size) of an image ``prepare`` produced

PRESETS: dict[str, dict] = {
    # short side 640 (LANCZOS), then clamped to <= 1,003,520 px
    "pretrain": {"min_pixels": 3136, "max_pixels": 1_003_520, "short_side": 640},
    "finetune": {"min_pixels": 200_704, "max_pixels": 1_003_520, "short_side": None},
    "eval": {"min_pixels": 200_704, "max_pixels": 1_003_520, "short_side": None},
    # the released fine-tuning range (processor min/max were ignored there)
    "released": {"min_pixels": 3136, "max_pixels": 12_845_056, "short_side": None},
    # CPU demo/tests: small images, a handful of visual tokens
    "tiny": {"min_pixels": 3136, "max_pixels": 12_544, "short_side": None},
}


@dataclass(frozen=True)
class ImagePolicy:
    """Resolution policy: ``min_pixels``/``max_pixels`` budget and an optional pre-resize of the short side."""

    min_pixels: int = 200_704
    max_pixels: int = 1_003_520
    short_side: int | None = None

    def __post_init__(self) -> None:
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ValueError(f"image policy needs 0 < min_pixels <= max_pixels, got {self}")

    @classmethod
    def preset(cls, name: str) -> ImagePolicy:
        if name not in PRESETS:
            raise ValueError(f"unknown image policy preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**PRESETS[name])

    def target(self, w: int, h: int) -> tuple[tuple[int, int], Image.Resampling]:
        """The final ``(width, height)`` of a ``w`` x ``h`` image and the filter to reach it in one resize.

        The size is the short-side resize (if any), the upsampling of sides under 28 px, then the processor's
        ``smart_resize``. The filter is LANCZOS when the policy has a short side (one resampling instead of
        LANCZOS to the short side, then BICUBIC to multiples of 28), else the processor's own BICUBIC, so the
        pixels equal the stock processor's on the original image.
        """
        resample = Image.Resampling.BICUBIC
        if self.short_side is not None:
            resample = Image.Resampling.LANCZOS
            if min(w, h) != self.short_side:
                s = self.short_side / min(w, h)
                w, h = max(1, round(w * s)), max(1, round(h * s))
        if min(w, h) < MIN_SIDE:
            s = MIN_SIDE / min(w, h)
            w, h = max(MIN_SIDE, round(w * s)), max(MIN_SIDE, round(h * s))
        th, tw = smart_resize(h, w, factor=FACTOR, min_pixels=self.min_pixels, max_pixels=self.max_pixels)
        return (tw, th), resample

    def is_final(self, image: Image.Image) -> bool:
        """Whether ``prepare`` made this image (at this size) for this policy, so it must not resize again:
        ``target`` of a final size is not always that size (short-side rounding, the pixel clamp)."""
        return image.info.get(_FINAL) == (astuple(self), image.size)

    def prepare(self, image: Image.Image, draft: bool = False) -> Image.Image:
        """The image in RGB at the policy's final size, resized at most once; a final image is kept as is.

        ``draft``: decode a not yet loaded JPEG at a reduced DCT scale that still covers the final size (much
        faster for large photos; the pixels differ slightly from a full decode, so training data only).
        The image is loaded here, so a corrupt file fails in the caller's error handling.
        """
        if self.is_final(image):
            return to_rgb(image)
        w, h = image.size
        if max(w, h) > MAX_ASPECT * min(w, h):
            raise ValueError(f"aspect ratio {w}x{h} > {MAX_ASPECT}")
        size, resample = self.target(w, h)
        if size == (w, h) and image.mode == "RGB":
            image.load()
            return image  # already final by the policy's own arithmetic: no tag needed, the caller's left as is
        if draft:
            image.draft("RGB", size)  # no-op unless an unloaded JPEG; never smaller than `size`
        image.load()
        image = to_rgb(image)
        if image.size != size:
            image = image.resize(size, resample)
        # tag it (PIL copies ``info`` along with the pixels; the size check catches any later resize or crop)
        image.info[_FINAL] = (astuple(self), image.size)
        return image

    def image_processor(self):
        """Qwen2-VL's stock PIL image processor with this policy's pixel budget (no files, no torchvision):
        the reference format (float32, normalised, temporal copy) and what exported models ship with."""
        from transformers import Qwen2VLImageProcessorPil

        return Qwen2VLImageProcessorPil(min_pixels=self.min_pixels, max_pixels=self.max_pixels)


def patchify(images: Sequence[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
    """Final-size RGB images -> ``pixel_values`` uint8 ``[patches, 3*14*14]`` and ``image_grid_thw`` ``[n, 3]``.

    Rows run in Qwen2-VL's order (2x2 merge block, then row, then column, per image); each row holds one
    patch channel-first ``(3, 14, 14)``, as the stock processor's rows minus the temporal copy.
    """
    grids = []
    for im in images:
        w, h = im.size
        if im.mode != "RGB" or w % FACTOR or h % FACTOR:
            raise ValueError(f"patchify needs RGB images with sides multiple of {FACTOR} (ImagePolicy.prepare), "
                             f"got {im.mode} {w}x{h}")
        grids.append((1, h // PATCH, w // PATCH))
    # one allocation, written in place: no per-image arrays to concatenate
    out = torch.empty((sum(g[1] * g[2] for g in grids), PATCH_DIM), dtype=torch.uint8)
    view, at = out.numpy(), 0
    for im, (_, gh, gw) in zip(images, grids):
        bh, bw = gh // MERGE, gw // MERGE
        a = np.asarray(im)  # (H, W, C)
        # (bh, mh, ph, bw, mw, pw, c) -> (bh, bw, mh, mw, c, ph, pw): the stock patchify's axis order
        view[at : at + gh * gw].reshape(bh, bw, MERGE, MERGE, 3, PATCH, PATCH)[...] = (
            a.reshape(bh, MERGE, PATCH, bw, MERGE, PATCH, 3).transpose(0, 3, 1, 4, 6, 2, 5))
        at += gh * gw
    return out, torch.tensor(grids, dtype=torch.long).reshape(-1, 3)
