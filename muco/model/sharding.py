"""FSDP2 sharding of the backbone (Lightning's ModelParallelStrategy calls `configure_model`)."""

from __future__ import annotations

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
