"""Reference model zoo: the architectures jaxmt is tested and benchmarked on.

Each architecture comes at two sizes: "tiny" (a forward pass compiles in seconds on a CPU, for
tests) and "full" (the real architecture: 224x224x3 images and 1000 classes for the vision
models, for GPU benchmarks). `make` returns a `ModelSpec` whose `apply_fn(variables, x)` is
the one-tenant function that jaxmt vmaps over a stacked tenant axis.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np

from . import mlp, mobilenetv2, resnet, rnn, transformer
from ._spec import ModelSpec, Variables, float_dtype

__all__ = ["ARCHITECTURES", "IMAGE_ARCHITECTURES", "SIZES", "ModelSpec", "Variables", "make"]

ARCHITECTURES: tuple[str, ...] = ("mlp", "resnet18", "resnet50", "mobilenetv2", "gru", "transformer")
SIZES: tuple[str, ...] = ("tiny", "full")
IMAGE_ARCHITECTURES: tuple[str, ...] = ("resnet18", "resnet50", "mobilenetv2")  # the ones `make(..., pixels=True)` takes

_BUILDERS: dict[str, Callable[[str, Any], ModelSpec]] = {
    "mlp": mlp.build,
    "resnet18": lambda size, dtype: resnet.build("resnet18", size, dtype),
    "resnet50": lambda size, dtype: resnet.build("resnet50", size, dtype),
    "mobilenetv2": mobilenetv2.build,
    "gru": rnn.build,
    "transformer": transformer.build,
}


def make(name: str, size: str = "tiny", *, dtype: Any = jnp.float32, pixels: bool = False) -> ModelSpec:
    """The spec of architecture `name` at `size`, computing in `dtype`.

    Equal arguments return the same spec object, so `spec.apply_fn` (a bound method, which
    hashes by the identity of its spec) keys a compiled-program cache across calls.

    Args:
      name: one of `ARCHITECTURES`.
      size: "tiny" or "full".
      dtype: compute dtype of the module (float32, or bfloat16 for benchmarks); the dtype of
        the variables is chosen separately, by `ModelSpec.init`.
      pixels: image models only: take uint8 pixels and map them to [-1, 1] on the device
        (`ModelSpec.pixels`) instead of taking float32 rows.

    Returns:
      The `ModelSpec`; nothing is initialised until `spec.init(seed)`.

    Raises:
      ValueError: unknown `name` or `size`, a non-floating `dtype`, or `pixels` for a model
        whose input is not an image.

    Example:
      >>> spec = make("mlp")
      >>> variables = spec.init(seed=0)
      >>> spec.apply_fn(variables, spec.random_input(0, n=4)).shape
      (4, 10)
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown architecture {name!r}; expected one of {ARCHITECTURES}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r} for {name!r}; expected one of {SIZES}")
    return _make_cached(name, size, float_dtype(dtype), bool(pixels))


@functools.cache
def _make_cached(name: str, size: str, dtype: Any, pixels: bool) -> ModelSpec:
    spec = _BUILDERS[name](size, dtype)
    if not pixels:
        return spec
    if name not in IMAGE_ARCHITECTURES:
        raise ValueError(f"pixels=True needs an image model ({IMAGE_ARCHITECTURES}); {name!r} takes {spec.input_dtype.name} rows of shape {spec.input_shape}")
    return dataclasses.replace(spec, input_dtype=np.dtype(np.uint8), pixels=True)
