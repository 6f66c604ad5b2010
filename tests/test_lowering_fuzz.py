"""Fuzzed convs: every lowering that says it applies equals ``jax.vmap`` of the per-tenant conv.

Hypothesis draws the conv (1-3 spatial dims, 1-3 tenants, 1-3 images, sizes 1-9, 1-6
channels, feature groups incl. depthwise, windows 1-4, strides 1-3, paddings that may be
asymmetric, zero or negative, both dilations, any dimension numbers, float32 or bfloat16 (and
float64 where 64-bit mode is available), both precisions and preferred element types) and
fresh random operands. Each lowering whose ``applicable`` says yes is run, half the time
through ``tenant_batched`` (the interpreter, from the model's layout) and otherwise through
``lower_conv`` (the canonical layout); shapes and dtypes must match exactly and values within
the dtype's rounding of a bound on the sum of products (the conv of |x| and |w|).
"""

from __future__ import annotations

import functools
import subprocess
import sys

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from jax import lax

from jaxmt import autotune
from jaxmt.lowering import LoweringPolicy, describe_lowering, tenant_batched
from jaxmt.lowering_ops import CONV_LOWERINGS, ConvParams, applicable, conv_one, lower_conv

# Error allowed per output element, relative to the conv of |x| and |w| there: float32 sums
# reordered (and a 16-bit result rounded once more, either side).
TOLERANCE = {"float32": 1e-5, "bfloat16": 1.6e-2, "float16": 2e-3, "float64": 1e-12}
ALWAYS = ("vmap", "loop", "map")
PADS = [0, 0, 0, 1, 1, 2, 3, -1, -2]  # per side: zero most often, cropping (negative) too


def _one_sign(pair) -> bool:
    """No axis both cropped and padded: XLA's CPU conv (Eigen) computes that wrong, reading
    past the input (openxla/xla#48713), so the reference itself is wrong there; the lowerings
    that crop by slicing are checked on it in ``test_cropping_and_padding_one_axis``."""
    lo, hi = pair
    return lo * hi >= 0


@pytest.fixture(autouse=True)
def _private_lowering_cache(tmp_path, monkeypatch):
    """Each test reads and writes its own choices file, never ~/.cache/jaxmt."""
    monkeypatch.setenv(autotune.CACHE_ENV, str(tmp_path / "lowering.json"))


