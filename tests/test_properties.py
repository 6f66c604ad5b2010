"""Property tests: random interleavings of tenant changes and requests keep every answer right.

Two state machines (hypothesis.stateful):

* ``StoreMachine`` drives a ``TenantStore`` with adds, updates, removals, reserves and bad
  params, and checks its bookkeeping (slots, free list, capacity, bytes, version, contents)
  against a plain-Python model of it after every operation.
* ``ServingMachine`` drives a ``MultiTenantModel`` of a random architecture from ``models/``
  (tiny size) with the same operations interleaved with ``predict`` calls of random tenant
  sets, repeated tenants, random row orders and row counts across the bucket edges; after
  every operation every resident tenant's answers must equal its own reference apply.

One model per architecture serves every example of a run (so programs compile once); each
example starts by emptying it, which is itself a property: a model survives many tenant sets.
"""

from __future__ import annotations

import functools
from collections.abc import Hashable

import hypothesis.strategies as st
import jax
import numpy as np
import pytest
from conftest import jitted_apply, tiny_spec
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import models
from jaxmt import (
    BucketPolicy,
    CapacityError,
    DuplicateTenantError,
    MultiTenantModel,
    NonFiniteParamsError,
    ParamMismatchError,
    TenantStore,
    UnknownTenantError,
)

# Tenant ids of several hashable types (no bools or floats: True == 1 == 1.0 would alias).
TENANT_IDS = st.sampled_from(["a", "b", "c", 0, 1, 2, ("t", 3), b"d"])

# ----------------------------------------------------------------------------- store bookkeeping
STORE_INITIAL_CAPACITY = 2
# Below the number of TENANT_IDS, so that adds reach the limit (CapacityError), and off the
# doubling path (2, 4, 8), so that the last growth is cut short at the limit.
STORE_MAX_CAPACITY = 6
assert STORE_MAX_CAPACITY < len(TENANT_IDS.elements) and STORE_MAX_CAPACITY & (STORE_MAX_CAPACITY - 1)


def _store_params(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "dense": {"w": rng.normal(size=(4, 3)).astype(np.float32), "b": rng.normal(size=(3,)).astype(np.float32)},
        "scale": rng.normal(size=()).astype(np.float32),
        "count": np.int32(rng.integers(1, 1000)),
    }


def _bad_store_params(kind: str, seed: int) -> dict:
    params = _store_params(seed)
    if kind == "missing_leaf":
        del params["scale"]
    elif kind == "extra_leaf":
        params["dense"]["extra"] = np.ones(2, np.float32)
    elif kind == "shape":
        params["dense"]["w"] = params["dense"]["w"][:3]
    elif kind == "dtype":
        params["dense"]["b"] = params["dense"]["b"].astype(np.float16)  # (float64 is float32 to JAX, and to the store)
    elif kind == "nan":
        params["dense"]["w"][1, 2] = np.nan
    elif kind == "inf":
        params["scale"] = np.float32(-np.inf)
    return params


BAD_KINDS = {
    "missing_leaf": ParamMismatchError,
    "extra_leaf": ParamMismatchError,
    "shape": ParamMismatchError,
    "dtype": ParamMismatchError,
    "nan": NonFiniteParamsError,
    "inf": NonFiniteParamsError,
}


