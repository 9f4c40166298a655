"""Inference API: ``MuCoEncoder`` turns texts and/or images into normalised fp32 embeddings.

Every item is encoded with the single-turn template ``BASE(u)`` (docs/method.md §4) and pooled at its one
``<|emb|>``: an image-bearing item reads ``u = IMG + "\\n" + text + "\\n"``, a text-only item
``text + "\\n"``, an image-only item ``IMG + "\\n"``.

Loading: :meth:`MuCoEncoder.from_pretrained` reads an exported directory (``muco export``);
:func:`muco.train.checkpoint.load_encoder` is the single entry point for a model on disk, whatever its format
(an exported directory or a training run's ``.ckpt``). This module imports nothing from :mod:`muco.train`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn
from transformers import PreTrainedTokenizerBase

from muco.inputs.image_policy import ImagePolicy
from muco.inputs.rgb import to_rgb
from muco.inputs.sequence import SequenceEncoder, check_user_text
from muco.inputs.templates import EMB_TOKEN, IMG, base_template, single_turn_user_text
from muco.inputs.tokenizer import SpecialTokenIds, add_muco_tokens
from muco.model.backbone import unwrap_qwen2vl
from muco.model.embedder import Embedder

log = logging.getLogger(__name__)

MUCO_CONFIG = "muco_config.json"
ImageInput = Image.Image | str | Path | None
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def as_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def as_policy(policy: ImagePolicy | str | None, default: ImagePolicy | None = None) -> ImagePolicy:
    if isinstance(policy, ImagePolicy):
        return policy
    if isinstance(policy, str):
        return ImagePolicy.preset(policy)
    return default if default is not None else ImagePolicy.preset("eval")


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Eval mode for the call, then every submodule's own mode back (a training module stays as it was)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _open(image: ImageInput) -> Image.Image | None:
    if image is None or isinstance(image, Image.Image):
        return image
    with Image.open(image) as im:
        return to_rgb(im)


class MuCoEncoder:
    """Tokenizer + embedder (backbone and ``<|emb|>`` pooler) + image policy, on one device."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        embedder: Embedder,
        image_policy: ImagePolicy | str | None = None,
        device: str | torch.device | None = None,
        autocast_dtype: str | torch.dtype | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.embedder = embedder
        self.image_policy = as_policy(image_policy)
        self.sequence_encoder = SequenceEncoder(tokenizer, self.image_policy)
        self.autocast_dtype = as_dtype(autocast_dtype)
        if device is not None:
            self.embedder.to(device)

    # ---- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_parts(
        cls,
        tokenizer: PreTrainedTokenizerBase,
        backbone: nn.Module,
        image_policy: ImagePolicy | str | None = None,
        **kwargs: Any,
    ) -> MuCoEncoder:
        """Wrap a (possibly adapter-wrapped) backbone without copying it; the caller keeps ownership."""
        emb_id = SpecialTokenIds.from_tokenizer(tokenizer).emb
        return cls(tokenizer, Embedder(backbone, emb_id), image_policy, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        image_policy: ImagePolicy | str | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        autocast_dtype: str | torch.dtype | None = None,
        attn_implementation: str = "sdpa",
    ) -> MuCoEncoder:
        """An exported directory (``muco export``) or any local Qwen2-VL directory with the MuCo tokens.

        The image policy defaults to the one stored in ``muco_config.json``, else the ``eval`` preset.
        """
        from transformers import AutoTokenizer, Qwen2VLModel

        path = Path(path)
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        if EMB_TOKEN not in tok.get_vocab():
            log.warning("%s: the tokenizer has no %s; adding it (its embedding row is untrained)",
                        path, EMB_TOKEN)
        tok = add_muco_tokens(tok)
        kw: dict[str, Any] = {"attn_implementation": attn_implementation, "local_files_only": True}
        if dtype is not None:
            kw["dtype"] = as_dtype(dtype)
        model = Qwen2VLModel.from_pretrained(str(path), **kw)
        ids = SpecialTokenIds.from_tokenizer(tok)
        rows = model.get_input_embeddings().num_embeddings
        if rows < len(tok):
            raise ValueError(f"{path}: embedding table has {rows} rows but the tokenizer {len(tok)} tokens")
        if model.config.image_token_id != ids.image_pad:
            raise ValueError(f"{path}: config image_token_id {model.config.image_token_id} != tokenizer's "
                             f"<|image_pad|> id {ids.image_pad}")
        stored = None
        cfg_file = path / MUCO_CONFIG
        if cfg_file.is_file():
            stored = ImagePolicy(**json.loads(cfg_file.read_text())["image_policy"])
        model.eval()
        return cls(tok, Embedder(model, ids.emb), as_policy(image_policy, stored), device, autocast_dtype)

    # ---- properties ---------------------------------------------------------------------------------------
    @property
    def backbone(self) -> nn.Module:
        return self.embedder.backbone

    @property
    def device(self) -> torch.device:
        return next(self.embedder.parameters()).device

    @property
    def dim(self) -> int:
        return int(unwrap_qwen2vl(self.backbone).config.text_config.hidden_size)

    # ---- encoding -----------------------------------------------------------------------------------------
    def encode_user_texts(
        self, user_texts: Sequence[str], images: Sequence[Image.Image | None], batch_size: int = 32
    ) -> torch.Tensor:
        """Embeddings [n, d] (fp32, L2-normalised, CPU) of ``BASE(u)`` for ready-made user texts ``u``.

        Each ``u`` holds one ``IMG`` exactly when its image is not None. This is the harness's ``encode_fn``.
        """
        if len(user_texts) != len(images):
            raise ValueError(f"{len(user_texts)} texts but {len(images)} images")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        n = len(user_texts)
        if n == 0:
            return torch.empty(0, self.dim)
        order = sorted(range(n), key=lambda i: (images[i] is not None, len(user_texts[i])), reverse=True)
        out = torch.empty(n, self.dim)
        device = self.device
        autocast = (torch.autocast(device.type, dtype=self.autocast_dtype) if self.autocast_dtype is not None
                    else nullcontext())
        with torch.inference_mode(), eval_mode(self.embedder), autocast:
            for start in range(0, n, batch_size):
                idx = order[start : start + batch_size]
                seqs = [base_template(user_texts[i]) for i in idx]
                inputs = self.sequence_encoder(seqs, [images[i] for i in idx])
                inputs = {k: v.to(device) for k, v in inputs.items()}
                out[torch.tensor(idx)] = self.embedder(inputs, expected=1).emb.float().cpu()
        return out

    def embed(
        self,
        texts: Sequence[str | None] | None = None,
        images: Sequence[ImageInput] | None = None,
        batch_size: int = 32,
    ) -> torch.Tensor:
        """Embeddings [n, d] of items given as texts, images (PIL or paths), or aligned pairs of both.

        In a paired call an item may have text only (image None) or image only (text None or "").
        """
        if texts is None and images is None:
            raise ValueError("embed needs texts, images, or both")
        if texts is not None and images is not None and len(texts) != len(images):
            raise ValueError(f"{len(texts)} texts but {len(images)} images")
        n = len(texts) if texts is not None else len(images)
        users, imgs = [], []
        for i in range(n):
            text = (texts[i] if texts is not None else None) or ""
            image = _open(images[i] if images is not None else None)
            if not text and image is None:
                raise ValueError(f"item {i} has neither text nor image")
            check_user_text(text, f"#{i}", "text")
            users.append(IMG + "\n" if not text else single_turn_user_text(text, image is not None))
            imgs.append(image)
        return self.encode_user_texts(users, imgs, batch_size)

    def embed_texts(self, texts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        return self.embed(texts=texts, batch_size=batch_size)

    def embed_images(self, images: Sequence[Image.Image | str | Path], batch_size: int = 32) -> torch.Tensor:
        return self.embed(images=images, batch_size=batch_size)
