"""MultiTenantTrainer: N tenants trained as one program equal N models trained alone.

References train each tenant alone with plain Optax (same optimizer, hyperparameters, init
and data order) under its own jit. Tolerance: relative 1e-5 in float32 (vmapped and
unbatched matmuls and convolutions may round differently, and the optimizer carries the
difference from step to step). Also here: ``TenantStore.add_stacked``, which export uses.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import ROOT, load_script, reference_predict, rel_error, tiny_spec

from jaxmt import (
    BucketPolicy,
    CapacityError,
    DuplicateTenantError,
    InputError,
    MultiTenantModel,
    MultiTenantTrainer,
    NonFiniteLossError,
    NonFiniteParamsError,
    ParamMismatchError,
    TenantStore,
    UnknownTenantError,
    shuffled_batch_indices,
)

TOL = 1e-5
POLICY = BucketPolicy.powers_of_two(8, 8)
STEPS_PER_EPOCH = 4
BATCH = 8


class TinyCNN(nn.Module):
    """Two 3x3 convs (the second strided), global mean pool, dense head; no BatchNorm."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(nn.Conv(4, (3, 3))(x))
        x = nn.relu(nn.Conv(8, (3, 3), strides=(2, 2))(x))
        return nn.Dense(10)(x.mean(axis=(1, 2)))


_CNN = TinyCNN()
_CNN_ROW = (8, 8, 1)


def _cnn_init(seed):
    return _CNN.init(jax.random.key(seed), jnp.zeros((1, *_CNN_ROW), jnp.float32))


def _arch(name: str):
    """(init_fn, apply_fn, row_shape) of a trainable architecture."""
    if name == "mlp":
        spec = tiny_spec("mlp")
        return spec.init, spec.apply_fn, spec.input_shape
    return _cnn_init, _CNN.apply, _CNN_ROW


@functools.lru_cache(maxsize=None)
def _loss_of(apply_fn):
    def loss_fn(params, batch):
        logits = apply_fn(params, batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

    return loss_fn


def _data(rng: np.random.Generator, row_shape, n: int = STEPS_PER_EPOCH * BATCH) -> dict[str, np.ndarray]:
    return {
        "x": rng.standard_normal((n, *row_shape), dtype=np.float32),
        "y": rng.integers(0, 10, size=n).astype(np.int32),
    }


def _stacked_batches(data, idx):
    return [{k: v[idx[s]] for k, v in data.items()} for s in range(idx.shape[0])]


@functools.lru_cache(maxsize=None)
def _reference_step(loss_fn, factory):
    """One tenant's plain-Optax step, jitted once; hyperparameters are traced arguments."""

    def step(params, state, batch, hyper):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, state = factory(**hyper).update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    return jax.jit(step)


def _train_alone(loss_fn, params, factory, hyper, batches):
    """The reference: one tenant trained by itself with ``factory(**hyper)``."""
    hyper = {name: np.float32(value) for name, value in hyper.items()}
    state = factory(**hyper).init(params)
    losses = []
    for batch in batches:
        params, state, loss = _reference_step(loss_fn, factory)(params, state, batch, hyper)
        losses.append(float(loss))
    return params, np.array(losses)


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(leaf, np.float64)) for leaf in jax.tree.leaves(tree)])


def _copy(tree):
    return jax.tree.map(lambda leaf: np.array(leaf, copy=True), tree)


def _assert_trees_equal(a, b):
    jax.tree.map(np.testing.assert_array_equal, _copy(a), _copy(b))


OPTIMIZERS = {
    "adamw": (optax.adamw, {"learning_rate": [1e-3, 1e-2, 3e-2], "weight_decay": [0.0, 1e-3, 1e-1]}),
    "sgd": (optax.sgd, {"learning_rate": [0.3, 0.1, 0.03], "momentum": [0.0, 0.5, 0.9]}),
}


def _trainer(arch: str, optimizer: str = "adamw", seeds=(3, 5, 7), **kwargs):
    init_fn, apply_fn, _ = _arch(arch)
    factory, hyper = OPTIMIZERS[optimizer]
    ids = [f"t{s}" for s in seeds]
    kwargs.setdefault("hyperparams", hyper)
    return MultiTenantTrainer.from_init(
        _loss_of(apply_fn), init_fn, dict(zip(ids, seeds)), optimizer=factory, apply_fn=apply_fn, **kwargs
    )


