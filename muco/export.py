"""Export: merge the LoRA/DoRA adapter and the trained ``<|emb|>``/``<|mask|>`` rows into the base model and
write a Hugging Face-format directory that ``transformers.AutoModel.from_pretrained`` loads on its own.

Written files: ``config.json`` + ``model.safetensors`` (a bare ``Qwen2VLModel``), the tokenizer (with the two
added tokens), ``preprocessor_config.json`` (``Qwen2VLImageProcessorPil`` with the policy's pixel budget),
``muco_config.json`` (template, pooling, token ids, image policy) and a model card ``README.md``.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase, Qwen2VLModel

from muco.encoder import MUCO_CONFIG, as_dtype
from muco.inputs.image_policy import ImagePolicy
from muco.inputs.templates import EMB_TOKEN, IMG, MASK_TOKEN, base_template
from muco.inputs.tokenizer import SpecialTokenIds
from muco.model.embedder import Embedder
from muco.model.token_rows import TokenRows, merge_token_rows

log = logging.getLogger(__name__)


def merge_adapter(model: nn.Module, ids: SpecialTokenIds, inplace: bool = False) -> Qwen2VLModel:
    """A plain ``Qwen2VLModel`` with the adapter folded in; checks the token rows made it into the table."""
    if isinstance(model, Embedder):
        model = model.backbone
    if not hasattr(model, "merge_and_unload"):
        if not isinstance(model, Qwen2VLModel):
            raise TypeError(f"expected a Qwen2VLModel or a PEFT model around one, got {type(model).__name__}")
        return merge_token_rows(model if inplace else copy.deepcopy(model))
    rows = torch.tensor([ids.emb, ids.mask])
    with torch.no_grad():
        # the effective rows as the adapter-wrapped model sees them (the trainable rows, not the table's)
        want = model.get_input_embeddings()(rows.to(model.get_input_embeddings().weight.device)).float().cpu()
    # merging rewrites the wrapped model; a copy keeps a model that is still training intact
    merged = (model if inplace else copy.deepcopy(model)).merge_and_unload()
    # PEFT's merge already writes the `TokenRows` rows in (their unload hook); this keeps it so if it stops
    merged = merge_token_rows(merged)
    if not isinstance(merged, Qwen2VLModel):
        raise TypeError(f"merging gave a {type(merged).__name__}, not a Qwen2VLModel")
    table = merged.get_input_embeddings()
    if type(table) is not nn.Embedding:
        raise RuntimeError(f"the merged input embedding is still a {type(table).__name__}")
    got = table.weight[rows.to(table.weight.device)].detach().float().cpu()
    if not torch.allclose(got, want, atol=1e-6, rtol=1e-5):
        raise RuntimeError(f"the merged <|emb|>/<|mask|> rows differ from the trained ones by "
                           f"{(got - want).abs().max():.3g}")
    leftovers = [n for n, m in merged.named_modules()
                 if "lora_" in n or "token_adapter" in n or isinstance(m, TokenRows)]
    if leftovers:
        raise RuntimeError(f"adapter modules survived the merge: {leftovers[:5]}")
    return merged


def model_card(ids: SpecialTokenIds, policy: ImagePolicy, hidden: int, dtype: torch.dtype) -> str:
    example = base_template(IMG + "\n" + "a photo of a cat\n")
    short = f"; before that the short side is resized to {policy.short_side} px" if policy.short_side else ""
    return f"""---
library_name: transformers
pipeline_tag: feature-extraction
tags: [muco, qwen2-vl, multimodal-embedding]
---
# MuCo embedder (Qwen2-VL, adapter merged)

A multimodal embedding model trained with MuCo (multi-turn contrastive learning) on a Qwen2-VL backbone.
The directory is a plain `Qwen2VLModel` (no LM head): `transformers` alone loads it.

- **Template** (single turn, one `{EMB_TOKEN}`):
  `<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n`
  `<|im_start|>user\\n{{u}}<|im_end|>\\n<|im_start|>assistant\\n{EMB_TOKEN}<|im_end|>`,
  where the user text `u` is `text + "\\n"`, `IMG + "\\n" + text + "\\n"` with an image, or `IMG + "\\n"`
  for an image alone;
  `IMG = <|vision_start|><|image_pad|><|vision_end|>` and `<|image_pad|>` is repeated once per merged visual
  token. Example before expansion: `{example!r}`.
- **Pooling**: the last hidden state (after the final norm) at the `{EMB_TOKEN}` token (id {ids.emb}).
  `{MASK_TOKEN}` (id {ids.mask}) is only used in training.
