"""from_flax with nnx modules that hold RNG state: served per tenant less their RNG streams."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import rel_error

from jaxmt import BucketPolicy, MultiTenantModel

POLICY = BucketPolicy.powers_of_two(8, 4)


def _regularized_classifier(seed: int, eval_mode: bool = True):
    """An nnx model with the usual inference-time layers: BatchNorm (per-tenant running
    statistics, made distinct per tenant) and Dropout holding an ``nnx.Rngs`` stream, in
    eval mode as a served model is."""
    from flax import nnx

    class Classifier(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.hidden = nnx.Linear(5, 7, rngs=rngs)
            self.norm = nnx.BatchNorm(7, rngs=rngs)
            self.drop = nnx.Dropout(0.5, rngs=rngs)
            self.out = nnx.Linear(7, 3, rngs=rngs)

        def __call__(self, x):
            return self.out(self.drop(nnx.gelu(self.norm(self.hidden(x)))))

    model = Classifier(nnx.Rngs(seed))
    stats = np.random.default_rng(seed)
    model.norm.mean = nnx.BatchStat(stats.normal(size=(7,)).astype(np.float32))
    model.norm.var = nnx.BatchStat(stats.uniform(0.5, 2.0, size=(7,)).astype(np.float32))
    if eval_mode:
        model.eval()
    return model


def _own_outputs(tenants: dict, ids: list, x: np.ndarray) -> np.ndarray:
    return np.stack([np.asarray(tenants[t](x[i : i + 1]))[0] for i, t in enumerate(ids)])


@pytest.mark.parametrize("lowering", ["auto", "vmap"])
def test_nnx_model_with_dropout_and_batchnorm_serves_each_tenants_own_eval_output(rng, lowering):
    tenants = {f"m{i}": _regularized_classifier(i + 1) for i in range(3)}
    mt = MultiTenantModel.from_flax(_regularized_classifier(0), tenants, buckets=POLICY, lowering=lowering)
    x = rng.normal(size=(6, 5)).astype(np.float32)
    ids = ["m2", "m0", "m1", "m1", "m2", "m2"]
    want = _own_outputs(tenants, ids, x)
    assert rel_error(mt.predict(ids, x), want) < 1e-5
    assert rel_error(mt.predict(ids, x), want) < 1e-5, "a second call answers the same (eval mode is deterministic)"


def test_a_template_in_train_mode_still_serves_each_tenants_eval_output_alone_or_in_company(rng):
    """Served modules run in eval mode whatever mode the template was given in: in train
    mode BatchNorm would normalize with the step's own statistics, so a row's answer would
    depend on the rows beside it."""
    tenants = {f"m{i}": _regularized_classifier(i + 1) for i in range(2)}
    template = _regularized_classifier(0, eval_mode=False)
    mt = MultiTenantModel.from_flax(template, tenants, buckets=POLICY)
    x = rng.normal(size=(4, 5)).astype(np.float32)
    alone = mt.predict(["m0"], x[:1])
    assert rel_error(alone, _own_outputs(tenants, ["m0"], x[:1])) < 1e-5
    ids = ["m0", "m0", "m1", "m0"]
    together = mt.predict(ids, x)
    assert rel_error(together, _own_outputs(tenants, ids, x)) < 1e-5
    assert template.norm.use_running_average is False  # the caller's module is left as it was


def test_nnx_tenants_hold_no_rng_state_and_may_be_given_as_state_or_a_pure_dict(rng):
    """The RNG streams are the template module's, shared by all tenants: a tenant's params
    are its weights and BatchNorm statistics only, whether given as a module or its state."""
    from flax import nnx

    tenants = {"module": _regularized_classifier(1), "state": _regularized_classifier(2)}
    _, pure = nnx.state(_regularized_classifier(3), nnx.RngState, ...)
    tenants["pure dict"] = _regularized_classifier(3)
    given = {"module": tenants["module"], "state": nnx.state(tenants["state"]), "pure dict": nnx.to_pure_dict(pure)}
    mt = MultiTenantModel.from_flax(_regularized_classifier(0), given, buckets=POLICY)
    assert set(mt.get_params("state")) == {"hidden", "norm", "out"}
    assert set(mt.get_params("state")["norm"]) == {"bias", "mean", "scale", "var"}
    x = rng.normal(size=(4, 5)).astype(np.float32)
    ids = ["state", "module", "pure dict", "module"]
    assert rel_error(mt.predict(ids, x), _own_outputs(tenants, ids, x)) < 1e-5


def test_an_nnx_template_module_lends_its_structure_not_its_arrays():
    """Every call fills a copy of the template's state with the tenant's values: ``apply_fn``
    holds the state's shapes and dtypes only, not the template module's weights."""
    import jax

    mt = MultiTenantModel.from_flax(_regularized_classifier(0), {"a": _regularized_classifier(1)}, buckets=POLICY)
    held = [leaf for arg in mt.apply_fn.args for leaf in jax.tree_util.tree_leaves(arg) if hasattr(leaf, "shape")]
    weights = [leaf for leaf in held if not isinstance(leaf, jax.ShapeDtypeStruct) and np.size(leaf) > 1]
    assert held and not weights


def test_an_nnx_variable_holding_a_python_scalar_is_served_per_tenant(rng):
    """nnx Variables may hold Python scalars (``nnx.Param(1.0)``): the store keeps them as
    the float32 leaves JAX makes of them, and each tenant is served its own value."""
    from flax import nnx

    class Scaled(nnx.Module):
        def __init__(self, seed: int, scale: float):
            self.linear = nnx.Linear(5, 3, rngs=nnx.Rngs(seed))
            self.scale = nnx.Param(scale)

        def __call__(self, x):
            return self.linear(x) * self.scale

    scales = rng.uniform(0.5, 2.0, size=2)
    tenants = {f"m{i}": Scaled(i + 1, float(scales[i])) for i in range(2)}
    mt = MultiTenantModel.from_flax(Scaled(0, 1.0), tenants, buckets=POLICY)
    x = rng.normal(size=(3, 5)).astype(np.float32)
    ids = ["m1", "m0", "m1"]
    assert rel_error(mt.predict(ids, x), _own_outputs(tenants, ids, x)) < 1e-5


def _linen_tenants(count: int):
    """A tiny linen model with two collections (params and batch_stats), whose variables
    dicts therefore have two entries, and ``count`` tenants' variables."""
    import jax
    import flax.linen as nn

    class Normed(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = False):
            h = nn.BatchNorm(use_running_average=not train)(nn.Dense(4)(x))
            self.sow("intermediates", "hidden", h)
            return nn.Dense(2)(h)

    module = Normed()
    x = np.zeros((1, 3), np.float32)
    return module, [module.init(jax.random.key(seed), x) for seed in range(count)]