# ------------------------------------------------------------------- equivalence
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("arch, lowering", [("mlp", "vmap"), ("cnn", "vmap"), ("cnn", "rule")])
def test_training_together_equals_training_each_alone(arch, lowering, optimizer, rng):
    init_fn, apply_fn, row_shape = _arch(arch)
    factory, hyper = OPTIMIZERS[optimizer]
    seeds = [int(s) for s in rng.choice(1000, size=3, replace=False)]
    trainer = _trainer(arch, optimizer, seeds, lowering=lowering)
    data = _data(rng, row_shape)
    idx = shuffled_batch_indices(len(data["y"]), BATCH, seeds, epochs=2)
    per_step = [trainer.step_stacked(batch) for batch in _stacked_batches(data, idx)]
    assert trainer.num_steps == idx.shape[0]
    loss_fn = _loss_of(apply_fn)
    for t, (tenant, seed) in enumerate(zip(trainer.tenants, seeds)):
        batches = [{k: v[idx[s, t]] for k, v in data.items()} for s in range(idx.shape[0])]
        want_params, want_losses = _train_alone(loss_fn, init_fn(seed), factory, _hyper_of(hyper, t), batches)
        assert rel_error(_flat(trainer.params_of(tenant)), _flat(want_params)) < TOL, tenant
        np.testing.assert_allclose(trainer.history[tenant], want_losses, rtol=TOL, atol=1e-6)
        np.testing.assert_allclose([losses[tenant] for losses in per_step], want_losses, rtol=TOL, atol=1e-6)
    np.testing.assert_allclose(trainer.hyperparams["learning_rate"], hyper["learning_rate"], rtol=1e-7)


def test_from_init_equals_init_of_each_seed():
    init_fn, _, _ = _arch("cnn")
    trainer = _trainer("cnn", seeds=(11, 4, 9))
    for tenant, seed in zip(trainer.tenants, (11, 4, 9)):
        assert rel_error(_flat(trainer.params_of(tenant)), _flat(init_fn(seed))) < 1e-6


def test_step_by_tenant_equals_step_stacked(rng):
    one, two = _trainer("mlp"), _trainer("mlp")
    data = _data(rng, (16,), n=3 * BATCH)
    batches = {t: {k: v[i * BATCH : (i + 1) * BATCH] for k, v in data.items()} for i, t in enumerate(one.tenants)}
    shuffled = dict(reversed(list(batches.items())))  # mapping order does not matter
    got = one.step(shuffled)
    want = two.step_stacked({k: np.stack([batches[t][k] for t in two.tenants]) for k in data})
    assert got == pytest.approx(want, rel=1e-6)
    assert rel_error(_flat(one.stacked_params), _flat(two.stacked_params)) < 1e-6


def _hyper_of(hyper: dict, t: int) -> dict:
    return {name: values[t] for name, values in hyper.items()}


def test_untrainable_leaves_are_constants(rng):
    init_fn, apply_fn, row_shape = _arch("cnn")
    head = "['params']['Dense_0']"
    trainer = _trainer("cnn", trainable=lambda path: not path.startswith(head))
    data = _data(rng, row_shape)
    idx = shuffled_batch_indices(len(data["y"]), BATCH, (3, 5, 7))
    for batch in _stacked_batches(data, idx)[:3]:
        trainer.step_stacked(batch)
    factory, hyper = OPTIMIZERS["adamw"]
    for t, seed in enumerate((3, 5, 7)):
        init = init_fn(seed)
        got = trainer.params_of(f"t{seed}")
        _assert_trees_equal(got["params"]["Dense_0"], init["params"]["Dense_0"])  # no update, no weight decay

        def convs_loss(convs, batch, head=init["params"]["Dense_0"]):
            return _loss_of(apply_fn)({"params": {**convs, "Dense_0": head}}, batch)

        convs = {k: v for k, v in init["params"].items() if k != "Dense_0"}
        batches = [{k: v[idx[s, t]] for k, v in data.items()} for s in range(3)]
        want, _ = _train_alone(convs_loss, convs, factory, _hyper_of(hyper, t), batches)
        got_convs = {k: v for k, v in got["params"].items() if k != "Dense_0"}
        assert rel_error(_flat(got_convs), _flat(want)) < TOL


@pytest.mark.slow
def test_batch_stats_stay_constant_when_not_trainable(rng):
    spec = tiny_spec("resnet18")
    params = {f"r{i}": spec.init(20 + i) for i in range(2)}
    loss_fn = _loss_of(spec.apply_fn)
    trainer = MultiTenantTrainer.from_params(
        loss_fn,
        params,
        optimizer=optax.sgd,
        hyperparams={"learning_rate": [0.05, 0.01]},
        trainable=lambda path: path.startswith("['params']"),
    )
    data = _data(rng, spec.input_shape, n=2 * 4)
    batches = [{k: v[s * 4 : (s + 1) * 4] for k, v in data.items()} for s in range(2)]
    for batch in batches:
        trainer.step({t: batch for t in trainer.tenants})
    for i, (tenant, variables) in enumerate(params.items()):
        got = trainer.params_of(tenant)
        _assert_trees_equal(got["batch_stats"], variables["batch_stats"])

        def params_loss(p, batch, stats=variables["batch_stats"]):
            return loss_fn({"params": p, "batch_stats": stats}, batch)

        want, _ = _train_alone(params_loss, variables["params"], optax.sgd, {"learning_rate": [0.05, 0.01][i]}, batches)
        assert rel_error(_flat(got["params"]), _flat(want)) < TOL, tenant


