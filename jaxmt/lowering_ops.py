"""Equivalent lowerings of one tenant-batched convolution, in a canonical layout.

Every function here computes, for K tenants at once, exactly what ``jax.vmap`` of
``lax.conv_general_dilated`` computes: tenant k's output is tenant k's input convolved with
tenant k's filter. They differ only in which kernels XLA emits, and so in speed, which
depends on the device, the layer shape and the dtype (see ``jaxmt.autotune``).

Layouts are canonical, whatever the model used (the caller transposes in and out, a no-op
for Flax, which is NHWC/HWIO):

    x  [K, N, *spatial, C]          (C = input channels of one tenant)
    w  [K, *window, I, O]           (I = C / feature_group_count)
    y  [K, N, *out_spatial, O]

The lowerings (``CONV_LOWERINGS``):

  vmap            XLA's batching rule: tenants folded into feature groups of one grouped
                  conv (feature_group_count = K * groups), NHWC.
  einsum          1x1 convs as one batched matmul over the tenant axis (pad and stride by
                  slicing first); grouped 1x1 convs batch over (tenant, group).
  loop            one dense conv per tenant (a plain matmul for 1x1), unrolled in the
                  program, then stacked.
  map             the same conv inside ``lax.map`` (a loop in the program: small HLO for
                  large K, but no overlap between iterations).
  batch_group     tenants folded into the batch axis with ``batch_group_count = K`` (the
                  form XLA uses for filter gradients); filters concatenated on O. XLA on
                  CPUs computes it densely with zero masks, so there one tenant's NaN or
                  Inf filter reaches the others' outputs (0 x NaN). The rule never picks
                  it there, and a CPU is not autotuned unless asked (which may pick it);
                  forced on a CPU it does not keep tenants apart.
  grouped_nchw    tenants folded into channel groups in NCHW/OIHW logical layout.
  im2col          patches [K, N*HW, kh*kw*C] from strided slices, then a batched matmul.
  im2col_rows     patches over the window's columns only, [K, N, Hp, W, kw*C] (a third of
                  im2col's bytes for a 3x3 window); each window row is then a batched
                  matmul on a slice of those rows (contiguous for one image per tenant),
                  summed in float32.
  shift_sum       sum over the kh*kw window offsets of a batched 1x1 matmul of a shifted,
                  strided slice (float32 accumulation).
  depthwise_direct  depthwise convs (one input channel per group) as a fused elementwise
                  multiply-add over the window offsets (float32 accumulation).
  implicit_gemm   2-d kxk convs of stride 1 or 2 in bfloat16, float16 or float32 as one Pallas
                  kernel that accumulates the window's shifted matmuls per output tile,
                  building no patches (stride 2 after a space-to-depth rearrangement;
                  ``jaxmt.pallas_conv``; float32 accumulation; GPU, or Pallas's interpreter
                  elsewhere; XLA's conv gradient).

The float32-accumulating forms (im2col_rows, shift_sum, depthwise_direct) round once at the end, the
others round as the conv or matmul they call; all agree with the reference within the
dtype's tolerance, which the tests check on CPU.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxmt import pallas_conv

CONV_LOWERINGS: tuple[str, ...] = (
    "vmap",
    "einsum",
    "loop",
    "map",
    "batch_group",
    "grouped_nchw",
    "im2col",
    "im2col_rows",
    "shift_sum",
    "depthwise_direct",
    "implicit_gemm",
)


@dataclasses.dataclass(frozen=True)
class ConvSignature:
    """Everything that decides which lowering of a tenant-batched conv is fastest.

    Shapes are of one tenant in the canonical layout: ``lhs_shape`` = [N, *spatial, C],
    ``rhs_shape`` = [*window, I, O]. ``precision`` is the repr of the conv's precision.
    """

    tenants: int
    lhs_shape: tuple[int, ...]
    rhs_shape: tuple[int, ...]
    window_strides: tuple[int, ...]
    padding: tuple[tuple[int, int], ...]
    lhs_dilation: tuple[int, ...]
    rhs_dilation: tuple[int, ...]
    feature_group_count: int = 1
    batch_group_count: int = 1
    lhs_dtype: str = "float32"
    rhs_dtype: str = "float32"
    preferred_element_type: str | None = None
    precision: str = "None"

    @property
    def spatial_dims(self) -> int:
        """How many spatial axes the conv has (2 for images)."""
        return len(self.lhs_shape) - 2

    @property
    def window(self) -> tuple[int, ...]:
        """The filter's spatial extent (kh, kw, ...)."""
        return self.rhs_shape[:-2]

    @property
    def in_channels(self) -> int:
        """C: one tenant's input channels."""
        return self.lhs_shape[-1]

    @property
    def out_channels(self) -> int:
        """O: one tenant's output channels."""
        return self.rhs_shape[-1]

    @property
    def is_depthwise(self) -> bool:
        """One input channel per feature group: what ``depthwise_direct`` computes."""
        g = self.feature_group_count
        return g > 1 and g == self.in_channels and self.batch_group_count == 1

    @property
    def kind(self) -> str:
        """"1x1", "depthwise", "grouped" (other feature groups) or "kxk" (dense, larger window)."""
        if self.is_depthwise:
            return "depthwise"
        if self.feature_group_count > 1 or self.batch_group_count > 1:
            return "grouped"
        return "1x1" if all(r == 1 for r in self.window) else "kxk"

    @property
    def out_spatial(self) -> tuple[int, ...]:
        """The output's spatial shape, after padding, dilations and strides."""
        return tuple(
            _out_size(s * ld - (ld - 1), lo + hi, r, rd, st)
            for s, (lo, hi), r, rd, st, ld in zip(
                self.lhs_shape[1:-1], self.padding, self.window, self.rhs_dilation, self.window_strides, self.lhs_dilation
            )
        )

    @property
    def flops(self) -> int:
        """Multiply-adds x 2 of all K tenants (the dense-equivalent work)."""
        n = self.lhs_shape[0] // self.batch_group_count
        return 2 * self.tenants * n * math.prod(self.out_spatial) * math.prod(self.window) * self.rhs_shape[-2] * self.out_channels

    def family(self, with_dtype: bool = True) -> str:
        """The key with the tenant count and the batch size left out (and the dtypes, if asked):
        the same layer at another K x N, whose measured choice is the best guess for this one."""
        other = dataclasses.replace(self, tenants=0, lhs_shape=(0, *self.lhs_shape[1:]))
        if not with_dtype:
            other = dataclasses.replace(other, lhs_dtype="*", rhs_dtype="*")
        return other.key

    @property
    def key(self) -> str:
        """A short, stable, human-readable string naming the signature (a cache key)."""
        dims = lambda t: "x".join(str(d) for d in t)
        pad = ",".join(f"{lo}:{hi}" for lo, hi in self.padding)
        parts = [
            f"conv K={self.tenants}",
            f"x={dims(self.lhs_shape)}",
            f"w={dims(self.rhs_shape)}",
            f"s={dims(self.window_strides)}",
            f"p={pad}",
        ]
        if any(d != 1 for d in self.lhs_dilation):
            parts.append(f"ld={dims(self.lhs_dilation)}")
        if any(d != 1 for d in self.rhs_dilation):
            parts.append(f"rd={dims(self.rhs_dilation)}")
        if self.feature_group_count != 1:
            parts.append(f"g={self.feature_group_count}")
        if self.batch_group_count != 1:
            parts.append(f"bg={self.batch_group_count}")
        dtypes = self.lhs_dtype if self.rhs_dtype == self.lhs_dtype else f"{self.lhs_dtype}/{self.rhs_dtype}"
        parts.append(f"dt={dtypes}")
        if self.preferred_element_type is not None:
            parts.append(f"out={self.preferred_element_type}")
        if self.precision != "None":
            parts.append(f"prec={self.precision}")
        return " ".join(parts)


