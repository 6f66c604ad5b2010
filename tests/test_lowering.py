"""Lowerings of tenant-batched convs equal the per-tenant reference; the planner and its cache.

Reference: a Python loop over tenants of ``lax.conv_general_dilated`` at the highest
precision, on fresh random inputs (never zeros). Float32 tolerances are rounding-level
(relative L2 error 1e-5); bfloat16 ones allow for one rounding of each product (2e-2).
"""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import reference_predict, rel_error, tiny_spec
from jax import lax

import jaxmt
from jaxmt import autotune
from jaxmt.lowering import LOWERINGS, LoweringPolicy, describe_lowering, lowering_key, tenant_batched
from jaxmt.lowering_ops import CONV_LOWERINGS, ConvParams, ConvSignature, applicable, lower_conv


@pytest.fixture(autouse=True)
def _private_lowering_cache(tmp_path, monkeypatch):
    """Each test reads and writes its own choices file, never ~/.cache/jaxmt."""
    monkeypatch.setenv(autotune.CACHE_ENV, str(tmp_path / "lowering.json"))


# (name, K, x per tenant [N, H, W, C], window, O, strides, padding, rhs_dilation, lhs_dilation, groups)
CASES = [
    ("3x3_same_odd_channels", 3, (2, 9, 9, 5), (3, 3), 7, (1, 1), "SAME", (1, 1), (1, 1), 1),
    ("3x3_stride2_valid", 2, (3, 10, 11, 3), (3, 3), 4, (2, 2), "VALID", (1, 1), (1, 1), 1),
    ("3x3_stride2_explicit_asymmetric", 3, (1, 9, 8, 4), (3, 3), 5, (2, 2), ((1, 2), (0, 1)), (1, 1), (1, 1), 1),
    ("1x1", 3, (2, 6, 6, 5), (1, 1), 7, (1, 1), "VALID", (1, 1), (1, 1), 1),
    ("1x1_stride2", 2, (2, 7, 7, 6), (1, 1), 3, (2, 2), "VALID", (1, 1), (1, 1), 1),
    ("1x1_stride2_padded", 2, (1, 6, 5, 3), (1, 1), 4, (2, 2), ((1, 1), (0, 1)), (1, 1), (1, 1), 1),
    ("7x7_stride2_stem", 2, (1, 12, 12, 3), (7, 7), 8, (2, 2), ((3, 3), (3, 3)), (1, 1), (1, 1), 1),
    ("5x3_dilated", 2, (2, 12, 10, 3), (5, 3), 4, (1, 2), "SAME", (2, 1), (1, 1), 1),
    ("3x3_lhs_dilated", 2, (1, 5, 5, 3), (3, 3), 2, (1, 1), ((2, 2), (2, 2)), (1, 1), (2, 2), 1),
    ("depthwise", 3, (2, 8, 8, 6), (3, 3), 6, (1, 1), ((1, 1), (1, 1)), (1, 1), (1, 1), 6),
    ("depthwise_stride2_multiplier2", 2, (2, 9, 9, 5), (3, 3), 10, (2, 2), "SAME", (1, 1), (1, 1), 5),
    ("grouped_3_groups", 2, (2, 7, 7, 6), (3, 3), 9, (1, 1), "SAME", (1, 1), (1, 1), 3),
    ("grouped_1x1", 2, (2, 5, 5, 6), (1, 1), 4, (1, 1), "VALID", (1, 1), (1, 1), 2),
    ("3x3_same_16_channels", 3, (2, 9, 7, 16), (3, 3), 32, (1, 1), "SAME", (1, 1), (1, 1), 1),
    ("5x5_same_32_channels", 2, (1, 11, 13, 32), (5, 5), 16, (1, 1), "SAME", (1, 1), (1, 1), 1),
]


