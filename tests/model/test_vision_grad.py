"""A frozen vision tower stays out of autograd, with and without gradient checkpointing (issue 18).

`enable_input_require_grads` (what transformers and PEFT call for gradient checkpointing) hooks every input
embedding, the vision tower's ``patch_embed`` too: the frozen tower then entered the graph and was recomputed and
backpropagated through on every step. A trainable tower (the demo) still trains, checkpointed or not.
"""

from __future__ import annotations

import pytest
import torch

from muco.data.m3t.collate import PretrainCollator, PretrainSample
from muco.inputs.image_policy import ImagePolicy
from muco.inputs.sequence import SequenceEncoder
from muco.inputs.templates import finetune_template
from muco.inputs.templates import single_turn_user_text as user
from muco.inputs.tokenizer import SpecialTokenIds
from muco.losses.pretrain import pretrain_loss
from muco.model.backbone import AdapterConfig, BackboneConfig, build_backbone, unwrap_qwen2vl
from muco.model.embedder import Embedder


@pytest.fixture(scope="module")
def batch(tiny_tok, photos):
    samples = [PretrainSample(f"s{i}", photos[i], [f"query {k} about image {i}" for k in range(3)],
                              [f"target {k} for image {i}" for k in range(3)]) for i in range(3)]
    return PretrainCollator(tiny_tok, ImagePolicy.preset("tiny"))(samples)


def _build(tok, *, ckpt: bool, freeze_vision: bool, adapter: bool, like: torch.nn.Module | None = None):
    cfg = BackboneConfig(preset="tiny", freeze_vision=freeze_vision, gradient_checkpointing=ckpt,
                         adapter=AdapterConfig(r=4, alpha=8) if adapter else None)
    model = build_backbone(cfg, tok)
    if like is not None:
        model.load_state_dict(like.state_dict())
    else:  # non-zero LoRA B and token rows, so every trainable tensor gets a non-trivial gradient
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n or "trainable_tokens_delta" in n:
                    p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    return model