def _linen_reference(module, variables: dict, ids: list, x: np.ndarray) -> np.ndarray:
    return np.stack([np.asarray(module.apply(variables[t], x[i : i + 1]))[0] for i, t in enumerate(ids)])


@pytest.mark.parametrize("flavor", ["linen", "nnx"])
def test_variables_by_tenant_may_be_an_iterable_of_id_and_variables_pairs(rng, flavor):
    """A mapping or any iterable of (id, variables) pairs (a generator, ``dict.items()``),
    for linen and nnx alike."""
    x = rng.normal(size=(3, 3 if flavor == "linen" else 5)).astype(np.float32)
    ids = ["b", "a", "b"]
    if flavor == "linen":
        module, variables = _linen_tenants(2)
        tenants = dict(zip("ab", variables))
        mt = MultiTenantModel.from_flax(module, ((t, v) for t, v in tenants.items()), buckets=POLICY)
        want = _linen_reference(module, tenants, ids, x)
    else:
        tenants = {t: _regularized_classifier(seed) for seed, t in enumerate("ab", start=1)}
        mt = MultiTenantModel.from_flax(_regularized_classifier(0), ((t, m) for t, m in tenants.items()), buckets=POLICY)
        want = _own_outputs(tenants, ids, x)
    assert mt.tenants == ["a", "b"]
    assert rel_error(mt.predict(ids, x), want) < 1e-5