@st.composite
def convs(draw, dtypes=("float32", "bfloat16"), wider=("float32",)):
    """A conv of one tenant: the static arguments of ``lax.conv_general_dilated`` and the shapes.

    Weighted towards what the narrower lowerings take (2-d, no dilation, one group, the same
    stride on every axis, no cropping), so that each of them meets many convs."""
    nd = draw(st.sampled_from([1, 2, 2, 2, 3]))
    groups = draw(st.sampled_from([1, 1, 1, 2, 3, 4, 5, 6]))
    c = groups * draw(st.integers(1, 6 // groups))
    o = groups * draw(st.integers(1, 6 // groups))
    same = draw(st.booleans())  # one value for every spatial axis (strides, dilations)

    def per_axis(values):
        if same:
            return (draw(st.sampled_from(values)),) * nd
        return tuple(draw(st.sampled_from(values)) for _ in range(nd))

    dims = lambda: tuple(draw(st.permutations(range(nd + 2))))
    dtype = draw(st.sampled_from(dtypes))
    return dict(
        tenants=draw(st.integers(1, 3)),
        n=draw(st.integers(1, 3)),
        c=c,
        o=o,
        spatial=tuple(draw(st.integers(1, 9 if nd < 3 else 5)) for _ in range(nd)),
        window=tuple(draw(st.integers(1, 4 if nd < 3 else 3)) for _ in range(nd)),
        strides=per_axis([1, 1, 2, 2, 3]),
        padding=tuple(draw(st.tuples(st.sampled_from(PADS), st.sampled_from(PADS)).filter(_one_sign)) for _ in range(nd)),
        lhs_dilation=per_axis([1, 1, 1, 2]),
        rhs_dilation=per_axis([1, 1, 1, 2]),
        dimension_numbers=lax.ConvDimensionNumbers(dims(), dims(), dims()),
        groups=groups,
        dtype=dtype,
        precision=draw(st.sampled_from([None, lax.Precision.HIGHEST])),
        preferred_element_type=draw(st.sampled_from([None, *(t for t in wider if t != dtype)])),
    )


def _apply_fn(cfg):
    """The conv of one tenant, ``apply_fn(w, x)``, in the config's layout."""
    pet = cfg["preferred_element_type"]
    return functools.partial(
        lambda w, x: lax.conv_general_dilated(
            x, w, cfg["strides"], cfg["padding"], cfg["lhs_dilation"], cfg["rhs_dilation"], cfg["dimension_numbers"],
            cfg["groups"], precision=cfg["precision"], preferred_element_type=None if pet is None else jnp.dtype(pet)))


def _shape(spec, batch, feature, spatial):
    shape = [0] * len(spec)
    for axis, size in zip(spec, (batch, feature, *spatial)):
        shape[axis] = size
    return tuple(shape)


def _operands(cfg, seed):
    """w [K, ...] and x [K, ...] in the model's layout, fresh normal draws (never zeros)."""
    dn, k = cfg["dimension_numbers"], cfg["tenants"]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((k, *_shape(dn.lhs_spec, cfg["n"], cfg["c"], cfg["spatial"])))
    w = rng.standard_normal((k, *_shape(dn.rhs_spec, cfg["o"], cfg["c"] // cfg["groups"], cfg["window"])))
    return jnp.asarray(w, cfg["dtype"]), jnp.asarray(x, cfg["dtype"])


def _bound(apply_fn, w, x):
    """The conv of |w| and |x| at the highest precision in float32 (float64 for float64): what
    every output element's rounding error scales with."""
    wide = jnp.float64 if x.dtype == jnp.float64 else jnp.float32
    return np.asarray(jax.vmap(apply_fn)(jnp.abs(w).astype(wide), jnp.abs(x).astype(wide)), np.float64)


def _assert_close(got, want, bound, dtype_name, what):
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    err = np.abs(got - want)
    allowed = TOLERANCE[dtype_name] * bound + 1e-30
    bad = np.argwhere(~(err <= allowed))
    assert bad.size == 0, (f"{what}: {len(bad)} of {err.size} elements differ, first at {tuple(bad[0])}: "
                           f"{got[tuple(bad[0])]} != {want[tuple(bad[0])]} (allowed {allowed[tuple(bad[0])]:.3g})")


def _check_conv(cfg, seed, via_interpreter):
    apply_fn = _apply_fn(cfg)
    w, x = _operands(cfg, seed)
    try:
        want_shape = jax.eval_shape(jax.vmap(apply_fn), w, x)
    except (TypeError, ValueError):  # an invalid conv (e.g. cropped below nothing): not one to lower
        assume(False)
    # The signature as the interpreter builds it ("loop" applies to every conv).
    (layer,) = describe_lowering(apply_fn, w, x, "loop")
    sig = layer.signature
    for choice in ALWAYS:
        assert applicable(choice, sig), f"{choice} refuses {sig.key}"
    want = jax.vmap(apply_fn)(w, x)
    assert want.shape == want_shape.shape and want.dtype == want_shape.dtype
    bound = _bound(apply_fn, w, x)
    dtype_name = np.dtype(want.dtype).name  # the type the products are summed in
    if via_interpreter:
        for choice in CONV_LOWERINGS:
            if not applicable(choice, sig):
                continue
            # An override is honoured or raises: the interpreter's sig is the one checked above.
            policy = LoweringPolicy(default="vmap", overrides={"conv:0": choice}, autotune=False)
            got = tenant_batched(apply_fn, policy)(w, x)
            _assert_close(got, want, bound, dtype_name, f"{choice} on {sig.key} dn={cfg['dimension_numbers']}")
    else:  # lower_conv itself, on the operands in the canonical layout
        dn, pet = cfg["dimension_numbers"], cfg["preferred_element_type"]
        x_c = jnp.transpose(x, (0, *(a + 1 for a in (dn.lhs_spec[0], *dn.lhs_spec[2:], dn.lhs_spec[1]))))
        w_c = jnp.transpose(w, (0, *(a + 1 for a in (*dn.rhs_spec[2:], dn.rhs_spec[1], dn.rhs_spec[0]))))
        p = ConvParams(cfg["strides"], cfg["padding"], cfg["lhs_dilation"], cfg["rhs_dilation"], cfg["groups"], 1,
                       cfg["precision"], None if pet is None else jnp.dtype(pet))
        one = lambda w_, x_: conv_one(x_, w_, p)
        want_c = jax.vmap(one)(w_c, x_c)
        assert want_c.shape == (cfg["tenants"], cfg["n"], *sig.out_spatial, cfg["o"])
        for choice in CONV_LOWERINGS:
            if applicable(choice, sig):
                got = lower_conv(choice, x_c, w_c, p)
                _assert_close(got, want_c, _bound(one, w_c, x_c), dtype_name, f"lower_conv {choice} on {sig.key}")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(cfg=convs(), seed=st.integers(0, 2**32 - 1), via_interpreter=st.booleans())
def test_fuzzed_convs_equal_vmap_under_every_applicable_lowering(cfg, seed, via_interpreter):
    _check_conv(cfg, seed, via_interpreter)


@functools.lru_cache(maxsize=None)
def _x64_available() -> bool:
    """Whether this JAX computes in float64 once 64-bit mode is on (asked in a subprocess, so
    that this one's configuration stays as it is)."""
    code = ("import jax, jax.numpy as jnp; jax.config.update('jax_enable_x64', True); "
            "assert (jnp.ones(2, jnp.float64) + 1).dtype == jnp.float64")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120).returncode == 0


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(cfg=convs(dtypes=("float64", "float32"), wider=("float64",)), seed=st.integers(0, 2**32 - 1),
       via_interpreter=st.booleans())
def test_fuzzed_float64_convs_equal_vmap_under_every_applicable_lowering(cfg, seed, via_interpreter):
    """float64 convs, and float32 ones summed in float64 (``preferred_element_type``), which the
    forms that sum in float32 must refuse: both are held to float64's tolerance."""
    if not _x64_available():
        pytest.skip("64-bit mode is not available")
    with jax.enable_x64(True):
        _check_conv(cfg, seed, via_interpreter)


# Lowerings that crop (negative padding) by slicing, never handing it to XLA's conv.
_CROP_BY_SLICING = ("einsum", "im2col", "im2col_rows", "shift_sum", "depthwise_direct")


@pytest.mark.parametrize("groups, window", [(1, (1, 2)), (1, (1, 1)), (5, (1, 2))], ids=["kxk", "1x1", "depthwise"])
def test_cropping_and_padding_one_axis(groups, window):
    """Padding (-1, 1) on one axis (drop the first column, add a zero one at the end), minimised
    from the fuzzer: XLA's CPU conv reads past the input there (openxla/xla#48713), vmap's
    grouped conv included, so the reference is the conv of the input cropped in numpy first.
    The lowerings that slice instead must match it."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 1, 4, 5, 5)).astype(np.float32)
    w = rng.standard_normal((2, *window, 5 // groups, 5)).astype(np.float32)
    padding = ((0, 0), (-1, 1))
    p = ConvParams((1, 1), padding, (1, 1), (1, 1), groups)
    cropped = ConvParams((1, 1), ((0, 0), (0, 1)), (1, 1), (1, 1), groups, precision=lax.Precision.HIGHEST)
    want = np.stack([np.asarray(conv_one(jnp.asarray(x[k, :, :, 1:]), jnp.asarray(w[k]), cropped)) for k in range(2)])
    sig = describe_lowering(lambda w_, x_: conv_one(x_, w_, p), w, x, "loop")[0].signature
    checked = [choice for choice in _CROP_BY_SLICING if applicable(choice, sig)]
    assert checked
    for choice in checked:
        got = jax.jit(lambda a, b: lower_conv(choice, a, b, p))(jnp.asarray(x), jnp.asarray(w))
        assert got.shape == want.shape and got.dtype == want.dtype
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5, err_msg=choice)
