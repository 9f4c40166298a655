import pytest
import torch

from muco.data.m3t.collate import PretrainCollator, PretrainSample
from muco.inputs.image_policy import ImagePolicy
from muco.inputs.sequence import SequenceEncoder
from muco.inputs.templates import base_template, finetune_template, pretrain_query_turns, pretrain_template
from muco.inputs.templates import single_turn_user_text as user
from muco.inputs.tokenizer import SpecialTokenIds
from muco.model.backbone import AdapterConfig, BackboneConfig, build_backbone, unwrap_qwen2vl
from muco.model.embedder import Embedder


@pytest.fixture(scope="module")
def embedder(tiny_tok):
    torch.manual_seed(0)
    model = build_backbone(BackboneConfig(preset="tiny", attn_implementation="eager"), tiny_tok)
    return Embedder(model, SpecialTokenIds.from_tokenizer(tiny_tok).emb).eval()


def test_k7_batch_sample_major_turn_order(tiny_tok, photos, embedder):
    samples = [PretrainSample(f"s{i}", photos[i], [f"query {k} of {i}" for k in range(7)],
                              [f"target {k} of {i}" for k in range(7)]) for i in range(3)]
    batch = PretrainCollator(tiny_tok, ImagePolicy.preset("tiny"))(samples)
    with torch.no_grad():
        out = embedder(batch["query"], batch["num_turns"], batch["keys"])
    assert out.emb.shape == (21, 128)
    assert torch.allclose(out.emb.norm(dim=-1), torch.ones(21), atol=1e-5)
    assert out.sample_id.tolist() == [i for i in range(3) for _ in range(7)]
    assert out.turn_id.tolist() == list(range(7)) * 3
    # causal attention: row (i, k) equals the last embedding of the same sequence cut after turn k
    enc = SequenceEncoder(tiny_tok, ImagePolicy.preset("tiny"))
    for i, k in [(0, 0), (1, 3), (2, 6)]:
        prefix = pretrain_template(pretrain_query_turns(samples[i].queries[: k + 1], True))
        with torch.no_grad():
            ref = embedder(enc([prefix], [photos[i]]), k + 1)
        assert torch.allclose(out.emb[i * 7 + k], ref.emb[-1], atol=1e-5)


def test_finetune_first_embedding_equals_base(tiny_tok, photos, embedder):
    enc = SequenceEncoder(tiny_tok, ImagePolicy.preset("tiny"))
    u = [user("what is shown", True), user("a plain text query", False)]
    ims = [photos[2], None]
    with torch.no_grad():
        ft = embedder(enc([finetune_template(x, "masked <|mask|> words") for x in u], ims), 2)
        base = embedder(enc([base_template(x) for x in u], ims), 1)
    assert ft.emb.shape == (4, 128)
    assert torch.allclose(ft.emb[ft.turn_id == 0], base.emb, atol=1e-5)
    assert not torch.allclose(ft.emb[ft.turn_id == 1], base.emb, atol=1e-3)


def test_lora_trains_only_adapters_and_two_token_rows(tiny_tok):
    model = build_backbone(BackboneConfig(preset="tiny", adapter=AdapterConfig(r=4, alpha=8)), tiny_tok)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable, "adapter has no trainable parameters"
    for n in trainable:
        assert "lora_" in n or "trainable_tokens" in n, n
        assert "visual" not in n
    assert any("q_proj.lora_A" in n for n in trainable) and any("down_proj.lora_B" in n for n in trainable)
    delta = [p for n, p in model.named_parameters() if "trainable_tokens_delta" in n]
    assert len(delta) == 1 and delta[0].shape[0] == 2


def test_dora_preset_and_vision_frozen(tiny_tok):
    model = build_backbone(BackboneConfig(preset="tiny", adapter=AdapterConfig.preset("released")), tiny_tok)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_magnitude_vector" in n for n in names)
    assert all(not p.requires_grad for p in unwrap_qwen2vl(model).visual.parameters())


def test_full_finetune_keeps_vision_frozen(tiny_tok):
    model = build_backbone(BackboneConfig(preset="tiny"), tiny_tok)
    assert all(not p.requires_grad for p in model.visual.parameters())
    assert all(p.requires_grad for p in model.language_model.parameters())


def test_embedding_table_grows_with_tokenizer(tiny_tok):
    from muco.model.backbone import load_qwen2vl

    model = load_qwen2vl(BackboneConfig(preset="tiny"), tiny_tok)
    assert model.get_input_embeddings().num_embeddings >= len(tiny_tok)


def test_missing_weights_dir_is_clear(tiny_tok, tmp_path):
    with pytest.raises(FileNotFoundError, match="point at them"):
        build_backbone(BackboneConfig(pretrained=str(tmp_path / "none")), tiny_tok)


def test_gradient_checkpointing_backward(tiny_tok, photos):
    model = build_backbone(BackboneConfig(preset="tiny", gradient_checkpointing=True,
                                          adapter=AdapterConfig(r=4, alpha=8)), tiny_tok)
    emb = Embedder(model, SpecialTokenIds.from_tokenizer(tiny_tok).emb).train()
    enc = SequenceEncoder(tiny_tok, ImagePolicy.preset("tiny"))
    out = emb(enc([base_template(user("x", True))], [photos[0]]), 1)
    out.emb.sum().backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None for g in grads)


@pytest.mark.parametrize("spelling", ["None", "null", ""])
def test_pretrained_null_from_the_command_line_means_random_init(spelling):
    # LightningCLI hands `--model.init_args.backbone.pretrained null` to the dataclass as the string "None"
    assert BackboneConfig(pretrained=spelling, preset="tiny").pretrained is None
    assert BackboneConfig.coerce({"pretrained": spelling}).pretrained is None
    assert BackboneConfig(pretrained="/models/Qwen2-VL-2B").pretrained == "/models/Qwen2-VL-2B"
