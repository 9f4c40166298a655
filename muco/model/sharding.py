"""FSDP2 sharding of the backbone (Lightning's ModelParallelStrategy calls `configure_model`), and what a
sharded backbone asks of every forward.

Under FSDP2 a sharded block gathers its weights from all ranks when it runs (and scatters its gradients in the
backward), so every rank must run the same blocks in the same order. Two cases break that and are handled here
and by the callers: a forward whose batch has images on some ranks but not on others (the vision tower would
run on some ranks only: :func:`vision_on_every_rank`), and ranks running different numbers of forwards (mining
a share of a corpus: :class:`muco.mine.dist.Lockstep`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

from muco.model.backbone import unwrap_qwen2vl


def fully_shard_backbone(backbone: nn.Module, device_mesh, mixed_precision=None) -> None:
    """Shard every vision block and decoder layer, then the module whose forward is called.

    A root `fully_shard` on the LightningModule would never run its pre-forward hook (the step calls
    `backbone(...)`), which mixes DTensors and tensors in the embedding lookup and fails.
    """
    from torch.distributed.fsdp import fully_shard

    mesh = device_mesh["data_parallel"] if "data_parallel" in (device_mesh.mesh_dim_names or ()) else device_mesh
    kw = {"mesh": mesh}
    if mixed_precision is not None:
        kw["mp_policy"] = mixed_precision
    qwen = unwrap_qwen2vl(backbone)
    for block in qwen.visual.blocks:
        fully_shard(block, **kw)
    for layer in qwen.language_model.layers:
        fully_shard(layer, **kw)
    fully_shard(backbone, **kw)


def is_sharded(module: nn.Module) -> bool:
    """True for a module `fully_shard` has wrapped (FSDP2) in a job of more than one process."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule) and dist.is_available() and dist.is_initialized() \
        and dist.get_world_size() > 1


@contextmanager
def vision_on_every_rank(backbone: nn.Module, has_images: bool, device: torch.device) -> Iterator[None]:
    """Around one forward of a sharded ``backbone``: when some rank's batch has images and this one's has none,
    run the vision tower here too, on one blank 28x28 image, right before the language model (where the ranks
    with images run it), and add 0 x its output to the language model's input, so that the backward also
    passes through the same blocks. One all-reduce of a flag per forward; nothing changes when every rank's
    batch has images or none has. Outside FSDP2 this is a no-op."""
    if not is_sharded(backbone):
        yield
        return
    flag = torch.tensor([1.0 if has_images else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if has_images or flag.item() == 0:
        yield
        return
    qwen = unwrap_qwen2vl(backbone)

    def run_vision(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        embed = qwen.visual.patch_embed
        merge = qwen.visual.spatial_merge_size
        pixels = torch.zeros(merge * merge, embed.in_channels * embed.temporal_patch_size * embed.patch_size ** 2,
                             dtype=embed.proj.weight.dtype, device=device)
        out = qwen.visual(pixels, grid_thw=torch.tensor([[1, merge, merge]], device=device))
        out = getattr(out, "pooler_output", out)
        inputs_embeds = kwargs["inputs_embeds"]
        kwargs["inputs_embeds"] = inputs_embeds + 0 * out.sum().to(inputs_embeds.dtype)
        return args, kwargs

    handle = qwen.language_model.register_forward_pre_hook(run_vision, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
