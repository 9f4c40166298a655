"""`TokenRows` (trainable `<|emb|>`/`<|mask|>` rows without a table copy) equals PEFT's trainable tokens (issue 17):
same embeddings, same row gradients, checkpoints of either kind load, and merging writes the rows in."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from muco.encoder import MuCoEncoder
from muco.export import merge_adapter
from muco.inputs.image_policy import ImagePolicy
from muco.inputs.sequence import SequenceEncoder
from muco.inputs.templates import finetune_template
from muco.inputs.templates import single_turn_user_text as user
from muco.inputs.tokenizer import SpecialTokenIds
from muco.model.backbone import (
    LLM_LINEAR_LAYERS,
    AdapterConfig,
    BackboneConfig,
    _output_requires_grad,
    build_backbone,
    load_qwen2vl,
    unwrap_qwen2vl,
)
from muco.model.embedder import Embedder
from muco.model.token_rows import TokenRows, merge_token_rows, upgrade_key, upgrade_state_dict
from muco.train.optim import param_groups

ADAPTER = AdapterConfig(r=4, alpha=8)
TEXTS = ["what is shown", "a plain text query"]


def peft_trainable_tokens_backbone(tok) -> nn.Module:
    """The backbone as `apply_adapter` built it before `TokenRows`: PEFT's `trainable_token_indices`."""
    from peft import LoraConfig, get_peft_model

    ids = SpecialTokenIds.from_tokenizer(tok)
    model = load_qwen2vl(BackboneConfig(preset="tiny"), tok)
    model.visual.requires_grad_(False)
    targets = "|".join(LLM_LINEAR_LAYERS)
    cfg = LoraConfig(r=ADAPTER.r, lora_alpha=ADAPTER.alpha, target_modules=rf".*language_model.*\.({targets})$",
                     trainable_token_indices={"embed_tokens": [ids.emb, ids.mask]})
    return get_peft_model(model, cfg)


def randomize_trainable(model: nn.Module, seed: int) -> nn.Module:
    """Non-zero LoRA B and moved token rows, so both matter to the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "trainable_tokens_delta" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model


@pytest.fixture(scope="module")
def pair(tiny_tok):
    """(old PEFT model, new model) with equal weights: the new one loaded from the old one's state dict."""
    old = randomize_trainable(peft_trainable_tokens_backbone(tiny_tok), seed=5)
    new = build_backbone(BackboneConfig(preset="tiny", adapter=ADAPTER), tiny_tok)
    new.load_state_dict(old.state_dict())  # strict: PEFT's names map onto TokenRows' (the load hook)
    return old, new


@pytest.fixture(scope="module")
def inputs(tiny_tok, photos):
    # fine-tuning sequences hold both rows: `<|emb|>` (the embedding slots) and `<|mask|>`
    enc = SequenceEncoder(tiny_tok, ImagePolicy.preset("tiny"))
    return enc([finetune_template(user(TEXTS[0], True), "a <|mask|> photo"),
                finetune_template(user(TEXTS[1], False), "masked <|mask|> words")], [photos[0], None])


def rows_of(model: nn.Module) -> torch.Tensor:
    (rows,) = [p for n, p in model.named_parameters() if "trainable_tokens_delta" in n]
    return rows


def test_the_new_backbone_has_token_rows_and_no_peft_token_layer(pair, tiny_tok):
    _, new = pair
    ids = SpecialTokenIds.from_tokenizer(tiny_tok)
    table = unwrap_qwen2vl(new).language_model.embed_tokens
    assert type(table) is TokenRows and table is new.get_input_embeddings()
    assert table.token_ids.tolist() == [ids.emb, ids.mask]
    assert not any("token_adapter" in n for n, _ in new.named_modules())
    trainable = {n for n, p in new.named_parameters() if p.requires_grad}
    assert "base_model.model.language_model.embed_tokens.trainable_tokens_delta" in trainable
    assert "base_model.model.language_model.embed_tokens.weight" not in trainable
    assert "token_ids" not in "".join(new.state_dict())  # from the tokenizer, not stored


def test_embeddings_equal_peft_trainable_tokens(pair, tiny_tok):
    old, new = pair
    ids = SpecialTokenIds.from_tokenizer(tiny_tok)
    tokens = torch.tensor([[ids.emb, 5, ids.mask, ids.pad, ids.emb], [7, ids.mask, ids.mask, 0, 9]])
    with torch.no_grad():
        want, got = old.get_input_embeddings()(tokens), new.get_input_embeddings()(tokens)
    assert torch.equal(got, want)
    assert torch.equal(got[0, 0], rows_of(new)[0]) and torch.equal(got[1, 1], rows_of(new)[1])


