"""Specification of the `models` zoo: every architecture builds, is seeded, and vmaps exactly.

Fast tests use the "tiny" sizes only; full sizes are checked by shape (jax.eval_shape), never
initialised, in the slow test.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models

BN_ARCHITECTURES = ("resnet18", "resnet50", "mobilenetv2")
NUM_TENANTS = 3
ROWS_PER_TENANT = 4
# vmap turns a tenant's convs and matmuls into batched/grouped ones: same maths, another
# summation order, so float32 agrees to a few ulps of the largest logit.
VMAP_RTOL = 1e-5
# Published parameter counts (torchvision) of the full-size vision models.
FULL_PARAM_COUNTS = {"resnet18": 11_689_512, "resnet50": 25_557_032, "mobilenetv2": 3_504_872}


@functools.cache
def _spec(arch: str) -> models.ModelSpec:
    return models.make(arch, "tiny")


@functools.cache
def _variables(arch: str, seed: int, dtype: type = jnp.float32) -> models.Variables:
    return _spec(arch).init(seed, dtype=dtype)


@functools.cache
def _jit_apply(arch: str):
    return jax.jit(_spec(arch).apply_fn)


def _stack(trees):
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def _max_rel_error(got: jax.Array, want: jax.Array) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def _leaves_equal(a, b) -> bool:
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


@pytest.mark.parametrize("arch", models.ARCHITECTURES)
def test_forward_gives_finite_logits_of_the_right_shape(arch: str) -> None:
    spec = _spec(arch)
    x = spec.random_input(0, ROWS_PER_TENANT)
    logits = _jit_apply(arch)(_variables(arch, 0), x)
    assert logits.shape == (ROWS_PER_TENANT, spec.num_classes)
    assert logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))
    # Distinct rows give distinct logits: the input reaches the output.
    assert not np.allclose(logits[0], logits[1])


@pytest.mark.parametrize("arch", models.ARCHITECTURES)
def test_init_is_deterministic_from_seed(arch: str) -> None:
    spec = _spec(arch)
    assert _leaves_equal(spec.init(0), _variables(arch, 0))
    other = _variables(arch, 1)
    assert jax.tree.structure(other) == jax.tree.structure(_variables(arch, 0))
    assert not _leaves_equal(other, _variables(arch, 0))
    x = spec.random_input(0, ROWS_PER_TENANT)
    assert not np.allclose(_jit_apply(arch)(_variables(arch, 0), x), _jit_apply(arch)(other, x))


# The cast is generic code: checked on a model without and one with batch_stats, and on the
# transformer's integer inputs, which keeps compile time down.
@pytest.mark.parametrize("arch", ["mlp", "resnet18", "transformer"])
def test_init_casts_floating_leaves_to_dtype(arch: str) -> None:
    variables_bf16 = _variables(arch, 0, jnp.bfloat16)
    want = jax.tree.map(lambda leaf: leaf.astype(jnp.bfloat16), _variables(arch, 0))
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(variables_bf16))
    assert _leaves_equal(variables_bf16, want)


# vmapped init is generic code; a convnet here would mostly time XLA's grouped-conv compile.
@pytest.mark.parametrize("arch", ["mlp", "gru"])
def test_init_vmaps_over_seeds(arch: str) -> None:
    stacked = jax.vmap(_spec(arch).init)(jnp.arange(NUM_TENANTS))
    want = _stack([_variables(arch, seed) for seed in range(NUM_TENANTS)])
    assert _leaves_equal(stacked, want)


@pytest.mark.parametrize("arch", models.ARCHITECTURES)
def test_batch_stats_exist_exactly_for_batchnorm_models_and_are_not_trivial(arch: str) -> None:
    variables = _variables(arch, 0)
    assert ("batch_stats" in variables) == (arch in BN_ARCHITECTURES)
    if arch not in BN_ARCHITECTURES:
        return
    stats = variables["batch_stats"]
    paths_and_leaves = jax.tree_util.tree_flatten_with_path(stats)[0]
    means = np.concatenate([np.ravel(v) for p, v in paths_and_leaves if p[-1].key == "mean"])
    variances = np.concatenate([np.ravel(v) for p, v in paths_and_leaves if p[-1].key == "var"])
    assert means.size == variances.size > 0
    assert np.std(means) > 0.05 and np.max(np.abs(means)) < 1.0
    assert np.all(variances >= 0.5) and np.all(variances <= 1.5) and np.std(variances) > 0.1


@pytest.mark.parametrize("arch", models.ARCHITECTURES)
def test_random_input_is_seeded_nonzero_and_in_range(arch: str) -> None:
    spec = _spec(arch)
    x = spec.random_input(3, 5)
    assert x.shape == (5, *spec.input_shape)
    assert x.dtype == spec.input_dtype
    assert np.any(x != 0)
    assert np.array_equal(x, spec.random_input(3, 5))
    assert np.array_equal(x, spec.random_input(np.random.default_rng(3), 5))
    assert not np.array_equal(x, spec.random_input(4, 5))
    if spec.vocab_size is None:
        assert spec.input_dtype == np.float32
        assert spec.random_input(3, 5, dtype=jnp.bfloat16).dtype == jnp.bfloat16
    else:
        assert spec.input_dtype == np.int32
        assert x.min() >= 0 and x.max() < spec.vocab_size


@pytest.mark.parametrize("arch", models.ARCHITECTURES)
def test_vmap_over_stacked_tenants_matches_per_tenant_apply(arch: str) -> None:
    spec = _spec(arch)
    rng = np.random.default_rng(7)
    tenants = [_variables(arch, seed) for seed in range(NUM_TENANTS)]
    x_kb = np.stack([spec.random_input(rng, ROWS_PER_TENANT) for _ in range(NUM_TENANTS)])
    got_kb = jax.jit(jax.vmap(spec.apply_fn))(_stack(tenants), x_kb)
    assert got_kb.shape == (NUM_TENANTS, ROWS_PER_TENANT, spec.num_classes)
    for tenant, (variables, x) in enumerate(zip(tenants, x_kb)):
        want = _jit_apply(arch)(variables, x)
        assert _max_rel_error(got_kb[tenant], want) < VMAP_RTOL, f"tenant {tenant}"


@pytest.mark.parametrize("arch", ["mlp", "resnet18", "transformer"])
def test_bfloat16_compute_stays_close_to_float32(arch: str) -> None:
    spec_bf16 = models.make(arch, dtype=jnp.bfloat16)
    x = spec_bf16.random_input(0, ROWS_PER_TENANT)
    logits = jax.jit(spec_bf16.apply_fn)(_variables(arch, 0, jnp.bfloat16), x)
    assert logits.dtype == jnp.bfloat16
    # Measured: 0.0035 (mlp), 0.0043 (resnet18), 0.0086 (transformer); a 5% weight error gives 0.09.
    assert _max_rel_error(logits, _jit_apply(arch)(_variables(arch, 0), x)) < 3e-2


@pytest.mark.parametrize("arch", models.ARCHITECTURES)
def test_equal_arguments_give_the_same_spec_and_apply_fn(arch: str) -> None:
    spec = models.make(arch)
    assert spec is models.make(arch, "tiny", dtype=np.float32)
    assert spec.apply_fn == models.make(arch).apply_fn
    assert hash(spec.apply_fn) == hash(models.make(arch).apply_fn)
    assert spec.apply_fn != models.make(arch, dtype=jnp.bfloat16).apply_fn


@pytest.mark.parametrize("arch", models.IMAGE_ARCHITECTURES)
def test_pixel_models_take_uint8_and_equal_the_float_model_on_pixels_mapped_to_minus_one_one(arch: str) -> None:
    """make(..., pixels=True): the same weights and layers, fed uint8 pixels p as (2p/255 - 1)."""
    pixel_spec, float_spec = models.make(arch, "tiny", pixels=True), _spec(arch)
    variables = pixel_spec.init(5)
    assert _leaves_equal(variables, float_spec.init(5))
    x = pixel_spec.random_input(np.random.default_rng(), 4)
    assert x.dtype == np.uint8 == pixel_spec.input_dtype and x.shape == (4, *float_spec.input_shape)
    assert 0 < x.mean() < 255 and x.std() > 30  # spread over the range, not constant
    want = float_spec.apply_fn(variables, x.astype(np.float32) * (2 / 255) - 1)
    assert _max_rel_error(pixel_spec.apply_fn(variables, x), want) < 1e-6


@pytest.mark.parametrize("arch", ["mlp", "gru", "transformer"])
def test_pixels_are_refused_for_models_that_do_not_take_images(arch: str) -> None:
    with pytest.raises(ValueError, match="pixels=True needs an image model"):
        models.make(arch, "tiny", pixels=True)


def test_make_rejects_unknown_architecture() -> None:
    with pytest.raises(ValueError, match="resnet50") as excinfo:
        models.make("resnet51")
    assert "'resnet51'" in str(excinfo.value)


def test_make_rejects_unknown_size() -> None:
    with pytest.raises(ValueError, match="'tiny', 'full'"):
        models.make("mlp", "huge")


def test_make_rejects_non_floating_dtype() -> None:
    with pytest.raises(ValueError, match="int32"):
        models.make("mlp", dtype=jnp.int32)


@pytest.mark.slow
@pytest.mark.parametrize("arch", models.ARCHITECTURES)
def test_full_size_builds_with_plausible_parameter_count(arch: str) -> None:
    spec = models.make(arch, "full")
    variables = jax.eval_shape(spec.init, 0)
    x = jax.ShapeDtypeStruct((2, *spec.input_shape), spec.input_dtype)
    logits = jax.eval_shape(spec.apply_fn, variables, x)
    assert logits.shape == (2, spec.num_classes)
    param_count = sum(leaf.size for leaf in jax.tree.leaves(variables["params"]))
    if arch in FULL_PARAM_COUNTS:
        assert spec.input_shape == (224, 224, 3) and spec.num_classes == 1000
        assert param_count == pytest.approx(FULL_PARAM_COUNTS[arch], rel=0.01)
    else:
        assert 1_000_000 < param_count < 100_000_000


# BatchNorm running statistics (mean + var, 2 per channel) of the full vision models: not
# params in torchvision's count; in Flax they are the "batch_stats" collection.
FULL_BATCH_STAT_COUNTS = {"resnet18": 9_600, "resnet50": 53_120, "mobilenetv2": 34_112}


def _full_conv_trace(arch: str) -> list[tuple[str, tuple[int, ...], tuple[int, ...], int, int, int]]:
    """(path, input shape, output shape, kernel, stride, groups) of every conv of the full-size
    model, in call order, from a shape-only forward pass (nothing is computed)."""
    import flax.linen as nn

    spec = models.make(arch, "full")
    convs = []

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        module = context.module
        if context.method_name == "__call__" and isinstance(module, nn.Conv):
            convs.append((
                "/".join(module.scope.path), args[0].shape[1:], out.shape[1:], module.kernel_size[0],
                module.strides[0], module.feature_group_count,
            ))
        return out

    variables = jax.eval_shape(spec.init, 0)
    with nn.intercept_methods(record):
        jax.eval_shape(spec.apply_fn, variables, jax.ShapeDtypeStruct((1, *spec.input_shape), spec.input_dtype))
    return convs


@pytest.mark.parametrize("arch", models.IMAGE_ARCHITECTURES)
def test_full_vision_models_have_exactly_the_torchvision_parameter_and_running_stat_counts(arch: str) -> None:
    spec = models.make(arch, "full")
    variables = jax.eval_shape(spec.init, 0)
    assert spec.input_shape == (224, 224, 3) and spec.num_classes == 1000
    assert sum(leaf.size for leaf in jax.tree.leaves(variables["params"])) == FULL_PARAM_COUNTS[arch]
    assert sum(leaf.size for leaf in jax.tree.leaves(variables["batch_stats"])) == FULL_BATCH_STAT_COUNTS[arch]


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_full_resnets_have_the_7x7_stride_2_stem_and_max_pool_and_v1_5_downsampling(arch: str) -> None:
    convs = _full_conv_trace(arch)
    stem, first_block = convs[0], convs[1]
    assert stem[1:] == ((224, 224, 3), (112, 112, 64), 7, 2, 1)
    assert first_block[1][:2] == (56, 56)  # the 3x3/2 max pool sits between stem and stage 1
    strided = [(path, kernel) for path, _, _, kernel, stride, _ in convs[1:] if stride == 2]
    # One strided main-branch conv and one strided 1x1 projection in each of stages 2-4; in
    # the bottleneck (v1.5, as torchvision) the stride is on the 3x3 conv, not the first 1x1.
    assert [kernel for path, kernel in strided if not path.endswith("proj_conv")] == [3, 3, 3]
    assert [kernel for path, kernel in strided if path.endswith("proj_conv")] == [1, 1, 1]
    assert convs[-1][2] == (7, 7, 2048 if arch == "resnet50" else 512)


def test_full_mobilenetv2_follows_the_papers_inverted_residual_table() -> None:
    convs = _full_conv_trace("mobilenetv2")
    assert convs[0][1:] == ((224, 224, 3), (112, 112, 32), 3, 2, 1)
    assert convs[-1][1:] == ((7, 7, 320), (7, 7, 1280), 1, 1, 1)
    depthwise = [conv for conv in convs if conv[5] > 1]
    # (t, c, n, s) of Table 2, read back from the depthwise convs: one per block, stride s on
    # the first block of each row, hidden width t * (input width).
    table = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
    want, in_features = [], 32
    for t, c, n, s in table:
        for index in range(n):
            want.append((in_features * t, s if index == 0 else 1))
            in_features = c
    assert [(conv[5], conv[4]) for conv in depthwise] == want
    assert all(conv[3] == 3 and conv[2][-1] == conv[5] for conv in depthwise)
