"""Qwen2-VL backbone: local weights or a random-init size preset, frozen vision tower, optional LoRA/DoRA."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase, Qwen2VLConfig, Qwen2VLModel

from muco.inputs.tokenizer import SpecialTokenIds
from muco.model.packing import use_varlen_sdpa

log = logging.getLogger(__name__)

LLM_LINEAR_LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Random-init shapes. `tiny` is for tests/CPU; `2b`/`7b` match Qwen2-VL-2B/7B for throughput work without weights;
# `cpu-2b-shape` keeps 2B's vision/text cost split at a size a CPU can step.
PRESETS: dict[str, dict] = {
    "tiny": dict(
        text=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, mrope_section=[4, 6, 6]),
        vision=dict(depth=2, embed_dim=64, num_heads=4, mlp_ratio=4),
    ),
    # 2B's head sizes (80 vision, 128 text) and attention-to-matmul ratios at 1/42 of its cost, so the
    # vision/text FLOP split matches 2B at any resolution and text length (benchmarks/bench_turns.py)
    "cpu-2b-shape": dict(
        text=dict(hidden_size=256, intermediate_size=9856, num_hidden_layers=4, num_attention_heads=2,
                  num_key_value_heads=1, mrope_section=[16, 24, 24]),
        vision=dict(depth=3, embed_dim=320, num_heads=4, mlp_ratio=22),
    ),
    "2b": dict(
        text=dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                  num_key_value_heads=2, mrope_section=[16, 24, 24]),
        vision=dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4),
    ),
    "7b": dict(
        text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                  num_key_value_heads=4, mrope_section=[16, 24, 24]),
        vision=dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4),
    ),
}


@dataclass
class AdapterConfig:
    """LoRA/DoRA on the language model's linear layers. Presets: `paper` (LoRA 64/64), `released` (DoRA 16/64)."""

    kind: str = "lora"  # lora | dora
    r: int = 64
    alpha: int = 64
    dropout: float = 0.0
    init: str = "default"  # default | gaussian
    target_modules: list[str] = field(default_factory=lambda: list(LLM_LINEAR_LAYERS))

    @classmethod
    def preset(cls, name: str) -> AdapterConfig:
        if name == "paper":
            return cls(kind="lora", r=64, alpha=64)
        if name == "released":
            return cls(kind="dora", r=16, alpha=64, dropout=0.1, init="gaussian")
        raise ValueError(f"unknown adapter preset {name!r}; choose 'paper' or 'released'")


