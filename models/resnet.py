"""ResNet v1.5 (He et al. 2016; stride on the 3x3 conv of the bottleneck, as in torchvision).

ResNet-18 (basic blocks) and ResNet-50 (bottlenecks) share the stem, stages and head; only the
block and the stage depths differ. BatchNorm uses its running averages (inference mode), so
the variables are {"params", "batch_stats"}. Padding is explicit and symmetric, as in
torchvision, so that ported weights give the same outputs.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ._spec import ModelSpec

# torchvision's kaiming_normal_(mode="fan_out", nonlinearity="relu"): keeps activations of a
# randomly initialised deep network finite, which the benchmarks rely on in bfloat16.
_CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
_PAD_1 = ((1, 1), (1, 1))


def _conv(features: int, kernel: int, strides: int, dtype: Any, name: str | None = None) -> nn.Conv:
    padding = ((kernel // 2, kernel // 2),) * 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(strides, strides),
        padding=padding,
        use_bias=False,
        kernel_init=_CONV_INIT,
        dtype=dtype,
        name=name,
    )


def _batch_norm(dtype: Any, name: str | None = None) -> nn.BatchNorm:
    return nn.BatchNorm(use_running_average=True, momentum=0.9, epsilon=1e-5, dtype=dtype, name=name)


class BasicBlock(nn.Module):
    """Two 3x3 convs; output width `features`."""

    features: int
    strides: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = _conv(self.features, 3, self.strides, self.dtype)(x)
        y = nn.relu(_batch_norm(self.dtype)(y))
        y = _conv(self.features, 3, 1, self.dtype)(y)
        y = _batch_norm(self.dtype)(y)
        return nn.relu(y + _shortcut(x, y.shape[-1], self.strides, self.dtype))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided, v1.5), 1x1 expand; output width 4 * `features`."""

    features: int
    strides: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = _conv(self.features, 1, 1, self.dtype)(x)
        y = nn.relu(_batch_norm(self.dtype)(y))
        y = _conv(self.features, 3, self.strides, self.dtype)(y)
        y = nn.relu(_batch_norm(self.dtype)(y))
        y = _conv(4 * self.features, 1, 1, self.dtype)(y)
        y = _batch_norm(self.dtype)(y)
        return nn.relu(y + _shortcut(x, y.shape[-1], self.strides, self.dtype))


def _shortcut(x: jax.Array, features: int, strides: int, dtype: Any) -> jax.Array:
    """Identity, or a strided 1x1 conv + BN where the shape changes (called inside a block)."""
    if x.shape[-1] == features and strides == 1:
        return x
    x = _conv(features, 1, strides, dtype, name="proj_conv")(x)
    return _batch_norm(dtype, name="proj_bn")(x)


class ResNet(nn.Module):
    """Images [b, h, w, c] -> logits [b, num_classes].

    Stem (7x7/2 conv, BN, ReLU, 3x3/2 max pool), then one stage per entry of `stage_sizes`
    (the first block of every stage after the first has stride 2), global average pool, dense.
    """

    stage_sizes: tuple[int, ...]
    stage_features: tuple[int, ...]
    block: type[BasicBlock | Bottleneck]
    stem_features: int
    num_classes: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        x = _conv(self.stem_features, 7, 2, self.dtype)(x)
        x = nn.relu(_batch_norm(self.dtype)(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=_PAD_1)
        for stage, (num_blocks, features) in enumerate(zip(self.stage_sizes, self.stage_features)):
            for index in range(num_blocks):
                strides = 2 if stage > 0 and index == 0 else 1
                x = self.block(features, strides, dtype=self.dtype)(x)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=self.dtype)(x)


_FULL_FEATURES = (64, 128, 256, 512)

_SIZES: dict[tuple[str, str], dict[str, Any]] = {
    ("resnet18", "full"): {
        "stage_sizes": (2, 2, 2, 2), "stage_features": _FULL_FEATURES, "block": BasicBlock,
        "stem_features": 64, "num_classes": 1000, "image_size": 224,
    },
    ("resnet50", "full"): {
        "stage_sizes": (3, 4, 6, 3), "stage_features": _FULL_FEATURES, "block": Bottleneck,
        "stem_features": 64, "num_classes": 1000, "image_size": 224,
    },
    # Tiny: the same blocks, stem and head, two short narrow stages on 32x32 images.
    ("resnet18", "tiny"): {
        "stage_sizes": (1, 1), "stage_features": (8, 16), "block": BasicBlock,
        "stem_features": 8, "num_classes": 10, "image_size": 32,
    },
    ("resnet50", "tiny"): {
        "stage_sizes": (1, 1), "stage_features": (4, 8), "block": Bottleneck,
        "stem_features": 8, "num_classes": 10, "image_size": 32,
    },
}


def build(name: str, size: str, dtype: np.dtype) -> ModelSpec:
    """ResNet `name` ("resnet18" or "resnet50") at `size` ("tiny" or "full") in `dtype`."""
    config = dict(_SIZES[name, size])
    image_size = config.pop("image_size")
    module = ResNet(**config, dtype=dtype)
    return ModelSpec(
        name=name,
        size=size,
        module=module,
        input_shape=(image_size, image_size, 3),
        input_dtype=np.dtype(np.float32),
        num_classes=config["num_classes"],
    )
