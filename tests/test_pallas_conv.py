"""jaxmt.pallas_conv: the implicit-GEMM kernel equals each tenant's own conv, whatever its tiling.

On a CPU the kernel runs in Pallas's interpreter: these tests check what it computes, not its
speed (benchmarks/lowering.py times it on a GPU).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_error
from jax import lax

from jaxmt import pallas_conv
from jaxmt.jax_compat import lowering_for_gpu


def _per_tenant(x, w):
    k = w.shape[1]
    return np.stack([
        np.asarray(lax.conv_general_dilated(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), (1, 1), [(k // 2, k // 2)] * 2,
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=lax.Precision.HIGHEST))
        for a, b in zip(x, w)
    ])


@pytest.mark.parametrize(
    "tenants, n, h, w, c, o, window, blocks",
    [
        (2, 1, 6, 6, 16, 16, 3, (16, 16, 16)),  # one tile of rows per image row pair
        (3, 2, 5, 7, 32, 48, 3, (32, 16, 16)),  # two channel chunks, three output-channel tiles, rows across images
        (2, 1, 9, 9, 16, 32, 5, (64, 32, 16)),  # a 5x5 window: shifts of two rows and columns
        (1, 3, 4, 4, 64, 16, 3, (128, 128, 64)),  # one tile larger than all rows of all images
    ],
)
@pytest.mark.parametrize("filter_k_major", [False, True])
def test_the_kernel_equals_each_tenants_conv(rng, tenants, n, h, w, c, o, window, blocks, filter_k_major):
    x = rng.standard_normal((tenants, n, h, w, c)).astype(np.float32)
    f = (rng.standard_normal((tenants, window, window, c, o)) / np.sqrt(window * window * c)).astype(np.float32)
    block_m, block_n, block_k = blocks
    got = pallas_conv.conv_implicit_gemm(jnp.asarray(x), jnp.asarray(f), block_m=block_m, block_n=block_n, block_k=block_k,
                                         filter_k_major=filter_k_major)
    assert got.shape == (tenants, n, h, w, o) and got.dtype == jnp.float32
    assert rel_error(got, _per_tenant(x, f)) < 1e-5


@pytest.mark.parametrize("dtype, k_major", [(jnp.float32, True), (jnp.bfloat16, False), (jnp.float16, False)])
def test_four_byte_filters_reach_the_kernel_k_major_by_default(dtype, k_major):
    """The filter operand the kernel reads: [K, taps, O, C] (K-major, what Hopper's TF32 wgmma
    wants) for float32, [K, taps, C, O] for 16-bit inputs."""
    x = jax.ShapeDtypeStruct((2, 1, 6, 6, 16), dtype)
    w = jax.ShapeDtypeStruct((2, 3, 3, 16, 32), dtype)
    jaxpr = jax.make_jaxpr(functools.partial(pallas_conv.conv_implicit_gemm, block_m=16))(x, w)
    calls = [e for e in _equations(jaxpr.jaxpr) if e.primitive.name == "pallas_call"]
    assert len(calls) == 1
    assert calls[0].invars[1].aval.shape == ((2, 9, 32, 16) if k_major else (2, 9, 16, 32))


def _equations(jaxpr):
    """Every equation of ``jaxpr`` and of the jaxprs nested in its equations' parameters."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _equations(inner)


def test_bfloat16_inputs_accumulate_in_float32(rng):
    x = jnp.asarray(rng.standard_normal((2, 1, 6, 5, 32)), jnp.bfloat16)
    f = jnp.asarray(rng.standard_normal((2, 3, 3, 32, 16)) / 17, jnp.bfloat16)
    got = pallas_conv.conv_implicit_gemm(x, f, block_m=16, block_n=16, block_k=16)
    assert got.dtype == jnp.bfloat16
    assert rel_error(got, _per_tenant(np.asarray(x, np.float32), np.asarray(f, np.float32))) < 1e-2


SAME3 = ((1, 1), (1, 1))
VALID = ((0, 0), (0, 0))


