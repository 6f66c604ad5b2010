"""How ``predict`` waits for its steps: ``MultiTenantModel(predict_spin_us=...)`` asks the
outputs whether they are ready for up to that long, then blocks (``jaxmt.steps.wait_for``).
Answers do not depend on the wait; bad spins are refused before the store is made."""

from __future__ import annotations

import time

import jax
import numpy as np
import pytest
from conftest import reference_predict, rel_error, tiny_spec

from jaxmt import BucketPolicy, MultiTenantModel, model
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


def test_wait_for_asks_until_the_spin_is_over_then_blocks():
    leaf = _NeverReady()
    start = time.perf_counter()
    wait_for([leaf], 2e-3)
    assert leaf.asked > 1 and leaf.blocked_at - start >= 2e-3


def test_wait_for_without_a_spin_blocks_at_once_and_skips_numpy_leaves():
    leaf = _NeverReady()
    wait_for({"host": np.zeros(3), "device": leaf}, 0.0)
    assert leaf.asked == 1 and leaf.blocked_at is not None


def test_wait_for_returns_with_every_output_ready():
    outputs = [jax.jit(lambda a: a @ a)(np.eye(64, dtype=np.float32) * i) for i in range(3)]
    wait_for(outputs, 1.0)
    assert all(o.is_ready() for o in outputs)


@pytest.mark.parametrize("spin_us", [0, 50, 10_000])
@pytest.mark.parametrize("name", ["mlp", "resnet18"])
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


def test_the_default_spins_only_on_a_gpu():
    spec = tiny_spec("mlp")
    mt = MultiTenantModel(spec.apply_fn, spec.init(0))
    on_gpu = mt.store.device.platform == "gpu"
    assert mt.predict_spin_s == (model.DEFAULT_PREDICT_SPIN_S if on_gpu else 0.0)


@pytest.mark.parametrize("spin_us", [-1, float("nan"), float("inf"), "100", True])
def test_a_spin_that_is_not_a_finite_number_of_microseconds_is_refused_before_the_store_is_made(spin_us, monkeypatch):
    spec = tiny_spec("mlp")
    monkeypatch.setattr(MultiTenantModel, "_make_store", lambda *a, **k: pytest.fail("the store was made"))
    with pytest.raises(ValueError, match="predict_spin_us"):
        MultiTenantModel(spec.apply_fn, spec.init(0), predict_spin_us=spin_us)
