"""GradCache (muco.train.grad_cache): chunked steps give the unchunked batch's gradients, for both objectives,
with hard negatives, images split with their rows, chunk sizes that do not divide the batch, dropout replayed,
and through the module with gradient accumulation. The 2-rank DDP / FSDP2 runs are in test_distributed.py."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from torch.utils.data import DataLoader

from muco.data.m3t.collate import PretrainCollator, PretrainSample
from muco.data.pairs.collate import FinetuneCollator, PairSample
from muco.inputs.image_policy import ImagePolicy
from muco.inputs.templates import MASK_TOKEN
from muco.model.backbone import AdapterConfig, BackboneConfig
from muco.model.pooling import PooledEmbeddings
from muco.objectives import FinetuneObjective, PretrainObjective, embed_all
from muco.train.grad_cache import chunk_sequences, grad_cache_step
from muco.train.module import MuCoModule


@pytest.fixture(scope="module")
def pretrain_batch(tiny_tok, photos):
    """5 images (one without), K=2..3 turns, 2 negative draws each, one negative missing."""
    samples = []
    for i in range(5):
        k = 2 + i % 2
        negs = [[f"neg {i} {d} {t}" if (i, d, t) != (2, 1, 0) else None for t in range(k)] for d in range(2)]
        samples.append(PretrainSample(f"s{i}", photos[i] if i != 3 else None, [f"q {i} {t}" for t in range(k)],
                                      [f"answer {i} {t}" for t in range(k)], negatives=negs))
    return PretrainCollator(tiny_tok, ImagePolicy.preset("tiny"))(samples)


@pytest.fixture(scope="module")
def finetune_batch(tiny_tok, photos):
    """5 pairs; image queries, an image target, image and text hard negatives, one sample without negative."""
    ss = [PairSample(f"p{i}", f"what is in picture {i}?", photos[i], f"answer {i}",
                     photos[5] if i == 1 else None, f"answer {MASK_TOKEN}",
                     f"Image description: photo {i}\n{MASK_TOKEN}", neg_text=None if i == 3 else f"wrong {i}",
                     neg_image=photos[(i + 1) % 5] if i in (0, 4) else None) for i in range(5)]
    return FinetuneCollator(tiny_tok, ImagePolicy.preset("tiny"))(ss)


def module(objective, dropout: float = 0.0, learnable: bool = False) -> MuCoModule:
    torch.manual_seed(0)
    adapter = AdapterConfig(r=4, alpha=8, init="gaussian", dropout=dropout)
    return MuCoModule(backbone=BackboneConfig(preset="tiny", adapter=adapter), objective=objective,
                      temperature=0.05, learnable_temperature=learnable)


def grads(m: MuCoModule) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


def assert_same_grads(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys() and len(a) > 10
    nonzero = 0
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=1e-4, msg=name)
        nonzero += bool(a[name].abs().sum() > 0)
    assert nonzero > len(a) // 2, "most gradients are zero: the comparison would prove nothing"


def unchunked(m: MuCoModule, batch) -> tuple[torch.Tensor, dict]:
    m.zero_grad(set_to_none=True)
    out = m.objective.step(m.embedder, batch, m.temperature(), 0)
    out.loss.backward()
    return out.loss.detach(), grads(m)


def chunked(m: MuCoModule, batch, chunk: int, scale: float = 1.0) -> tuple[torch.Tensor, dict]:
    m.zero_grad(set_to_none=True)
    out = grad_cache_step(m.embedder, m.objective, batch, m.temperature(), 0, chunk, loss_scale=scale)
    return out.loss, grads(m)


@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_pretrain_with_negatives_equals_the_unchunked_batch(pretrain_batch, chunk):
    m = module(PretrainObjective(), learnable=True)
    loss, ref = unchunked(m, pretrain_batch)
    got_loss, got = chunked(m, pretrain_batch, chunk)
    torch.testing.assert_close(got_loss, loss, atol=1e-6, rtol=1e-6)
    assert any("temperature" in n for n in got)  # τ's gradient comes from the loss half
    assert_same_grads(ref, got)


@pytest.mark.parametrize("loss", ["blockwise", "joint_masked"])
def test_finetune_with_hard_negatives_equals_the_unchunked_batch(finetune_batch, loss):
    m = module(FinetuneObjective(loss=loss, hard_negatives=True, mask_same_text=True))
    ref_loss, ref = unchunked(m, finetune_batch)
    got_loss, got = chunked(m, finetune_batch, 2)
    torch.testing.assert_close(got_loss, ref_loss, atol=1e-6, rtol=1e-6)
    assert_same_grads(ref, got)


def test_loss_scale_scales_every_gradient(pretrain_batch):
    m = module(PretrainObjective())
    _, ref = chunked(m, pretrain_batch, 2)
    _, half = chunked(m, pretrain_batch, 2, scale=0.5)
    assert_same_grads({n: g * 0.5 for n, g in ref.items()}, half, atol=1e-6)


def test_dropout_masks_are_replayed(pretrain_batch):
    """With LoRA dropout, the gradient is the one of the loss the cached embeddings gave: the reference embeds
    the same chunks in the same order with one graph (same RNG stream), then backpropagates once."""
    m = module(PretrainObjective(), dropout=0.3)
    m.train()
    chunk = 2
    torch.manual_seed(7)
    m.zero_grad(set_to_none=True)
    parts = {name: [embed_all(m.embedder, {"c": c.sequences})["c"] for c in chunk_sequences(s, chunk)]
             for name, s in m.objective.sequences(pretrain_batch).items()}
    whole = {}
    for name, ps in parts.items():
        starts = [0]
        for c in chunk_sequences(m.objective.sequences(pretrain_batch)[name], chunk)[:-1]:
            starts.append(c.stop)
        whole[name] = PooledEmbeddings(torch.cat([p.emb for p in ps]),
                                       torch.cat([p.sample_id + s for p, s in zip(ps, starts)]),
                                       torch.cat([p.turn_id for p in ps]))
    ref_out = m.objective.compute_loss(whole, pretrain_batch, m.temperature(), 0)
    ref_out.loss.backward()
    ref = grads(m)
    torch.manual_seed(7)
    got_loss, got = chunked(m, pretrain_batch, chunk)
    torch.testing.assert_close(got_loss, ref_out.loss.detach(), atol=1e-6, rtol=1e-6)
    assert_same_grads(ref, got)
    torch.manual_seed(8)  # another draw of the masks gives other gradients: dropout is really on
    _, other = chunked(m, pretrain_batch, chunk)
    assert any(not torch.allclose(other[n], got[n], atol=1e-6) for n in got)


def test_chunks_carry_their_rows_images(pretrain_batch):
    seqs = PretrainObjective().sequences(pretrain_batch)["query"]
    chunks = chunk_sequences(seqs, 2)
    assert [(c.start, c.stop) for c in chunks] == [(0, 2), (2, 4), (4, 5)]
    grid = pretrain_batch["query"]["image_grid_thw"]
    patches = grid.prod(-1).tolist()
    # sample 3 has no image: the second chunk holds one image (sample 2's)
    assert [c.sequences.inputs["image_grid_thw"].shape[0] for c in chunks] == [2, 1, 1]
    assert torch.equal(torch.cat([c.sequences.inputs["pixel_values"] for c in chunks]),
                       pretrain_batch["query"]["pixel_values"])
    assert chunks[1].sequences.inputs["pixel_values"].shape[0] == patches[2]
    assert chunks[2].sequences.keys == ["s4"] and chunks[2].sequences.expected.tolist() == [2]
    with pytest.raises(ValueError, match="chunk size must be >= 1"):
        chunk_sequences(seqs, 0)


def fit(m: MuCoModule, batches, accumulate: int) -> dict[str, torch.Tensor]:
    """The gradients at the first optimizer step of a real Trainer."""
    seen = {}

    class Snapshot(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if not seen:
                seen.update(grads(pl_module))

    trainer = Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, accumulate_grad_batches=accumulate,
                      callbacks=[Snapshot()])
    trainer.fit(m, DataLoader(batches, batch_size=None))
    return seen


def test_module_with_gradient_accumulation_equals_unchunked(pretrain_batch):
    """Two batches accumulated into one optimizer step: Lightning's zero_grad must not wipe the cached
    backward, and each batch's gradients are divided by the accumulation as Lightning divides a loss."""
    batches = [pretrain_batch, pretrain_batch]
    ref = fit(module(PretrainObjective()), batches, accumulate=2)
    m = module(PretrainObjective())
    m.grad_cache_chunk = 2
    got = fit(m, batches, accumulate=2)
    assert_same_grads(ref, got)
    with pytest.raises(ValueError, match="grad_cache_chunk must be >= 1"):
        MuCoModule(grad_cache_chunk=0)