- **Normalisation**: cast to fp32 and L2-normalise; similarity = dot product (cosine). Dimension {hidden}.
- **Resolution policy**: {policy.min_pixels:,}-{policy.max_pixels:,} pixels per image (Qwen2-VL processor
  `min_pixels`/`max_pixels`, see `preprocessor_config.json`){short}. Images with a side under 28 px are
  upsampled to 28 px first.
- **Weights dtype**: {str(dtype).replace("torch.", "")}. Batches are right-padded and never truncated.

## Use with transformers only

```python
import torch, torch.nn.functional as F
from PIL import Image
from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

path = "path/to/this/directory"
model, tok = AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
proc = AutoImageProcessor.from_pretrained(path)  # Qwen2VLImageProcessorPil with the pixel budget
SYS = "<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n"

def embed(text: str = "", image: Image.Image | None = None) -> torch.Tensor:
    user = text + "\\n" if text and not text.endswith("\\n") else text
    inputs = {{}}
    if image is not None:
        vision = proc(images=[image.convert("RGB")], return_tensors="pt")
        n = int(vision["image_grid_thw"].prod()) // proc.merge_size ** 2
        user = "<|vision_start|>" + "<|image_pad|>" * n + "<|vision_end|>\\n" + user
        inputs.update(vision)
    seq = SYS + "<|im_start|>user\\n" + user + "<|im_end|>\\n<|im_start|>assistant\\n{EMB_TOKEN}<|im_end|>"
    enc = tok(seq, add_special_tokens=False, return_tensors="pt")
    ids = enc["input_ids"]
    inputs.update(input_ids=ids, attention_mask=enc["attention_mask"],
                  mm_token_type_ids=(ids == model.config.image_token_id).int())
    with torch.inference_mode():
        hidden = model(**inputs).last_hidden_state
    return F.normalize(hidden[ids == tok.convert_tokens_to_ids("{EMB_TOKEN}")].float(), dim=-1)  # [1, d]
```

With the `muco` package: `muco.MuCoEncoder.from_pretrained(path).embed(texts=[...], images=[...])`.
"""


def _as_normal_files(out: Path) -> None:
    """Give every file of the export the mode of any file the user creates (0644 under umask 022): the
    weights come out of ``safetensors`` as 0600 whatever the umask, unreadable to the group that shares them."""
    mask = os.umask(0o022)  # the only way to read the umask is to set it: put it back at once
    os.umask(mask)
    mode = 0o666 & ~mask
    for path in out.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(mode)


def export(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    image_policy: ImagePolicy,
    out_dir: str | Path,
    dtype: str | torch.dtype | None = None,
    overwrite: bool = False,
    inplace: bool = False,
) -> Path:
    """Write the merged model, tokenizer, image-processor settings, ``muco_config.json`` and a model card.

    ``model`` is a ``Qwen2VLModel``, a PEFT model around one, or an ``Embedder``; it is left untouched unless
    ``inplace`` (which saves a copy's worth of memory).
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True (--overwrite)")
    ids = SpecialTokenIds.from_tokenizer(tokenizer)
    merged = merge_adapter(model, ids, inplace=inplace)
    if (target := as_dtype(dtype)) is not None:
        merged = merged.to(target)
    if merged.get_input_embeddings().num_embeddings < len(tokenizer):
        raise ValueError(f"embedding table ({merged.get_input_embeddings().num_embeddings} rows) is smaller "
                         f"than the tokenizer ({len(tokenizer)})")
    out.mkdir(parents=True, exist_ok=True)
    merged.config.architectures = ["Qwen2VLModel"]
    merged.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    image_policy.image_processor().save_pretrained(out)
    hidden = int(merged.config.text_config.hidden_size)
    wdtype = next(merged.parameters()).dtype
    meta = {
        "format": "muco-encoder", "version": 1, "template": "base", "pooling": "last_hidden_state at <|emb|>",
        "normalize": "l2, fp32", "emb_token": EMB_TOKEN, "emb_token_id": ids.emb, "mask_token": MASK_TOKEN,
        "mask_token_id": ids.mask, "hidden_size": hidden, "image_policy": asdict(image_policy),
    }
    (out / MUCO_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    (out / "README.md").write_text(model_card(ids, image_policy, hidden, wdtype))
    _as_normal_files(out)
    log.info("exported %s (%s, d=%d) to %s", type(merged).__name__, wdtype, hidden, out)
    return out
