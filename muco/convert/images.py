"""Images for the shards: read from the image root, fully decoded once, stored as is or re-encoded as JPEG."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from PIL import Image

from muco.inputs.rgb import to_rgb

KEEP_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}  # stored as is; others -> JPEG


class ImageError(ValueError):
    """An image a record cannot use; ``reason`` (``missing_image``, ``bad_path``, ``bad_image``) is its category
    in the rejects and the summary."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


def load_image(root: str, rel: Any, max_side: int | None, quality: int) -> tuple[str, bytes]:
    """(extension, bytes) of a fully decodable image; re-encoded as JPEG only when resized or exotic."""
    if not isinstance(rel, str) or not rel:
        raise ImageError("missing_image", "has no image path")
    if os.path.isabs(rel) or ".." in Path(rel).parts:
        raise ImageError("bad_path", f"image path {rel!r} must stay inside the image root")
    path = os.path.join(root, rel)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ImageError("missing_image", f"image {path} cannot be read ({e.strerror or e})") from None
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if max(w, h) > 200 * min(w, h):  # Qwen2-VL's processor refuses such aspect ratios
                raise ImageError("bad_image", f"image {path} has aspect ratio {w}x{h} > 200")
            ext = KEEP_FORMATS.get(im.format or "")
            if max_side and max(w, h) > max_side:
                s = max_side / max(w, h)
                size = (max(1, round(w * s)), max(1, round(h * s)))
                im.draft("RGB", size)  # JPEG: decode at a reduced DCT scale, >= size
                out = to_rgb(im).resize(size, Image.Resampling.LANCZOS)
            else:
                im.load()  # a full decode catches truncated files that Image.open accepts
                if ext is not None:
                    return ext, data
                out = to_rgb(im)
    except ImageError:
        raise
    except Exception as e:  # Pillow raises many kinds (OSError, ValueError, SyntaxError, struct.error, ...)
        raise ImageError("bad_image", f"image {path} is unreadable ({type(e).__name__}: {e})") from None
    buf = io.BytesIO()
    out.save(buf, format="JPEG", quality=quality)
    return "jpg", buf.getvalue()


__all__ = ["KEEP_FORMATS", "ImageError", "load_image"]
