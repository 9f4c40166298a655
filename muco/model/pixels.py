"""uint8 patches -> the float ``pixel_values`` Qwen2-VL's vision tower expects, on the tensor's own device.

The data path (``muco.inputs.image_policy.patchify``) ships ``[patches, 3*14*14]`` uint8: a quarter of the
bytes of float32 and half again without the temporal copy, and no float work in the DataLoader workers.
Here each value goes through a 3x256 lookup table built with the stock processor's own ``rescale`` and
``normalize`` (float64 rescale by 1/255, cast to float32, then ``(x - mean) / std`` in float32), so the result
equals ``Qwen2VLImageProcessorPil``'s output bit for bit on any device and under any compiler. Arithmetic
would depend on how it is evaluated: the fused form ``v * (1/255/std) - mean/std`` (what a compiler may turn
the division into) differs from the stock values by a rounding step (up to 2.4e-7) for 64% of the 768
entries. Then each patch is duplicated for ``temporal_patch_size=2`` (a still image is a two-frame clip of
itself) and laid out as ``[patches, 1176]``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

CHANNELS, PATCH, TEMPORAL = 3, 14, 2
UINT8_DIM = CHANNELS * PATCH * PATCH  # 588
FLOAT_DIM = CHANNELS * TEMPORAL * PATCH * PATCH  # 1176


def _stock_table() -> torch.Tensor:
    """``[3 * 256]`` float32: entry ``c * 256 + v`` is what the stock processor makes of value ``v`` in channel
    ``c``, computed by its own functions and constants (one fake 1x256 image per channel)."""
    from transformers import Qwen2VLImageProcessorPil
    from transformers.image_transforms import normalize, rescale
    from transformers.image_utils import ChannelDimension

    proc = Qwen2VLImageProcessorPil
    values = np.broadcast_to(np.arange(256, dtype=np.uint8), (CHANNELS, 1, 256))  # channel-first image
    first = ChannelDimension.FIRST
    x = rescale(values, proc.rescale_factor, data_format=first, input_data_format=first)
    x = normalize(x, proc.image_mean, proc.image_std, data_format=first, input_data_format=first)
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32).reshape(-1))


_TABLE = _stock_table()  # built once per process at import (cheap), a plain CPU tensor
_CHANNEL_OFFSET = (torch.arange(CHANNELS, dtype=torch.int32) * 256).view(1, CHANNELS, 1)


def pixels_to_model(pixel_values: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """uint8 ``[n, 588]`` -> normalised ``[n, 1176]`` in ``dtype`` (default float32) on the same device.

    Float ``pixel_values`` (the stock processor's format) are returned unchanged, so callers may pass either.
    Casting the table before the lookup equals casting the float32 result, at half the memory for bf16.
    """
    if pixel_values.is_floating_point():
        return pixel_values
    if pixel_values.dtype != torch.uint8 or pixel_values.dim() != 2 or pixel_values.shape[1] != UINT8_DIM:
        raise ValueError(f"pixel_values must be float [n, {FLOAT_DIM}] or uint8 [n, {UINT8_DIM}], got "
                         f"{pixel_values.dtype} {list(pixel_values.shape)}")
    device = pixel_values.device
    table = _TABLE.to(device=device, dtype=dtype or torch.float32)
    n = pixel_values.shape[0]
    index = pixel_values.reshape(n, CHANNELS, PATCH * PATCH).int() + _CHANNEL_OFFSET.to(device)
    x = table[index]  # [n, 3, 196]
    return x.unsqueeze(2).expand(n, CHANNELS, TEMPORAL, PATCH * PATCH).reshape(n, FLOAT_DIM)


def vision_dtype(backbone: nn.Module) -> torch.dtype:
    """The dtype of the vision tower's patch embedding (what it casts ``pixel_values`` to anyway), looked up
    through PEFT wrappers; else the first floating parameter's, else float32."""
    model = backbone.get_base_model() if callable(getattr(backbone, "get_base_model", None)) else backbone
    for path in (("visual",), ("model", "visual")):  # Qwen2VLModel, Qwen2VLForConditionalGeneration
        m: object = model
        for name in (*path, "patch_embed", "proj", "weight"):
            m = getattr(m, name, None)
        if isinstance(m, torch.Tensor):
            return m.dtype
    return next((p.dtype for p in backbone.parameters() if p.is_floating_point()), torch.float32)