def _case_arrays(case, rng, dtype=np.float32):
    _, k, x_shape, window, out, strides, padding, rd, ld, groups = case
    x = rng.standard_normal((k, *x_shape)).astype(dtype)
    w = (rng.standard_normal((k, *window, x_shape[-1] // groups, out)) / math.sqrt(np.prod(window) * x_shape[-1] // groups)).astype(dtype)
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(np.array(x_shape[1:3]) * np.array(ld) - (np.array(ld) - 1),
                                      [(r - 1) * d + 1 for r, d in zip(window, rd)], strides, padding)
    params = ConvParams(tuple(strides), tuple(tuple(p) for p in padding), tuple(ld), tuple(rd), groups)
    return x, w, params


def _signature(x, w, p: ConvParams) -> ConvSignature:
    return ConvSignature(x.shape[0], x.shape[1:], w.shape[1:], p.window_strides, p.padding, p.lhs_dilation,
                         p.rhs_dilation, p.feature_group_count, 1, x.dtype.name, w.dtype.name)


def _reference(x, w, p: ConvParams) -> np.ndarray:
    """Tenant by tenant, in a Python loop, at the highest precision."""
    dn = ("NHWC", "HWIO", "NHWC")
    return np.stack([
        np.asarray(lax.conv_general_dilated(
            jnp.asarray(x[i], jnp.float32), jnp.asarray(w[i], jnp.float32), p.window_strides, p.padding, p.lhs_dilation,
            p.rhs_dilation, dimension_numbers=dn, feature_group_count=p.feature_group_count, precision=lax.Precision.HIGHEST))
        for i in range(x.shape[0])
    ])


@pytest.mark.parametrize("choice", CONV_LOWERINGS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_every_lowering_equals_the_per_tenant_reference(case, choice, rng):
    x, w, p = _case_arrays(case, rng)
    sig = _signature(x, w, p)
    if not applicable(choice, sig):
        pytest.skip(f"{choice} does not apply to {sig.kind}")
    got = jax.jit(lambda a, b: lower_conv(choice, a, b, p))(x, w)
    want = _reference(x, w, p)
    assert got.shape == want.shape and got.dtype == x.dtype
    assert sig.out_spatial == want.shape[2:4]
    assert rel_error(got, want) < 1e-5


@pytest.mark.parametrize("choice", CONV_LOWERINGS)
def test_every_lowering_in_bfloat16(choice, rng):
    for case in CASES:  # the first case the lowering applies to in bfloat16
        x, w, p = _case_arrays(case, rng, np.float32)
        if applicable(choice, _signature(jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16), p)):
            break
    else:
        pytest.fail(f"no case for {choice} in bfloat16")
    x16, w16 = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    got = jax.jit(lambda a, b: lower_conv(choice, a, b, p))(x16, w16)
    assert got.dtype == jnp.bfloat16
    want = _reference(np.asarray(x16, np.float32), np.asarray(w16, np.float32), p)
    assert rel_error(got, want) < 2e-2


def test_applicability_follows_the_layer_kind():
    sig = lambda window, groups=1, c=8: ConvSignature(4, (2, 8, 8, c), (*window, c // groups, 8), (1, 1), ((0, 0), (0, 0)), (1, 1), (1, 1), groups)
    assert sig((1, 1)).kind == "1x1" and applicable("einsum", sig((1, 1)))
    assert sig((3, 3)).kind == "kxk" and not applicable("einsum", sig((3, 3)))
    assert sig((3, 3), 8).kind == "depthwise" and applicable("depthwise_direct", sig((3, 3), 8))
    assert sig((3, 3), 2).kind == "grouped" and not applicable("batch_group", sig((3, 3), 2))
    for name in ("vmap", "loop", "map"):
        assert all(applicable(name, s) for s in (sig((1, 1)), sig((3, 3)), sig((3, 3), 8), sig((3, 3), 2)))
    with pytest.raises(ValueError, match="unknown conv lowering"):
        applicable("winograd", sig((3, 3)))


# --------------------------------------------------------------------- the interpreter
def _plain_jax_model(params, x):
    """NCHW convs (one inside a nested jit), a shared (unbatched) filter, a dense head."""
    dn = ("NCHW", "OIHW", "NCHW")
    y = lax.conv_general_dilated(x, params["c1"], (1, 1), "SAME", dimension_numbers=dn)
    y = jax.nn.relu(y)
    y = jax.jit(lambda a, f: lax.conv_general_dilated(a, f, (2, 2), ((1, 0), (0, 1)), dimension_numbers=dn))(y, params["c2"])
    shared = jnp.ones((y.shape[1], 1, 1, 1), y.dtype) * 0.5  # same for every tenant
    y = y + lax.conv_general_dilated(y, shared, (1, 1), "VALID", dimension_numbers=dn, feature_group_count=y.shape[1])
    return jnp.mean(y, axis=(2, 3)) @ params["dense"]


def _plain_params(rng, k):
    return {
        "c1": jnp.asarray(rng.standard_normal((k, 6, 3, 3, 3)), jnp.float32),
        "c2": jnp.asarray(rng.standard_normal((k, 5, 6, 1, 1)), jnp.float32),
        "dense": jnp.asarray(rng.standard_normal((k, 5, 4)), jnp.float32),
    }


@pytest.mark.parametrize("lowering", ["auto", "rule", "einsum", "loop", "batch_group", "grouped_nchw", {"conv:0": "im2col"}])
def test_interpreter_equals_vmap_for_plain_jax_and_other_layouts(lowering, rng):
    k = 3
    params = _plain_params(rng, k)
    x = jnp.asarray(rng.standard_normal((k, 2, 3, 9, 8)), jnp.float32)
    want = jax.vmap(_plain_jax_model)(params, x)
    got = jax.jit(tenant_batched(_plain_jax_model, lowering))(params, x)
    assert rel_error(got, want) < 1e-5
    layers = describe_lowering(_plain_jax_model, params, x, lowering)
    # Both tenant-batched convs are seen (the one in the nested jit too); the shared-filter
    # conv is not tenant-batched and is left to vmap.
    assert [layer.signature.kind for layer in layers] == ["kxk", "1x1"]


def test_gradients_flow_through_the_lowered_program(rng):
    k = 2
    params = _plain_params(rng, k)
    x = jnp.asarray(rng.standard_normal((k, 2, 3, 9, 8)), jnp.float32)

    def loss(batched):
        return lambda p: jnp.sum(batched(p, x) ** 2)

    want = jax.grad(loss(jax.vmap(_plain_jax_model)))(params)
    got = jax.grad(loss(tenant_batched(_plain_jax_model, "loop")))(params)
    for name in params:
        assert rel_error(got[name], want[name]) < 1e-5, name


_REMAT = {"checkpoint", "remat", "remat2"}


@pytest.mark.parametrize("lowering", ["loop", "im2col", "rule"])
@pytest.mark.parametrize("policy", [None, jax.checkpoint_policies.nothing_saveable], ids=["default", "nothing_saveable"])
def test_a_rematerialised_block_stays_rematerialised_under_a_lowering(lowering, policy, rng):
    """A conv inside ``jax.checkpoint`` is lowered (it is seen, and counted), and the block is
    still recomputed in the backward pass, as under vmap: memory a trainer saved with remat
    stays saved, and the gradient is vmap's."""
    def f(w, x):
        block = jax.checkpoint(lambda a, b: jnp.sin(lax.conv_general_dilated(a, b, (1, 1), "SAME", dimension_numbers=_DN)),
                               policy=policy)
        return jnp.sum(block(x, w) ** 2)

    w = jnp.asarray(rng.standard_normal((2, 3, 3, 4, 5)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((2, 1, 5, 5, 4)), jnp.float32)
    grads = {name: lambda v, _bf=bf: jax.grad(lambda w_: jnp.sum(_bf(w_, x)))(v)
             for name, bf in [("vmap", jax.vmap(f)), ("lowered", tenant_batched(f, lowering))]}
    remats = {name: [e.params["policy"] for e in jax.make_jaxpr(g)(w).jaxpr.eqns if e.primitive.name in _REMAT]
              for name, g in grads.items()}
    assert remats["lowered"] == remats["vmap"] == [policy]
    assert rel_error(grads["lowered"](w), grads["vmap"](w)) < 1e-5
    assert [layer.lowering for layer in describe_lowering(f, w, x, lowering)] == [
        autotune.default_rule(_signature(x, w, ConvParams((1, 1), ((1, 1), (1, 1)), (1, 1), (1, 1))))
        if lowering == "rule" else lowering]


def test_forced_choices_are_honoured_and_inapplicable_ones_fall_back_or_raise(rng):
    spec = tiny_spec("resnet50")
    params_k = _stacked_shapes(spec, 2)
    x = jax.ShapeDtypeStruct((2, 3, *spec.input_shape), jnp.float32)
    forced = describe_lowering(spec.apply_fn, params_k, x, "einsum")
    assert {(c.signature.kind, c.lowering, c.source) for c in forced} == {("1x1", "einsum", "forced"), ("kxk", "vmap", "fallback")}
    mixed = describe_lowering(spec.apply_fn, params_k, x, {"kxk": "loop", "conv:1": "grouped_nchw"})
    assert mixed[1].lowering == "grouped_nchw" and mixed[1].source == "override"
    assert all(c.lowering == "loop" for c in mixed if c.signature.kind == "kxk")
    assert all(c.source in ("rule", "memo", "cache", "nearest", "override") for c in mixed)
    with pytest.raises(ValueError, match="does not apply"):
        describe_lowering(spec.apply_fn, params_k, x, {"conv:0": "einsum"})  # conv:0 is the 7x7 stem
    with pytest.raises(ValueError, match="unknown lowering"):
        LoweringPolicy("fastest")
    with pytest.raises(ValueError, match="unknown conv lowering"):
        LoweringPolicy(overrides=(("kxk", "auto"),))
    with pytest.raises(ValueError, match="selector"):
        LoweringPolicy(overrides=(("layer3", "loop"),))


def test_program_keys_name_the_policy():
    keys = {lowering_key(x) for x in ("vmap", "auto", "rule", "loop", {"kxk": "loop"}, LoweringPolicy("auto", autotune=False))}
    assert len(keys) == 6 and lowering_key("vmap") == "vmap" == lowering_key(LoweringPolicy("vmap"))
    assert set(LOWERINGS) >= {"vmap", "auto", "einsum", "loop"}


# ------------------------------------------------------------------------- end to end
def _stacked_shapes(spec, k):
    one = jax.eval_shape(spec.module.init, jax.random.key(0), jax.ShapeDtypeStruct((1, *spec.input_shape), spec.input_dtype))
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct((k, *s.shape), s.dtype), one)


def _random_variables(spec, seed: int):
    """One tenant's variables drawn with NumPy (ModelSpec.init compiles for ~20 s on a CPU)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(spec.module.init, jax.random.key(0), jax.ShapeDtypeStruct((1, *spec.input_shape), spec.input_dtype))

    def draw(path, leaf):
        name = getattr(path[-1], "key", "")
        if name == "var":
            return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), leaf.dtype)
        scale = 0.1 if name in ("bias", "mean", "scale") else math.sqrt(2.0 / max(1, math.prod(leaf.shape[:-1])))
        value = rng.standard_normal(leaf.shape) * scale + (1.0 if name == "scale" else 0.0)
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv2", "mlp"])
def test_multi_tenant_model_with_auto_lowering_equals_the_reference(name, rng):
    spec = tiny_spec(name)
    params = {f"t{i}": _random_variables(spec, 100 + i) for i in range(5)}
    auto = jaxmt.MultiTenantModel(spec.apply_fn, params["t0"], capacity=5, lowering="auto", buckets=jaxmt.BucketPolicy.powers_of_two(8, 4))
    plain = jaxmt.MultiTenantModel(spec.apply_fn, params["t0"], capacity=5, lowering="vmap", buckets=jaxmt.BucketPolicy.powers_of_two(8, 4))
    for tenant, p in params.items():
        auto.add_tenant(tenant, p)
        plain.add_tenant(tenant, p)
    ids = list(rng.choice(list(params), size=11))
    x = spec.random_input(rng, 11)
    want = reference_predict(spec.apply_fn, params, ids, x)
    assert rel_error(auto.predict(ids, x), want) < 1e-5
    assert rel_error(plain.predict(ids, x), want) < 1e-5
    (auto_key,) = auto.programs._programs
    (plain_key,) = plain.programs._programs
    assert auto_key.lowering == "auto" and plain_key.lowering == "vmap"


# ----------------------------------------------------------------- planner and cache
def _small_sig(k=2, dtype="float32"):
    return ConvSignature(k, (2, 6, 6, 4), (3, 3, 4, 5), (1, 1), ((1, 1), (1, 1)), (1, 1), (1, 1), lhs_dtype=dtype, rhs_dtype=dtype)


def test_cache_round_trips_and_is_keyed_by_device_and_jax_version(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "lowering.json"
    sig = _small_sig()
    key = autotune.cache_key(sig)
    device = jax.devices()[0]
    assert device.device_kind in key and f"jax-{jax.__version__}" in key and sig.key in key
    tuned = autotune.Planner(autotune=True, cache_path=path)
    choice, source = tuned.choose(sig)
    assert source == "autotune" and choice in autotune.candidates(sig) and tuned.measurements == 1
    assert tuned.choose(sig) == (choice, "memo")
    entry = json.loads(path.read_text())["entries"][key]
    assert entry["choice"] == choice and set(entry["us"]) == set(autotune.candidates(sig))
    # A fresh planner that may not measure reads the choice back from disk.
    assert autotune.Planner(autotune=False, cache_path=path).choose(sig) == (choice, "cache")
    # An entry for another jax version or device is not trusted.
    stale = json.loads(path.read_text())
    stale["entries"] = {k.replace(jax.__version__, "0.0.1"): v for k, v in stale["entries"].items()}
    path.write_text(json.dumps(stale))
    assert autotune.Planner(autotune=False, cache_path=path).choose(sig) == (autotune.default_rule(sig), "rule")
    # A corrupt file is ignored, and the next measurement rewrites it.
    path.write_text("{not json")
    assert autotune.Planner(autotune=False, cache_path=path).choose(sig)[1] == "rule"
    autotune.Planner(autotune=True, cache_path=path).choose(sig)
    assert key in json.loads(path.read_text())["entries"]


def test_a_choices_file_that_cannot_be_written_warns_and_the_choice_still_serves(tmp_path, monkeypatch, rng):
    """A cache location that cannot be written (a read-only home in a container; here a path
    below a plain file) costs the choice's persistence, with a warning naming the file, not
    the program that is being traced: the measured choice is used, and lent to other sizes."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    path = blocker / "lowering.json"
    measured = []

    def fake_measure(sig, params=None, names=None, **kw):
        measured.append(sig)
        return {"loop": {"us": 2.0}, "im2col": {"us": 1.0}, "vmap": {"us": 3.0}}

    monkeypatch.setattr(autotune, "measure", fake_measure)
    policy = LoweringPolicy("auto", autotune=True, cache_path=str(path))

    def f(w, x):
        return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=_DN)

    w = jnp.asarray(rng.standard_normal((2, 3, 3, 4, 5)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((2, 2, 6, 6, 4)), jnp.float32)
    with pytest.warns(RuntimeWarning, match="lowering.json"):
        got = jax.jit(tenant_batched(f, policy))(w, x)
    assert rel_error(got, jax.vmap(f)(w, x)) < 1e-5
    assert [(c.lowering, c.source) for c in describe_lowering(f, w, x, policy)] == [("im2col", "memo")]
    # The same layer at twice the tenants takes the measured choice, unmeasured.
    w2, x2 = jnp.concatenate([w, w]), jnp.concatenate([x, x])
    assert [(c.lowering, c.source) for c in describe_lowering(f, w2, x2, policy)] == [("im2col", "nearest")]
    assert len(measured) == 1 and not path.exists()


def test_the_environment_chooses_the_cache_file_and_autotuning(tmp_path, monkeypatch):
    monkeypatch.setenv(autotune.CACHE_ENV, str(tmp_path / "x.json"))
    assert autotune.default_cache_path() == tmp_path / "x.json"
    monkeypatch.setenv(autotune.AUTOTUNE_ENV, "0")
    assert autotune.autotune_default() is False
    monkeypatch.setenv(autotune.AUTOTUNE_ENV, "1")
    assert autotune.autotune_default() is True
    monkeypatch.delenv(autotune.AUTOTUNE_ENV)
    assert autotune.autotune_default() is (jax.default_backend() != "cpu")


def test_cached_choice_is_used_by_the_model_program(tmp_path, rng):
    spec = tiny_spec("resnet18")
    params = _random_variables(spec, 7)
    stacked = jax.tree.map(lambda leaf: jnp.stack([leaf, leaf * 0.5]), params)
    x = jnp.asarray(spec.random_input(rng, 6).reshape(2, 3, *spec.input_shape))
    layers = describe_lowering(spec.apply_fn, stacked, x, "rule")
    # Plant a choice for the stem in the cache: the planner must follow it.
    planted = LoweringPolicy("auto", autotune=False, cache_path=str(tmp_path / "c.json"))
    autotune.LoweringCache(planted.cache_path).put(autotune.cache_key(layers[0].signature), {"choice": "batch_group"})
    chosen = describe_lowering(spec.apply_fn, stacked, x, planted)
    assert (chosen[0].lowering, chosen[0].source) == ("batch_group", "cache")
    got = jax.jit(tenant_batched(spec.apply_fn, planted))(stacked, x)
    assert rel_error(got, jax.vmap(spec.apply_fn)(stacked, x)) < 1e-5


@pytest.mark.parametrize("platform, tried", [("gpu", True), ("cpu", False), ("tpu", False)])
def test_the_pallas_kernel_is_a_kxk_candidate_on_gpus_only(platform, tried):
    bf16_3x3 = ConvSignature(8, (2, 14, 14, 64), (3, 3, 64, 64), (1, 1), ((1, 1), (1, 1)), (1, 1), (1, 1),
                             lhs_dtype="bfloat16", rhs_dtype="bfloat16")
    f32_3x3 = dataclasses.replace(bf16_3x3, lhs_dtype="float32", rhs_dtype="float32")
    assert ("implicit_gemm" in autotune.candidates(bf16_3x3, platform)) is tried
    assert ("implicit_gemm" in autotune.candidates(f32_3x3, platform)) is tried
    # Where the kernel does not apply (a dilated filter; a float32 conv that names its own
    # precision, which the kernel's TF32 dots would not honour) no platform tries it.
    for sig in (dataclasses.replace(f32_3x3, precision=str(lax.Precision.HIGHEST)), dataclasses.replace(bf16_3x3, rhs_dilation=(2, 2))):
        assert "implicit_gemm" not in autotune.candidates(sig, "gpu")


def test_off_the_gpus_the_kernel_was_timed_on_the_rule_keeps_its_earlier_choices(monkeypatch):
    monkeypatch.setattr(autotune, "_kernel_is_timed_here", lambda: False)
    assert autotune.default_rule(_conv_sig(8, 56, 64, 3, 64), "gpu") == "vmap"
    assert autotune.default_rule(_conv_sig(1, 14, 256, 3, 256), "gpu") == "im2col"
    assert autotune.default_rule(_conv_sig(8, 224, 3, 7, 64, stride=2), "gpu") == "vmap"
    assert autotune.default_rule(_conv_sig(8, 224, 3, 7, 64, stride=2, dtype="float32"), "gpu") == "vmap"
    monkeypatch.setattr(autotune, "_kernel_is_timed_here", lambda: True)
    assert autotune.default_rule(_conv_sig(8, 56, 64, 3, 64), "gpu") == "implicit_gemm"


@pytest.mark.parametrize("platform, capability, timed", [
    ("gpu", "9.0", True),  # Hopper: where the kernel was timed
    ("gpu", "8.0", False),  # Ampere: compiles, not timed
    ("gpu", "10.0", False),  # Blackwell: not timed
    ("gpu", "gfx90a", False),  # ROCm
    ("cpu", None, True),  # no GPU here: a rule asked about "gpu" describes one that was timed
])
def test_the_rule_takes_the_kernel_unmeasured_only_on_the_gpus_it_was_timed_on(platform, capability, timed):
    import types

    device = types.SimpleNamespace(platform=platform, **({} if capability is None else {"compute_capability": capability}))
    assert autotune._kernel_is_timed_here(device) is timed


def test_a_lowering_that_fails_while_timed_is_reported_and_the_rest_still_timed(monkeypatch):
    sig = _small_sig()

    real_interleaved, real_burst = autotune.interleaved_seconds, autotune.burst_seconds

    def interleaved(fns, *args, **kwargs):  # the round of all forms fails; one form alone times
        if len(fns) > 1:
            raise RuntimeError("RESOURCE_EXHAUSTED: out of memory")
        return real_interleaved(fns, *args, **kwargs)

    failing = []

    def burst(program, args, **kwargs):
        if not failing:  # the first form timed alone fails too, the others time
            failing.append(program)
            raise RuntimeError("RESOURCE_EXHAUSTED: out of memory")
        return real_burst(program, args, **kwargs)

    monkeypatch.setattr(autotune, "interleaved_seconds", interleaved)
    monkeypatch.setattr(autotune, "burst_seconds", burst)
    rows = autotune.measure(sig, names=("vmap", "loop"), repeats=1)
    first, second = rows["vmap"], rows["loop"]
    assert first["us"] is None and first["error"].startswith("RuntimeError while timing")
    assert second["us"] > 0 and "error" not in second
    assert autotune.pick(sig, rows) == "loop"
    assert first["timed_alone"] and second["timed_alone"]
    with pytest.raises(ValueError, match="have the names of lowerings"):
        autotune.measure(sig, names=("vmap",), baselines={"vmap": lambda a, b: a}, repeats=1)


def test_pick_prefers_the_rule_within_the_noise_margin():
    sig = _small_sig()
    rule = autotune.default_rule(sig)
    other = next(n for n in autotune.candidates(sig) if n != rule)
    assert autotune.pick(sig, {rule: {"us": 100.0}, other: {"us": 98.0}}) == rule
    assert autotune.pick(sig, {rule: {"us": 100.0}, other: {"us": 80.0}}) == other
    assert autotune.pick(sig, {rule: {"us": None, "error": "x"}, other: {"us": 120.0}}) == other
    assert autotune.pick(sig, {}) == rule


def test_a_layer_measured_at_another_size_lends_its_choice(tmp_path):
    path = tmp_path / "c.json"
    measured = _small_sig(k=8)
    cache = autotune.LoweringCache(path)
    cache.put(autotune.cache_key(measured), autotune.cache_entry(measured, "batch_group", {}))
    import dataclasses

    other_k = _small_sig(k=3)
    other_n = dataclasses.replace(measured, lhs_shape=(7, *measured.lhs_shape[1:]))
    other_dtype = _small_sig(k=3, dtype="bfloat16")
    other_layer = dataclasses.replace(measured, rhs_shape=(3, 3, 4, 6))
    planner = autotune.Planner(autotune=False, cache_path=path)
    assert planner.choose(other_k) == ("batch_group", "nearest")
    assert planner.choose(other_n) == ("batch_group", "nearest")
    assert planner.choose(other_dtype) == ("batch_group", "nearest")  # no bf16 entry: any dtype
    assert planner.choose(other_layer)[1] == "rule"


def test_a_kxk_choice_is_not_lent_across_one_image_and_several(tmp_path):
    """The best kxk form flips between one image per tenant and several: a choice measured on
    one side is not lent to the other, which gets the rule; 1x1 choices are lent either way."""
    import dataclasses

    path = tmp_path / "c.json"
    cache = autotune.LoweringCache(path)
    several = _small_sig(k=8)
    assert several.kind == "kxk" and several.lhs_shape[0] > 1
    cache.put(autotune.cache_key(several), autotune.cache_entry(several, "batch_group", {}))
    one = dataclasses.replace(several, lhs_shape=(1, *several.lhs_shape[1:]))
    pointwise = dataclasses.replace(several, rhs_shape=(1, 1, *several.rhs_shape[2:]), padding=((0, 0), (0, 0)))
    cache.put(autotune.cache_key(pointwise), autotune.cache_entry(pointwise, "vmap", {}))
    planner = autotune.Planner(autotune=False, cache_path=path)
    assert planner.choose(one) == (autotune.default_rule(one), "rule")
    assert planner.choose(dataclasses.replace(one, tenants=3)) == (autotune.default_rule(one), "rule")
    assert planner.choose(dataclasses.replace(several, tenants=3)) == ("batch_group", "nearest")
    assert planner.choose(dataclasses.replace(pointwise, lhs_shape=(1, *several.lhs_shape[1:]))) == ("vmap", "nearest")


def test_autotuning_while_a_program_is_traced_times_the_pallas_kernel(monkeypatch):
    """``choose`` runs inside the model's trace; the kernel (Pallas's interpreter here) must
    compile and be timed there like the XLA forms, so that the autotuner can pick it."""
    monkeypatch.setattr(autotune, "candidates", lambda sig, platform=None: ("vmap", "implicit_gemm"))
    seen: dict = {}
    pick = autotune.pick
    monkeypatch.setattr(autotune, "pick", lambda sig, timings, **kw: seen.update(timings) or pick(sig, timings, **kw))
    planner = autotune.Planner(autotune=True, cache=False)
    choices = []
    jax.jit(lambda x: choices.append(planner.choose(_small_sig(k=2))) or x * 2)(jnp.ones(3))
    assert choices[0][1] == "autotune" and set(seen) == {"vmap", "implicit_gemm"}
    for name, row in seen.items():
        assert "error" not in row and row["us"] > 0, (name, row)


def test_autotuning_measures_with_the_callers_matmul_precision_and_device(monkeypatch):
    """The measuring thread takes the settings the caller entered with context managers."""
    seen = {}

    def fake_measure(sig, params=None, names=None, **kw):
        seen.update(precision=jax.config.jax_default_matmul_precision, device=jax.config.jax_default_device)
        return {"vmap": {"us": 1.0}}

    monkeypatch.setattr(autotune, "measure", fake_measure)
    device = jax.devices()[-1]
    outside = {"precision": jax.config.jax_default_matmul_precision, "device": jax.config.jax_default_device}
    inside = {"precision": "bfloat16" if outside["precision"] != "bfloat16" else "highest", "device": device}
    with jax.default_matmul_precision(inside["precision"]), jax.default_device(device):
        autotune.Planner(autotune=True, cache=False).choose(_small_sig(k=3))
    assert seen == inside
    seen.clear()
    autotune.Planner(autotune=True, cache=False).choose(_small_sig(k=5))
    assert seen == outside


def test_autotuning_measures_a_layer_once_per_spread_of_sizes(tmp_path):
    """A bucket ladder meets each layer at many K x N: sizes within ``measure_spread`` of a
    measured one reuse its choice, farther ones (and other dtypes) are measured."""
    path = tmp_path / "c.json"
    planner = autotune.Planner(autotune=True, cache_path=path, measure_spread=4.0)
    first, source = planner.choose(_small_sig(k=2))
    assert source == "autotune" and planner.measurements == 1
    assert planner.choose(_small_sig(k=8)) == (first, "nearest")  # 4x the work: within the spread
    assert planner.measurements == 1
    assert planner.choose(_small_sig(k=9))[1] == "autotune"  # 4.5x: measured
    assert planner.choose(_small_sig(k=2, dtype="bfloat16"))[1] == "autotune"  # dtypes are not mixed
    assert planner.measurements == 3
    every_size = autotune.Planner(autotune=True, cache_path=tmp_path / "d.json", measure_spread=1.0)
    every_size.choose(_small_sig(k=2))
    assert every_size.choose(_small_sig(k=3))[1] == "autotune" and every_size.measurements == 2
    with pytest.raises(ValueError, match="measure_spread"):
        autotune.Planner(measure_spread=0.5)


def _conv_sig(n, hw, c, window, o, stride=1, groups=1, tenants=16, dtype="bfloat16", precision="None"):
    pad = ((window // 2, window // 2),) * 2
    return autotune.ConvSignature(tenants, (n, hw, hw, c), (window, window, c // groups, o), (stride, stride), pad, (1, 1), (1, 1),
                                  feature_group_count=groups, lhs_dtype=dtype, rhs_dtype=dtype, precision=precision)


F32 = {"dtype": "float32"}


@pytest.mark.parametrize(
    "sig, platform, expected",
    [
        (_conv_sig(8, 56, 64, 1, 256), "gpu", "einsum"),  # 1x1: batched matmul
        # 16-bit kxk convs of several tenants on a GPU: the Pallas kernel at stride 1 and for stems.
        (_conv_sig(8, 56, 64, 3, 64), "gpu", "implicit_gemm"),
        (_conv_sig(1, 56, 64, 3, 64), "gpu", "implicit_gemm"),
        (_conv_sig(8, 7, 512, 3, 512), "gpu", "implicit_gemm"),
        (_conv_sig(8, 224, 3, 7, 64, stride=2), "gpu", "implicit_gemm"),  # 7x7 RGB stem
        (_conv_sig(8, 224, 3, 3, 32, stride=2), "gpu", "im2col"),  # 3x3 RGB stem: the kernel was not timed there
        (_conv_sig(8, 56, 64, 3, 128, stride=2), "gpu", "im2col"),  # a downsampling 3x3 widening C -> 2C
        (_conv_sig(8, 56, 128, 3, 128, stride=2), "gpu", "vmap"),  # ... keeping C: the grouped form
        (_conv_sig(1, 56, 64, 3, 64, tenants=1), "gpu", "vmap"),  # one tenant: vmap's form is a plain conv
        (_conv_sig(8, 56, 64, 3, 64), "tpu", "vmap"),  # no Triton kernel off GPUs
        # float32: the grouped form, im2col where it won, the kernel for large RGB stems only.
        (_conv_sig(8, 56, 64, 3, 64, **F32), "gpu", "vmap"),  # kxk, large output, several images: grouped form
        (_conv_sig(1, 14, 256, 3, 256, **F32), "gpu", "im2col"),  # one image per tenant, output of 14x14
        (_conv_sig(1, 28, 256, 3, 256, stride=2, **F32), "gpu", "im2col"),  # ... at stride 2 to 14x14
        (_conv_sig(1, 28, 128, 3, 128, **F32), "gpu", "vmap"),  # ... but an output of 28x28: the grouped form
        (_conv_sig(1, 56, 64, 3, 64, **F32), "gpu", "vmap"),
        (_conv_sig(1, 56, 128, 3, 128, stride=2, **F32), "gpu", "vmap"),
        (_conv_sig(1, 14, 256, 3, 256, tenants=1, **F32), "gpu", "vmap"),  # one tenant: a plain conv
        (_conv_sig(2, 14, 256, 3, 256, **F32), "gpu", "vmap"),  # two images per tenant
        (_conv_sig(8, 56, 64, 3, 128, stride=2, **F32), "gpu", "im2col"),  # widening downsample, any B
        (_conv_sig(1, 56, 64, 3, 128, stride=2, **F32), "gpu", "im2col"),
        (_conv_sig(8, 56, 64, 3, 128, stride=2, tenants=1, **F32), "gpu", "vmap"),
        # The same at a few tenants (timed at 4 as streams of steps).
        (_conv_sig(1, 28, 128, 3, 128, tenants=4, **F32), "gpu", "vmap"),
        (_conv_sig(8, 56, 64, 3, 128, stride=2, tenants=4), "gpu", "im2col"),
        (_conv_sig(1, 28, 128, 3, 128, tenants=2, **F32), "gpu", "vmap"),
        (dataclasses.replace(_conv_sig(8, 56, 64, 3, 128, **F32), window_strides=(2, 1)), "gpu", "im2col"),  # strided on one axis
        (_conv_sig(8, 56, 64, 5, 128, stride=2, **F32), "gpu", "vmap"),  # a 5x5 window: not timed
        (_conv_sig(8, 7, 512, 3, 512, **F32), "gpu", "im2col"),  # output of at most 7x7
        (_conv_sig(8, 224, 3, 3, 32, stride=2, **F32), "gpu", "im2col"),  # RGB stem, 3x3 window
        (_conv_sig(8, 224, 3, 7, 64, stride=2, **F32), "gpu", "implicit_gemm"),  # 7x7 stem: the kernel
        (_conv_sig(1, 224, 3, 7, 64, stride=2, **F32), "gpu", "implicit_gemm"),
        (_conv_sig(8, 224, 3, 7, 64, stride=2, tenants=1, **F32), "gpu", "vmap"),  # one tenant: a plain conv
        (_conv_sig(8, 56, 3, 7, 64, **F32), "gpu", "vmap"),  # a 7x7 RGB conv at stride 1: not the timed stem
        (_conv_sig(8, 224, 3, 7, 64, stride=2, dtype="float32", precision=str(lax.Precision.HIGHEST)), "gpu", "vmap"),
        (_conv_sig(8, 112, 96, 3, 96, stride=2, groups=96), "gpu", "depthwise_direct"),  # strided depthwise
        (_conv_sig(8, 112, 32, 3, 32, groups=32), "gpu", "vmap"),  # unstrided depthwise
        (_conv_sig(8, 56, 64, 3, 64), "cpu", "loop"),
        (_conv_sig(1, 56, 64, 3, 64), "cpu", "loop"),
    ],
)
def test_the_default_rule_picks_what_the_gpu_measurements_favoured(sig, platform, expected, monkeypatch):
    monkeypatch.setattr(autotune, "_kernel_is_timed_here", lambda: True)  # as on the H100 that timed it, whatever this host
    assert autotune.default_rule(sig, platform) == expected
    assert autotune.applicable(expected, sig)


# ------------------------------------------------------------------ edges: dtypes, empty outputs, the cache, selectors
_DN = ("NHWC", "HWIO", "NHWC")


def _depthwise(w, x):
    return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=_DN, feature_group_count=x.shape[-1])


def _operands(dtype, rng, x_shape, w_shape):
    if np.issubdtype(dtype, np.complexfloating):
        draw = lambda s: rng.standard_normal(s) + 1j * rng.standard_normal(s)
    elif np.issubdtype(dtype, np.integer):
        draw = lambda s: rng.integers(-100, 100, s)
    else:
        draw = rng.standard_normal
    return jnp.asarray(draw(w_shape), dtype), jnp.asarray(draw(x_shape), dtype)


@pytest.mark.parametrize("dtype", [jnp.int8, jnp.int32, jnp.complex64], ids=["int8", "int32", "complex64"])
@pytest.mark.parametrize("policy", ["auto", "rule"] + list(CONV_LOWERINGS))
def test_integer_and_complex_convs_equal_vmap_exactly_under_every_policy(dtype, policy, rng):
    """The forms that sum in float32 (depthwise_direct, shift_sum) do not apply to them: a
    forced one falls back to vmap, and the rule picks another."""
    w, x = _operands(dtype, rng, (2, 1, 5, 5, 4), (2, 3, 3, 1, 4))
    if policy == "implicit_gemm":
        pytest.skip("the Pallas kernel takes 16-bit and float32 convs only")
    got, want = tenant_batched(_depthwise, policy)(w, x), jax.vmap(_depthwise)(w, x)
    assert got.dtype == want.dtype
    tolerance = 1e-6 if dtype == jnp.complex64 else 0
    assert float(jnp.max(jnp.abs(got - want))) <= tolerance * float(jnp.max(jnp.abs(want)))


def test_integer_products_summed_into_a_wider_type_are_exact():
    def f(w, x):
        return lax.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=_DN, preferred_element_type=jnp.int32)

    x, w = jnp.full((1, 1, 3, 3, 1000), 127, jnp.int8), jnp.full((1, 3, 3, 1000, 1), 127, jnp.int8)
    for policy in ["auto", "im2col", "shift_sum", "einsum", "vmap"]:
        assert int(tenant_batched(f, policy)(w, x).ravel()[0]) == 9 * 1000 * 127 * 127, policy


@pytest.mark.parametrize("lowering", ["auto", "im2col", "shift_sum", "depthwise_direct", "einsum", "implicit_gemm"])
@pytest.mark.parametrize("case", ["empty-output", "no-images"])
def test_convs_with_nothing_to_compute_give_empty_answers(lowering, case):
    groups = 4 if lowering == "depthwise_direct" else 1
    window, stride = (1, 1) if lowering == "einsum" else (3, 2)

    def f(w, x):
        return lax.conv_general_dilated(x, w, (stride, stride), "VALID", dimension_numbers=_DN, feature_group_count=groups)

    x = jnp.ones((2, 1, 2, 2, 4)) if case == "empty-output" and window > 1 else jnp.ones((2, 0, 6, 6, 4))
    w = jnp.ones((2, window, window, 4 // groups, 4))
    want = jax.vmap(f)(w, x)
    got = tenant_batched(f, lowering)(w, x)
    assert got.shape == want.shape and got.dtype == want.dtype and 0 in got.shape


@pytest.mark.parametrize("policy", ["auto", "rule", *CONV_LOWERINGS])
@pytest.mark.parametrize("strides, padding", [((2, 2), ((-2, 0), (0, 0))), ((1, 1), ((-1, -1), (0, 0)))],
                         ids=["cropped-strided", "cropped"])
def test_a_1x1_conv_with_an_empty_output_is_answered_under_every_policy(policy, strides, padding, rng):
    """Negative padding can crop a 1x1 conv's input to nothing: every lowering that claims the
    conv (the per-tenant loop, which runs 1x1 convs as matmuls, too) answers an empty output."""
    def f(w, x):
        return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_DN)

    w = jnp.asarray(rng.standard_normal((2, 1, 1, 4, 5)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((2, 3, 2, 3, 4)), jnp.float32)
    want = jax.vmap(f)(w, x)
    got = jax.jit(tenant_batched(f, policy))(w, x)
    assert 0 in want.shape and got.shape == want.shape and got.dtype == want.dtype


def test_a_foreign_value_in_the_choices_file_is_no_entry(tmp_path):
    sig = ConvSignature(2, (2, 6, 6, 4), (3, 3, 4, 5), (1, 1), ((1, 1), (1, 1)), (1, 1), (1, 1))
    other = dataclasses.replace(sig, tenants=4)
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"format": autotune.CACHE_FORMAT, "entries": {autotune.cache_key(other): "loop"}}))
    assert autotune.Planner(autotune=False, cache_path=path).choose(sig)[1] == "rule"
    assert autotune.LoweringCache(path).entries() == {}


_CACHE_WRITER = """
import sys
from jaxmt import autotune
cache = autotune.LoweringCache(sys.argv[1])
for i in range(int(sys.argv[3])):
    cache.put(f"{sys.argv[2]}-{i}", {"choice": "loop"})
"""


def test_processes_sharing_a_choices_file_keep_every_entry(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    path, per_writer = str(tmp_path / "c.json"), 150
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), JAX_PLATFORMS="cpu")
    writers = [subprocess.Popen([sys.executable, "-c", _CACHE_WRITER, path, tag, str(per_writer)], env=env) for tag in "abc"]
    assert [w.wait(timeout=300) for w in writers] == [0, 0, 0]
    assert len(json.loads(Path(path).read_text())["entries"]) == 3 * per_writer


def test_weakly_typed_inputs_promote_as_under_vmap():
    def f(p, x):
        return p * x

    p, x = jnp.ones((3, 4), jnp.bfloat16), jnp.broadcast_to(jnp.asarray(2.0), (3, 4))  # x: weak float32
    assert tenant_batched(f, "auto")(p, x).dtype == jax.vmap(f)(p, x).dtype == jnp.bfloat16


def test_layer_selectors_are_read_as_numbers_and_must_name_a_conv():
    def f(w, x):
        return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=_DN)

    w, x = jnp.ones((2, 3, 3, 4, 5)), jnp.ones((2, 1, 6, 6, 4))
    assert describe_lowering(f, w, x, {"conv:00": "im2col"})[0].lowering == "im2col"
    with pytest.raises(ValueError, match=r"name conv \[3\], but the model has 1"):
        describe_lowering(f, w, x, {"conv:3": "im2col"})


@pytest.mark.parametrize("selector", ["conv 0", "conv 3", "conv K=2", "conv x=1x6x6x4"])
def test_a_selector_that_is_no_signature_key_is_refused(selector):
    """"conv 0" (a typo of "conv:0") would otherwise pass as a signature key, match no layer
    and change nothing, silently."""
    with pytest.raises(ValueError, match="selector"):
        LoweringPolicy.of({selector: "loop"})


@pytest.mark.parametrize("lowering", ["vmap", "loop", "map"])
def test_every_signature_key_describe_lowering_lists_selects_its_layer(lowering, rng):
    def f(w, x):
        y = lax.conv_general_dilated(x, w["a"], (2, 1), ((1, 0), (-1, 2)), rhs_dilation=(2, 1), dimension_numbers=_DN,
                                     precision=lax.Precision.HIGHEST)
        return lax.conv_general_dilated(y, w["b"], (1, 1), "SAME", dimension_numbers=_DN, feature_group_count=5,
                                        preferred_element_type=jnp.float32)

    w = {"a": jnp.asarray(rng.standard_normal((2, 3, 2, 4, 5)), jnp.bfloat16),
         "b": jnp.asarray(rng.standard_normal((2, 3, 3, 1, 5)), jnp.bfloat16)}
    x = jnp.asarray(rng.standard_normal((2, 1, 7, 6, 4)), jnp.bfloat16)
    keys = [layer.signature.key for layer in describe_lowering(f, w, x, "rule")]
    layers = describe_lowering(f, w, x, {key: lowering for key in keys})
    assert [(layer.lowering, layer.source) for layer in layers] == [(lowering, "override")] * 2


@pytest.mark.parametrize("overrides", [
    (("conv:0", "loop"), ("conv:00", "im2col")),
    (("conv:01", "im2col"), ("conv:1", "loop")),
    (("kxk", "loop"), ("kxk", "im2col")),
], ids=["conv:0", "conv:1", "kxk"])
def test_two_overrides_of_one_layer_that_disagree_are_refused(overrides):
    """"conv:0" and "conv:00" both name conv 0: which choice won was the overrides' order, so
    a policy that gives one selector two choices is refused rather than honouring one silently."""
    with pytest.raises(ValueError, match=r"conv:0|conv:1|kxk"):
        LoweringPolicy(overrides=overrides)
    if len(dict(overrides)) == len(overrides):  # a mapping holds each key once
        with pytest.raises(ValueError, match=r"conv:0|conv:1"):
            LoweringPolicy.of(dict(overrides))


def test_a_policy_takes_its_overrides_as_a_mapping_too(rng):
    """``LoweringPolicy("rule", overrides={"kxk": "loop"})`` means what the mapping means to
    ``LoweringPolicy.of``, on top of the policy's own default."""
    def f(w, x):
        y = lax.conv_general_dilated(x, w["a"], (1, 1), "SAME", dimension_numbers=_DN)
        return lax.conv_general_dilated(y, w["b"], (1, 1), "SAME", dimension_numbers=_DN)

    w = {"a": jnp.asarray(rng.standard_normal((2, 3, 3, 4, 5)), jnp.float32),
         "b": jnp.asarray(rng.standard_normal((2, 1, 1, 5, 3)), jnp.float32)}
    x = jnp.asarray(rng.standard_normal((2, 1, 6, 6, 4)), jnp.float32)
    policy = LoweringPolicy("vmap", overrides={"kxk": "im2col", "conv:01": "loop"})
    assert policy == LoweringPolicy("vmap", overrides=(("conv:01", "loop"), ("kxk", "im2col")))
    assert [(c.lowering, c.source) for c in describe_lowering(f, w, x, policy)] == [("im2col", "override"), ("loop", "override")]
    assert rel_error(tenant_batched(f, policy)(w, x), jax.vmap(f)(w, x)) < 1e-5


@pytest.mark.parametrize("overrides", ["kxk", [("kxk",)], [("kxk", "loop", "im2col")], ["conv:1=loop"]])
def test_overrides_that_are_no_pairs_are_refused_clearly(overrides):
    with pytest.raises(ValueError, match="pairs"):
        LoweringPolicy(overrides=overrides)


def test_an_override_repeated_with_the_same_choice_is_kept():
    policy = LoweringPolicy.of({"conv:2": "loop", "conv:02": "loop"})
    assert dict(policy.overrides) == {"conv:2": "loop"}


def test_an_entry_that_cannot_be_written_leaves_the_cache_as_it_was(tmp_path):
    """A put whose entry JSON cannot hold fails alone: no temporary file is left behind and
    later puts of good entries still reach the file."""
    rng = np.random.default_rng()
    path = tmp_path / "c.json"
    cache = autotune.LoweringCache(path)
    cache.put("good-1", {"choice": "vmap"})
    with pytest.raises(TypeError):
        cache.put("bad", {"choice": "loop", "us": {"loop": np.float32(rng.random())}})
    cache.put("good-2", {"choice": "einsum"})
    assert set(json.loads(path.read_text())["entries"]) == {"good-1", "good-2"}
    assert "bad" not in cache.entries()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.json", "c.json.lock"]


@pytest.mark.parametrize("policy", ["rule", "auto", "loop", "batch_group", "grouped_nchw", "implicit_gemm"])
@pytest.mark.parametrize("window, groups", [(1, 1), (3, 1), (3, 4)], ids=["1x1", "3x3", "depthwise"])
def test_no_tenants_give_empty_answers_as_under_vmap(policy, window, groups):
    """A tenant axis of size 0 is answered as jax.vmap answers it (an empty output), whatever
    the lowering: the per-tenant loop stacks nothing, and the grouped forms would have 0 groups."""
    def f(w, x):
        return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=_DN, feature_group_count=groups)

    w, x = jnp.ones((0, window, window, 4 // groups, 8)), jnp.ones((0, 2, 6, 6, 4))
    want = jax.vmap(f)(w, x)
    got = tenant_batched(f, policy)(w, x)
    assert got.shape == want.shape == (0, 2, 6, 6, 8) and got.dtype == want.dtype


_BATCH_GROUP_ON_CPU = pytest.mark.xfail(
    jax.default_backend() == "cpu", strict=True,
    reason="XLA on CPUs computes a batch-grouped conv densely with zero masks (0 x NaN); documented in lowering_ops")


@pytest.mark.parametrize("choice", [pytest.param(c, marks=_BATCH_GROUP_ON_CPU) if c == "batch_group" else c for c in CONV_LOWERINGS])
def test_a_non_finite_filter_of_one_tenant_leaves_the_others_bit_for_bit(choice, rng):
    """Isolation under every forced lowering: tenant 1's NaN filter (e.g. a weight-standardised
    conv of an all-zero filter) changes only tenant 1's outputs."""
    def f(w, x):
        return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=_DN)

    w = jnp.asarray(rng.standard_normal((3, 3, 3, 4, 5)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((3, 2, 6, 6, 4)), jnp.float32)
    fn = jax.jit(tenant_batched(f, choice))
    before, after = np.asarray(fn(w, x)), np.asarray(fn(w.at[1].set(jnp.nan), x))
    np.testing.assert_array_equal(after[[0, 2]], before[[0, 2]])
    assert np.isnan(after[1]).all()


@pytest.mark.parametrize("policy", ["auto", "rule", *CONV_LOWERINGS])
@pytest.mark.parametrize("groups", [1, 16], ids=["3x3", "depthwise"])
def test_a_float32_conv_summed_in_float64_is_not_summed_in_float32(policy, groups, rng):
    """``preferred_element_type=float64`` (64-bit mode) asks for float64 sums of float32
    products: the forms that sum in float32 (the rule's depthwise_direct on CPUs among them)
    would round to float32 (relative error ~1e-7), so they do not apply."""
    def f(w, x):
        return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=_DN, feature_group_count=groups,
                                        preferred_element_type=jnp.float64)

    with jax.enable_x64(True):
        w = jnp.asarray(rng.standard_normal((2, 3, 3, 16 // groups, 16)), jnp.float32)
        x = jnp.asarray(rng.standard_normal((2, 2, 6, 6, 16)), jnp.float32)
        want = jax.vmap(f)(w, x)
        got = jax.jit(tenant_batched(f, policy))(w, x)
        assert got.dtype == want.dtype == jnp.float64
        assert rel_error(got, want) < 1e-12


def test_a_layer_index_naming_a_conv_inside_a_scan_is_refused_saying_why(rng):
    """Convs in a scan body keep vmap's form and take no index: "conv:0" of a conv RNN names
    no conv, and the error says that control flow is why (not "conv:0 to conv:-1")."""
    def rnn(w, x):
        step = lambda h, xt: (jnp.tanh(lax.conv_general_dilated(h + xt, w, (1, 1), "SAME", dimension_numbers=_DN)), None)
        return lax.scan(step, jnp.zeros_like(x[0]), x)[0]

    w = jnp.asarray(rng.standard_normal((2, 3, 3, 4, 4)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((2, 3, 1, 5, 5, 4)), jnp.float32)
    assert describe_lowering(rnn, w, x, "rule") == []
    assert rel_error(tenant_batched(rnn, "rule")(w, x), jax.vmap(rnn)(w, x)) < 1e-5
    with pytest.raises(ValueError, match=r"has 0 tenant-batched convs outside control flow \(convs in scans"):
        tenant_batched(rnn, {"conv:0": "im2col"})(w, x)
