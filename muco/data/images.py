"""Image bytes from a shard -> a decoded image at the policy's final size (one resize in all)."""

from __future__ import annotations

import io

from PIL import Image

from muco.inputs.image_policy import MAX_ASPECT, ImagePolicy
from muco.inputs.sequence import BadSampleError


def load_image(data: bytes, policy: ImagePolicy) -> Image.Image:
    """Decode (a JPEG at a reduced DCT scale when that still covers the target) and resize once, to the
    policy's final size; the collator's ``policy.prepare`` then keeps it as it is."""
    im = Image.open(io.BytesIO(data))
    w, h = im.size
    if max(w, h) > MAX_ASPECT * min(w, h):
        raise BadSampleError(f"aspect ratio {w}x{h} > {MAX_ASPECT}")
    return policy.prepare(im, draft=True)  # decodes here: a corrupt file fails inside the skip handler