class VisionProbe:
    """Records whether vision-block outputs require grad, and whether a gradient ever reaches one."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.requires_grad: list[bool] = []
        self.grads = 0
        qwen = unwrap_qwen2vl(model)
        self.handles = [m.register_forward_hook(self._on_output)
                        for m in (qwen.visual.patch_embed, *qwen.visual.blocks, qwen.visual.merger)]

    def _on_output(self, _mod, _args, out) -> None:
        self.requires_grad.append(out.requires_grad)
        if out.requires_grad:
            out.register_hook(self._on_grad)

    def _on_grad(self, grad):
        self.grads += 1
        return grad


def _step(model: torch.nn.Module, tok, batch) -> dict[str, torch.Tensor]:
    emb = Embedder(model, SpecialTokenIds.from_tokenizer(tok).emb).train()
    q = emb(batch["query"], batch["num_turns"], batch["keys"])
    t = emb(batch["target"], batch["num_turns"], batch["keys"])
    pretrain_loss(q.emb, t.emb, q.sample_id, tau=0.05).loss.backward()
    assert torch.is_grad_enabled()  # grad mode comes back after the vision forward
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_frozen_vision_stays_out_of_autograd_with_checkpointing(tiny_tok, batch):
    ref_model = _build(tiny_tok, ckpt=False, freeze_vision=True, adapter=True)
    ckpt_model = _build(tiny_tok, ckpt=True, freeze_vision=True, adapter=True, like=ref_model)
    probes = {"ref": VisionProbe(ref_model), "ckpt": VisionProbe(ckpt_model)}
    ref, got = _step(ref_model, tiny_tok, batch), _step(ckpt_model, tiny_tok, batch)
    for name, probe in probes.items():
        assert probe.requires_grad and not any(probe.requires_grad), f"{name}: a vision activation requires grad"
        assert probe.grads == 0, f"{name}: a gradient reached the frozen vision tower"
    assert all(not p.requires_grad and p.grad is None for p in unwrap_qwen2vl(ckpt_model).visual.parameters())
    assert ref.keys() == got.keys()
    assert any("lora_A" in n for n in ref) and any("trainable_tokens_delta" in n for n in ref)
    for n, g in ref.items():
        assert g is not None and got[n] is not None, n
        assert g.abs().sum() > 0, f"{n}: no gradient"
        torch.testing.assert_close(got[n], g, atol=1e-5, rtol=1e-4, msg=n)


def test_trainable_token_rows_get_gradients_with_checkpointing(tiny_tok, photos):
    # fine-tuning sequences hold both trainable rows: `<|emb|>` (the embedding slots) and `<|mask|>` (the
    # guided reconstruction turn)
    enc = SequenceEncoder(tiny_tok, ImagePolicy.preset("tiny"))
    inputs = enc([finetune_template(user("what is shown", True), "a <|mask|> photo"),
                  finetune_template(user("a plain text query", False), "masked <|mask|> words")], [photos[0], None])
    grads = {}
    ref_model = _build(tiny_tok, ckpt=False, freeze_vision=True, adapter=True)
    for ckpt in (False, True):
        model = ref_model if not ckpt else _build(tiny_tok, ckpt=True, freeze_vision=True, adapter=True,
                                                  like=ref_model)
        probe = VisionProbe(model)
        emb = Embedder(model, SpecialTokenIds.from_tokenizer(tiny_tok).emb).train()
        out = emb(inputs, 2)
        (out.emb * torch.linspace(-1, 1, out.emb.shape[-1])).sum().backward()
        assert probe.requires_grad and not any(probe.requires_grad) and probe.grads == 0
        (grads[ckpt],) = [p.grad for n, p in model.named_parameters() if "trainable_tokens_delta" in n]
    assert grads[True].shape[0] == 2 and (grads[True].abs().sum(-1) > 0).all()
    torch.testing.assert_close(grads[True], grads[False], atol=1e-5, rtol=1e-4)


def test_trainable_vision_still_trains_with_checkpointing(tiny_tok, batch):
    ref_model = _build(tiny_tok, ckpt=False, freeze_vision=False, adapter=False)
    ckpt_model = _build(tiny_tok, ckpt=True, freeze_vision=False, adapter=False, like=ref_model)
    probe = VisionProbe(ckpt_model)
    ref, got = _step(ref_model, tiny_tok, batch), _step(ckpt_model, tiny_tok, batch)
    assert probe.requires_grad and all(probe.requires_grad) and probe.grads > 0
    vision = [n for n in ref if ".visual." in f".{n}"]
    assert vision and any(".blocks." in n for n in vision) and any("patch_embed" in n for n in vision)
    for n, g in ref.items():
        assert g is not None and got[n] is not None, n
        torch.testing.assert_close(got[n], g, atol=1e-5, rtol=1e-4, msg=n)
    assert all(ref[n].abs().sum() > 0 for n in vision)


def test_frozen_vision_forward_restores_grad_mode_and_model_still_copies(tiny_tok):
    import copy
    import pickle

    model = _build(tiny_tok, ckpt=True, freeze_vision=True, adapter=True)
    visual = unwrap_qwen2vl(model).visual
    with pytest.raises(RuntimeError):  # 5 values per patch instead of 3 x 2 x 14 x 14
        visual(torch.zeros(4, 5), grid_thw=torch.tensor([[1, 2, 2]]))
    assert torch.is_grad_enabled()
    with torch.no_grad():  # and stays off where it was off
        visual(torch.zeros(4, 3 * 2 * 14 * 14), grid_thw=torch.tensor([[1, 2, 2]]))
        assert not torch.is_grad_enabled()
    assert torch.is_grad_enabled()
    copy.deepcopy(model)
    pickle.dumps(unwrap_qwen2vl(build_backbone(BackboneConfig(preset="tiny"), tiny_tok)))