@pytest.mark.parametrize("flavor", ["linen", "nnx"])
def test_a_list_of_variables_without_ids_is_refused_with_a_type_error_saying_what_is_taken(flavor):
    """``dict()`` of a list of two-collection variables dicts would pair each dict's two
    collection names as an id and its value; the ids must be given."""
    if flavor == "linen":
        module, tenants = _linen_tenants(2)
    else:
        module, tenants = _regularized_classifier(0), [_regularized_classifier(1), _regularized_classifier(2)]
    with pytest.raises(TypeError, match=r"\(id, variables\) pairs.*item 0 is a"):
        MultiTenantModel.from_flax(module, tenants, buckets=POLICY)


def test_repeated_ids_among_pairs_are_refused_naming_the_id():
    from jaxmt.errors import DuplicateTenantError

    module, (first, second) = _linen_tenants(2)
    with pytest.raises(DuplicateTenantError, match="'a'"):
        MultiTenantModel.from_flax(module, [("a", first), ("a", second)], buckets=POLICY)


def test_an_empty_iterable_of_linen_tenants_is_a_value_error_not_a_stop_iteration():
    module, _ = _linen_tenants(0)
    with pytest.raises(ValueError, match="at least one tenant"):
        MultiTenantModel.from_flax(module, iter([]), buckets=POLICY)


def test_linen_variables_holding_sown_intermediates_are_served_like_those_without(rng):
    """Intermediates that ``apply(..., mutable=["intermediates"])`` returned are an earlier
    call's outputs, not weights (an ``apply`` that may not change them never reads them):
    a tenant may come with them or without, whatever the first tenant had."""
    module, (first, second) = _linen_tenants(2)
    x = rng.normal(size=(4, 3)).astype(np.float32)
    _, sown = module.apply(first, x, mutable=["intermediates"])
    tenants = {"with": {**first, **sown}, "without": second}
    mt = MultiTenantModel.from_flax(module, tenants, buckets=POLICY)
    assert "intermediates" not in mt.get_params("with")
    ids = ["without", "with", "with", "without"]
    assert rel_error(mt.predict(ids, x), _linen_reference(module, tenants, ids, x)) < 1e-5


@pytest.mark.filterwarnings("ignore:Using 'Module.sow\\(\\)' outside of 'nnx.capture\\(\\)':DeprecationWarning")  # as callers still sow
def test_nnx_modules_that_sowed_intermediates_are_served_as_their_weights(rng):
    """An nnx module called once holds what it sowed (``nnx.Intermediate``, shaped by that
    call's batch): like its RNG state, not a weight, so the template and the tenants may
    each have sown or not."""
    from flax import nnx

    class Sowing(nnx.Module):
        def __init__(self, seed: int):
            self.linear = nnx.Linear(5, 3, rngs=nnx.Rngs(seed))

        def __call__(self, x):
            y = self.linear(x)
            self.sow(nnx.Intermediate, "logits", y)
            return y

    x = rng.normal(size=(3, 5)).astype(np.float32)
    template, called, fresh = Sowing(0), Sowing(1), Sowing(2)
    template(x[:2])
    called(x)
    tenants = {"called": called, "fresh": fresh, "called state": nnx.state(called)}
    mt = MultiTenantModel.from_flax(template, tenants, buckets=POLICY)
    assert set(mt.get_params("called")) == {"linear"}
    ids = ["fresh", "called", "called state"]
    reference = {"called": called, "fresh": fresh, "called state": called}
    want = np.stack([np.asarray(nnx.clone(reference[t]).linear(x[i : i + 1]))[0] for i, t in enumerate(ids)])
    assert rel_error(mt.predict(ids, x), want) < 1e-5