# ------------------------------------------------------------ non-finite losses
def _nan_for(batch, tenant_index, value=np.nan):
    """The batch with one input value of one tenant made non-finite (one value, not a whole
    image: through the gradient of a batched conv a single one is what reached other tenants)."""
    bad = {k: np.array(v, copy=True) for k, v in batch.items()}
    bad["x"][tenant_index, 0].flat[0] = value
    return bad


@pytest.mark.parametrize("value", [np.nan, np.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("arch, lowering, backward", [
    ("mlp", "vmap", "auto"), ("cnn", "vmap", "auto"), ("cnn", "vmap", "summed"), ("cnn", "vmap", "per_tenant"),
    ("cnn", "rule", "auto"), ("cnn", "auto", "auto"),
])
def test_nonfinite_loss_freezes_that_tenant_and_the_others_train_on(arch, lowering, backward, value, rng):
    init_fn, apply_fn, row_shape = _arch(arch)
    factory, hyper = OPTIMIZERS["adamw"]
    trainer = _trainer(arch, seeds=(1, 2, 3), lowering=lowering, backward=backward)
    data = _data(rng, row_shape)
    idx = shuffled_batch_indices(len(data["y"]), BATCH, (1, 2, 3))
    batches = _stacked_batches(data, idx)
    trainer.step_stacked(batches[0])
    before = _copy(trainer.params_of("t2"))
    with pytest.warns(RuntimeWarning, match=r"step 1: tenants \['t2'\] diverged"):
        losses = trainer.step_stacked(_nan_for(batches[1], 1, value))
    assert not np.isfinite(losses["t2"]) and trainer.diverged == {"t2": 1} and trainer.active == ["t1", "t3"]
    for batch in batches[2:]:
        assert set(trainer.step_stacked(batch)) == {"t1", "t3"}
    _assert_trees_equal(trainer.params_of("t2"), before)
    assert not np.isfinite(trainer.history["t2"][1:]).any() and np.isfinite(trainer.history["t2"][0])
    for t, tenant in [(0, "t1"), (2, "t3")]:
        batches_t = [{k: v[idx[s, t]] for k, v in data.items()} for s in range(len(idx))]
        want, _ = _train_alone(_loss_of(apply_fn), init_fn(t + 1), factory, _hyper_of(hyper, t), batches_t)
        assert rel_error(_flat(trainer.params_of(tenant)), _flat(want)) < TOL
    assert trainer.to_model(buckets=POLICY).tenants == ["t1", "t3"]  # diverged tenants are not exported


def test_the_summed_backward_on_a_cpu_reaches_other_tenants_and_the_second_pass_keeps_them_apart(rng):
    """Why a summed step that flags tenants steps them again: on a CPU the summed backward of a
    CNN under plain vmap carries one tenant's NaN into the others' filter gradients (the first
    pass flags every tenant); the second pass on each tenant's own backward frees the others,
    whose update then equals that of a step without the NaN."""
    _, _, row_shape = _arch("cnn")
    data = _data(rng, row_shape)
    batch = _stacked_batches(data, shuffled_batch_indices(len(data["y"]), BATCH, (1, 2, 3)))[0]
    bad = _nan_for(batch, 1)
    first_pass = _trainer("cnn", seeds=(1, 2, 3), backward="summed")
    *_, finite = first_pass._step_program(first_pass._params, first_pass._opt_state, jnp.ones(3, bool), bad)
    assert not np.asarray(finite).any(), "the summed backward no longer reaches other tenants here: this test shows nothing"
    clean, trainer = _trainer("cnn", seeds=(1, 2, 3), backward="summed"), _trainer("cnn", seeds=(1, 2, 3), backward="summed")
    clean.step_stacked(batch)
    with pytest.warns(RuntimeWarning, match=r"tenants \['t2'\] diverged"):
        trainer.step_stacked(bad)
    assert trainer.active == ["t1", "t3"]
    for tenant in ("t1", "t3"):
        assert rel_error(_flat(trainer.params_of(tenant)), _flat(clean.params_of(tenant))) < TOL


@pytest.mark.parametrize("backward", ["summed", "per_tenant"])
def test_nonfinite_loss_under_raise_names_only_the_tenant_that_diverged(backward, rng):
    _, _, row_shape = _arch("cnn")
    data = _data(rng, row_shape)
    batch = _stacked_batches(data, shuffled_batch_indices(len(data["y"]), BATCH, (1, 2, 3)))[0]
    trainer = _trainer("cnn", seeds=(1, 2, 3), backward=backward, on_nonfinite="raise")
    before = _copy(trainer.stacked_params)
    with pytest.raises(NonFiniteLossError) as caught:
        trainer.step_stacked(_nan_for(batch, 1))
    assert caught.value.tenant_ids == ["t2"]
    _assert_trees_equal(trainer.stacked_params, before)
    trainer.step_stacked(batch)  # a clean step still trains every tenant


def test_backward_auto_is_each_tenants_own_pass_on_a_cpu_under_plain_vmap_only():
    assert _trainer("cnn").backward == "per_tenant"
    assert _trainer("cnn", lowering="rule").backward == "summed"
    with pytest.raises(ValueError, match="backward must be one of"):
        _trainer("cnn", backward="sum")


def test_nonfinite_loss_raises_naming_the_tenant_and_updates_nobody(rng):
    trainer = _trainer("mlp", seeds=(1, 2, 3), on_nonfinite="raise")
    data = _data(rng, (16,))
    batches = _stacked_batches(data, shuffled_batch_indices(len(data["y"]), BATCH, (1, 2, 3)))
    trainer.step_stacked(batches[0])
    params, opt_state = _copy(trainer.stacked_params), _copy(trainer.opt_state)
    with pytest.raises(NonFiniteLossError, match=r"step 1: .* tenants \['t3'\]") as info:
        trainer.step_stacked(_nan_for(batches[1], 2))
    assert info.value.tenant_ids == ["t3"] and info.value.step == 1
    _assert_trees_equal(trainer.stacked_params, params)
    _assert_trees_equal(trainer.opt_state, opt_state)
    assert trainer.num_steps == 1 and trainer.diverged == {}
    trainer.freeze(["t3"])  # what a caller does next: stop the trial, train the rest
    trainer.step_stacked(_nan_for(batches[1], 2))
    assert trainer.num_steps == 2 and trainer.active == ["t1", "t2"]


@pytest.mark.parametrize("on_nonfinite", ["freeze", "raise"])
def test_an_update_that_overflows_to_inf_is_not_committed(on_nonfinite, rng):
    """Loss and gradients finite, the learning rate huge: the new params would be Inf."""
    trainer = _trainer("mlp", "sgd", seeds=(1, 2), hyperparams={"learning_rate": [0.01, 1e38]}, on_nonfinite=on_nonfinite)
    data = _data(rng, (16,))
    batch = _stacked_batches(data, shuffled_batch_indices(len(data["y"]), BATCH, (1, 2)))[0]
    batch = {**batch, "x": batch["x"] * 100}
    params = _copy(trainer.stacked_params)
    if on_nonfinite == "raise":
        with pytest.raises(NonFiniteLossError, match=r"updated params or optimizer state are NaN or Inf for tenants \['t2'\]"):
            trainer.step_stacked(batch)
        _assert_trees_equal(trainer.stacked_params, params)
    else:
        with pytest.warns(RuntimeWarning, match=r"tenants \['t2'\] diverged"):
            trainer.step_stacked(batch)
        _assert_trees_equal(trainer.params_of("t2"), jax.tree.map(lambda leaf: leaf[1], params))
        assert trainer.to_model(buckets=POLICY).tenants == ["t1"]
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(trainer.params_of("t2")))


def test_frozen_tenant_keeps_its_params(rng):
    trainer = _trainer("cnn")
    data = _data(rng, _CNN_ROW)
    before = _copy(trainer.params_of("t5"))
    trainer.freeze(["t5"])
    for batch in _stacked_batches(data, shuffled_batch_indices(len(data["y"]), BATCH, (3, 5, 7)))[:2]:
        trainer.step_stacked(batch)
    _assert_trees_equal(trainer.params_of("t5"), before)
    assert rel_error(_flat(trainer.params_of("t3")), _flat(_cnn_init(3))) > 1e-4


# ------------------------------------------------------------- hyperparameters
def test_set_hyperparam_changes_one_tenant_from_the_next_step(rng):
    init_fn, apply_fn, row_shape = _arch("mlp")
    trainer = _trainer("mlp", "sgd", hyperparams={"learning_rate": [0.1, 0.2, 0.3]})
    data = _data(rng, row_shape)
    idx = shuffled_batch_indices(len(data["y"]), BATCH, (3, 5, 7))
    batches = _stacked_batches(data, idx)
    trainer.step_stacked(batches[0])
    trainer.set_hyperparam("learning_rate", {"t5": 0.05})
    trainer.step_stacked(batches[1])
    np.testing.assert_allclose(trainer.hyperparams["learning_rate"], [0.1, 0.05, 0.3], rtol=1e-7)
    tenant_batches = [{k: v[idx[s, 1]] for k, v in data.items()} for s in range(2)]
    loss_fn = _loss_of(apply_fn)
    mid, _ = _train_alone(loss_fn, init_fn(5), optax.sgd, {"learning_rate": 0.2}, tenant_batches[:1])
    want, _ = _train_alone(loss_fn, mid, optax.sgd, {"learning_rate": 0.05}, tenant_batches[1:])
    assert rel_error(_flat(trainer.params_of("t5")), _flat(want)) < TOL


@pytest.mark.parametrize(
    "hyperparams, match",
    [
        ({"learning_rate": [0.1, 0.2]}, r"'learning_rate' has 2 values for 3 tenants"),
        ({"learning_rate": [0.1, 0.2, 0.3, 0.4]}, r"'learning_rate' has 4 values for 3 tenants"),
        ({"learning_rate": [0.1, np.nan, 0.3]}, r"'learning_rate' of tenant 't5' is not finite"),
        ({"learning_rate": ["fast", "slow", "x"]}, r"'learning_rate' must be a number or a sequence of 3 numbers"),
        ({"learning_rate": [[0.1], [0.2], [0.3]]}, r"'learning_rate' must be a number or a sequence of 3 numbers"),
    ],
)
def test_bad_hyperparameters_are_rejected(hyperparams, match):
    with pytest.raises(ValueError, match=match):
        _trainer("mlp", "sgd", hyperparams=hyperparams)


def test_set_hyperparam_rejects_bad_input_and_changes_nothing():
    trainer = _trainer("mlp", "sgd", hyperparams={"learning_rate": [0.1, 0.2, 0.3]})
    with pytest.raises(KeyError, match="'momentum' is not a per-tenant hyperparameter"):
        trainer.set_hyperparam("momentum", 0.9)
    with pytest.raises(UnknownTenantError, match="unknown tenant 'nobody'"):
        trainer.set_hyperparam("learning_rate", {"t3": 0.5, "nobody": 0.5})
    with pytest.raises(ValueError, match="has 2 values for 3 tenants"):
        trainer.set_hyperparam("learning_rate", [0.5, 0.5])
    with pytest.raises(ValueError, match="must be finite"):
        trainer.set_hyperparam("learning_rate", {"t3": np.inf})
    np.testing.assert_allclose(trainer.hyperparams["learning_rate"], [0.1, 0.2, 0.3], rtol=1e-7)


def test_a_hyperparameter_given_as_an_integer_refuses_fractions_instead_of_truncating():
    trainer = _trainer("mlp", "adamw", hyperparams={"learning_rate": 1e-3, "weight_decay": 0})
    for fractional in (1e-2, {"t5": 0.05}, [0.0, 0.5, 1.0]):
        with pytest.raises(ValueError, match="'weight_decay' holds integers .* would be truncated"):
            trainer.set_hyperparam("weight_decay", fractional)
    trainer.set_hyperparam("weight_decay", {"t5": 2})  # whole numbers still fit
    np.testing.assert_array_equal(trainer.hyperparams["weight_decay"], [0, 2, 0])


# ----------------------------------------------------------------- bad inputs
def _state(trainer):
    return _copy(trainer.stacked_params), trainer.num_steps


def _assert_state(trainer, state):
    params, steps = state
    _assert_trees_equal(trainer.stacked_params, params)
    assert trainer.num_steps == steps


def test_step_rejects_bad_batches_and_changes_nothing(rng):
    trainer = _trainer("mlp")
    data = _data(rng, (16,), n=BATCH)
    state = _state(trainer)
    with pytest.raises(UnknownTenantError, match="unknown tenant 'ghost'"):
        trainer.step({**{t: data for t in trainer.tenants}, "ghost": data})
    with pytest.raises(InputError, match=r"no batch for tenants \['t7'\]"):
        trainer.step({"t3": data, "t5": data})
    short = {k: v[:-1] for k, v in data.items()}
    with pytest.raises(InputError, match=r"tenant 't5': batch leaf \['x'\] has shape \[7, 16\], expected \[8, 16\] like tenant 't3'"):
        trainer.step({"t3": data, "t5": short, "t7": data})
    with pytest.raises(InputError, match="tenant 't7': batch structure"):
        trainer.step({"t3": data, "t5": data, "t7": {"x": data["x"]}})
    with pytest.raises(InputError, match=r"batch leaf \['y'\] has shape \[2, 8\]; expected a leading tenant axis of 3"):
        trainer.step_stacked({"x": np.stack([data["x"]] * 3), "y": np.stack([data["y"]] * 2)})
    with pytest.raises(InputError, match="step takes a mapping"):
        trainer.step([data, data, data])
    _assert_state(trainer, state)


def test_constructors_reject_bad_tenants_and_params():
    spec = tiny_spec("mlp")
    loss_fn = _loss_of(spec.apply_fn)
    stack = jax.vmap(spec.init)(jnp.arange(2))
    sgd = dict(optimizer=optax.sgd, hyperparams={"learning_rate": 0.1})
    with pytest.raises(ValueError, match="tenant 'a' appears more than once"):
        MultiTenantTrainer(loss_fn, stack, ["a", "a"], **sgd)
    with pytest.raises(ValueError, match="on_nonfinite must be one of"):
        MultiTenantTrainer(loss_fn, stack, ["a", "b"], on_nonfinite="ignore", **sgd)
    with pytest.raises(TypeError, match=r"hyperparams \[\] do not fit optimizer adamw: missing a required argument: 'learning_rate'"):
        MultiTenantTrainer(loss_fn, stack, ["a", "b"])
    with pytest.raises(TypeError, match=r"hyperparams \['learning_rate', 'weight_decay'\] do not fit optimizer sgd"):
        MultiTenantTrainer(loss_fn, stack, ["a", "b"], optimizer=optax.sgd, hyperparams={"learning_rate": 0.1, "weight_decay": 0.1})
    with pytest.raises(ParamMismatchError, match=r"stacked leaf \['params'\]\['Dense_0'\]\['bias'\] has shape \[2, 32\]; expected a leading tenant axis of 3"):
        MultiTenantTrainer(loss_fn, stack, ["a", "b", "c"], **sgd)
    wide = models_mlp_params(spec.init(1), width=33)
    with pytest.raises(ParamMismatchError, match=r"tenant 'b': leaf \['params'\]\['Dense_0'\]\['bias'\] is float32\[33\], expected float32\[32\]"):
        MultiTenantTrainer.from_params(loss_fn, {"a": spec.init(0), "b": wide}, **sgd)
    with pytest.raises(ValueError, match="trainable\\(\\) rejects every leaf"):
        MultiTenantTrainer.from_params(loss_fn, {"a": spec.init(0)}, trainable=lambda path: False, **sgd)
    trainer = MultiTenantTrainer.from_params(loss_fn, {"a": spec.init(0)}, **sgd)
    with pytest.raises(UnknownTenantError, match="unknown tenant 'b'"):
        trainer.params_of("b")
    with pytest.raises(UnknownTenantError, match=r"unknown tenant \['a'\]"):
        trainer.freeze([["a"]])
    assert trainer.active == ["a"]


@pytest.mark.parametrize("leaf", ["count", "mask"])
def test_integer_and_bool_leaves_must_be_left_out_of_training_by_name(leaf):
    """A step counter or a mask has no gradient: left trainable (the default trains every
    leaf), it used to fail the first step inside JAX's grad, naming no leaf; it is refused
    when the trainer is built, and trains as a constant once ``trainable`` leaves it out."""
    def init_fn(seed):
        return {"w": jax.random.normal(jax.random.key(seed), (3,)), "count": jnp.int32(2), "mask": jnp.ones(3, bool)}

    def loss_fn(p, batch):
        return jnp.mean((batch["x"] @ jnp.where(p["mask"], p["w"], 0.0) + p["count"] - batch["y"]) ** 2)

    sgd = dict(optimizer=optax.sgd, hyperparams={"learning_rate": 0.1})
    with pytest.raises(TypeError, match=rf"leaf \['{leaf}'\] is (int32|bool)\[.*\]: only floating leaves can be trained"):
        MultiTenantTrainer.from_init(loss_fn, init_fn, {"a": 0, "b": 1}, trainable=lambda path: leaf in path or "w" in path, **sgd)
    with pytest.raises(TypeError, match=r"leaf \['count'\] is int32\[\]: only floating"):  # the default: every leaf
        MultiTenantTrainer.from_init(loss_fn, init_fn, {"a": 0, "b": 1}, **sgd)
    trainer = MultiTenantTrainer.from_init(loss_fn, init_fn, {"a": 0, "b": 1}, trainable=lambda path: "w" in path, **sgd)
    x = np.ones((2, 4, 3), np.float32)
    trainer.step_stacked({"x": x, "y": np.zeros((2, 4), np.float32)})
    assert int(trainer.params_of("b")["count"]) == 2 and trainer.params_of("b")["mask"].dtype == bool


def models_mlp_params(params, width: int):
    """The MLP's params with a hidden layer of another width (a template mismatch)."""
    out = jax.tree.map(np.asarray, params)
    out["params"]["Dense_0"]["bias"] = np.zeros((width,), np.float32) + 0.1
    return out


# ---------------------------------------------------------------------- eval
@pytest.mark.parametrize("lowering", ["vmap", "rule"])
def test_evaluate_shared_and_stacked_batches_equal_each_tenant(lowering, rng):
    _, apply_fn, row_shape = _arch("cnn")
    trainer = _trainer("cnn", lowering=lowering)
    x = rng.standard_normal((5, *row_shape), dtype=np.float32)
    got = trainer.evaluate(apply_fn, x)
    x_stacked = rng.standard_normal((3, 5, *row_shape), dtype=np.float32)
    got_stacked = trainer.evaluate(apply_fn, x_stacked, stacked=True)
    for t, tenant in enumerate(trainer.tenants):
        params = trainer.params_of(tenant)
        assert rel_error(got[tenant], apply_fn(params, x)) < TOL
        assert rel_error(got_stacked[tenant], apply_fn(params, x_stacked[t])) < TOL


# -------------------------------------------------------------------- export
def test_to_model_serves_the_trained_weights(rng):
    _, apply_fn, row_shape = _arch("cnn")
    trainer = _trainer("cnn")
    data = _data(rng, row_shape)
    for batch in _stacked_batches(data, shuffled_batch_indices(len(data["y"]), BATCH, (3, 5, 7)))[:2]:
        trainer.step_stacked(batch)
    model = trainer.to_model(buckets=POLICY)
    assert model.tenants == trainer.tenants and model.store.capacity == 3
    ids = list(rng.choice(trainer.tenants, size=9))
    x = rng.standard_normal((9, *row_shape), dtype=np.float32)
    trained = {t: trainer.params_of(t) for t in trainer.tenants}
    assert rel_error(model.predict(ids, x), reference_predict(apply_fn, trained, ids, x)) < TOL


def test_export_writes_device_arrays_without_host_transfers():
    trainer = _trainer("mlp")
    model = MultiTenantModel(trainer.apply_fn, trainer.params_of("t3"), capacity=4, buckets=POLICY)
    # Only the slot indices go host -> device (explicitly); no parameter takes a trip through
    # the host, which an implicit transfer would be.
    with jax.transfer_guard_host_to_device("disallow"):
        exported = trainer.export_to(model, ["t7", "t3"])
    assert exported == ["t7", "t3"] and model.tenants == ["t7", "t3"]
    _assert_trees_equal(model.get_params("t7"), trainer.params_of("t7"))


def test_export_to_rejects_resident_and_unknown_tenants_and_changes_nothing(rng):
    trainer = _trainer("mlp")
    model = MultiTenantModel(trainer.apply_fn, trainer.params_of("t3"), capacity=2, buckets=POLICY)
    model.add_tenant("t5", tiny_spec("mlp").init(99))
    before = (model.tenants, model.store.version, _copy(model.store.stacked_leaves))

    def unchanged():
        tenants, version, leaves = before
        assert model.tenants == tenants and model.store.version == version
        _assert_trees_equal(model.store.stacked_leaves, leaves)

    with pytest.raises(DuplicateTenantError, match="tenant 't5' is already resident"):
        trainer.export_to(model)
    unchanged()
    with pytest.raises(UnknownTenantError, match="unknown tenant 'ghost'"):
        trainer.export_to(model, ["t3", "ghost"])
    unchanged()
    # Replacing: a resident tenant whose new params hold NaN fails the whole export before
    # any write (the new tenants t3 and t7 are not added either).
    good = trainer._params
    trainer._params = jax.tree.map(lambda leaf: leaf.at[1].set(jnp.nan) if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf, good)
    with pytest.raises(NonFiniteParamsError, match="tenant 't5'"):
        trainer.export_to(model, replace=True)
    unchanged()
    trainer._params = good
    assert trainer.export_to(model, replace=True) == ["t3", "t5", "t7"]
    assert model.tenants == ["t5", "t3", "t7"] and model.store.capacity == 4
    for tenant in trainer.tenants:
        _assert_trees_equal(model.get_params(tenant), trainer.params_of(tenant))


# ----------------------------------------------------- TenantStore.add_stacked
def _stack_of(seeds):
    return jax.vmap(tiny_spec("mlp").init)(jnp.asarray(seeds))


def _store_snapshot(store):
    return store.tenants, store.capacity, store.version, _copy(store.stacked_leaves)


def _assert_store(store, snapshot):
    tenants, capacity, version, leaves = snapshot
    assert (store.tenants, store.capacity, store.version) == (tenants, capacity, version)
    _assert_trees_equal(store.stacked_leaves, leaves)


def test_add_stacked_grows_once_and_writes_each_row():
    store = TenantStore(tiny_spec("mlp").init(0), capacity=2)
    store.add("first", tiny_spec("mlp").init(50))
    slots = store.add_stacked(["a", "b", "c", "d"], _stack_of([1, 2, 3, 4]))
    assert store.capacity == 8 and list(slots) == [1, 2, 3, 4]
    for tenant, seed in zip("abcd", [1, 2, 3, 4]):
        _assert_trees_equal(store.get(tenant), tiny_spec("mlp").init(seed))
    _assert_trees_equal(store.get("first"), tiny_spec("mlp").init(50))
    assert list(store.add_stacked([], jax.tree.map(lambda leaf: leaf[:0], _stack_of([1])))) == []


@pytest.mark.parametrize("case", ["repeated", "resident", "rows", "shape", "dtype", "nan", "capacity", "unhashable"])
def test_add_stacked_rejects_bad_input_and_changes_nothing(case):
    store = TenantStore(tiny_spec("mlp").init(0), capacity=2, max_capacity=4)
    store.add("x", tiny_spec("mlp").init(9))
    snapshot = _store_snapshot(store)
    stack = _stack_of([1, 2])
    ids = ["a", "b"]
    error, match = {
        "repeated": (DuplicateTenantError, "tenant 'a' appears more than once"),
        "resident": (DuplicateTenantError, "tenant 'x' is already resident"),
        "rows": (ParamMismatchError, r"stacked params of tenants \['a', 'b', 'c'\]: leaf \['params'\]\['Dense_0'\]\['bias'\] "
                                     r"is float32\[2, 32\], expected float32\[3, 32\] \(one row per tenant of 3\)"),
        "shape": (ParamMismatchError, r"tenants \['a', 'b'\]: leaf \['params'\]\['Dense_0'\]\['bias'\] is float32\[2, 33\], expected float32\[2, 32\]"),
        "dtype": (ParamMismatchError, r"is bfloat16\[2, 32\], expected float32\[2, 32\]"),
        "nan": (NonFiniteParamsError, r"tenant 'b': leaf \['params'\]\['Dense_1'\]\['kernel'\] holds NaN"),
        "capacity": (CapacityError, "4 new tenants do not fit: 1 resident, max_capacity=4"),
        "unhashable": (TypeError, "tenant id must be hashable"),
    }[case]
    if case == "repeated":
        ids = ["a", "a"]
    elif case == "resident":
        ids = ["a", "x"]
    elif case == "rows":
        ids = ["a", "b", "c"]
    elif case == "capacity":
        ids, stack = ["a", "b", "c", "d"], _stack_of([1, 2, 3, 4])
    elif case == "unhashable":
        ids = ["a", ["b"]]
    else:
        params = jax.tree.map(np.array, stack)
        if case == "shape":
            params["params"]["Dense_0"]["bias"] = np.ones((2, 33), np.float32)
        elif case == "dtype":
            params["params"]["Dense_0"]["bias"] = params["params"]["Dense_0"]["bias"].astype(jnp.bfloat16)
        else:
            params["params"]["Dense_1"]["kernel"][1, 0, 0] = np.nan
        stack = params
    with pytest.raises(error, match=match):
        store.add_stacked(ids, stack)
    _assert_store(store, snapshot)


# --------------------------------------------------------------- data order
def test_shuffled_batch_indices_gives_each_tenant_its_own_permutations():
    idx = shuffled_batch_indices(10, 3, [0, 1, 0], epochs=2)
    assert idx.shape == (6, 3, 3)
    for t in range(3):
        for epoch in range(2):
            rows = idx[epoch * 3 : (epoch + 1) * 3, t].ravel()
            assert len(set(rows.tolist())) == 9 and rows.max() < 10
    np.testing.assert_array_equal(idx[:, 0], idx[:, 2])  # same seed, same order
    assert not np.array_equal(idx[:, 0], idx[:, 1])
    assert not np.array_equal(idx[:3, 0], idx[3:, 0])  # a new shuffle each epoch


@pytest.mark.parametrize(
    "args, match",
    [((10, 0, [0]), r"batch_size must be in \[1, 10\]"), ((10, 11, [0]), r"batch_size must be in \[1, 10\]"), ((10, 2, []), "at least one tenant")],
)
def test_shuffled_batch_indices_rejects_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        shuffled_batch_indices(*args)


# ------------------------------------------------------- python -m jaxmt train
def test_train_cli_help_explains_the_options(capsys):
    from jaxmt.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--tenants", "--lr-range", "--wd-range", "--compare", "--json", "--plot", "Exit codes"):
        assert option in out


def test_train_many_script_wraps_the_subcommand(capsys):
    script = load_script(ROOT / "scripts" / "train_many.py", "train_many")
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--help"])
    assert exit_info.value.code == 0 and "--plot PNG" in capsys.readouterr().out
    assert script.main(["--tenants", "0"]) == 2
    assert "--tenants must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ["mlp", pytest.param("cnn", marks=pytest.mark.slow)])
def test_train_cli_trains_a_search_on_digits(arch, tmp_path, capsys):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    import json

    from jaxmt.cli import main

    out_json, out_png = tmp_path / "search.json", tmp_path / "curves.png"
    argv = ["train", "--arch", arch, "--tenants", "3", "--epochs", "2", "--batch-size", "128", "--lr-range", "0.01", "0.03",
            "--compare", "--compare-steps", "2", "--json", str(out_json), "--plot", str(out_png), "--no-progress"]
    assert main(argv) == 0
    table = capsys.readouterr().out
    result = json.loads(out_json.read_text(), parse_constant=lambda name: pytest.fail(f"{name} in strict JSON"))
    assert [row["tenant"] for row in result["tenants"]] == ["trial-000", "trial-001", "trial-002"]
    assert result["steps"] == 2 * (result["train_rows"] // 128)
    for row in result["tenants"]:
        assert 0.01 <= row["learning_rate"] <= 0.03 and row["tenant"] in table
        assert row["val_accuracy"] > 0.3  # ten classes: chance is 0.1
        assert len(result["curves"]["train_loss"][row["tenant"]]) == result["steps"]
        assert len(result["curves"]["val_accuracy"][row["tenant"]]) == 2
    compare = result["compare"]
    assert compare["tenants"] == 3 and compare["one_program_steps_per_s"] > 0 and compare["separate_loops_steps_per_s"] > 0
    assert compare["median_rel_error"] < 1e-3 and compare["max_loss_abs_diff"] < 1e-3
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