@dataclasses.dataclass(frozen=True)
class ConvParams:
    """The static arguments of one conv (canonical layout), as ``lax.conv_general_dilated`` takes them."""

    window_strides: tuple[int, ...]
    padding: tuple[tuple[int, int], ...]
    lhs_dilation: tuple[int, ...]
    rhs_dilation: tuple[int, ...]
    feature_group_count: int = 1
    batch_group_count: int = 1
    precision: Any = None
    preferred_element_type: Any = None

    @classmethod
    def of(cls, sig: ConvSignature) -> ConvParams:
        """The params of a signature (precision and preferred type as the signature names them)."""
        pet = None if sig.preferred_element_type is None else np.dtype(sig.preferred_element_type)
        return cls(sig.window_strides, sig.padding, sig.lhs_dilation, sig.rhs_dilation,
                   sig.feature_group_count, sig.batch_group_count, None, pet)


def canonical_dimension_numbers(spatial_dims: int) -> lax.ConvDimensionNumbers:
    """N, spatial..., C / spatial..., I, O / N, spatial..., C (NHWC, HWIO, NHWC for 2-d)."""
    nd = spatial_dims
    spatial = tuple(range(1, nd + 1))
    return lax.ConvDimensionNumbers((0, nd + 1, *spatial), (nd + 1, nd, *range(nd)), (0, nd + 1, *spatial))