@pytest.mark.parametrize(
    "lhs, rhs, strides, padding, dilation, groups, dtype, ok",
    [
        ((8, 56, 56, 64), (3, 3, 64, 64), (1, 1), SAME3, (1, 1), 1, "bfloat16", True),
        ((8, 7, 7, 512), (3, 3, 512, 512), (1, 1), SAME3, (1, 1), 1, "float16", True),
        ((8, 28, 28, 96), (3, 3, 96, 192), (1, 1), SAME3, (1, 1), 1, "bfloat16", True),  # channels padded to the blocks
        ((8, 56, 56, 8), (3, 3, 8, 24), (1, 1), SAME3, (1, 1), 1, "bfloat16", True),  # 8 in, 24 out: padded too
        ((8, 56, 56, 64), (3, 3, 64, 64), (1, 1), VALID, (1, 1), 1, "bfloat16", True),  # output shrinks
        ((8, 56, 56, 64), (2, 2, 64, 64), (1, 1), ((0, 1), (0, 1)), (1, 1), 1, "bfloat16", True),  # even window
        ((8, 224, 224, 3), (7, 7, 3, 64), (2, 2), ((3, 3), (3, 3)), (1, 1), 1, "bfloat16", True),  # ResNet's stem
        ((8, 56, 56, 64), (3, 3, 64, 128), (2, 2), ((0, 1), (0, 1)), (1, 1), 1, "bfloat16", True),  # "SAME" at stride 2
        ((8, 7, 7, 512), (3, 3, 512, 512), (1, 1), SAME3, (1, 1), 1, "float32", True),  # TF32 dots, as XLA's convs
        ((8, 7, 7, 512), (3, 3, 512, 512), (1, 1), SAME3, (1, 1), 1, "float64", False),  # no float64 tensor-core dots
        ((8, 56, 56, 64), (3, 3, 64, 64), (1, 1), ((2, 1), (1, 1)), (1, 1), 1, "bfloat16", False),  # output grows
        ((8, 56, 56, 64), (3, 3, 64, 64), (3, 3), SAME3, (1, 1), 1, "bfloat16", False),  # stride 3
        ((8, 56, 56, 64), (3, 3, 64, 64), (1, 2), SAME3, (1, 1), 1, "bfloat16", False),  # mixed strides
        ((8, 2, 2, 64), (3, 3, 64, 64), (1, 1), VALID, (1, 1), 1, "bfloat16", False),  # empty output
        ((8, 56, 56, 64), (3, 3, 64, 64), (1, 1), SAME3, (2, 2), 1, "bfloat16", False),  # dilated filter
        ((8, 56, 56, 64), (3, 3, 32, 64), (1, 1), SAME3, (1, 1), 2, "bfloat16", False),  # feature groups
        ((8, 56, 56, 64), (1, 1, 64, 64), (1, 1), VALID, (1, 1), 1, "bfloat16", False),  # 1x1: a plain matmul
        ((8, 56, 56, 64), (3, 3, 64, 64), (1, 1), SAME3, (1, 1), 1, "int8", False),
    ],
)
def test_the_kernel_takes_only_the_convs_it_computes(lhs, rhs, strides, padding, dilation, groups, dtype, ok):
    assert pallas_conv.supports(lhs, rhs, strides, padding, (1, 1), dilation, groups, 1, dtype) is ok


@pytest.mark.parametrize("c, o", [(16, 16), (32, 128), (64, 256), (128, 64), (3, 64), (96, 24)])
def test_every_channel_count_supports_accepts_runs_at_the_default_blocks(rng, c, o):
    x = jnp.asarray(rng.standard_normal((2, 1, 3, 3, c)), jnp.bfloat16)
    f = jnp.asarray(rng.standard_normal((2, 3, 3, c, o)) / np.sqrt(9 * c), jnp.bfloat16)
    assert pallas_conv.supports(x.shape[1:], f.shape[1:], (1, 1), SAME3, (1, 1), (1, 1), 1, 1, "bfloat16")
    got = pallas_conv.conv_implicit_gemm(x, f, block_m=16)
    assert rel_error(got, _per_tenant(np.asarray(x, np.float32), np.asarray(f, np.float32))) < 2e-2


