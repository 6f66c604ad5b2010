"""MLP classifier: the smallest architecture, where per-kernel launch overhead dominates."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ._spec import ModelSpec

_SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"in_features": 16, "hidden_features": (32,), "num_classes": 10},
    "full": {"in_features": 784, "hidden_features": (1024, 1024), "num_classes": 10},
}


class MLP(nn.Module):
    """Dense + ReLU layers, then a dense head: x [b, in_features] -> logits [b, num_classes]."""

    hidden_features: tuple[int, ...]
    num_classes: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        for features in self.hidden_features:
            x = nn.relu(nn.Dense(features, dtype=self.dtype)(x))
        return nn.Dense(self.num_classes, dtype=self.dtype)(x)


def build(size: str, dtype: np.dtype) -> ModelSpec:
    """The MLP at `size` ("tiny" or "full") computing in `dtype`."""
    config = _SIZES[size]
    module = MLP(config["hidden_features"], config["num_classes"], dtype=dtype)
    return ModelSpec(
        name="mlp",
        size=size,
        module=module,
        input_shape=(config["in_features"],),
        input_dtype=np.dtype(np.float32),
        num_classes=config["num_classes"],
    )
