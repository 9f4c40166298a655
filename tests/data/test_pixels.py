"""The one image path: ``ImagePolicy.prepare`` -> uint8 patches in the worker -> ``pixels_to_model`` on the
device must give exactly what the stock ``Qwen2VLImageProcessorPil`` gives on the same resized image.

Exact (``torch.equal``), not approximate: the stock processor computes each value from the uint8 pixel alone
(float64 rescale, float32 normalise) and ``pixels_to_model`` looks those very values up, so any difference
would be a layout or rounding bug, not noise.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from muco.data.images import load_image
from muco.inputs.image_policy import PATCH_DIM, ImagePolicy, patchify
from muco.inputs.sequence import SequenceEncoder
from muco.inputs.templates import base_template, single_turn_user_text
from muco.model.pixels import FLOAT_DIM, pixels_to_model, vision_dtype

POLICIES = ("eval", "pretrain", "tiny", "released")


@pytest.fixture(scope="module")
def big_photos() -> list[Image.Image]:
    """Full-size photos, plus resized ones that hit the pixel clamp (3:1) and the 28 px upsampling."""
    from skimage import data

    astronaut = Image.fromarray(data.astronaut())  # 512 x 512
    chelsea = Image.fromarray(data.chelsea())  # 451 x 300
    coffee = Image.fromarray(data.coffee())  # 600 x 400
    return [astronaut, chelsea, coffee, coffee.resize((1800, 600)), astronaut.resize((1400, 1050)),
            chelsea.resize((20, 13)), Image.fromarray(data.camera())]  # camera: grayscale


def stock(policy: ImagePolicy, images: list[Image.Image]) -> dict[str, torch.Tensor]:
    return policy.image_processor()(images=images, return_tensors="pt")


@pytest.mark.parametrize("name", POLICIES)
def test_uint8_patches_normalised_on_the_device_equal_the_stock_processor(name, photos, big_photos):
    policy = ImagePolicy.preset(name)
    for im in [*photos, *big_photos]:
        final = policy.prepare(im)
        pv, grid = patchify([final])
        assert pv.dtype == torch.uint8 and pv.shape == (int(grid.prod()), PATCH_DIM)
        ref = stock(policy, [final])
        assert grid.tolist() == ref["image_grid_thw"].tolist() == [[1, final.height // 14, final.width // 14]]
        assert torch.equal(pixels_to_model(pv), ref["pixel_values"]), (name, im.size)
        if policy.short_side is None and min(im.size) >= 28:
            # one BICUBIC resize, as the stock processor's own: equal to the stock path on the original
            assert torch.equal(pixels_to_model(pv), stock(policy, [im.convert("RGB")])["pixel_values"])


def test_sequence_encoder_batches_images_in_stock_order(tiny_tok, photos, big_photos):
    policy = ImagePolicy.preset("eval")
    images = [big_photos[1], None, photos[3], big_photos[3]]
    texts = [base_template(single_turn_user_text(f"t{i}", im is not None)) for i, im in enumerate(images)]
    out = SequenceEncoder(tiny_tok, policy)(texts, images)
    ref = stock(policy, [policy.prepare(im) for im in images if im is not None])
    assert out["pixel_values"].dtype == torch.uint8
    assert torch.equal(out["image_grid_thw"], ref["image_grid_thw"])
    got = pixels_to_model(out["pixel_values"])
    assert got.shape == (int(ref["image_grid_thw"].prod(-1).sum()), FLOAT_DIM)
    assert torch.equal(got, ref["pixel_values"])


def test_prepare_resizes_once_and_keeps_final_images(big_photos):
    pretrain = ImagePolicy.preset("pretrain")
    wide = big_photos[0].resize((100, 600))
    final = pretrain.prepare(wide)
    assert final.size == pretrain.target(100, 600)[0] == (392, 2436)
    # applying the policy's arithmetic to the final size would resize again (short-side rounding)...
    assert pretrain.target(*final.size)[0] != final.size
    assert pretrain.prepare(final) is final  # ... but prepare knows the image is final
    assert pretrain.prepare(final.crop((0, 0, 280, 280))).size == (644, 644)  # a crop is a new image
    assert pretrain.prepare(Image.new("RGB", (280, 280))).size == (644, 644)  # a user's 28-multiple image
    eval_ = ImagePolicy.preset("eval")  # the tag is per policy; a no-op prepare leaves the image untouched
    assert eval_.prepare(final) is final and pretrain.prepare(final) is final
    small = eval_.prepare(final.resize((98, 609)))  # under the eval budget: upsampled, tagged for eval only
    assert small.size == eval_.target(98, 609)[0] == (196, 1120)
    assert eval_.is_final(small) and not pretrain.is_final(small)
    gray = pretrain.prepare(big_photos[6])
    assert gray.mode == "RGB" and pretrain.prepare(gray.convert("L")).mode == "RGB"
    with pytest.raises(ValueError, match="aspect ratio"):
        pretrain.prepare(Image.new("RGB", (5000, 20)))
    with pytest.raises(ValueError, match="sides multiple of 28"):
        patchify([Image.new("RGB", (30, 28))])


def test_stream_decodes_to_the_final_size_once(photos):
    """The stream's ``load_image`` gives the policy's final image (a JPEG decoded at a reduced DCT scale
    when that still covers it); the collator's ``prepare`` then leaves it alone."""
    big = photos[0].resize((300, 200))
    png, jpg = io.BytesIO(), io.BytesIO()
    big.save(png, format="PNG")
    photos[1].resize((1600, 1200)).save(jpg, format="JPEG")
    for name in POLICIES:
        policy = ImagePolicy.preset(name)
        im = load_image(png.getvalue(), policy)
        assert policy.prepare(im) is im
        assert np.array_equal(np.asarray(im), np.asarray(policy.prepare(big)))  # PNG: no draft, same pixels
        drafted = load_image(jpg.getvalue(), policy)
        assert drafted.size == policy.prepare(Image.open(jpg)).size and policy.prepare(drafted) is drafted
    tiny = ImagePolicy.preset("tiny")
    buf = io.BytesIO()
    photos[0].resize((10, 20)).save(buf, format="PNG")
    assert load_image(buf.getvalue(), tiny).size == tiny.target(10, 20)[0] == (56, 84)


