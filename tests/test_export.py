"""Export: merged weights + tokenizer + processor settings reload with transformers alone, same embeddings."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from muco.cli.export import main
from muco.encoder import MuCoEncoder
from muco.export import export
from muco.inputs.image_policy import ImagePolicy
from muco.inputs.tokenizer import SpecialTokenIds
from muco.model.backbone import AdapterConfig, BackboneConfig, build_backbone
from tests.adapted import adapted_tiny_backbone

TEXTS = ["a cat sitting on a mat", "what is in the picture?", None]


@pytest.fixture(scope="module")
def adapted(tiny_tok):
    """Tiny Qwen2-VL + LoRA with non-zero B and changed <|emb|>/<|mask|> rows, so the merge matters."""
    return adapted_tiny_backbone(tiny_tok, seed=2)


@pytest.fixture(scope="module")
def reference(adapted, tiny_tok, photos):
    return MuCoEncoder.from_parts(tiny_tok, adapted, "tiny").embed(TEXTS, [None, photos[0], photos[1]])


@pytest.fixture(scope="module")
def exported(adapted, tiny_tok, tmp_path_factory):
    return export(adapted, tiny_tok, ImagePolicy.preset("tiny"), tmp_path_factory.mktemp("export") / "model")


def test_written_files(exported, tiny_tok):
    names = {p.name for p in exported.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "preprocessor_config.json", "muco_config.json", "README.md"} <= names
    meta = json.loads((exported / "muco_config.json").read_text())
    ids = SpecialTokenIds.from_tokenizer(tiny_tok)
    assert (meta["emb_token_id"], meta["mask_token_id"]) == (ids.emb, ids.mask)
    assert meta["image_policy"] == {"min_pixels": 3136, "max_pixels": 12544, "short_side": None}
    proc = json.loads((exported / "preprocessor_config.json").read_text())
    assert proc["size"] == {"shortest_edge": 3136, "longest_edge": 12544}
    card = (exported / "README.md").read_text()
    assert "AutoModel.from_pretrained" in card and "<|emb|>" in card and "L2-normalise" in card


def test_original_model_is_left_intact(adapted):
    assert type(adapted).__name__ == "PeftModel"
    assert any("lora_B" in n for n, _ in adapted.named_parameters())


def test_token_rows_are_merged_and_the_adapter_matters(adapted, exported, tiny_tok, reference, photos):
    from transformers import AutoModel

    ids = SpecialTokenIds.from_tokenizer(tiny_tok)
    merged = AutoModel.from_pretrained(exported).get_input_embeddings().weight
    base = build_backbone(BackboneConfig(preset="tiny"), tiny_tok)  # same seed: the pre-adapter weights
    base_rows = base.get_input_embeddings().weight[[ids.emb, ids.mask]]
    # `TokenRows.rows` (`trainable_tokens_delta`) holds the trained rows themselves (initialised from the base rows)
    trained = adapted.get_input_embeddings().rows
    assert torch.allclose(merged[[ids.emb, ids.mask]], trained, atol=1e-6)
    assert (merged[[ids.emb, ids.mask]] - base_rows).abs().max() > 1e-3
    plain = MuCoEncoder.from_parts(tiny_tok, base, "tiny").embed(TEXTS, [None, photos[0], photos[1]])
    assert (plain - reference).abs().max() > 1e-3  # so the 1e-5 checks below test the merge


def embed_with_transformers_only(path, text, image):
    """The recipe of the exported model card, written out: no muco code involved."""
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    model, tok = AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    proc = AutoImageProcessor.from_pretrained(path)
    user = text + "\n" if text and not text.endswith("\n") else text or ""
    inputs = {}
    if image is not None:
        vision = proc(images=[image.convert("RGB")], return_tensors="pt")
        n = int(vision["image_grid_thw"].prod()) // proc.merge_size**2
        user = "<|vision_start|>" + "<|image_pad|>" * n + "<|vision_end|>\n" + user
        inputs.update(vision)
    seq = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n" + user
           + "<|im_end|>\n<|im_start|>assistant\n<|emb|><|im_end|>")
    enc = tok(seq, add_special_tokens=False, return_tensors="pt")
    ids = enc["input_ids"]
    inputs.update(input_ids=ids, attention_mask=enc["attention_mask"],
                  mm_token_type_ids=(ids == model.config.image_token_id).int())
    with torch.inference_mode():
        hidden = model(**inputs).last_hidden_state
    return F.normalize(hidden[ids == tok.convert_tokens_to_ids("<|emb|>")].float(), dim=-1)


def test_transformers_only_reload_matches_the_adapter_model(exported, reference, photos):
    for i, (text, image) in enumerate(zip(TEXTS, [None, photos[0], photos[1]])):
        got = embed_with_transformers_only(exported, text, image)
        assert got.shape == (1, 128)
        assert torch.allclose(got[0], reference[i], atol=1e-5), i


def test_from_pretrained_matches(exported, reference, photos):
    enc = MuCoEncoder.from_pretrained(exported)
    assert enc.image_policy == ImagePolicy.preset("tiny")
    assert torch.allclose(enc.embed(TEXTS, [None, photos[0], photos[1]]), reference, atol=1e-5)


def test_export_refuses_a_non_empty_directory(adapted, tiny_tok, exported):
    with pytest.raises(FileExistsError):
        export(adapted, tiny_tok, ImagePolicy.preset("tiny"), exported)


def test_main_re_exports_in_bfloat16(exported, tmp_path, reference, photos):
    out = tmp_path / "bf16"
    assert main(["--checkpoint", str(exported), "--output", str(out), "--dtype", "bfloat16"]) == 0
    enc = MuCoEncoder.from_pretrained(out, dtype="float32")
    assert next(enc.backbone.parameters()).dtype == torch.float32
    got = enc.embed(TEXTS, [None, photos[0], photos[1]])
    assert (got - reference).abs().max() < 5e-2  # bf16 rounding of the weights only


def test_dora_adapter_merges_too(tiny_tok, photos, tmp_path):
    """The `released` adapter kind: DoRA's magnitude vectors must fold into the weights as well."""
    dora = AdapterConfig(kind="dora", r=4, alpha=8)
    m = build_backbone(BackboneConfig(preset="tiny", adapter=dora), tiny_tok)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_B" in name or "trainable_tokens_delta" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.rand(p.shape, generator=gen))
    images = [None, photos[2], photos[3]]
    want = MuCoEncoder.from_parts(tiny_tok, m.eval(), "tiny").embed(TEXTS, images)
    got = MuCoEncoder.from_pretrained(export(m, tiny_tok, ImagePolicy.preset("tiny"), tmp_path / "d"))
    assert torch.allclose(got.embed(TEXTS, images), want, atol=1e-5)


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640)])
def test_every_exported_file_has_the_mode_of_a_normal_file(exported, tmp_path, umask, mode):
    """safetensors writes the weights 0600 whatever the umask; `muco export` leaves no file private."""
    import os

    from muco.cli.export import main as export_main

    out = tmp_path / "shared"
    old = os.umask(umask)
    try:
        assert export_main(["--checkpoint", str(exported), "--output", str(out)]) == 0
    finally:
        os.umask(old)
    files = [p for p in out.rglob("*") if p.is_file()]
    assert "model.safetensors" in {p.name for p in files}
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: oct(mode) for p in files}
