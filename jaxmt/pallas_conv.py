"""A tenant-batched kxk convolution as one Pallas kernel (Triton on GPUs): an implicit GEMM.

Why a kernel of our own: XLA lowers a conv with per-tenant filters as a grouped conv, which
ran at 0.35-0.92x of the dense conv on an H100 for ResNet's 3x3 layers, and im2col
materialises kh*kw copies of the activations before its batched matmul (0.05-0.63x;
benchmarks/README.md, "Lowering"). This kernel builds no patches: the output rows of one
tile (positions of the flattened N*H*W image) accumulate, for every window offset (dy, dx)
and every chunk of input channels, the matmul of the input rows shifted by dy*W + dx (masked
where the shift crosses the image border, which is the zero padding) with that offset's
slice of the tenant's filter. What it copies besides: the input once, padded with guard rows
so that every shifted tile stays in bounds, and the output once more when its rows do not
fill the last tile (the rows past the end are sliced off).

Scope (``supports``): 2-d, stride 1, no dilation, odd windows with the padding that keeps the
output size ((k - 1) / 2 on each side), no feature groups, bfloat16 or float16, channel
counts that tile: 16, 32 or 64 input channels or a multiple of 64, and 16 to 128 output
channels in powers of two or a multiple of 128 (Triton's blocks are powers of two). That
covers every stride-1 3x3 conv of ResNet-18 and ResNet-50. float32 runs too (the tests use
it) but is not offered: Triton's float32 dots are IEEE, not the TF32 of XLA's convs.

Its answers are checked in Pallas's interpreter, and the tests lower it (and its gradient)
to Triton IR for CUDA with ``jax.export`` on a CPU; it has not yet been compiled to GPU code
or timed on a GPU, so the autotuner does not try it yet (``jaxmt.autotune``); a lowering policy may name it
(``{"kxk": "implicit_gemm"}`` where every kxk conv qualifies, or a ``conv:<i>`` selector),
and ``benchmarks/lowering.py --layer-lowerings`` times it. Its gradient is XLA's conv's
(a custom VJP), so a trainer may use it too.

Layouts are the canonical ones of ``jaxmt.lowering_ops``: x [K, N, H, W, C], w [K, kh, kw, C,
O] -> y [K, N, H, W, O]. Off a GPU the kernel runs in Pallas's interpreter, which is slow
and meant for tests.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

# Block sizes: output rows per tile, output channels per tile (at most), input channels per
# matmul step (at most). 128 x 128 tiles with 64-deep steps are Triton's usual bf16 GEMM
# shape on Hopper; narrower layers take their whole channel count. Tenants with few output
# rows (N*H*W <= SMALL_ROWS) take tiles of SMALL_BLOCK_M rows: on an H100, 64-row tiles
# ran ResNet's 3x3 layers of 1 image per tenant and of 8 images at 7x7 at 0.8-1.05x of the
# dense conv where 128-row tiles ran at 0.36-0.64x (less of the last tile is padding, and
# more tiles spread over the SMs; benchmarks/README.md, "Pallas conv kernel").
BLOCK_M = 128
SMALL_BLOCK_M = 64
SMALL_ROWS = 4096
BLOCK_N = 128
BLOCK_K = 64
NUM_WARPS = 4
NUM_STAGES = 3
CHANNEL_MULTIPLE = 16
DTYPES = ("bfloat16", "float16")


def _tiles(channels: int, block: int) -> bool:
    """Whether a channel count splits into power-of-two blocks of at most ``block``."""
    if channels <= block:
        return channels >= CHANNEL_MULTIPLE and channels & (channels - 1) == 0
    return channels % block == 0


def supports(lhs_shape: tuple[int, ...], rhs_shape: tuple[int, ...], window_strides: tuple[int, ...],
             padding: tuple[tuple[int, int], ...], lhs_dilation: tuple[int, ...], rhs_dilation: tuple[int, ...],
             feature_group_count: int, batch_group_count: int, dtype: str) -> bool:
    """Whether ``conv_implicit_gemm`` computes this conv (one tenant's shapes, canonical layout)."""
    if len(lhs_shape) != 4 or feature_group_count != 1 or batch_group_count != 1 or dtype not in DTYPES:
        return False
    *window, c_in, c_out = rhs_shape
    if lhs_shape[-1] != c_in or not _tiles(c_in, BLOCK_K) or not _tiles(c_out, BLOCK_N):
        return False
    if any(s != 1 for s in (*window_strides, *lhs_dilation, *rhs_dilation)):
        return False
    return all(r % 2 == 1 and r > 1 for r in window) and all(lo == hi == r // 2 for (lo, hi), r in zip(padding, window))


def rows_per_tile(rows: int) -> int:
    """The default output rows per tile for a tenant's ``rows`` (N*H*W) output positions."""
    return SMALL_BLOCK_M if rows <= SMALL_ROWS else BLOCK_M


def conv_implicit_gemm(x: jax.Array, w: jax.Array, *, interpret: bool | None = None, block_m: int | None = None,
                       block_n: int = BLOCK_N, block_k: int = BLOCK_K, num_warps: int = NUM_WARPS,
                       num_stages: int = NUM_STAGES) -> jax.Array:
    """Tenant k's ``x[k]`` convolved with its filter ``w[k]`` ("same" padding, stride 1).

    Differentiable: the gradient is that of XLA's conv of the same arguments.

    Args:
      x: [K, N, H, W, C].
      w: [K, kh, kw, C, O] (odd kh and kw; C and O tiled by the blocks).
      interpret: run in Pallas's interpreter (None: unless the default backend is a GPU).
      block_m, block_n, block_k: tile sizes (powers of two); block_m defaults to
        ``rows_per_tile(N*H*W)``; block_n and block_k are capped at O and C.
      num_warps, num_stages: Triton's warps per tile and software-pipeline depth (GPU only).
    """
    tenants, n, h, wd, c = x.shape
    _, kh, kw, c_w, o = w.shape
    if c_w != c or w.shape[0] != tenants:
        raise ValueError(f"filter {w.shape} does not match input {x.shape} (expected [{tenants}, kh, kw, {c}, O])")
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    bn, bk = min(block_n, o), min(block_k, c)
    block_m = rows_per_tile(n * h * wd) if block_m is None else block_m
    if o % bn or c % bk:
        raise ValueError(f"channels ({c} in, {o} out) must be multiples of the blocks ({bk}, {bn})")
    return _with_xla_gradient(x, w, (bool(interpret), int(block_m), int(bn), int(bk), int(num_warps), int(num_stages)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _with_xla_gradient(x: jax.Array, w: jax.Array, config: tuple[bool, int, int, int, int, int]) -> jax.Array:
    return _forward(x, w, *config)


def _forward_with_residuals(x, w, config):
    return _forward(x, w, *config), (x, w)


def _xla_gradient(config, residuals, cotangent):
    x, w = residuals
    return jax.vjp(_xla_conv, x, w)[1](cotangent)


_with_xla_gradient.defvjp(_forward_with_residuals, _xla_gradient)


def _xla_conv(x: jax.Array, w: jax.Array) -> jax.Array:
    """What the kernel computes, as XLA's grouped conv: its gradient is the kernel's."""
    kh, kw = w.shape[1:3]
    one = functools.partial(lax.conv_general_dilated, window_strides=(1, 1), padding=((kh // 2, kh // 2), (kw // 2, kw // 2)),
                            dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jax.vmap(one)(x, w)


def _forward(x: jax.Array, w: jax.Array, interpret: bool, block_m: int, bn: int, bk: int, num_warps: int, num_stages: int) -> jax.Array:
    tenants, n, h, wd, c = x.shape
    _, kh, kw, _, o = w.shape
    m = n * h * wd
    tiles_m = pl.cdiv(m, block_m)
    # Guard rows before and after the flattened image keep every shifted tile in bounds; the
    # border mask zeroes what they (and rows of neighbouring images) contribute.
    guard = (kh // 2) * wd + kw // 2
    tail = tiles_m * block_m - m + guard
    x_rows = jnp.pad(x.reshape(tenants, m, c), ((0, 0), (guard, tail), (0, 0)))
    taps = w.reshape(tenants, kh * kw, c, o)
    kernel = functools.partial(_kernel, height=h, width=wd, kw=kw, guard=guard, chunks=c // bk,
                               block_m=block_m, block_n=bn, block_k=bk, interpret=interpret)
    params = {} if interpret else {"compiler_params": _triton_params(num_warps, num_stages)}
    y = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((tenants, tiles_m * block_m, o), x.dtype),
        grid=(tenants, tiles_m, o // bn),
        interpret=interpret,
        name="tenant_conv_implicit_gemm",
        **params,
    )(x_rows, taps)
    return y[:, :m].reshape(tenants, n, h, wd, o)


def _triton_params(num_warps: int, num_stages: int):
    from jax.experimental.pallas import triton as plt

    return plt.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _masked_load(ref, mask: jax.Array, interpret: bool) -> jax.Array:
    """``ref`` where ``mask``, else 0 (Triton's masked load; the interpreter's select)."""
    if not interpret:
        from jax.experimental.pallas import triton as plt

        return plt.load(ref, mask=mask, other=0)
    return jnp.where(mask, ref[...], jnp.zeros((), ref.dtype))


def _kernel(x_ref, w_ref, y_ref, *, height: int, width: int, kw: int, guard: int, chunks: int,
            block_m: int, block_n: int, block_k: int, interpret: bool) -> None:
    k, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    # Truncating lax.div/lax.rem on non-negative int32 (jnp's floor forms lower to more ops, and
    # Triton's lowering takes a divisor of 1 for a bool).
    div = lambda a, b: a if b == 1 else lax.div(a, jnp.int32(b))  # noqa: E731
    rem = lambda a, b: jnp.zeros_like(a) if b == 1 else lax.rem(a, jnp.int32(b))  # noqa: E731
    rows = i * block_m + lax.broadcasted_iota(jnp.int32, (block_m, 1), 0)
    yy, xx = rem(div(rows, width), height), rem(rows, width)
    half_h, half_w = (w_ref.shape[1] // kw) // 2, kw // 2

    def step(s, acc):
        tap, chunk = div(s, chunks), rem(s, chunks)
        dy, dx = div(tap, kw) - half_h, rem(tap, kw) - half_w
        inside = (yy + dy >= 0) & (yy + dy < height) & (xx + dx >= 0) & (xx + dx < width)
        start = guard + i * block_m + dy * width + dx
        cols = pl.ds(pl.multiple_of(chunk * block_k, block_k), block_k)
        a = _masked_load(x_ref.at[k, pl.ds(start, block_m), cols], jnp.broadcast_to(inside, (block_m, block_k)), interpret)
        b = w_ref[k, tap, cols, pl.ds(j * block_n, block_n)]
        return acc + jnp.dot(a, b, preferred_element_type=jnp.float32)

    acc = lax.fori_loop(0, w_ref.shape[1] * chunks, step, jnp.zeros((block_m, block_n), jnp.float32))
    y_ref[k, pl.ds(i * block_m, block_m), pl.ds(j * block_n, block_n)] = acc.astype(y_ref.dtype)