def test_pixels_to_model_dtype_passthrough_and_errors():
    pv = torch.randint(0, 256, (12, PATCH_DIM), dtype=torch.uint8)
    f32 = pixels_to_model(pv)
    assert f32.dtype == torch.float32 and f32.shape == (12, FLOAT_DIM)
    assert torch.equal(f32.view(12, 3, 2, 196)[:, :, 0], f32.view(12, 3, 2, 196)[:, :, 1])  # temporal copy
    assert torch.equal(pixels_to_model(pv, torch.bfloat16), f32.to(torch.bfloat16))
    assert pixels_to_model(f32) is f32  # the stock float format passes unchanged
    with pytest.raises(ValueError, match="uint8"):
        pixels_to_model(pv[:, :100])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_device_normalisation_is_exact_on_cuda():
    pv = torch.randint(0, 256, (4096, PATCH_DIM), dtype=torch.uint8)
    assert torch.equal(pixels_to_model(pv.cuda()).cpu(), pixels_to_model(pv))
    assert torch.equal(pixels_to_model(pv.cuda(), torch.bfloat16).cpu(), pixels_to_model(pv, torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_embeddings_equal_through_both_paths(tiny_tok, photos, big_photos, dtype):
    """The tiny model's embeddings from uint8 inputs (normalised in ``Embedder``) equal those from the stock
    processor's float inputs, in fp32 and in a bf16 model (which casts pixels to bf16 in its patch embed)."""
    from muco.inputs.tokenizer import SpecialTokenIds
    from muco.model.backbone import BackboneConfig, build_backbone
    from muco.model.embedder import Embedder

    torch.manual_seed(0)
    model = build_backbone(BackboneConfig(preset="tiny", attn_implementation="eager"), tiny_tok).to(dtype)
    embedder = Embedder(model, SpecialTokenIds.from_tokenizer(tiny_tok).emb).eval()
    assert vision_dtype(model) == dtype
    policy = ImagePolicy.preset("tiny")
    images = [photos[0], big_photos[2], None, big_photos[5]]
    texts = [base_template(single_turn_user_text(f"item {i}", im is not None)) for i, im in enumerate(images)]
    inputs = SequenceEncoder(tiny_tok, policy)(texts, images)
    float_inputs = {**inputs, "pixel_values": stock(policy, [policy.prepare(im) for im in images if im])[
        "pixel_values"]}
    with torch.no_grad():
        a = embedder(inputs, 1).emb
        b = embedder(float_inputs, 1).emb
    assert torch.equal(a, b)


def test_every_image_mode_keeps_its_contrast():
    """16-bit and 32-bit grey, float, palette with transparency, alpha and CMYK: converted to RGB with their real
    contrast (`convert("RGB")` clips 16-bit scans to nearly white and drops alpha)."""
    from muco.inputs.rgb import to_rgb

    ramp = np.linspace(0, 1, 64 * 64).reshape(64, 64)
    png16 = io.BytesIO()
    Image.fromarray((ramp * 65535).astype(np.uint16)).save(png16, format="PNG")
    as_read = Image.open(io.BytesIO(png16.getvalue()))
    assert as_read.mode.startswith("I")
    assert np.asarray(as_read.convert("RGB")).mean() > 250  # the fault: nearly white
    for image in (as_read, Image.fromarray((ramp * 1e6).astype(np.int32), mode="I"),
                  Image.fromarray(ramp.astype(np.float32), mode="F")):
        rgb = np.asarray(to_rgb(image))
        assert rgb.shape == (64, 64, 3) and rgb.min() <= 1 and rgb.max() >= 254 and 120 < rgb.mean() < 135
    clear = Image.new("RGBA", (8, 8), (0, 0, 0, 0))  # fully transparent black: white once composited
    assert np.asarray(to_rgb(clear)).min() == 255
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([0, 0, 0, 200, 10, 10])
    pal.info["transparency"] = 0
    assert np.asarray(to_rgb(pal)).min() == 255
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red
    assert tuple(np.asarray(to_rgb(cmyk))[0, 0]) == (255, 0, 0)