def _per_tenant_strided(x, w, strides, padding):
    return np.stack([
        np.asarray(lax.conv_general_dilated(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), strides, padding,
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=lax.Precision.HIGHEST))
        for a, b in zip(x, w)
    ])


@pytest.mark.parametrize(
    "n, h, w, c, o, window, strides, padding",
    [
        (2, 9, 9, 3, 16, 7, (2, 2), ((3, 3), (3, 3))),  # a stem: 7x7 at stride 2 on 3 channels (padded to 16)
        (1, 8, 8, 16, 32, 3, (2, 2), ((0, 1), (0, 1))),  # "SAME" at stride 2 on an even size
        (1, 7, 6, 16, 16, 3, (2, 2), ((1, 1), (1, 1))),  # odd sizes: the space-to-depth pads a row
        (2, 6, 6, 20, 24, 3, (1, 1), VALID),  # valid: the output is cut from the input grid
        (1, 6, 5, 16, 16, 2, (1, 1), ((0, 1), (1, 0))),  # an even window, padded unevenly
    ],
)
def test_strided_and_unpadded_convs_equal_each_tenants_conv(rng, n, h, w, c, o, window, strides, padding):
    x = rng.standard_normal((2, n, h, w, c)).astype(np.float32)
    f = (rng.standard_normal((2, window, window, c, o)) / np.sqrt(window * window * c)).astype(np.float32)
    got = pallas_conv.conv_implicit_gemm(jnp.asarray(x), jnp.asarray(f), strides=strides, padding=padding, block_m=16)
    want = _per_tenant_strided(x, f, strides, padding)
    assert got.shape == want.shape and rel_error(got, want) < 1e-5


def test_a_strided_convs_gradient_is_that_of_xlas_conv(rng):
    x = jnp.asarray(rng.standard_normal((2, 1, 7, 6, 3)), jnp.float32)
    f = jnp.asarray(rng.standard_normal((2, 5, 5, 3, 16)) / 8, jnp.float32)
    padding = ((2, 2), (2, 2))
    cotangent = jnp.asarray(rng.standard_normal((2, 1, 4, 3, 16)), jnp.float32)
    ours = jax.grad(lambda a, b: jnp.sum(pallas_conv.conv_implicit_gemm(a, b, strides=(2, 2), padding=padding, block_m=16)
                                         * cotangent), argnums=(0, 1))(x, f)
    xla = jax.grad(lambda a, b: jnp.sum(jax.vmap(lambda u, v: lax.conv_general_dilated(
        u, v, (2, 2), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=lax.Precision.HIGHEST))(a, b) * cotangent),
        argnums=(0, 1))(x, f)
    for got, want in zip(ours, xla):
        assert rel_error(got, want) < 1e-5


def test_the_gradient_is_that_of_xlas_conv(rng):
    x = jnp.asarray(rng.standard_normal((2, 1, 5, 4, 16)), jnp.float32)
    f = jnp.asarray(rng.standard_normal((2, 3, 3, 16, 16)) / 12, jnp.float32)
    cotangent = jnp.asarray(rng.standard_normal((2, 1, 5, 4, 16)), jnp.float32)
    ours = jax.grad(lambda a, b: jnp.sum(pallas_conv.conv_implicit_gemm(a, b, block_m=16) * cotangent), argnums=(0, 1))(x, f)
    xla = jax.grad(lambda a, b: jnp.sum(pallas_conv._xla_conv(a, b) * cotangent), argnums=(0, 1))(x, f)
    for got, want in zip(ours, xla):
        assert rel_error(got, want) < 1e-5


def _convs_in(fn, *args) -> int:
    """conv_general_dilated equations in fn's jaxpr, nested ones included (the kernel is none)."""
    def jaxprs(value):
        if hasattr(value, "eqns"):
            yield value
        elif hasattr(getattr(value, "jaxpr", None), "eqns"):
            yield value.jaxpr
        elif isinstance(value, (list, tuple)):
            for item in value:
                yield from jaxprs(item)

    def count(jaxpr) -> int:
        return sum((eqn.primitive.name == "conv_general_dilated")
                   + sum(count(inner) for value in eqn.params.values() for inner in jaxprs(value)) for eqn in jaxpr.eqns)

    return count(jax.make_jaxpr(fn)(*args).jaxpr)


