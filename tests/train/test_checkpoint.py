import torch

from muco.encoder import MuCoEncoder, load_encoder
from muco.model.backbone import AdapterConfig, BackboneConfig
from muco.train.module import MuCoModule


def test_adapter_checkpoint_drops_frozen_weights_and_reloads_equal(tmp_path, photos):
    module = MuCoModule(tokenizer="tiny", backbone=BackboneConfig(preset="tiny", adapter=AdapterConfig(r=4, alpha=8)),
                        eval_image_policy="tiny")
    with torch.no_grad():
        for _, p in module.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))  # a "trained" adapter and token rows
    ckpt = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(ckpt)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert set(ckpt["state_dict"]) >= trainable
    assert len(ckpt["state_dict"]) < len(module.state_dict()), "frozen base weights were kept"
    torch.save(ckpt, tmp_path / "m.ckpt")

    loaded = load_encoder(tmp_path / "m.ckpt")
    ref = MuCoEncoder.from_parts(module.tokenizer, module.embedder.backbone, "tiny")
    texts, images = ["a digit", "caption of a cat"], [photos[0], None]
    assert torch.allclose(loaded.embed(texts, images), ref.embed(texts, images), atol=1e-6)
