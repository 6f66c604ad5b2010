"""MobileNetV2 (Sandler et al. 2018): inverted residuals with depthwise 3x3 convs.

Depthwise convs (`feature_group_count` = channels) are the kernels that batch worst across
tenants, which is why this architecture is in the zoo. BatchNorm is in inference mode and
padding is symmetric, as in torchvision.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ._spec import ModelSpec

_CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

# (expand ratio t, output channels c, repeats n, first stride s), from the paper's Table 2.
Stage = tuple[int, int, int, int]
_FULL_STAGES: tuple[Stage, ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)

_SIZES: dict[str, dict[str, Any]] = {
    "full": {
        "stem_features": 32, "stages": _FULL_STAGES, "last_features": 1280, "num_classes": 1000, "image_size": 224,
    },
    # Tiny keeps each kind of block: no expansion, expansion with stride 2, a residual repeat.
    "tiny": {
        "stem_features": 8, "stages": ((1, 8, 1, 1), (4, 8, 2, 2), (4, 16, 1, 2)), "last_features": 32,
        "num_classes": 10, "image_size": 16,
    },
}


def _conv_bn(
    x: jax.Array, features: int, kernel: int, strides: int, dtype: Any, groups: int = 1,
    relu6: bool = True,
) -> jax.Array:
    pad = kernel // 2
    x = nn.Conv(
        features,
        (kernel, kernel),
        strides=(strides, strides),
        padding=((pad, pad), (pad, pad)),
        feature_group_count=groups,
        use_bias=False,
        kernel_init=_CONV_INIT,
        dtype=dtype,
    )(x)
    x = nn.BatchNorm(use_running_average=True, momentum=0.9, epsilon=1e-5, dtype=dtype)(x)
    return nn.relu6(x) if relu6 else x


class InvertedResidual(nn.Module):
    """1x1 expand (ReLU6), 3x3 depthwise (ReLU6), 1x1 linear projection; residual if shapes match."""

    features: int
    strides: int
    expand_ratio: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        in_features = x.shape[-1]
        hidden_features = in_features * self.expand_ratio
        y = x
        if self.expand_ratio != 1:
            y = _conv_bn(y, hidden_features, 1, 1, self.dtype)
        y = _conv_bn(y, hidden_features, 3, self.strides, self.dtype, groups=hidden_features)
        y = _conv_bn(y, self.features, 1, 1, self.dtype, relu6=False)
        if self.strides == 1 and in_features == self.features:
            y = y + x
        return y


class MobileNetV2(nn.Module):
    """Images [b, h, w, 3] -> logits [b, num_classes]."""

    stem_features: int
    stages: tuple[Stage, ...]
    last_features: int
    num_classes: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        x = _conv_bn(x, self.stem_features, 3, 2, self.dtype)
        for expand_ratio, features, repeats, first_strides in self.stages:
            for index in range(repeats):
                strides = first_strides if index == 0 else 1
                x = InvertedResidual(features, strides, expand_ratio, dtype=self.dtype)(x)
        x = _conv_bn(x, self.last_features, 1, 1, self.dtype)
        x = jnp.mean(x, axis=(1, 2))
        # The classifier's dropout is the identity in inference mode.
        return nn.Dense(self.num_classes, dtype=self.dtype)(x)


def build(size: str, dtype: np.dtype) -> ModelSpec:
    """MobileNetV2 (width multiplier 1.0) at `size` ("tiny" or "full") computing in `dtype`."""
    config = dict(_SIZES[size])
    image_size = config.pop("image_size")
    return ModelSpec(
        name="mobilenetv2",
        size=size,
        module=MobileNetV2(**config, dtype=dtype),
        input_shape=(image_size, image_size, 3),
        input_dtype=np.dtype(np.float32),
        num_classes=config["num_classes"],
    )
