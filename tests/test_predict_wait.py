"""How ``predict`` waits for its steps: ``MultiTenantModel(predict_spin_us=...)`` asks the
outputs whether they are ready for up to that long, then blocks (``jaxmt.steps.wait_for``).
Answers do not depend on the wait; bad spins are refused before the store is made."""

from __future__ import annotations

import time

import jax
import numpy as np
import pytest
from conftest import reference_predict, rel_error, tiny_spec

from jaxmt import BucketPolicy, MultiTenantModel, steps
from jaxmt.steps import wait_for


class _NeverReady:
    """An output that never says it is ready; blocking on it returns at once."""

    def __init__(self):
        self.asked = 0
        self.blocked_at = None

    def is_ready(self) -> bool:
        self.asked += 1
        return False

    def block_until_ready(self):
        self.blocked_at = time.perf_counter()
        return self

    def is_deleted(self) -> bool:
        return False


def test_wait_for_asks_until_the_spin_is_over_then_blocks():
    leaf = _NeverReady()
    start = time.perf_counter()
    wait_for([leaf], 2e-3)
    assert leaf.asked > 1 and leaf.blocked_at - start >= 2e-3


def test_the_spin_counts_over_all_the_leaves_together():
    leaves = [_NeverReady(), _NeverReady()]
    start = time.perf_counter()
    wait_for(leaves, 20e-3)
    assert all(leaf.blocked_at is not None for leaf in leaves)
    assert leaves[1].asked == 1 and leaves[1].blocked_at - start < 40e-3  # the second found the spin over


def test_wait_for_without_a_spin_blocks_at_once_and_skips_numpy_leaves():
    leaf = _NeverReady()
    wait_for({"host": np.zeros(3), "device": leaf}, 0.0)
    assert leaf.asked == 1 and leaf.blocked_at is not None


def test_a_deleted_output_is_not_asked_and_reading_it_raises_as_without_a_spin():
    spec = tiny_spec("mlp")
    mt = MultiTenantModel(spec.apply_fn, spec.init(0), predict_spin_us=0)
    mt.add_tenant("a", spec.init(1))
    pending = mt.dispatch(["a"], spec.random_input(np.random.default_rng(0), 1))
    for leaf in jax.tree_util.tree_leaves(pending.outputs):
        leaf.delete()
    with pytest.raises(RuntimeError, match="deleted"):
        pending.result(spin_s=1e-3)


def test_predict_waits_with_the_models_spin(monkeypatch):
    spec = tiny_spec("mlp")
    mt = MultiTenantModel(spec.apply_fn, spec.init(0), predict_spin_us=250)
    mt.add_tenant("a", spec.init(1))
    spins = []
    monkeypatch.setattr(steps, "wait_for", lambda outputs, spin_s: spins.append(spin_s))
    mt.predict(["a", "a"], spec.random_input(np.random.default_rng(0), 2))
    assert spins == [pytest.approx(250e-6)]


@pytest.mark.parametrize("name, spin_us", [("mlp", 0), ("mlp", 50), ("mlp", 10_000), ("resnet18", 10_000)])
def test_predict_answers_the_same_whatever_the_spin(name, spin_us, rng):
    spec = tiny_spec(name)
    params = {f"t{i}": spec.init(int(rng.integers(1 << 30))) for i in range(3)}
    mt = MultiTenantModel(spec.apply_fn, params["t0"], capacity=3, buckets=BucketPolicy.powers_of_two(4, 2),
                          predict_spin_us=spin_us)
    for tenant, p in params.items():
        mt.add_tenant(tenant, p)
    assert mt.predict_spin_s == pytest.approx(spin_us * 1e-6)
    ids = list(rng.choice(list(params), size=6))
    x = spec.random_input(rng, 6)
    assert rel_error(mt.predict(ids, x), reference_predict(spec.apply_fn, params, ids, x)) < 1e-5


def test_by_default_predict_blocks_at_once(monkeypatch):
    spec = tiny_spec("mlp")
    mt = MultiTenantModel(spec.apply_fn, spec.init(0))
    mt.add_tenant("a", spec.init(1))
    monkeypatch.setattr(steps, "wait_for", lambda outputs, spin_s: pytest.fail("predict spun"))
    mt.predict(["a"], spec.random_input(np.random.default_rng(0), 1))
    assert mt.predict_spin_s == 0.0


def test_the_baselines_wait_as_the_models_predict_waits(monkeypatch):
    from jaxmt import baselines

    spec = tiny_spec("mlp")
    params = {"a": spec.init(1), "b": spec.init(2)}
    mt = MultiTenantModel(spec.apply_fn, params["a"], predict_spin_us=120)
    for tenant, p in params.items():
        mt.add_tenant(tenant, p)
    spins = []
    monkeypatch.setattr(baselines, "wait_for", lambda outputs, spin_s: spins.append(spin_s))
    x = spec.random_input(np.random.default_rng(0), 3)
    got = baselines.time_only_predict(mt, ["a", "b", "a"], x)
    assert rel_error(got, reference_predict(spec.apply_fn, params, ["a", "b", "a"], x)) < 1e-5
    baselines.exclusive_predict(mt, x)
    assert spins == [pytest.approx(120e-6)] * 2  # one spin over both tenants' programs, then exclusive access's


@pytest.mark.parametrize("spin_us, error", [(-1, ValueError), (float("nan"), ValueError), (float("inf"), ValueError),
                                            ("100", TypeError), (True, TypeError), (None, TypeError)])
def test_a_spin_that_is_not_a_finite_number_of_microseconds_is_refused_before_the_store_is_made(spin_us, error, monkeypatch):
    spec = tiny_spec("mlp")
    monkeypatch.setattr(MultiTenantModel, "_make_store", lambda *a, **k: pytest.fail("the store was made"))
    with pytest.raises(error, match="predict_spin_us"):
        MultiTenantModel(spec.apply_fn, spec.init(0), predict_spin_us=spin_us)
