"""Isolation: one tenant's weights never influence another tenant's outputs.

``add_tenant`` rejects non-finite weights, so the poison is written straight into the
store's stacked leaves (bypassing validation): what is tested is the compute, where tenants
share one program, one grouped convolution, one batched matmul. Other tenants' rows must be
bit-for-bit what they were (same program, same inputs), the poisoned tenant's rows must all
change, and writing valid weights back must restore them.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import jitted_apply, rel_error, tiny_spec

from jaxmt import BucketPolicy, MultiTenantModel

POLICY = BucketPolicy.powers_of_two(4, 4)
# resnet50 lowers like resnet18 (same layers, more of them); the others each add a layer kind.
ARCHITECTURES = ("mlp", "resnet18", "mobilenetv2", "gru", "transformer")


def _served(arch: str, seed: int):
    spec = tiny_spec(arch)
    params = {f"t{i}": spec.init(seed * 100 + i) for i in range(3)}
    mt = MultiTenantModel(spec.apply_fn, params["t0"], capacity=4, buckets=POLICY)
    for tenant, p in params.items():
        mt.add_tenant(tenant, p)
    return spec, mt, params


def _request(rng: np.random.Generator, spec, counts: dict[str, int]):
    """8 rows of t0, t1, t2, shuffled: 3 entries pad to K=4 by repeating the largest one."""
    ids = [t for t, c in counts.items() for _ in range(c)]
    ids = [ids[i] for i in rng.permutation(len(ids))]
    return ids, spec.random_input(rng, len(ids))


def _reference(spec, params: dict, ids: list, x: np.ndarray) -> np.ndarray:
    """Each tenant's own apply on the whole batch (one shape, one compile), its rows kept."""
    apply = jitted_apply(spec.apply_fn)
    out = {t: np.asarray(apply(params[t], x)) for t in set(ids)}
    return np.stack([out[t][i] for i, t in enumerate(ids)])


def _poison(mt: MultiTenantModel, tenant: str, value: float) -> None:
    """Writes ``value`` over every floating weight of one tenant, bypassing validation."""
    store = mt.store
    with store.lock:
        slot = store.slot_of(tenant)
        store._leaves = [
            leaf.at[slot].set(value) if jnp.issubdtype(leaf.dtype, jnp.inexact) else leaf for leaf in store.stacked_leaves
        ]


@pytest.mark.parametrize(
    "victim, counts, value",
    [("t1", {"t0": 2, "t1": 4, "t2": 2}, np.nan), ("t0", {"t0": 1, "t1": 3, "t2": 4}, np.inf)],
    ids=["victim-is-the-padding-entry-nan", "victim-is-smallest-inf"],
)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_poisoned_weights_change_only_their_tenants_rows(arch, victim, counts, value, rng):
    spec, mt, params = _served(arch, seed=len(arch))
    ids, x = _request(rng, spec, counts)
    before = mt.predict(ids, x)
    assert rel_error(before, _reference(spec, params, ids, x)) < 1e-5
    steps_before = mt.stats()["steps"]

    _poison(mt, victim, value)
    after = mt.predict(ids, x)

    assert mt.stats()["steps"] == steps_before + 1  # one shared step computed every tenant
    mine = np.array([t == victim for t in ids])
    np.testing.assert_array_equal(after[~mine], before[~mine])  # bit for bit
    assert not np.isfinite(after[mine]).all(axis=-1).any(), "every row of the poisoned tenant changes"

    mt.update_tenant(victim, params[victim])  # valid weights repair the slot in place
    np.testing.assert_array_equal(mt.predict(ids, x), before)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_new_weights_of_one_tenant_leave_the_others_bit_for_bit(arch, rng):
    spec, mt, params = _served(arch, seed=7)
    ids, x = _request(rng, spec, {"t0": 2, "t1": 3, "t2": 3})
    before = mt.predict(ids, x)
    replacement = spec.init(999)
    mt.update_tenant("t2", replacement)
    after = mt.predict(ids, x)
    mine = np.array([t == "t2" for t in ids])
    np.testing.assert_array_equal(after[~mine], before[~mine])
    want = _reference(spec, {**params, "t2": replacement}, ids, x)
    assert rel_error(after[mine], want[mine]) < 1e-5
    assert rel_error(after[mine], before[mine]) > 1e-3  # the update did change its rows


def test_a_reused_slot_does_not_remember_its_previous_tenant(rng):
    spec, mt, params = _served("mlp", seed=11)
    _poison(mt, "t1", np.nan)
    slot = mt.store.slot_of("t1")
    mt.remove_tenant("t1")
    fresh = spec.init(1234)
    mt.add_tenant("new", fresh)
    assert mt.store.slot_of("new") == slot
    ids, x = _request(rng, spec, {"new": 3, "t0": 3, "t2": 2})
    got = mt.predict(ids, x)
    assert np.isfinite(got).all()
    assert rel_error(got, _reference(spec, {**params, "new": fresh}, ids, x)) < 1e-5
