"""How ``predict`` waits for its steps: ``MultiTenantModel(predict_spin_us=...)`` asks the
outputs whether they are ready for up to that long, then blocks (``jaxmt.steps.wait_for``).
Answers do not depend on the wait; bad spins are refused before the store is made."""

from __future__ import annotations

import time
import types

import jax
import numpy as np
import pytest
from conftest import FakeClock, reference_predict, rel_error, tiny_spec

from jaxmt import BucketPolicy, MultiTenantModel, steps
from jaxmt.steps import wait_for


ASK_S = 1e-3  # what one is_ready() costs on the fake clock


class _NeverReady:
    """An output that never says it is ready, each ask moving the clock by ASK_S; blocking on
    it returns at once."""

    def __init__(self, clock: FakeClock | None = None):
        self.clock = clock
        self.asked = 0
        self.blocked_at = None

    def is_ready(self) -> bool:
        self.asked += 1
        if self.clock is not None:
            self.clock.advance(ASK_S)
        return False

    def block_until_ready(self):
        self.blocked_at = self.clock() if self.clock is not None else time.perf_counter()
        return self

    def is_deleted(self) -> bool:
        return False


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    """The clock wait_for reads, moved only by the leaves' asks."""
    fake = FakeClock(start=0.0)
    monkeypatch.setattr(steps, "time", types.SimpleNamespace(perf_counter=fake))
    return fake


@pytest.mark.parametrize("spin_asks", [1, 2, 5])
def test_wait_for_asks_until_the_spin_is_over_then_blocks(spin_asks, clock):
    leaf = _NeverReady(clock)
    wait_for([leaf], spin_asks * ASK_S)
    assert leaf.asked == spin_asks  # the ask that reaches the deadline is the last one
    assert leaf.blocked_at == pytest.approx(spin_asks * ASK_S)


def test_the_spin_counts_over_all_the_leaves_together(clock):
    leaves = [_NeverReady(clock), _NeverReady(clock)]
    wait_for(leaves, 20 * ASK_S)
    assert [leaf.asked for leaf in leaves] == [20, 1]  # the second found the spin over
    assert [leaf.blocked_at for leaf in leaves] == [pytest.approx(20 * ASK_S), pytest.approx(21 * ASK_S)]  # one ask, no spin


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