@pytest.mark.parametrize("strides, padding", [((1, 1), SAME3), ((2, 2), ((1, 1), (1, 1)))])
def test_forward_mode_derivatives_are_those_of_xlas_conv(rng, strides, padding):
    """jvp through the kernel in each argument alone and in both: the tangent is XLA's conv's,
    and an argument nobody differentiates costs no conv."""
    x = jnp.asarray(rng.standard_normal((2, 1, 6, 5, 16)), jnp.float32)
    f = jnp.asarray(rng.standard_normal((2, 3, 3, 16, 16)) / 12, jnp.float32)
    dx, df = jnp.asarray(rng.standard_normal(x.shape), jnp.float32), jnp.asarray(rng.standard_normal(f.shape), jnp.float32)
    ours = functools.partial(pallas_conv.conv_implicit_gemm, strides=strides, padding=padding, block_m=16)
    xla = jax.vmap(lambda u, v: lax.conv_general_dilated(u, v, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                                         precision=lax.Precision.HIGHEST))
    cases = {  # name: (a function of the differentiated arguments, primals, tangents, XLA convs in its jvp)
        "both": (lambda a, b: ours(a, b), lambda a, b: xla(a, b), (x, f), (dx, df), 2),
        "input only": (lambda a: ours(a, f), lambda a: xla(a, f), (x,), (dx,), 1),
        "filter only": (lambda b: ours(x, b), lambda b: xla(x, b), (f,), (df,), 1),
    }
    for name, (fn, ref, primals, tangents, convs) in cases.items():
        (y, dy), (y_ref, dy_ref) = jax.jvp(fn, primals, tangents), jax.jvp(ref, primals, tangents)
        assert rel_error(y, y_ref) < 1e-5 and rel_error(dy, dy_ref) < 1e-5, name
        assert _convs_in(lambda p, t, fn=fn: jax.jvp(fn, p, t), primals, tangents) == convs, name


@pytest.mark.parametrize("strides, padding", [((1, 1), SAME3), ((2, 2), ((1, 1), (1, 1)))])
def test_second_derivatives_are_those_of_xlas_conv(rng, strides, padding):
    """Hessian-vector products (forward over reverse) and gradients of gradients pass through
    the kernel's rule again, so they are XLA's conv's too."""
    x = jnp.asarray(rng.standard_normal((2, 1, 5, 4, 16)), jnp.float32)
    f = jnp.asarray(rng.standard_normal((2, 3, 3, 16, 16)) / 12, jnp.float32)
    df = jnp.asarray(rng.standard_normal(f.shape), jnp.float32)
    ours = functools.partial(pallas_conv.conv_implicit_gemm, strides=strides, padding=padding, block_m=16)
    xla = jax.vmap(lambda u, v: lax.conv_general_dilated(u, v, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                                         precision=lax.Precision.HIGHEST))

    def loss(conv):
        return lambda a, b: jnp.sum(jnp.tanh(conv(a, b)) ** 2)

    def hvp(conv):  # forward over reverse, in the filter
        return jax.jvp(lambda b: jax.grad(loss(conv), argnums=1)(x, b), (f,), (df,))[1]

    def mixed(conv):  # reverse over reverse, filter then input
        return jax.grad(lambda a: jnp.sum(jax.grad(loss(conv), argnums=1)(a, f) * df))(x)

    assert rel_error(hvp(ours), hvp(xla)) < 1e-5
    assert rel_error(mixed(ours), mixed(xla)) < 1e-5


