"""Model: tokenizers, the Qwen2-VL backbone, pooling and the embedder."""