def test_model_outputs_and_gradients_equal_peft_trainable_tokens(pair, tiny_tok, inputs):
    grads, outs = {}, {}
    for name, model in zip(("old", "new"), pair):
        model.zero_grad()
        emb = Embedder(model, SpecialTokenIds.from_tokenizer(tiny_tok).emb).train()
        out = emb(inputs, 2)
        (out.emb * torch.linspace(-1, 1, out.emb.shape[-1])).sum().backward()
        outs[name] = out.emb.detach()
        grads[name] = {n.replace("token_adapter.", "").replace(".default", ""): p.grad
                       for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad()
    torch.testing.assert_close(outs["new"], outs["old"], atol=1e-6, rtol=0)
    assert grads["new"].keys() == grads["old"].keys()
    row = "base_model.model.language_model.embed_tokens.trainable_tokens_delta"
    assert (grads["new"][row].abs().sum(-1) > 0).all()  # both rows are in the batch
    for n, g in grads["old"].items():
        torch.testing.assert_close(grads["new"][n], g, atol=1e-6, rtol=1e-5, msg=n)


class LargestOutput(TorchDispatchMode):
    """The largest tensor any op made (forward and backward), with the op's name."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = (0, "")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.numel() > self.largest[0]:
                self.largest = (t.numel(), str(func))
        return out


def _lookup_and_backward(embedding: nn.Module, tokens: torch.Tensor) -> LargestOutput:
    with LargestOutput() as mode:
        out = embedding(tokens)
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    return mode


def test_the_table_is_never_copied_and_gets_no_gradient():
    from peft.utils.other import TrainableTokensWrapper

    torch.manual_seed(0)
    vocab, d, ids = 5000, 32, [3, 4000]
    tokens = torch.tensor([[3, 1, 4000, 3, 9, 9], [0, 2, 2, 3, 7, 8]])
    old_table = nn.Embedding(vocab, d, padding_idx=0).requires_grad_(False)
    new_table = copy.deepcopy(old_table)
    peft = TrainableTokensWrapper(old_table, "default", token_indices=ids)
    # the probe sees PEFT's copy of the table: it would see one in TokenRows
    assert _lookup_and_backward(peft, tokens).largest[0] >= vocab * d

    weight = new_table.weight
    ptr, version = weight.data_ptr(), weight._version
    rows = TokenRows(new_table, ids)
    assert rows.weight is weight  # taken over, not copied
    largest = _lookup_and_backward(rows, tokens).largest
    assert largest[0] < vocab * d / 10, largest
    assert weight.grad is None and weight.data_ptr() == ptr and weight._version == version
    # each row's gradient is the sum of the output gradients where its token is
    ramp = torch.linspace(-1, 1, d)
    torch.testing.assert_close(rows.rows.grad, torch.stack([3 * ramp, ramp]))
    assert torch.equal(rows.rows.grad, peft.token_adapter.trainable_tokens_delta["default"].grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("train_table", [False, True])
def test_layer_bitwise_equal_to_peft(dtype, train_table):
    # the same lookup, and the row gradients summed by the same kernel in the same order; a trainable table
    # gets nothing at the replaced rows in both (PEFT's `index_copy` overwrote them)
    from peft.utils.other import TrainableTokensWrapper

    torch.manual_seed(0)
    table = nn.Embedding(3000, 64, padding_idx=0, dtype=dtype).requires_grad_(train_table)
    ids = [5, 2999]
    peft = TrainableTokensWrapper(copy.deepcopy(table), "default", token_indices=ids)
    rows = TokenRows(table, ids)
    tokens = torch.randint(0, 3000, (4, 300))
    tokens[tokens % 7 == 0], tokens[tokens % 11 == 0] = 5, 2999
    grad = torch.randn(4, 300, 64, dtype=dtype)
    want, got = peft(tokens), rows(tokens)
    assert torch.equal(got, want) and got.dtype == dtype
    (want * grad).sum().backward()
    (got * grad).sum().backward()
    assert torch.equal(rows.rows.grad, peft.token_adapter.trainable_tokens_delta["default"].grad)
    if train_table:
        assert torch.equal(table.weight.grad, peft.token_adapter.base_layer.weight.grad)
        assert table.weight.grad[ids].abs().sum() == 0 and table.weight.grad.abs().sum() > 0
    else:
        assert table.weight.grad is None


def test_inference_mode_and_no_grad():
    table = nn.Embedding(50, 8).requires_grad_(False)
    rows = TokenRows(table, [3, 7])
    tokens = torch.tensor([[3, 1, 7]])
    with torch.inference_mode():
        a = rows(tokens)
    with torch.no_grad():
        b = rows(tokens)
    assert torch.equal(a, b) and torch.equal(a[0, 0], rows.rows[0]) and torch.equal(a[0, 1], table.weight[1])


def test_token_rows_checks_its_input():
    with pytest.raises(ValueError, match="distinct"):
        TokenRows(nn.Embedding(10, 4), [3, 3])
    with pytest.raises(ValueError, match="distinct rows"):
        TokenRows(nn.Embedding(10, 4), [10])

    class Scaled(nn.Embedding):
        pass

    with pytest.raises(TypeError, match="plain nn.Embedding"):
        TokenRows(Scaled(10, 4), [1])


def test_rows_are_not_weight_decayed(pair):
    _, new = pair
    decay, no_decay = param_groups(new, 0.01)
    assert any(p is rows_of(new) for p in no_decay["params"])
    assert not any(p is rows_of(new) for p in decay["params"])


def test_gradient_checkpointing_hooks_the_token_rows(tiny_tok, inputs):
    model = build_backbone(BackboneConfig(preset="tiny", adapter=ADAPTER, gradient_checkpointing=True), tiny_tok)
    table = model.get_input_embeddings()
    assert type(table) is TokenRows and _output_requires_grad in table._forward_hooks.values()
    # the rows frozen (the adapter alone training): the hook still puts the decoder layers in the graph
    rows_of(model).requires_grad_(False)
    assert table(torch.tensor([[1, 2]])).requires_grad
    out = Embedder(model, SpecialTokenIds.from_tokenizer(tiny_tok).emb).train()(inputs, 2)
    out.emb.sum().backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]  # (lora_A's are 0 while B is)
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_copies_and_pickles(pair):
    _, new = pair
    clone = copy.deepcopy(new)
    assert torch.equal(rows_of(clone), rows_of(new)) and rows_of(clone) is not rows_of(new)
    back = pickle.loads(pickle.dumps(unwrap_qwen2vl(new).language_model.embed_tokens))
    assert torch.equal(back.rows, rows_of(new)) and back.token_ids.tolist() == \
        unwrap_qwen2vl(new).language_model.embed_tokens.token_ids.tolist()


def test_peft_names_are_upgraded():
    p = "embedder.backbone.base_model.model.language_model.embed_tokens."
    assert upgrade_key(p + "token_adapter.trainable_tokens_delta.default") == p + "trainable_tokens_delta"
    assert upgrade_key(p + "token_adapter.base_layer.weight") == p + "weight"
    assert upgrade_key(p + "weight") == p + "weight"
    assert upgrade_key("x.q_proj.lora_A.default.weight") == "x.q_proj.lora_A.default.weight"
    assert list(upgrade_state_dict({"b": 1, "token_adapter.trainable_tokens_delta.default": 2})) == \
        ["b", "trainable_tokens_delta"]


# ------------------------------------------------------------------------------------------------ merging
def test_merge_writes_the_rows_and_leaves_the_model_intact(pair, tiny_tok, inputs):
    old, new = pair
    ids = SpecialTokenIds.from_tokenizer(tiny_tok)
    merged = merge_adapter(new, ids)
    assert type(merged.get_input_embeddings()) is nn.Embedding
    torch.testing.assert_close(merged.get_input_embeddings().weight[[ids.emb, ids.mask]], rows_of(new).detach())
    assert type(new.get_input_embeddings()) is TokenRows  # the training model is untouched
    # the same table as PEFT's own merge of the old model
    old_merged = copy.deepcopy(old).merge_and_unload()
    assert torch.equal(merged.get_input_embeddings().weight, old_merged.get_input_embeddings().weight)
    emb_id = ids.emb
    with torch.no_grad():
        want = Embedder(new, emb_id).eval()(inputs, 2).emb
        got = Embedder(merged, emb_id).eval()(inputs, 2).emb
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_peft_merge_and_unload_alone_writes_the_rows_and_unload_does_not(pair, tiny_tok):
    _, new = pair
    ids = SpecialTokenIds.from_tokenizer(tiny_tok)
    base_rows = new.get_input_embeddings().weight[[ids.emb, ids.mask]].detach().clone()
    merged = copy.deepcopy(new).merge_and_unload()  # the TokenRows unload hook
    assert type(merged.get_input_embeddings()) is nn.Embedding
    assert torch.equal(merged.get_input_embeddings().weight[[ids.emb, ids.mask]], rows_of(new).detach())
    unloaded = copy.deepcopy(new).unload()
    assert type(unloaded.get_input_embeddings()) is nn.Embedding
    assert torch.equal(unloaded.get_input_embeddings().weight[[ids.emb, ids.mask]], base_rows)
    assert not torch.equal(base_rows, rows_of(new).detach())
    # and on a model with no PEFT wrapper at all
    plain = merge_token_rows(copy.deepcopy(unwrap_qwen2vl(new)))
    assert torch.equal(plain.get_input_embeddings().weight, merged.get_input_embeddings().weight)


# ---------------------------------------------------------------------------------------------- checkpoints
def _module():
    from muco.train.module import MuCoModule

    return MuCoModule(tokenizer="tiny", backbone=BackboneConfig(preset="tiny", adapter=ADAPTER),
                      eval_image_policy="tiny")


def _checkpoint(module) -> dict:
    ckpt = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(ckpt)
    return ckpt


def test_checkpoint_roundtrip(tmp_path, photos):
    from muco.train.checkpoint import load_module

    module = _module()
    randomize_trainable(module, seed=7)
    ckpt = _checkpoint(module)
    key = "embedder.backbone.base_model.model.language_model.embed_tokens."
    assert key + "trainable_tokens_delta" in ckpt["state_dict"]
    assert key + "weight" not in ckpt["state_dict"]  # the frozen table is rebuilt, not stored
    torch.save(ckpt, tmp_path / "m.ckpt")
    loaded = load_module(tmp_path / "m.ckpt")
    assert torch.equal(rows_of(loaded), rows_of(module))
    images = [photos[0], None]
    want = MuCoEncoder.from_parts(module.tokenizer, module.embedder.backbone, "tiny").embed(TEXTS, images)
    got = MuCoEncoder.from_parts(loaded.tokenizer, loaded.embedder.backbone, "tiny").embed(TEXTS, images)
    assert torch.equal(got, want)


@pytest.fixture(scope="module")
def old_checkpoint(tiny_tok, tmp_path_factory):
    """What the PEFT trainable-tokens code wrote: the trainable parameters under PEFT's names, and the old model."""
    module = _module()
    ckpt = _checkpoint(module)
    old = randomize_trainable(peft_trainable_tokens_backbone(tiny_tok), seed=9)
    prefix = "embedder.backbone."
    sd = {k: v for k, v in ckpt["state_dict"].items() if not k.startswith(prefix)}
    sd.update({prefix + n: p.detach().clone() for n, p in old.named_parameters() if p.requires_grad})
    assert any(k.endswith("token_adapter.trainable_tokens_delta.default") for k in sd)
    ckpt["state_dict"] = sd
    path = tmp_path_factory.mktemp("old") / "old.ckpt"
    torch.save(ckpt, path)
    return path, old.eval()


def test_a_peft_trainable_tokens_checkpoint_loads(old_checkpoint, photos):
    from muco.train.checkpoint import load_module

    path, old = old_checkpoint
    loaded = load_module(path)
    assert torch.equal(rows_of(loaded), rows_of(old))
    images = [photos[1], None]
    want = MuCoEncoder.from_parts(loaded.tokenizer, old, "tiny").embed(TEXTS, images)
    got = MuCoEncoder.from_parts(loaded.tokenizer, loaded.embedder.backbone, "tiny").embed(TEXTS, images)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_a_peft_trainable_tokens_checkpoint_initialises_fine_tuning(old_checkpoint, tiny_tok):
    from muco.train import init_from

    path, old = old_checkpoint
    ckpt = init_from.read_checkpoint(path)
    module = _module()
    assert init_from.load_continue(module, ckpt, path) == set()  # every loaded weight trains here too
    assert torch.equal(rows_of(module), rows_of(old))
    # merge first: the rows go into the merged base table, and a fresh TokenRows starts from them
    ids = SpecialTokenIds.from_tokenizer(tiny_tok)
    merged = init_from.merged_backbone(ckpt, path, BackboneConfig(preset="tiny", adapter=ADAPTER), tiny_tok)
    assert torch.equal(merged.get_input_embeddings().weight[[ids.emb, ids.mask]], rows_of(old).detach())
    assert torch.equal(rows_of(merged), rows_of(old))