class StoreMachine(RuleBasedStateMachine):
    """A TenantStore against a plain-Python model of its slots, free list and capacity."""

    def __init__(self) -> None:
        super().__init__()
        self.store = TenantStore(_store_params(0), capacity=STORE_INITIAL_CAPACITY, max_capacity=STORE_MAX_CAPACITY)
        # The plain model: what the store must hold.
        self.slot_of: dict[Hashable, int] = {}
        self.free: set[int] = set(range(STORE_INITIAL_CAPACITY))
        self.capacity = STORE_INITIAL_CAPACITY
        self.params: dict[Hashable, dict] = {}
        self.version = self.store.version
        template_bytes = sum(np.asarray(leaf).nbytes for leaf in jax.tree.leaves(_store_params(0)))
        self.bytes_per_tenant = template_bytes

    def _expect_unchanged_after(self, error: type[BaseException], operation, *args) -> None:
        version, capacity = self.store.version, self.store.capacity
        free = sorted(self.store._free)
        with pytest.raises(error):
            operation(*args)
        assert self.store.version == version and self.store.capacity == capacity
        assert sorted(self.store._free) == free

    @rule(tenant=TENANT_IDS, seed=st.integers(0, 2**20))
    def add(self, tenant, seed):
        params = _store_params(seed)
        if tenant in self.slot_of:
            self._expect_unchanged_after(DuplicateTenantError, self.store.add, tenant, params)
            return
        if not self.free and self.capacity >= STORE_MAX_CAPACITY:
            self._expect_unchanged_after(CapacityError, self.store.add, tenant, params)
            return
        if not self.free:  # grows by doubling, up to the limit
            grown = min(2 * self.capacity, STORE_MAX_CAPACITY)
            self.free |= set(range(self.capacity, grown))
            self.capacity = grown
            self.version += 1
        expected = min(self.free)  # the lowest free slot
        assert self.store.add(tenant, params) == expected
        self.free.remove(expected)
        self.slot_of[tenant] = expected
        self.params[tenant] = params
        self.version += 1

    @rule(tenant=TENANT_IDS, seed=st.integers(0, 2**20))
    def update(self, tenant, seed):
        params = _store_params(seed)
        if tenant not in self.slot_of:
            self._expect_unchanged_after(UnknownTenantError, self.store.update, tenant, params)
            return
        assert self.store.update(tenant, params) == self.slot_of[tenant]
        self.params[tenant] = params
        self.version += 1

    @rule(tenant=TENANT_IDS)
    def remove(self, tenant):
        if tenant not in self.slot_of:
            self._expect_unchanged_after(UnknownTenantError, self.store.remove, tenant)
            return
        slot = self.slot_of.pop(tenant)
        del self.params[tenant]
        assert self.store.remove(tenant) == slot
        self.free.add(slot)
        self.version += 1

    @rule(capacity=st.integers(1, STORE_MAX_CAPACITY + 4))
    def reserve(self, capacity):
        if capacity > STORE_MAX_CAPACITY:
            self._expect_unchanged_after(CapacityError, self.store.reserve, capacity)
            return
        self.store.reserve(capacity)
        if capacity > self.capacity:
            self.free |= set(range(self.capacity, capacity))
            self.capacity = capacity
            self.version += 1

    @rule(tenant=TENANT_IDS, kind=st.sampled_from(sorted(BAD_KINDS)), seed=st.integers(0, 2**20), update=st.booleans())
    def bad_params(self, tenant, kind, seed, update):
        params = _bad_store_params(kind, seed)
        if update:
            error = BAD_KINDS[kind] if tenant in self.slot_of else UnknownTenantError
            self._expect_unchanged_after(error, self.store.update, tenant, params)
        else:
            error = BAD_KINDS[kind] if tenant not in self.slot_of else DuplicateTenantError
            self._expect_unchanged_after(error, self.store.add, tenant, params)

    @invariant()
    def bookkeeping_matches_the_plain_model(self):
        store = self.store
        assert store.tenants == list(self.slot_of)  # insertion order, removals dropped
        assert {t: store.slot_of(t) for t in store.tenants} == self.slot_of
        assert store.capacity == self.capacity and len(store) == len(self.slot_of)
        assert sorted(store._free) == sorted(self.free)  # no slot lost, none listed twice
        assert set(self.slot_of.values()).isdisjoint(self.free)
        assert set(self.slot_of.values()) | self.free == set(range(self.capacity))
        assert store.version == self.version
        stats = store.stats()
        assert stats == {
            "resident_tenants": len(self.slot_of),
            "capacity": self.capacity,
            "free_slots": self.capacity - len(self.slot_of),
            "bytes_per_tenant": self.bytes_per_tenant,
            "param_bytes": self.bytes_per_tenant * self.capacity,
            "resident_param_bytes": self.bytes_per_tenant * len(self.slot_of),
        }
        assert sum(leaf.nbytes for leaf in store.stacked_leaves) == stats["param_bytes"]
        assert all(leaf.shape[0] == self.capacity for leaf in store.stacked_leaves)

    @invariant()
    def every_tenant_reads_back_its_own_params(self):
        for tenant, params in self.params.items():
            got = jax.tree.map(np.asarray, self.store.get(tenant))
            jax.tree.map(np.testing.assert_array_equal, got, params)


