"""Transformer encoder classifier over token ids: attention and layer norm, batched by vmap."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ._spec import ModelSpec

_SIZES: dict[str, dict[str, Any]] = {
    "tiny": {
        "vocab_size": 50, "seq_len": 8, "model_features": 16, "num_heads": 2, "num_layers": 2, "num_classes": 10,
    },
    "full": {
        "vocab_size": 30522, "seq_len": 128, "model_features": 512, "num_heads": 8, "num_layers": 6,
        "num_classes": 1000,
    },
}


class EncoderBlock(nn.Module):
    """Pre-LN block: x + attn(LN(x)), then x + MLP(LN(x)) with a 4x GELU hidden layer."""

    num_heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        model_features = x.shape[-1]
        y = nn.LayerNorm(dtype=self.dtype)(x)
        y = nn.MultiHeadDotProductAttention(
            num_heads=self.num_heads, dtype=self.dtype, deterministic=True
        )(y)
        x = x + y
        y = nn.LayerNorm(dtype=self.dtype)(x)
        y = nn.gelu(nn.Dense(4 * model_features, dtype=self.dtype)(y))
        return x + nn.Dense(model_features, dtype=self.dtype)(y)


class TransformerClassifier(nn.Module):
    """Token ids [b, T] int32 -> logits [b, num_classes] (mean-pooled over positions)."""

    vocab_size: int
    seq_len: int
    model_features: int
    num_heads: int
    num_layers: int
    num_classes: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, token_ids: jax.Array) -> jax.Array:
        x = nn.Embed(self.vocab_size, self.model_features, dtype=self.dtype)(token_ids)
        positions = self.param(
            "pos_embedding", nn.initializers.normal(0.02), (self.seq_len, self.model_features)
        )
        x = x + positions[: token_ids.shape[-1]].astype(self.dtype)
        for _ in range(self.num_layers):
            x = EncoderBlock(self.num_heads, dtype=self.dtype)(x)
        x = nn.LayerNorm(dtype=self.dtype)(x)
        return nn.Dense(self.num_classes, dtype=self.dtype)(jnp.mean(x, axis=1))


def build(size: str, dtype: np.dtype) -> ModelSpec:
    """The transformer classifier at `size` ("tiny" or "full") computing in `dtype`."""
    config = _SIZES[size]
    return ModelSpec(
        name="transformer",
        size=size,
        module=TransformerClassifier(**config, dtype=dtype),
        input_shape=(config["seq_len"],),
        input_dtype=np.dtype(np.int32),
        num_classes=config["num_classes"],
        vocab_size=config["vocab_size"],
    )