def test_mismatched_filters_and_blocks_are_refused(rng):
    x = jnp.zeros((2, 1, 4, 4, 32), jnp.float32)
    with pytest.raises(ValueError, match="does not match input"):
        pallas_conv.conv_implicit_gemm(x, jnp.zeros((2, 3, 3, 16, 16), jnp.float32))
    with pytest.raises(ValueError, match="differs from input dtype"):
        pallas_conv.conv_implicit_gemm(x, jnp.zeros((2, 3, 3, 32, 16), jnp.bfloat16))
    with pytest.raises(ValueError, match="powers of two"):
        pallas_conv.conv_implicit_gemm(x, jnp.zeros((2, 3, 3, 32, 48), jnp.float32), block_n=48)
    with pytest.raises(ValueError, match="not one the kernel computes"):
        pallas_conv.conv_implicit_gemm(x, jnp.zeros((2, 3, 3, 32, 16), jnp.float32), strides=(3, 3))


def test_a_model_served_with_the_kernel_where_it_applies_equals_each_tenants_forward(rng):
    """A bfloat16 ResNet-18 (tiny) with every conv the kernel supports lowered by it: the
    tenant-batched interpreter routes those layers to the kernel and predict still answers
    each row with its own tenant's weights."""
    import models
    from conftest import reference_predict

    import jaxmt
    from jaxmt.lowering import describe_lowering

    spec = models.make("resnet18", "tiny", dtype=jnp.bfloat16)
    params = {t: spec.init(40 + i, jnp.bfloat16) for i, t in enumerate(["a", "b", "c"])}
    x = spec.random_input(rng, 6)
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *params.values())
    plan = describe_lowering(spec.apply_fn, stacked, jnp.asarray(x[:3])[:, None], "rule")
    chosen = {f"conv:{c.index}": "implicit_gemm" for c in plan if pallas_conv.supports(
        c.signature.lhs_shape, c.signature.rhs_shape, c.signature.window_strides, c.signature.padding, c.signature.lhs_dilation,
        c.signature.rhs_dilation, c.signature.feature_group_count, c.signature.batch_group_count, c.signature.lhs_dtype)}
    assert chosen, "the tiny model has no conv the kernel supports"
    routed = describe_lowering(spec.apply_fn, stacked, jnp.asarray(x[:3])[:, None], chosen)
    assert sorted(f"conv:{c.index}" for c in routed if c.lowering == "implicit_gemm") == sorted(chosen)
    mt = jaxmt.MultiTenantModel(spec.apply_fn, params["a"], capacity=4, lowering=chosen)
    for t, p in params.items():
        mt.add_tenant(t, p)
    ids = ["a", "c", "b", "a", "b", "c"]
    got = mt.predict(ids, x)
    want = reference_predict(spec.apply_fn, params, ids, x)
    assert rel_error(np.asarray(got, np.float32), np.asarray(want, np.float32)) < 3e-2


@pytest.mark.parametrize("x_shape, w_shape, strides, padding", [
    ((4, 8, 56, 56, 64), (4, 3, 3, 64, 64), (1, 1), SAME3),  # ResNet's first stage: one channel chunk, one output tile
    ((16, 8, 28, 28, 128), (16, 3, 3, 128, 256), (1, 1), SAME3),  # two chunks, two output-channel tiles
    ((32, 8, 7, 7, 512), (32, 3, 3, 512, 512), (1, 1), SAME3),  # eight chunks, four tiles, rows that do not fill a tile
    ((2, 1, 9, 9, 16), (2, 5, 5, 16, 32), (1, 1), ((2, 2), (2, 2))),  # a 5x5 window of 16 channels
    ((4, 2, 224, 224, 3), (4, 7, 7, 3, 64), (2, 2), ((3, 3), (3, 3))),  # ResNet's stem, space-to-depth
    ((4, 2, 56, 56, 64), (4, 3, 3, 64, 128), (2, 2), ((0, 1), (0, 1))),  # a downsampling 3x3
])
@pytest.mark.parametrize("dtype, filter_k_major", [(jnp.bfloat16, False), (jnp.float32, True)])
def test_the_kernel_and_its_gradient_lower_to_triton_for_a_gpu(x_shape, w_shape, strides, padding, dtype, filter_k_major):
    """Without a GPU here, jax.export lowers for CUDA: the kernel's jaxpr must become Triton IR
    (power-of-two blocks, ops Triton's lowering knows), with the filter laid out either way.
    Compiling that IR to GPU code is not checked here."""
    from jax import export

    x, w = jax.ShapeDtypeStruct(x_shape, dtype), jax.ShapeDtypeStruct(w_shape, dtype)
    triton = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    conv = functools.partial(pallas_conv.conv_implicit_gemm, strides=strides, padding=padding, interpret=False,
                             filter_k_major=filter_k_major)
    forward = jax.jit(conv)
    backward = jax.jit(jax.grad(lambda a, b: jnp.sum(conv(a, b).astype(jnp.float32)), argnums=(0, 1)))
    with lowering_for_gpu():
        assert "__gpu$xla.gpu.triton" in export.export(forward, platforms=["cuda"], disabled_checks=triton)(x, w).mlir_module()
        export.export(backward, platforms=["cuda"], disabled_checks=triton)(x, w)


