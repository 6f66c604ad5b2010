"""GRU sequence classifier: a scan over time, the recurrent kernel shape that vmap must batch."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ._spec import ModelSpec

_SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"seq_len": 6, "in_features": 8, "hidden_features": 16, "num_layers": 1, "num_classes": 10},
    "full": {"seq_len": 128, "in_features": 64, "hidden_features": 512, "num_layers": 2, "num_classes": 1000},
}


class GRUClassifier(nn.Module):
    """Sequences [b, T, F] -> logits [b, num_classes] from the last layer's final hidden state."""

    hidden_features: int
    num_layers: int
    num_classes: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        for _ in range(self.num_layers):
            x = nn.RNN(nn.GRUCell(self.hidden_features, dtype=self.dtype))(x)  # [b, T, H]
        return nn.Dense(self.num_classes, dtype=self.dtype)(x[:, -1])


def build(size: str, dtype: np.dtype) -> ModelSpec:
    """The GRU classifier at `size` ("tiny" or "full") computing in `dtype`."""
    config = _SIZES[size]
    module = GRUClassifier(
        config["hidden_features"], config["num_layers"], config["num_classes"], dtype=dtype
    )
    return ModelSpec(
        name="gru",
        size=size,
        module=module,
        input_shape=(config["seq_len"], config["in_features"]),
        input_dtype=np.dtype(np.float32),
        num_classes=config["num_classes"],
    )