def conv_one(x: jax.Array, w: jax.Array, p: ConvParams, **overrides: Any) -> jax.Array:
    """The plain conv of one tenant in the canonical layout (the reference of every lowering)."""
    kw = dict(
        window_strides=p.window_strides,
        padding=p.padding,
        lhs_dilation=p.lhs_dilation,
        rhs_dilation=p.rhs_dilation,
        dimension_numbers=canonical_dimension_numbers(x.ndim - 2),
        feature_group_count=p.feature_group_count,
        batch_group_count=p.batch_group_count,
        precision=p.precision,
        preferred_element_type=p.preferred_element_type,
    )
    kw.update(overrides)
    return lax.conv_general_dilated(x, w, **kw)


def _out_size(size: int, pad: int, window: int, dilation: int, stride: int) -> int:
    return max(0, (size + pad - (window - 1) * dilation - 1) // stride + 1)


def _out_dtype(x: jax.Array, p: ConvParams) -> Any:
    return x.dtype if p.preferred_element_type is None else p.preferred_element_type


def _padded(x: jax.Array, p: ConvParams) -> jax.Array:
    """x [K, N, *S, C] zero-padded (or cropped, for negative padding) on the spatial axes."""
    if all(lo == 0 and hi == 0 for lo, hi in p.padding):
        return x
    config = [(0, 0, 0), (0, 0, 0), *((lo, hi, 0) for lo, hi in p.padding), (0, 0, 0)]
    return lax.pad(x, jnp.zeros((), x.dtype), config)


def _window_slice(x_pad: jax.Array, offsets: tuple[int, ...], out_spatial: tuple[int, ...], strides: tuple[int, ...]) -> jax.Array:
    """The strided slice of x_pad [K, N, *Sp, C] that window offset ``offsets`` reads."""
    start = (0, 0, *offsets, 0)
    limit = (
        x_pad.shape[0],
        x_pad.shape[1],
        *(o + (n - 1) * s + 1 for o, n, s in zip(offsets, out_spatial, strides)),
        x_pad.shape[-1],
    )
    return lax.slice(x_pad, start, limit, (1, 1, *strides, 1))


def _out_spatial_of(x: jax.Array, w: jax.Array, p: ConvParams) -> tuple[int, ...]:
    window = w.shape[1:-2]
    return tuple(
        _out_size(s, lo + hi, r, rd, st)
        for s, (lo, hi), r, rd, st in zip(x.shape[2:-1], p.padding, window, p.rhs_dilation, p.window_strides)
    )


# --------------------------------------------------------------------------- lowerings
def conv_vmap(x: jax.Array, w: jax.Array, p: ConvParams) -> jax.Array:
    """``vmap`` (see the module docstring): XLA's batching rule, the reference the others match."""
    return jax.vmap(functools.partial(conv_one, p=p))(x, w)


def conv_loop(x: jax.Array, w: jax.Array, p: ConvParams) -> jax.Array:
    """``loop``: one dense conv (a matmul for 1x1) per tenant, unrolled, then stacked."""
    if _is_pointwise(w, p):  # a 1x1 conv of one tenant is a plain matmul (cuBLAS, not cuDNN)
        # Through lower_conv, which answers an empty output (input cropped away by negative
        # padding) before the einsum would slice nothing.
        return jnp.concatenate([lower_conv("einsum", x[k : k + 1], w[k : k + 1], p) for k in range(x.shape[0])])
    return jnp.stack([conv_one(x[k], w[k], p) for k in range(x.shape[0])])


def _is_pointwise(w: jax.Array, p: ConvParams) -> bool:
    return (all(r == 1 for r in w.shape[1:-2]) and all(d == 1 for d in p.lhs_dilation)
            and p.batch_group_count == 1)


def conv_map(x: jax.Array, w: jax.Array, p: ConvParams) -> jax.Array:
    """``map``: one tenant's conv inside ``lax.map``, a small program for large K."""
    return lax.map(lambda xw: conv_one(xw[0], xw[1], p), (x, w))


def conv_batch_group(x: jax.Array, w: jax.Array, p: ConvParams) -> jax.Array:
    """``batch_group``: tenants folded into the batch axis (``batch_group_count = K``)."""
    k, n = x.shape[:2]
    nd = x.ndim - 3
    x_b = x.reshape(k * n, *x.shape[2:])  # tenant-major batch groups
    w_b = jnp.moveaxis(w, 0, nd + 1)  # [*R, I, K, O]
    w_b = w_b.reshape(*w_b.shape[:-2], k * w.shape[-1])
    y = conv_one(x_b, w_b, p, batch_group_count=k)  # [N, *S', K*O]
    y = y.reshape(*y.shape[:-1], k, w.shape[-1])
    return jnp.moveaxis(y, -2, 0)


def conv_grouped_nchw(x: jax.Array, w: jax.Array, p: ConvParams) -> jax.Array:
    """``grouped_nchw``: tenants folded into channel groups in NCHW/OIHW layout."""
    k, n, c = x.shape[0], x.shape[1], x.shape[-1]
    nd = x.ndim - 3
    spatial = tuple(range(2, nd + 2))
    x_c = jnp.transpose(x, (1, 0, nd + 2, *spatial)).reshape(n, k * c, *x.shape[2:-1])
    w_c = jnp.transpose(w, (0, nd + 2, nd + 1, *range(1, nd + 1)))  # [K, O, I, *R]
    w_c = w_c.reshape(k * w.shape[-1], w.shape[-2], *w.shape[1:-2])
    ident = tuple(range(nd + 2))
    y = conv_one(
        x_c, w_c, p,
        dimension_numbers=lax.ConvDimensionNumbers(ident, ident, ident),
        feature_group_count=k * p.feature_group_count,
    )  # [N, K*O, *S']
    y = y.reshape(n, k, w.shape[-1], *y.shape[2:])
    return jnp.transpose(y, (1, 0, *range(3, nd + 3), 2))


def conv_einsum(x: jax.Array, w: jax.Array, p: ConvParams) -> jax.Array:
    """``einsum``: a 1x1 conv as one matmul batched over tenants (and feature groups)."""
    k, n = x.shape[:2]
    out_spatial = _out_spatial_of(x, w, p)
    x_s = _window_slice(_padded(x, p), (0,) * len(out_spatial), out_spatial, p.window_strides)
    m = n * math.prod(out_spatial)
    c, o, g = x.shape[-1], w.shape[-1], p.feature_group_count
    if g == 1:
        y = lax.dot_general(
            x_s.reshape(k, m, c), w.reshape(k, c, o), (((2,), (1,)), ((0,), (0,))),
            precision=p.precision, preferred_element_type=p.preferred_element_type,
        )  # [K, M, O]
    else:
        cg, og = c // g, o // g
        y = lax.dot_general(
            x_s.reshape(k, m, g, cg), w.reshape(k, cg, g, og), (((3,), (1,)), ((0, 2), (0, 2))),
            precision=p.precision, preferred_element_type=p.preferred_element_type,
        )  # [K, G, M, Og]
        y = jnp.transpose(y, (0, 2, 1, 3))
    return y.reshape(k, n, *out_spatial, o)


def conv_im2col(x: jax.Array, w: jax.Array, p: ConvParams) -> jax.Array:
    """``im2col``: patches from strided slices, then one matmul batched over tenants."""
    k, n = x.shape[:2]
    out_spatial = _out_spatial_of(x, w, p)
    x_pad = _padded(x, p)
    # Patches built from strided slices (one fused copy), features ordered (*window, C) so
    # that the filter reshapes without a transpose. Cheap where activations are small next
    # to the filters (late stages) or channels are few (the RGB stem); costly (kh*kw times
    # the input) for early wide layers, which the autotuner then leaves to other forms.
    slices = [
        _window_slice(x_pad, tuple(int(i) * d for i, d in zip(offset, p.rhs_dilation)), out_spatial, p.window_strides)
        for offset in np.ndindex(*w.shape[1:-2])
    ]
    patches = slices[0] if len(slices) == 1 else jnp.concatenate(slices, axis=-1)
    depth = patches.shape[-1]
    y = lax.dot_general(
        patches.reshape(k, n * math.prod(out_spatial), depth), w.reshape(k, depth, w.shape[-1]),
        (((2,), (1,)), ((0,), (0,))), precision=p.precision, preferred_element_type=p.preferred_element_type,
    )
    return y.reshape(k, n, *out_spatial, w.shape[-1])


def conv_im2col_rows(x: jax.Array, w: jax.Array, p: ConvParams) -> jax.Array:
    """``im2col_rows``: patches over the window's trailing axes, one batched matmul per window row,
    summed in float32."""
    window = w.shape[1:-2]
    if len(window) < 2:  # one spatial axis: nothing to split, im2col is the same program
        return conv_im2col(x, w, p).astype(_out_dtype(x, p))
    k, n = x.shape[:2]
    out_spatial = _out_spatial_of(x, w, p)
    x_pad = _padded(x, p)
    # Patches over the window's trailing axes with every padded row kept, so that each
    # window row reads a slice of them along the leading spatial axis instead of a copy of
    # its own: kh times fewer patch bytes than im2col, for kh matmuls instead of one.
    slices = []
    for offset in np.ndindex(*window[1:]):
        start = (0, 0, 0, *(int(i) * d for i, d in zip(offset, p.rhs_dilation[1:])), 0)
        limit = (k, n, x_pad.shape[2],
                 *(o + (m - 1) * s + 1 for o, m, s in zip(start[3:-1], out_spatial[1:], p.window_strides[1:])),
                 x_pad.shape[-1])
        slices.append(lax.slice(x_pad, start, limit, (1, 1, 1, *p.window_strides[1:], 1)))
    rows = slices[0] if len(slices) == 1 else jnp.concatenate(slices, axis=-1)
    depth, stride, m = rows.shape[-1], p.window_strides[0], n * math.prod(out_spatial)
    acc = None
    for i in range(window[0]):
        first = i * p.rhs_dilation[0]
        row_slice = lax.slice_in_dim(rows, first, first + (out_spatial[0] - 1) * stride + 1, stride=stride, axis=2)
        term = lax.dot_general(
            row_slice.reshape(k, m, depth), w[:, i].reshape(k, depth, w.shape[-1]),
            (((2,), (1,)), ((0,), (0,))), precision=p.precision, preferred_element_type=jnp.float32,
        )
        acc = term if acc is None else acc + term
    return acc.astype(_out_dtype(x, p)).reshape(k, n, *out_spatial, w.shape[-1])


def conv_shift_sum(x: jax.Array, w: jax.Array, p: ConvParams) -> jax.Array:
    """``shift_sum``: a batched 1x1 matmul per window offset, summed in float32."""
    k, n = x.shape[:2]
    out_spatial = _out_spatial_of(x, w, p)
    x_pad = _padded(x, p)
    c, o = x.shape[-1], w.shape[-1]
    m = n * math.prod(out_spatial)
    acc = None
    for offset in np.ndindex(*w.shape[1:-2]):
        start = tuple(int(i) * d for i, d in zip(offset, p.rhs_dilation))
        x_s = _window_slice(x_pad, start, out_spatial, p.window_strides).reshape(k, m, c)
        term = lax.dot_general(
            x_s, w[(slice(None), *offset)], (((2,), (1,)), ((0,), (0,))),
            precision=p.precision, preferred_element_type=jnp.float32,
        )
        acc = term if acc is None else acc + term
    return acc.astype(_out_dtype(x, p)).reshape(k, n, *out_spatial, o)


def conv_depthwise_direct(x: jax.Array, w: jax.Array, p: ConvParams) -> jax.Array:
    """``depthwise_direct``: a depthwise conv as a fused multiply-add over window offsets (float32)."""
    k = x.shape[0]
    nd = x.ndim - 3
    out_spatial = _out_spatial_of(x, w, p)
    multiplier = w.shape[-1] // x.shape[-1]
    x_pad = _padded(x, p)
    if multiplier > 1:  # output channel c*m + j reads input channel c
        x_pad = jnp.repeat(x_pad, multiplier, axis=-1)
    acc = None
    for offset in np.ndindex(*w.shape[1:-2]):
        start = tuple(int(i) * d for i, d in zip(offset, p.rhs_dilation))
        x_s = _window_slice(x_pad, start, out_spatial, p.window_strides).astype(jnp.float32)
        w_o = w[(slice(None), *offset, 0)].astype(jnp.float32)  # [K, O]
        term = x_s * w_o.reshape(k, *(1,) * (nd + 1), w.shape[-1])
        acc = term if acc is None else acc + term
    return acc.astype(_out_dtype(x, p))


def conv_implicit_gemm(x: jax.Array, w: jax.Array, p: ConvParams) -> jax.Array:
    """``implicit_gemm``: the Pallas kernel of ``jaxmt.pallas_conv`` (2-d, stride 1 or 2)."""
    return pallas_conv.conv_implicit_gemm(x, w, strides=tuple(p.window_strides), padding=tuple(p.padding))


_IMPLS: dict[str, Callable[[jax.Array, jax.Array, ConvParams], jax.Array]] = {
    "vmap": conv_vmap,
    "einsum": conv_einsum,
    "loop": conv_loop,
    "map": conv_map,
    "batch_group": conv_batch_group,
    "grouped_nchw": conv_grouped_nchw,
    "im2col": conv_im2col,
    "im2col_rows": conv_im2col_rows,
    "shift_sum": conv_shift_sum,
    "depthwise_direct": conv_depthwise_direct,
    "implicit_gemm": conv_implicit_gemm,
}


_FLOAT32_OR_NARROWER = {"float16", "bfloat16", "float32"}
# Lowerings that slice the input by window offset (or tile it): a conv with nothing to compute
# (no images, or an empty output) is answered with zeros before they would slice nothing.
_SLICING = ("einsum", "im2col", "im2col_rows", "shift_sum", "depthwise_direct", "implicit_gemm")


def applicable(choice: str, sig: ConvSignature) -> bool:
    """Whether lowering ``choice`` can compute the conv of ``sig`` exactly."""
    if choice not in _IMPLS:
        raise ValueError(f"unknown conv lowering {choice!r}; choose one of {CONV_LOWERINGS}")
    plain = sig.batch_group_count == 1
    dense = plain and sig.feature_group_count == 1
    no_lhs_dilation = all(d == 1 for d in sig.lhs_dilation)
    if choice in ("vmap", "loop", "map"):
        return True
    if choice == "batch_group":
        return dense
    if choice == "grouped_nchw":
        return plain
    if choice == "einsum":
        return plain and no_lhs_dilation and all(r == 1 for r in sig.window)
    if choice == "im2col":
        return dense and no_lhs_dilation
    # These sum their products in float32 and cast back: exact enough for floats of at
    # most 32 bits only (not for float64, integers or complex numbers), and only where the
    # conv asks for no wider sums (float32 convs with preferred_element_type=float64).
    summed_in_float32 = {sig.lhs_dtype, sig.rhs_dtype, sig.preferred_element_type or sig.lhs_dtype} <= _FLOAT32_OR_NARROWER
    if choice in ("shift_sum", "im2col_rows"):
        return dense and no_lhs_dilation and summed_in_float32
    if choice == "depthwise_direct":
        return sig.is_depthwise and no_lhs_dilation and summed_in_float32
    if choice == "implicit_gemm":
        # 16-bit products are exact in the kernel and its sums float32, whatever the conv's
        # precision; float32 products round as TF32 (or as jax_default_matmul_precision says),
        # so a float32 conv that names its own precision is left to XLA.
        plain_types = sig.lhs_dtype == sig.rhs_dtype and sig.preferred_element_type in (None, sig.lhs_dtype)
        default_precision = sig.lhs_dtype != "float32" or sig.precision == "None"
        return plain_types and default_precision and pallas_conv.supports(
            sig.lhs_shape, sig.rhs_shape, sig.window_strides, sig.padding, sig.lhs_dilation, sig.rhs_dilation,
            sig.feature_group_count, sig.batch_group_count, sig.lhs_dtype)
    raise AssertionError(choice)


def lower_conv(choice: str, x: jax.Array, w: jax.Array, p: ConvParams) -> jax.Array:
    """Runs lowering ``choice`` on x [K, N, *S, C], w [K, *R, I, O] (canonical layouts)."""
    if choice not in _IMPLS:
        raise ValueError(f"unknown conv lowering {choice!r}; choose one of {CONV_LOWERINGS}")
    if x.shape[0] == 0:  # no tenants: the loop would stack nothing, the grouped forms have 0 groups
        one = jax.eval_shape(functools.partial(conv_one, p=p), jax.ShapeDtypeStruct(x.shape[1:], x.dtype),
                             jax.ShapeDtypeStruct(w.shape[1:], w.dtype))
        return jnp.zeros((0, *one.shape), one.dtype)
    if choice in _SLICING:
        out_spatial = _out_spatial_of(x, w, p)
        if x.shape[1] == 0 or 0 in out_spatial:
            return jnp.zeros((x.shape[0], x.shape[1], *out_spatial, w.shape[-1]), _out_dtype(x, p))
    return _IMPLS[choice](x, w, p)