@pytest.mark.parametrize("platform, capability, compiles", [
    ("gpu", "9.0", True),  # Hopper
    ("gpu", "8.0", True),  # Ampere
    ("gpu", "7.0", False),  # Volta: no bfloat16 tensor-core dots in Triton
    ("gpu", "gfx90a", False),  # a ROCm GPU
    ("cpu", None, False),
])
def test_the_kernel_is_offered_only_where_triton_compiles_it(platform, capability, compiles):
    import types

    device = types.SimpleNamespace(platform=platform, **({} if capability is None else {"compute_capability": capability}))
    assert pallas_conv.compiles_on(device) is compiles
    if jax.devices()[0].platform == "cpu":  # the default device is the first one
        assert pallas_conv.compiles_on() is False


def test_a_jax_without_pallas_triton_backend_is_offered_the_kernel_nowhere(monkeypatch):
    """Once a jax release drops Pallas's Triton backend (deprecated in 0.12), even a Hopper GPU
    is not offered the kernel, so the lowering takes XLA's forms instead of failing to compile."""
    import sys
    import types

    from jax.experimental import pallas as pallas_package

    hopper = types.SimpleNamespace(platform="gpu", compute_capability="9.0")
    assert pallas_conv.triton_backend_available() and pallas_conv.compiles_on(hopper)
    # As a release without the submodule: a None entry in sys.modules makes its import fail.
    monkeypatch.delattr(pallas_package, "triton", raising=False)
    monkeypatch.setitem(sys.modules, "jax.experimental.pallas.triton", None)
    assert not pallas_conv.triton_backend_available()
    assert pallas_conv.compiles_on(hopper) is False


@pytest.mark.parametrize("dtype, matmul_precision, expected", [
    (jnp.float32, "default", "TF32"),  # as XLA's float32 convs round on these GPUs
    (jnp.float32, "highest", "IEEE"),  # what these tests set (conftest), and XLA's convs with it
    (jnp.bfloat16, "default", "TF32"),  # 16-bit products are exact whatever the name
])
def test_the_kernels_dots_follow_jaxs_matmul_precision(dtype, matmul_precision, expected):
    """The kernel's float32 products round as XLA's float32 convs do under the same
    ``jax_default_matmul_precision``, so the autotuner compares like with like."""
    from jax import export

    lowering = pytest.importorskip("jax._src.pallas.triton.lowering")
    if not hasattr(getattr(lowering, "tt_dialect", None), "dot"):
        pytest.skip("this jax's Triton lowering builds dots elsewhere")
    seen = []
    original = lowering.tt_dialect.dot

    def spy(*args, **kwargs):
        seen.append(kwargs.get("input_precision", args[3] if len(args) > 3 else None))
        return original(*args, **kwargs)

    x, w = jax.ShapeDtypeStruct((2, 1, 8, 8, 64), dtype), jax.ShapeDtypeStruct((2, 3, 3, 64, 64), dtype)
    triton = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    forward = jax.jit(lambda a, b: pallas_conv.conv_implicit_gemm(a, b, interpret=False))
    try:
        lowering.tt_dialect.dot = spy
        with jax.default_matmul_precision(matmul_precision), lowering_for_gpu():
            export.export(forward, platforms=["cuda"], disabled_checks=triton)(x, w)
    finally:
        lowering.tt_dialect.dot = original
    assert seen and all(getattr(p, "name", str(p)) == expected for p in seen), seen
