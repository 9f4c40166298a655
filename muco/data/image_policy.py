"""One image-resolution policy shared by training and evaluation (METHOD.md §10).

The policy resizes with PIL (optional short-side resize, tiny images upsampled) and hands the image to Qwen2-VL's
PIL image processor with an explicit min/max pixel budget, so the processor can never silently fall back to
its defaults (pitfall 4 of the released code).
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

MIN_SIDE = 28  # patch 14 x merge 2: the smallest side the processor accepts

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

    def prepare(self, image: Image.Image) -> Image.Image:
        """RGB, short side resized when the policy says so, and no side below 28 px."""
        if image.mode != "RGB":
            image = image.convert("RGB")
        w, h = image.size
        if self.short_side is not None and min(w, h) != self.short_side:
            scale = self.short_side / min(w, h)
            w, h = max(1, round(w * scale)), max(1, round(h * scale))
            image = image.resize((w, h), Image.Resampling.LANCZOS)
        if min(w, h) < MIN_SIDE:
            scale = MIN_SIDE / min(w, h)
            image = image.resize((max(MIN_SIDE, round(w * scale)), max(MIN_SIDE, round(h * scale))),
                                 Image.Resampling.BICUBIC)
        return image

    def image_processor(self):
        """Qwen2-VL's PIL image processor with this policy's pixel budget (no files, no torchvision)."""
        from transformers import Qwen2VLImageProcessorPil

        return Qwen2VLImageProcessorPil(min_pixels=self.min_pixels, max_pixels=self.max_pixels)