StoreMachine.TestCase.settings = settings(
    max_examples=40, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestStoreBookkeeping = StoreMachine.TestCase


# ----------------------------------------------------------------------------------- serving
SERVING_POLICY = BucketPolicy.powers_of_two(4, 4)  # K, B in {1, 2, 4}: many requests cross the edges
SERVING_CAPACITY = 4  # a fifth tenant grows the store (and so the programs) mid-run
PROBE_ROWS = 12
# Cheap to compile on a CPU, and between them dense, recurrent and attention models with
# float and integer inputs; the conv models join in the slow run (and in test_isolation).
FAST_ARCHITECTURES = ("mlp", "gru", "transformer")
RTOL = ATOL = 1e-5  # float32 at full matmul precision (conftest)


@functools.lru_cache(maxsize=None)
def _served(arch: str) -> tuple[models.ModelSpec, MultiTenantModel, np.ndarray]:
    """One model per architecture for the whole run, and the probe rows its requests use."""
    spec = tiny_spec(arch)
    mt = MultiTenantModel(spec.apply_fn, spec.init(0), capacity=SERVING_CAPACITY, buckets=SERVING_POLICY)
    probe = spec.random_input(np.random.default_rng(sum(map(ord, arch))), PROBE_ROWS)
    return spec, mt, probe


def _serving_machine(architectures: tuple[str, ...]) -> type[RuleBasedStateMachine]:
    class ServingMachine(RuleBasedStateMachine):
        """Tenant changes interleaved with requests; every answer equals the tenant's own apply."""

        @initialize(arch=st.sampled_from(architectures), seed=st.integers(0, 2**16))
        def start(self, arch, seed):
            self.spec, self.mt, self.probe = _served(arch)
            for tenant in self.mt.tenants:  # left by the previous example
                self.mt.remove_tenant(tenant)
            self.reference: dict[Hashable, np.ndarray] = {}  # tenant -> its apply on the probe rows
            self.rng = np.random.default_rng(seed)

        def _set(self, tenant, seed: int, operation) -> None:
            params = self.spec.init(seed)
            operation(tenant, params)
            apply = jitted_apply(self.spec.apply_fn)
            self.reference[tenant] = np.asarray(apply(params, self.probe))

        @rule(tenant=TENANT_IDS, seed=st.integers(1, 2**20))
        def add(self, tenant, seed):
            if tenant in self.reference:
                with pytest.raises(DuplicateTenantError):
                    self.mt.add_tenant(tenant, self.spec.init(seed))
                return
            self._set(tenant, seed, self.mt.add_tenant)

        @precondition(lambda self: self.reference)
        @rule(data=st.data(), seed=st.integers(1, 2**20))
        def update(self, data, seed):
            tenant = data.draw(st.sampled_from(sorted(self.reference, key=repr)))
            self._set(tenant, seed, self.mt.update_tenant)

        @rule(tenant=TENANT_IDS)
        def remove(self, tenant):
            if tenant not in self.reference:
                with pytest.raises(UnknownTenantError):
                    self.mt.remove_tenant(tenant)
                return
            self.mt.remove_tenant(tenant)
            del self.reference[tenant]
            with pytest.raises(UnknownTenantError):
                self.mt.predict([tenant], self.probe[:1])

        @precondition(lambda self: self.reference)
        @rule(data=st.data())
        def predict(self, data):
            """Random tenants (repeats allowed), 1..10 rows each, in a random row order."""
            resident = sorted(self.reference, key=repr)
            chosen = data.draw(st.lists(st.sampled_from(resident), min_size=1, max_size=6))
            counts = data.draw(st.lists(st.integers(1, 10), min_size=len(chosen), max_size=len(chosen)))
            ids = [t for t, c in zip(chosen, counts) for _ in range(c)]
            rows = data.draw(st.lists(st.integers(0, PROBE_ROWS - 1), min_size=len(ids), max_size=len(ids)))
            order = data.draw(st.permutations(range(len(ids))))
            ids, rows = [ids[i] for i in order], [rows[i] for i in order]
            self._check(ids, np.asarray(rows))

        @precondition(lambda self: self.reference)
        @rule(tenant=TENANT_IDS)
        def predict_with_an_unknown_tenant(self, tenant):
            if tenant in self.reference:
                return
            ids = [next(iter(self.reference)), tenant]
            with pytest.raises(UnknownTenantError):
                self.mt.predict(ids, self.probe[:2])

        def _check(self, ids: list, rows: np.ndarray) -> None:
            got = self.mt.predict(ids, self.probe[rows])
            want = np.stack([self.reference[t][r] for t, r in zip(ids, rows)])
            np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)

        @invariant()
        def every_tenant_answers_with_its_own_weights(self):
            if not getattr(self, "reference", None):
                return
            assert sorted(self.mt.tenants, key=repr) == sorted(self.reference, key=repr)
            ids = [t for t in self.reference for _ in range(int(self.rng.integers(1, 6)))]
            order = self.rng.permutation(len(ids))
            self._check([ids[i] for i in order], self.rng.integers(0, PROBE_ROWS, size=len(ids)))

    return ServingMachine


_SERVING_SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

FastServing = _serving_machine(FAST_ARCHITECTURES)
FastServing.TestCase.settings = settings(max_examples=12, stateful_step_count=15, **_SERVING_SETTINGS)
TestServingFast = FastServing.TestCase

AllServing = _serving_machine(models.ARCHITECTURES)
AllServing.TestCase.settings = settings(max_examples=40, stateful_step_count=25, **_SERVING_SETTINGS)
TestServingAllArchitectures = pytest.mark.slow(AllServing.TestCase)
