"""Padding-free forwards (muco.model.packing): a packed row gives the padded batch's embeddings, losses and
gradients for both objectives (images of several sizes, a sample without image, hard negatives, LoRA, gradient
checkpointing, GradCache); the varlen attention splits exactly at sequence starts and runs padded batches as
stock SDPA; the settings that cannot pack are refused. The flash-attention 2 check needs CUDA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, Trainer
from torch.utils.data import DataLoader

from muco.data.m3t.collate import PretrainCollator, PretrainSample
from muco.data.pairs.collate import FinetuneCollator, PairSample
from muco.inputs.image_policy import ImagePolicy
from muco.inputs.templates import MASK_TOKEN
from muco.model.backbone import AdapterConfig, BackboneConfig
from muco.model.packing import pack_inputs, varlen_sdpa_attention
from muco.objectives import FinetuneObjective, PretrainObjective
from muco.train.callbacks import PairThroughput
from muco.train.grad_cache import grad_cache_step
from muco.train.module import MuCoModule
from tests.train.conftest import REPO, call_muco


def sized(photo, i: int):
    return photo.resize((36 + 22 * i, 60 - 6 * i))  # another grid (visual token count) per image


@pytest.fixture(scope="module")
def pretrain_batch(tiny_tok, photos):
    """4 images of 4 sizes and one sample without, K=2..3 turns of very different lengths, a negative draw."""
    samples = []
    for i in range(5):
        k = 2 + i % 2
        samples.append(PretrainSample(
            f"s{i}", sized(photos[i], i) if i != 3 else None, [f"q {i} {t}" + " more" * (5 * i) for t in range(k)],
            [f"answer {i} {t}" + " words" * (7 * (4 - i)) for t in range(k)],
            negatives=[[f"neg {i} {t}" + " x" * i for t in range(k)]]))
    return PretrainCollator(tiny_tok, ImagePolicy.preset("tiny"))(samples)


@pytest.fixture(scope="module")
def finetune_batch(tiny_tok, photos):
    ss = [PairSample(f"p{i}", f"what is in picture {i}?" + " really" * 4 * i, sized(photos[i], i), f"answer {i}",
                     photos[5] if i == 1 else None, f"answer {MASK_TOKEN}",
                     f"Image description: photo {i}\n{MASK_TOKEN}", neg_text=None if i == 3 else f"wrong {i}",
                     neg_image=photos[(i + 1) % 5] if i in (0, 3) else None) for i in range(4)]
    return FinetuneCollator(tiny_tok, ImagePolicy.preset("tiny"))(ss)


def module(objective, padding_free: bool, **backbone) -> MuCoModule:
    torch.manual_seed(0)
    cfg = BackboneConfig(preset="tiny", adapter=AdapterConfig(r=4, alpha=8, init="gaussian"),
                         padding_free=padding_free, **backbone)
    return MuCoModule(backbone=cfg, objective=objective, temperature=0.05)


def loss_and_grads(m: MuCoModule, batch, chunk: int | None = None) -> tuple[torch.Tensor, dict]:
    m.zero_grad(set_to_none=True)
    if chunk is None:
        loss = m.objective.step(m.embedder, batch, m.temperature(), 0).loss
        loss.backward()
    else:
        loss = grad_cache_step(m.embedder, m.objective, batch, m.temperature(), 0, chunk).loss
    return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


def assert_same(a: tuple[torch.Tensor, dict], b: tuple[torch.Tensor, dict]) -> None:
    torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=0)
    assert a[1].keys() == b[1].keys() and len(a[1]) > 10
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], atol=1e-5, rtol=1e-4, msg=name)
    assert sum(bool(g.abs().sum() > 0) for g in a[1].values()) > len(a[1]) // 2


def test_packed_row_holds_the_real_tokens_with_the_padded_positions(tiny_tok, pretrain_batch):
    m = module(PretrainObjective(), padding_free=True)
    query = pretrain_batch["query"]
    mask = query["attention_mask"].bool()
    assert not mask.all(), "the batch must pad for the test to mean anything"
    qwen = m.embedder.backbone.get_base_model()
    packed = pack_inputs(qwen.get_rope_index, query)
    ids, pos = packed.inputs["input_ids"], packed.inputs["position_ids"]
    assert ids.shape == (1, int(mask.sum())) and pos.shape == (4, 1, ids.shape[1])
    assert torch.equal(ids[0], query["input_ids"][mask])
    rope, _ = qwen.get_rope_index(query["input_ids"], image_grid_thw=query["image_grid_thw"], attention_mask=mask,
                                  mm_token_type_ids=query["mm_token_type_ids"])
    assert torch.equal(pos[1:, 0], rope[:, mask])  # M-RoPE as the padded forward computes it
    starts = (pos[0, 0] == 0).nonzero().flatten()
    assert starts.tolist() == [0, *mask.sum(1).cumsum(0)[:-1].tolist()]  # one text-position run per sequence
    assert torch.equal(packed.flat_index[mask], torch.arange(ids.shape[1]))
    assert (packed.flat_index[~mask] == -1).all()


@pytest.mark.parametrize("chunk", [None, 2], ids=["whole", "grad-cache-2"])
def test_pretrain_packed_equals_padded(pretrain_batch, chunk):
    padded = loss_and_grads(module(PretrainObjective(), padding_free=False), pretrain_batch)
    assert_same(loss_and_grads(module(PretrainObjective(), padding_free=True), pretrain_batch, chunk), padded)


def test_finetune_packed_equals_padded_with_gradient_checkpointing(finetune_batch):
    padded = loss_and_grads(module(FinetuneObjective(), padding_free=False), finetune_batch)
    packed = loss_and_grads(module(FinetuneObjective(), padding_free=True, gradient_checkpointing=True),
                            finetune_batch)
    assert_same(packed, padded)


def test_training_steps_and_logged_token_efficiency(pretrain_batch):
    """Two optimizer steps in a real Trainer: the same losses, and ``perf/token_efficiency`` says what the
    language model computed (1.0 packed, the padded share otherwise)."""

    def fit(padding_free: bool) -> dict[str, list[float]]:
        seen: dict[str, list[float]] = {"loss": [], "efficiency": []}

        class Record(Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                seen["loss"].append(float(outputs["loss"]))
                seen["efficiency"].append(float(trainer.callback_metrics["perf/token_efficiency"]))

        trainer = Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False,
                          callbacks=[PairThroughput(), Record()])
        trainer.fit(module(PretrainObjective(), padding_free), DataLoader([pretrain_batch] * 2, batch_size=None))
        return seen

    padded, packed = fit(False), fit(True)
    assert len(packed["loss"]) == 2
    torch.testing.assert_close(packed["loss"], padded["loss"], atol=1e-5, rtol=0)
    assert packed["efficiency"] == [1.0, 1.0]
    assert all(0.3 < e < 0.95 for e in padded["efficiency"]), padded["efficiency"]


def test_a_padding_free_backbone_runs_padded_batches_as_sdpa(pretrain_batch):
    """The same backbone serves evaluation and mining, which pad: its attention must then be stock SDPA."""
    stock, varlen = module(PretrainObjective(), False), module(PretrainObjective(), True)
    varlen.embedder.padding_free = False  # padded batches through the varlen-capable attention
    with torch.no_grad():
        for side in ("query", "target"):
            a = stock.embedder(pretrain_batch[side], pretrain_batch["num_turns"]).emb
            b = varlen.embedder(pretrain_batch[side], pretrain_batch["num_turns"]).emb
            assert torch.equal(a, b), side


def test_varlen_attention_splits_exactly_at_sequence_starts():
    torch.manual_seed(0)
    lengths = [3, 1, 5]
    q, k, v = (torch.randn(1, 4, sum(lengths), 8) for _ in range(3))
    k, v = k[:, :2], v[:, :2]  # grouped-query attention: 4 query heads share 2 key/value heads
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 2, True
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    out, _ = varlen_sdpa_attention(module, q, k, v, None, position_ids=positions, scaling=0.5)
    assert out.shape == (1, sum(lengths), 4, 8)
    start = 0
    for n in lengths:
        part = slice(start, start + n)
        want = F.scaled_dot_product_attention(q[:, :, part], k[:, :, part].repeat_interleave(2, 1),
                                              v[:, :, part].repeat_interleave(2, 1), is_causal=True, scale=0.5)
        torch.testing.assert_close(out[0, part], want[0].transpose(0, 1), atol=1e-6, rtol=0)
        start += n
    whole = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True,
                                           scale=0.5)
    assert not torch.allclose(out[0, 3:], whole[0].transpose(0, 1)[3:], atol=1e-3)  # no attention across rows


def test_padding_free_needs_an_attention_that_can_pack(demo_data, tmp_path):
    message = "backbone.padding_free needs attn_implementation sdpa or flash_attention_2, not 'eager'"
    with pytest.raises(ValueError, match=message):
        BackboneConfig(attn_implementation="eager", padding_free=True)
    res = call_muco("fit", "--config", str(REPO / "configs" / "tiny.yaml"), "--trainer.max_steps=1",
                    f"--data.init_args.train_shards={demo_data}/train/manifest.json",
                    "--data.init_args.val_shards=null", "--model.init_args.backbone.padding_free=true",
                    "--model.init_args.backbone.attn_implementation=eager", cwd=tmp_path)
    assert res.returncode == 1 and f"muco fit: error: {message}; set one of them" in res.stderr, res.stderr[-2000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (flash-attention 2's varlen kernel)")
def test_flash_attention_packed_equals_padded_on_cuda(pretrain_batch):
    pytest.importorskip("flash_attn")

    def embed(padding_free: bool) -> torch.Tensor:
        m = module(PretrainObjective(), padding_free, attn_implementation="flash_attention_2", dtype="bfloat16")
        m.embedder.cuda().eval()
        query = {k: v.cuda() for k, v in pretrain_batch["query"].items()}
        with torch.no_grad():
            return m.embedder(query, pretrain_batch["num_turns"]).emb

    torch.testing.assert_close(embed(True), embed(False), atol=2e-2, rtol=0)
