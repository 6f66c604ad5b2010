"""A tenant-batched kxk convolution as one Pallas kernel (Triton on GPUs): an implicit GEMM.

Why a kernel of our own: XLA lowers a conv with per-tenant filters as a grouped conv, which
ran at 0.12-0.75x of the dense conv on an H100 for ResNet's 3x3 layers, and im2col
materialises kh*kw copies of the activations before its batched matmul (0.05-0.63x;
benchmarks/README.md, "Lowering"). This kernel builds no patches: the output rows of one
tile (positions of the flattened N*H*W image) accumulate, for every window offset (dy, dx)
and every chunk of input channels, the matmul of the input rows shifted by dy*W + dx (masked
where the shift crosses the image border, which is the zero padding) with that offset's
slice of the tenant's filter. What it copies besides: the input once, padded with guard rows
so that every shifted tile stays in bounds (and with zero channels up to what the blocks
tile), and the output once more when it is cut (rows past the last image, padded channels,
positions past a smaller output).

A stride-2 conv is first rearranged space-to-depth (each 2x2 block of pixels becomes one
pixel of 4C channels, the filter likewise), which makes it a stride-1 conv of half the
window over a quarter of the positions: ResNet's 7x7 stem on 3 channels becomes a 4x4 conv
on 12 (padded to 16), whose matmuls are 5x deeper than the 3-channel taps.

Scope (``supports``): 2-d, stride 1 (any window and padding whose output is no larger than
its input: "same" and "valid" convs) or stride 2 (any padding), no dilation, no feature
groups, bfloat16, float16 or float32 (whose dots run as TF32 at the default precision, as
XLA's do), any channel counts.

On an H100, in bfloat16, it ran ResNet's stride-1 3x3 layers at 0.54-1.66x of the dense conv,
above XLA's grouped forms on most of them, and the 7x7 stem at 1.8-2.35x of XLA's dense stem
(benchmarks/README.md, "Pallas conv kernel"); in float32 (TF32), with K-major filters (the
default for 4-byte inputs), it ran the stem at 1.03x of XLA's dense stem and the 3x3 layers at
0.22-0.59x at 16 tenants x 8 images, 1.3-2.0x faster than with [C, O] filters but below
XLA's forms on all but one ("Pallas conv kernel: float32", "Filters laid out K-major"). The
autotuner tries it on CUDA GPUs among the kxk lowerings, the default rule takes it on Hopper
GPUs for 16-bit convs at stride 1 and for RGB stems wider than 3x3 at stride 2
(``jaxmt.autotune``), and a lowering policy may name it (``{"kxk": "implicit_gemm"}`` or a
``conv:<i>`` selector). Its derivatives are XLA's conv's (a custom JVP), so a trainer may use
it too. Its answers are checked in
Pallas's interpreter, and the tests lower it (and its gradient) to Triton IR for CUDA with
``jax.export``.

The kernel uses Pallas's Triton backend, which jax 0.12 deprecates (``triton_backend_available``
says what happens once it is gone); it was measured with jax 0.11.

Layouts are the canonical ones of ``jaxmt.lowering_ops``: x [K, N, H, W, C], w [K, kh, kw, C,
O] -> y [K, N, H, W, O]. Off a GPU the kernel runs in Pallas's interpreter, which is slow
and meant for tests.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero
from jax.experimental import pallas as pl

# Block sizes: output rows per tile, output channels per tile (at most), input channels per
# matmul step (at most). 128 x 128 tiles with 64-deep steps are Triton's usual bf16 GEMM
# shape on Hopper; narrower layers take their whole channel count. On an H100 these tiles
# ran within 10% of the best of eight configurations on 9 of ResNet's 12 stride-1 3x3
# layer shapes at 32x8, 16x8 and 32x1, and within 17% on all (benchmarks/README.md,
# "Pallas conv kernel"); 64-row tiles were slower.
BLOCK_M = 128
BLOCK_N = 128
BLOCK_K = 64  # 16-bit inputs; 4-byte ones take half as deep steps (the same bytes in shared memory)
NUM_WARPS = 4
NUM_STAGES = 3
CHANNEL_MULTIPLE = 16
# float32 dots lower to TF32 in Pallas's Triton backend at the default precision, as XLA's
# float32 convs and matmuls do on these GPUs (``jax_default_matmul_precision="highest"``
# makes both IEEE).
DTYPES = ("bfloat16", "float16", "float32")


def default_block_k(dtype: Any) -> int:
    """Input channels per matmul step for inputs of ``dtype``: ``BLOCK_K`` for 16-bit ones, half
    that for 4-byte ones, so that a pipeline stage holds the same bytes in shared memory."""
    return BLOCK_K * 2 // max(2, np.dtype(dtype).itemsize)


def compiles_on(device: jax.Device | None = None) -> bool:
    """Whether the kernel compiles for ``device`` (default: the first device): a CUDA GPU of
    compute capability 8.0 or newer, where Triton has bfloat16 and TF32 tensor-core dots (a ROCm GPU
    names its architecture there, "gfx90a", and is not offered the kernel), with a jax that
    still has Pallas's Triton backend (``triton_backend_available``)."""
    device = device or jax.devices()[0]
    if device.platform != "gpu" or not triton_backend_available():
        return False
    try:
        return float(getattr(device, "compute_capability", "0")) >= 8.0
    except (TypeError, ValueError):
        return False


