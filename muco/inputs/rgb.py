"""Decoded images as 8-bit RGB. Kept apart from the resolution policy so that processes which only read
images (the converter's workers, the eval's loaders) do not import transformers."""

from __future__ import annotations

import numpy as np
from PIL import Image

HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any image Pillow decodes as 8-bit RGB with its real contrast.

    ``Image.convert("RGB")`` clips 16- and 32-bit grey values at 255 (a 16-bit scan comes out nearly white)
    and drops alpha (what is under transparent pixels is often black). High-bit images are rescaled from
    their type's range (16-bit: /257; 32-bit integer and float: from their own minimum..maximum), and images
    with transparency are composited on white. Palette and CMYK images go through Pillow's own conversion.
    """
    if image.mode == "RGB":
        image.load()  # decoded now: callers may close the file right after
        return image
    if image.mode in HIGH_BIT_MODES:
        arr = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16"):
            arr = arr / 257.0
        else:
            lo, hi = float(arr.min()), float(arr.max())
            arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


__all__ = ["HIGH_BIT_MODES", "to_rgb"]