@dataclass
class BackboneConfig:
    """Where the backbone comes from and how it trains."""

    pretrained: str | None = None  # local Qwen2-VL directory; None = random init from `preset`
    preset: str = "tiny"
    dtype: str = "float32"  # weights dtype; bf16 training uses Lightning's autocast instead
    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attention_2
    freeze_vision: bool = True
    adapter: AdapterConfig | None = None
    gradient_checkpointing: bool = False
    # run each batch as one packed row of its real tokens (muco.model.packing): flash_attention_2's varlen kernel,
    # or SDPA sequence by sequence; the embeddings equal the padded forward's
    padding_free: bool = False
    seed: int = 0  # random-init seed, so every rank builds the same weights

    def __post_init__(self) -> None:
        # `--model.init_args.backbone.pretrained null` reaches a nested dataclass as the string "None" through
        # LightningCLI's omegaconf+ mode; no Qwen2-VL directory is called that, so read it as "no weights"
        if isinstance(self.pretrained, str) and self.pretrained.strip() in ("", "None", "null"):
            object.__setattr__(self, "pretrained", None)
        if self.padding_free and self.attn_implementation not in ("sdpa", "flash_attention_2"):
            raise ValueError(f"backbone.padding_free needs attn_implementation sdpa or flash_attention_2, not "
                             f"{self.attn_implementation!r}; set one of them or padding_free: false")

    @classmethod
    def coerce(cls, value: BackboneConfig | dict | None) -> BackboneConfig:
        """Accept the dict form that saved hyper-parameters come back as."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        fields = dict(value)
        if isinstance(fields.get("adapter"), dict):
            fields["adapter"] = AdapterConfig(**fields["adapter"])
        return cls(**fields)


def preset_config(preset: str, ids: SpecialTokenIds, vocab_size: int) -> Qwen2VLConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown backbone preset {preset!r}; choose one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    text = dict(p["text"])
    mrope = text.pop("mrope_section")
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    if sum(mrope) * 2 != head_dim:
        raise ValueError(f"preset {preset}: mrope_section {mrope} must sum to head_dim/2 = {head_dim // 2}")
    text.update(
        vocab_size=vocab_size,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope},
        bos_token_id=ids.pad, eos_token_id=ids.pad, pad_token_id=ids.pad,
    )
    vision = dict(p["vision"], hidden_size=text["hidden_size"], patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, in_channels=3)
    return Qwen2VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids.image_pad, video_token_id=ids.video_pad,
        vision_start_token_id=ids.vision_start, vision_end_token_id=ids.vision_end,
    )


def _dtype(name: str) -> torch.dtype:
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use float32, bfloat16 or float16") from None


def load_qwen2vl(cfg: BackboneConfig, tokenizer: PreTrainedTokenizerBase) -> Qwen2VLModel:
    """A bare Qwen2VLModel (no LM head), from local weights or a preset; embedding table grown if needed."""
    ids = SpecialTokenIds.from_tokenizer(tokenizer)
    if cfg.pretrained is not None:
        path = Path(cfg.pretrained)
        if not path.is_dir():
            raise FileNotFoundError(
                f"backbone.pretrained={path} is not a directory; download Qwen2-VL weights and point at them"
            )
        model = Qwen2VLModel.from_pretrained(
            str(path), dtype=_dtype(cfg.dtype), attn_implementation=cfg.attn_implementation, local_files_only=True
        )
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = Qwen2VLModel._from_config(
                preset_config(cfg.preset, ids, len(tokenizer)), attn_implementation=cfg.attn_implementation,
                dtype=_dtype(cfg.dtype),
            )
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    if cfg.padding_free and cfg.attn_implementation == "sdpa":
        use_varlen_sdpa(model)  # flash_attention_2 reads packed rows as they are
    return model


def build_backbone(cfg: BackboneConfig, tokenizer: PreTrainedTokenizerBase) -> nn.Module:
    """Qwen2VLModel with the vision tower frozen, optional adapter, optional gradient checkpointing."""
    return prepare_for_training(load_qwen2vl(cfg, tokenizer), cfg, SpecialTokenIds.from_tokenizer(tokenizer))


def prepare_for_training(model: Qwen2VLModel, cfg: BackboneConfig, ids: SpecialTokenIds) -> nn.Module:
    """``cfg``'s vision freezing, adapter and gradient checkpointing on loaded (or merged) weights.

    A frozen vision tower stays out of autograd (``keep_frozen_vision_out_of_autograd``), checkpointed or not.
    The adapter goes on before checkpointing, so PEFT adds no input-gradient hooks of its own.
    """
    if cfg.freeze_vision:
        model.visual.requires_grad_(False)
    keep_frozen_vision_out_of_autograd(model)
    if cfg.adapter is not None:
        model = apply_adapter(model, cfg.adapter, ids)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(unwrap_qwen2vl(model))
    return model


def _output_requires_grad(_module: nn.Module, _args: object, output: torch.Tensor) -> None:
    if torch.is_grad_enabled():
        output.requires_grad_(True)


def enable_gradient_checkpointing(model: Qwen2VLModel) -> None:
    """Non-reentrant checkpointing of every vision block and decoder layer; only the LLM's input embeddings
    are made to require grad.

    Checkpointed decoder layers need an input that requires grad even when the embedding table is frozen, so
    transformers (``enable_input_require_grads``, called by ``gradient_checkpointing_enable`` and by PEFT) hooks
    every input embedding of the model. That includes the vision tower's ``patch_embed``: a frozen tower then
    enters autograd and is recomputed and backpropagated through on every step. Those hooks are replaced by one
    on the language model's ``embed_tokens`` (the ``TokenRows`` embedding, with an adapter). A trainable tower
    needs no hook: its own weights put it in the graph.
    """
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.disable_input_require_grads()
    # kept where transformers keeps its own, so `disable_input_require_grads` removes it too
    model._require_grads_hooks = [model.language_model.get_input_embeddings().register_forward_hook(
        _output_requires_grad)]


# grad modes to restore after frozen vision forwards (grad mode is per thread)
_grad_mode_stack = threading.local()


def _frozen_vision_enter(module: nn.Module, _args: object) -> None:
    stack = _grad_mode_stack.__dict__.setdefault("modes", [])
    stack.append(torch.is_grad_enabled())
    if stack[-1] and not any(p.requires_grad for p in module.parameters()):
        torch.set_grad_enabled(False)


def _frozen_vision_leave(_module: nn.Module, _args: object, _output: object) -> None:
    torch.set_grad_enabled(_grad_mode_stack.modes.pop())


def keep_frozen_vision_out_of_autograd(model: Qwen2VLModel) -> None:
    """Run the vision tower (blocks and merger) without autograd while none of its weights requires grad.

    Its output then enters the LLM's input embeddings as a constant, whatever hooks make tensors require grad
    (``enable_input_require_grads``), and its checkpointed blocks run as plain forwards. Checked per call, so a
    tower whose weights are unfrozen later trains as usual. Idempotent; the hooks are module-level functions,
    so the model still pickles and deep-copies.
    """
    visual = model.visual
    if _frozen_vision_enter in visual._forward_pre_hooks.values():
        return
    visual.register_forward_pre_hook(_frozen_vision_enter)
    # `always_call`: the grad mode comes back when the forward raises, too
    visual.register_forward_hook(_frozen_vision_leave, always_call=True)


def apply_adapter(model: Qwen2VLModel, cfg: AdapterConfig, ids: SpecialTokenIds) -> nn.Module:
    """LoRA/DoRA on the language model's linear layers only, plus trainable `<|emb|>`/`<|mask|>` rows."""
    from peft import LoraConfig, get_peft_model

    from muco.model.token_rows import add_token_rows

    if cfg.kind not in ("lora", "dora"):
        raise ValueError(f"adapter.kind must be 'lora' or 'dora', got {cfg.kind!r}")
    targets = "|".join(cfg.target_modules)
    lcfg = LoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, use_dora=cfg.kind == "dora",
        init_lora_weights="gaussian" if cfg.init == "gaussian" else True,
        # regex: the vision tower and merger are never adapted
        target_modules=rf".*language_model.*\.({targets})$",
    )
    peft_model = get_peft_model(model, lcfg)
    # the two rows train through `TokenRows`, not PEFT's `trainable_token_indices`, whose layer copies the whole
    # table on every forward (muco/model/token_rows.py); added after PEFT froze the base weights
    add_token_rows(unwrap_qwen2vl(peft_model).language_model, "embed_tokens", [ids.emb, ids.mask])
    return peft_model


def unwrap_qwen2vl(model: nn.Module) -> Qwen2VLModel:
    """The Qwen2VLModel inside a PEFT wrapper (or the model itself)."""
    base = getattr(model, "get_base_model", None)
    return base() if callable(base) else model