def triton_backend_available() -> bool:
    """Whether this jax has Pallas's Triton backend, which the kernel is written for. jax 0.12
    deprecates it (a DeprecationWarning each time a kernel is lowered) in favour of Mosaic GPU;
    once a release removes it, the kernel is offered nowhere and every conv takes one of XLA's
    forms (``jaxmt.lowering_ops``)."""
    try:
        from jax.experimental.pallas import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _padded_channels(channels: int, block: int) -> int:
    """Channels rounded up to what power-of-two blocks of at most ``block`` tile: a power of
    two of at least CHANNEL_MULTIPLE up to ``block``, a multiple of ``block`` beyond."""
    if channels <= block:
        return max(CHANNEL_MULTIPLE, 1 << (channels - 1).bit_length())
    return -(-channels // block) * block


def supports(lhs_shape: tuple[int, ...], rhs_shape: tuple[int, ...], window_strides: tuple[int, ...],
             padding: tuple[tuple[int, int], ...], lhs_dilation: tuple[int, ...], rhs_dilation: tuple[int, ...],
             feature_group_count: int, batch_group_count: int, dtype: str) -> bool:
    """Whether the autotuner may lower this conv (one tenant's shapes, canonical layout) with
    ``conv_implicit_gemm``: a shape it computes, in one of DTYPES."""
    return dtype in DTYPES and feature_group_count == 1 and batch_group_count == 1 and _computes(
        lhs_shape, rhs_shape, window_strides, padding, lhs_dilation, rhs_dilation)


def _computes(lhs_shape, rhs_shape, window_strides, padding, lhs_dilation=(1, 1), rhs_dilation=(1, 1)) -> bool:
    """Whether ``conv_implicit_gemm`` computes a conv of these shapes (any dtype)."""
    if len(lhs_shape) != 4 or len(rhs_shape) != 4:
        return False
    *window, c_in, _ = rhs_shape
    if lhs_shape[-1] != c_in or any(d != 1 for d in (*lhs_dilation, *rhs_dilation)) or min(window) < 2:
        return False
    if any(lo < 0 or hi < 0 for lo, hi in padding):
        return False
    if any(size + lo + hi < r for size, (lo, hi), r in zip(lhs_shape[1:3], padding, window)):
        return False  # an empty output
    strides = tuple(window_strides)
    if strides == (1, 1):
        return all(lo + hi <= r - 1 for (lo, hi), r in zip(padding, window))  # no output larger than the input
    return strides == (2, 2)


def conv_implicit_gemm(x: jax.Array, w: jax.Array, *, strides: tuple[int, int] = (1, 1),
                       padding: tuple[tuple[int, int], tuple[int, int]] | None = None, interpret: bool | None = None,
                       block_m: int = BLOCK_M, block_n: int = BLOCK_N, block_k: int | None = None, num_warps: int = NUM_WARPS,
                       num_stages: int = NUM_STAGES, filter_k_major: bool | None = None) -> jax.Array:
    """Tenant k's ``x[k]`` convolved with its filter ``w[k]``.

    Differentiable in both modes: the derivative is that of XLA's conv of the same arguments.

    Args:
      x: [K, N, H, W, C].
      w: [K, kh, kw, C, O].
      strides: (1, 1), or (2, 2): then the input is rearranged space-to-depth (each 2x2
        block of pixels becomes one pixel of 4C channels, the filter likewise), which turns
        the conv into a stride-1 one of half the window over a quarter of the positions.
      padding: (lo, hi) per spatial dim; default "same" for odd windows ((k - 1) / 2 each
        side). At stride 1 the output may not be larger than the input (lo + hi <= k - 1).
      interpret: run in Pallas's interpreter (None: unless the default backend is a GPU).
      block_m, block_n, block_k: tile sizes (powers of two): output rows, output channels and
        input channels per matmul step (default BLOCK_K for 16-bit inputs, half that for
        4-byte ones); channels are padded with zeros to what the blocks tile.
      num_warps, num_stages: Triton's warps per tile and software-pipeline depth (GPU only).
      filter_k_major: lay each tap's filter out as [O, C] (input channels contiguous) and
        contract the tile transposed, instead of [C, O]; None: for 4-byte inputs only.
        Hopper's TF32 tensor-core instruction (wgmma) reads both operands K-major from
        shared memory (only 16-bit types may be transposed there). Compiled for sm_90 by
        Triton 3.9, a float32 [C, O] filter tile is copied into shared memory 4 bytes at a
        time to transpose it (16 bytes at a time as [O, C], and for bfloat16 either way);
        ``benchmarks/pallas_conv.py`` times float32 tiles both ways.
    """
    tenants, n, h, wd, c = x.shape
    kh, kw = w.shape[1:3]
    if w.ndim != 5 or w.shape[3] != c or w.shape[0] != tenants:
        raise ValueError(f"filter {w.shape} does not match input {x.shape} (expected [{tenants}, kh, kw, {c}, O])")
    if w.dtype != x.dtype:
        raise ValueError(f"filter dtype {w.dtype} differs from input dtype {x.dtype} (expected one dtype, as XLA's conv does)")
    if block_k is None:
        block_k = default_block_k(x.dtype)
    if filter_k_major is None:
        filter_k_major = np.dtype(x.dtype).itemsize == 4
    if any(b < 1 or b & (b - 1) for b in (block_m, block_n, block_k)):
        raise ValueError(f"blocks must be powers of two, got block_m={block_m}, block_n={block_n}, block_k={block_k}")
    padding = ((kh // 2, kh // 2), (kw // 2, kw // 2)) if padding is None else tuple(tuple(int(v) for v in p) for p in padding)
    if not _computes(x.shape[1:], w.shape[1:], tuple(strides), padding):
        raise ValueError(f"conv of input {x.shape} with filter {w.shape}, strides {tuple(strides)} and padding {padding} "
                         "is not one the kernel computes (see pallas_conv.supports)")
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    config = (bool(interpret), int(block_m), int(block_n), int(block_k), int(num_warps), int(num_stages),
              bool(filter_k_major))
    if tuple(strides) == (1, 1):
        return _with_xla_derivatives(x, w, padding, config)
    x2, w2, (ho, wo) = _space_to_depth(x, w, padding)
    return _with_xla_derivatives(x2, w2, ((0, 0), (0, 0)), config)[:, :, :ho, :wo]


def _space_to_depth(x: jax.Array, w: jax.Array, padding) -> tuple[jax.Array, jax.Array, tuple[int, int]]:
    """A stride-2 conv as a stride-1 "valid" one: x padded (to even sizes) and each 2x2 block
    of pixels stacked into channels; the filter zero-padded to even sizes and stacked alike.
    Returns both and the stride-2 conv's output size (the valid conv's may be one larger)."""
    tenants, n, h, wd, c = x.shape
    _, kh, kw, _, o = w.shape
    (ly, hy), (lx, hx) = padding
    hp, wp = h + ly + hy, wd + lx + hx
    out = ((hp - kh) // 2 + 1, (wp - kw) // 2 + 1)
    x = jnp.pad(x, ((0, 0), (0, 0), (ly, hy + hp % 2), (lx, hx + wp % 2), (0, 0)))
    hs, ws = (hp + 1) // 2, (wp + 1) // 2
    x = x.reshape(tenants, n, hs, 2, ws, 2, c).transpose(0, 1, 2, 4, 3, 5, 6).reshape(tenants, n, hs, ws, 4 * c)
    kh2, kw2 = (kh + 1) // 2, (kw + 1) // 2
    w = jnp.pad(w, ((0, 0), (0, 2 * kh2 - kh), (0, 2 * kw2 - kw), (0, 0), (0, 0)))
    w = w.reshape(tenants, kh2, 2, kw2, 2, c, o).transpose(0, 1, 3, 2, 4, 5, 6).reshape(tenants, kh2, kw2, 4 * c, o)
    return x, w, out


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _with_xla_derivatives(x: jax.Array, w: jax.Array, padding, config: tuple[bool, int, int, int, int, int, bool]) -> jax.Array:
    return _forward(x, w, padding, *config)


def _xla_tangent(padding, config, primals, tangents):
    """The kernel's answer, and as its tangent that of XLA's conv: conv(dx, w) + conv(x, dw),
    linear in the tangents, so JAX transposes it for reverse mode (XLA's conv gradients) and
    forward mode works too. A tangent known to be zero (an input nobody differentiates, such
    as the images) costs no conv."""
    x, w = primals
    dx, dw = tangents
    conv = functools.partial(_xla_conv, padding=padding)
    terms = []
    if not isinstance(dx, SymbolicZero):
        terms.append(conv(dx, w))
    if not isinstance(dw, SymbolicZero):
        terms.append(conv(x, dw))
    y = _with_xla_derivatives(x, w, padding, config)  # through the rule again: derivatives of derivatives
    if not terms:
        return y, jnp.zeros_like(y)
    return y, terms[0] if len(terms) == 1 else terms[0] + terms[1]


_with_xla_derivatives.defjvp(_xla_tangent, symbolic_zeros=True)


def _xla_conv(x: jax.Array, w: jax.Array, padding=None) -> jax.Array:
    """What the kernel computes at stride 1, as XLA's grouped conv: its gradient is the kernel's."""
    kh, kw = w.shape[1:3]
    padding = ((kh // 2, kh // 2), (kw // 2, kw // 2)) if padding is None else padding
    one = functools.partial(lax.conv_general_dilated, window_strides=(1, 1), padding=padding,
                            dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jax.vmap(one)(x, w)


def _forward(x: jax.Array, w: jax.Array, padding, interpret: bool, block_m: int, block_n: int, block_k: int,
             num_warps: int, num_stages: int, filter_k_major: bool) -> jax.Array:
    """The stride-1 conv, computed at every input position (H x W, each output position
    reading the input shifted by (dy - lo, dx - lo)) and cut to the output's size."""
    tenants, n, h, wd, c = x.shape
    _, kh, kw, _, o = w.shape
    (ly, hy), (lx, hx) = padding
    ho, wo = h + ly + hy - kh + 1, wd + lx + hx - kw + 1
    c_pad, o_pad = _padded_channels(c, block_k), _padded_channels(o, block_n)
    bk, bn = min(block_k, c_pad), min(block_n, o_pad)
    m = n * h * wd
    tiles_m = pl.cdiv(m, block_m)
    # Guard rows before and after the flattened image keep every shifted tile in bounds; the
    # border mask zeroes what they (and rows of neighbouring images) contribute.
    before = ly * wd + lx
    after = (kh - 1 - ly) * wd + (kw - 1 - lx)
    x_rows = jnp.pad(x.reshape(tenants, m, c), ((0, 0), (before, tiles_m * block_m - m + after), (0, c_pad - c)))
    taps = jnp.pad(w.reshape(tenants, kh * kw, c, o), ((0, 0), (0, 0), (0, c_pad - c), (0, o_pad - o)))
    if filter_k_major:
        taps = taps.transpose(0, 1, 3, 2)  # [K, taps, O, C]: input channels contiguous
    kernel = functools.partial(_kernel, height=h, width=wd, kw=kw, pad_y=ly, pad_x=lx, guard=before, chunks=c_pad // bk,
                               block_m=block_m, block_n=bn, block_k=bk, filter_k_major=filter_k_major, interpret=interpret)
    params = {} if interpret else {"compiler_params": _triton_params(num_warps, num_stages)}
    y = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((tenants, tiles_m * block_m, o_pad), x.dtype),
        grid=(tenants, tiles_m, o_pad // bn),
        interpret=interpret,
        name="tenant_conv_implicit_gemm",
        **params,
    )(x_rows, taps)
    return y[:, :m, :o].reshape(tenants, n, h, wd, o)[:, :, :ho, :wo]


def _triton_params(num_warps: int, num_stages: int):
    from jax.experimental.pallas import triton as plt

    return plt.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _masked_load(ref, mask: jax.Array, interpret: bool) -> jax.Array:
    """``ref`` where ``mask``, else 0 (Triton's masked load; the interpreter's select)."""
    if not interpret:
        from jax.experimental.pallas import triton as plt

        return plt.load(ref, mask=mask, other=0)
    return jnp.where(mask, ref[...], jnp.zeros((), ref.dtype))


def _kernel(x_ref, w_ref, y_ref, *, height: int, width: int, kw: int, pad_y: int, pad_x: int, guard: int, chunks: int,
            block_m: int, block_n: int, block_k: int, filter_k_major: bool, interpret: bool) -> None:
    k, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    # Truncating lax.div/lax.rem on non-negative int32 (jnp's floor forms lower to more ops, and
    # Triton's lowering takes a divisor of 1 for a bool).
    div = lambda a, b: a if b == 1 else lax.div(a, jnp.int32(b))  # noqa: E731
    rem = lambda a, b: jnp.zeros_like(a) if b == 1 else lax.rem(a, jnp.int32(b))  # noqa: E731
    rows = i * block_m + lax.broadcasted_iota(jnp.int32, (block_m, 1), 0)
    yy, xx = rem(div(rows, width), height), rem(rows, width)

    def step(s, acc):
        tap, chunk = div(s, chunks), rem(s, chunks)
        dy, dx = div(tap, kw) - pad_y, rem(tap, kw) - pad_x
        inside = (yy + dy >= 0) & (yy + dy < height) & (xx + dx >= 0) & (xx + dx < width)
        start = guard + i * block_m + dy * width + dx
        cols = pl.ds(pl.multiple_of(chunk * block_k, block_k), block_k)
        a = _masked_load(x_ref.at[k, pl.ds(start, block_m), cols], jnp.broadcast_to(inside, (block_m, block_k)), interpret)
        if filter_k_major:  # the [O, C] tile, contracted over its C: a @ b.T
            b = w_ref[k, tap, pl.ds(j * block_n, block_n), cols]
            return acc + lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        b = w_ref[k, tap, cols, pl.ds(j * block_n, block_n)]
        return acc + jnp.dot(a, b, preferred_element_type=jnp.float32)

    acc = lax.fori_loop(0, w_ref.shape[1] * chunks, step, jnp.zeros((block_m, block_n), jnp.float32))
    y_ref[k, pl.ds(i * block_m, block_m), pl.ds(j * block_n, block_n)] = acc.astype(y_ref.dtype)
