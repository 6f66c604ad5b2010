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
