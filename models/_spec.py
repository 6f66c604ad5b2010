"""`ModelSpec`: one architecture at one size, with everything a benchmark or test needs.

The spec is a frozen, hashable dataclass so that `spec.apply_fn` (a bound method) is a stable
cache key for compiled programs: two `make()` calls with the same arguments give equal specs.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Variables = dict[str, Any]

# BatchNorm running statistics are drawn, not left at the trivial mean 0 / var 1, so that a
# bug which drops or mixes up `batch_stats` changes the output.
_BN_MEAN_STD = 0.1
_BN_VAR_RANGE = (0.5, 1.5)


def float_dtype(dtype: Any) -> np.dtype:
    """Canonical floating dtype (so that jnp.float32 and np.float32 key the same cache entry).

    Raises:
      ValueError: `dtype` is not a floating dtype.
    """
    try:
        canonical = np.dtype(dtype)
    except TypeError as error:  # a name NumPy does not know ("nonsense")
        raise ValueError(f"expected a floating dtype (float32, bfloat16, ...), got {dtype!r}") from error
    if not jnp.issubdtype(canonical, jnp.floating):
        raise ValueError(f"expected a floating dtype (float32, bfloat16, ...), got {canonical}")
    return canonical


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One architecture at one size, in inference mode.

    Attributes:
      name: architecture name, one of `models.ARCHITECTURES`.
      size: "tiny" (CPU tests) or "full" (the real architecture, for GPU benchmarks).
      module: the Flax linen module; BatchNorm layers use their running averages.
      input_shape: shape of one row, without the batch axis, e.g. (32, 32, 3) or (8,).
      input_dtype: float32 for images and sequences of features, int32 for token ids, uint8
        for images of a pixel model (``pixels``).
      num_classes: width of the logits.
      vocab_size: token ids lie in [0, vocab_size); None for float inputs.
      pixels: inputs are uint8 pixels in [0, 255] (the bytes a camera or an image decoder
        hands over), mapped to [-1, 1] in float32 on the device before the first layer:
        a quarter of the bytes of float32 rows to copy and send per request.
    """

    name: str
    size: str
    module: nn.Module
    input_shape: tuple[int, ...]
    input_dtype: np.dtype
    num_classes: int
    vocab_size: int | None = None
    pixels: bool = False

    def init(self, seed: int | jax.Array, dtype: Any = jnp.float32) -> Variables:
        """Variables of one tenant, deterministic from `seed`; nothing is downloaded.

        `seed` may be a traced integer, so `jax.vmap(spec.init)(jnp.arange(k))` builds k
        stacked tenants at once.

        Args:
          seed: integer in [0, 2**31).
          dtype: floating leaves (params and batch_stats) are cast to this dtype.

        Returns:
          {"params": ...} plus {"batch_stats": ...} for BatchNorm models, whose running mean
          is normal * 0.1 and running variance uniform in [0.5, 1.5).
        """
        dtype = float_dtype(dtype)

        def cast(leaf: jax.Array) -> jax.Array:
            return leaf.astype(dtype) if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf

        # Cast outside the jitted init: every dtype reuses the one compiled initialiser, whose
        # compile (random number generation included) dominates the cost of a new tenant.
        return jax.tree.map(cast, _init_variables(self, seed))

    def apply_fn(self, variables: Variables, x: jax.Array) -> jax.Array:
        """Logits [b, num_classes] of one tenant for a batch x [b, *input_shape].

        Pure in (variables, x): safe under jax.jit and jax.vmap over a stacked tenant axis.
        """
        if self.pixels:
            x = x.astype(jnp.float32) * (2.0 / 255.0) - 1.0
        return self.module.apply(variables, x)

    def random_input(
        self, seed_or_rng: int | np.random.Generator, n: int, dtype: Any = None
    ) -> np.ndarray:
        """A random batch [n, *input_shape]: standard normal floats, ids in [0, vocab_size),
        or uniform uint8 pixels in [0, 255] for a pixel model.

        Args:
          seed_or_rng: an integer seed or a numpy Generator (which is advanced).
          n: number of rows.
          dtype: result dtype; defaults to `input_dtype`.
        """
        rng = np.random.default_rng(seed_or_rng)
        shape = (n, *self.input_shape)
        if self.vocab_size is not None:
            x = rng.integers(0, self.vocab_size, size=shape, dtype=np.int32)
        elif self.pixels:
            x = rng.integers(0, 256, size=shape, dtype=np.uint8)
        else:
            x = rng.standard_normal(shape, dtype=np.float32)
        return x.astype(self.input_dtype if dtype is None else dtype)


@functools.partial(jax.jit, static_argnames=("spec",))
def _init_variables(spec: ModelSpec, seed: jax.Array) -> Variables:
    # Jitted and keyed on the (hashable) spec: initialising many tenants of a full-size model
    # compiles once instead of dispatching every initializer op by op for each tenant.
    params_key, stats_key = jax.random.split(jax.random.key(seed))
    x_example = jnp.zeros((1, *spec.input_shape), jnp.float32 if spec.pixels else spec.input_dtype)
    variables = dict(spec.module.init(params_key, x_example))
    if "batch_stats" in variables:
        variables["batch_stats"] = _random_batch_stats(variables["batch_stats"], stats_key)
    return variables


def _random_batch_stats(batch_stats: Any, key: jax.Array) -> Any:
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(batch_stats)
    keys = jax.random.split(key, len(leaves_with_path))
    drawn = []
    for leaf_key, (path, leaf) in zip(keys, leaves_with_path):
        stat_name = getattr(path[-1], "key", None)
        if stat_name == "mean":
            drawn.append(_BN_MEAN_STD * jax.random.normal(leaf_key, leaf.shape, leaf.dtype))
        elif stat_name == "var":
            low, high = _BN_VAR_RANGE
            drawn.append(jax.random.uniform(leaf_key, leaf.shape, leaf.dtype, low, high))
        else:
            drawn.append(leaf)
    return jax.tree_util.tree_unflatten(treedef, drawn)
