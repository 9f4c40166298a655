"""MuCo: multi-turn contrastive training of Qwen2-VL multimodal embedders."""

__version__ = "0.1.0"
