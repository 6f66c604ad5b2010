"""Faults: a failure is confined to what caused it, and the store keeps serving.

* an exception inside ``apply_fn`` at trace time is a ``CompileError`` for the buckets that
  trace it, and only those;
* an exception inside ``apply_fn`` at run time fails the request that ran it, and nothing else;
* a store that cannot grow (its limit, or a failed allocation: simulated here, real on a GPU)
  raises ``CapacityError`` and keeps serving at its old size;
* ``close()`` while a step runs completes every future (see the scheduler section below).
"""

from __future__ import annotations

import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import reference_predict, rel_error

import jaxmt.store
from jaxmt import BucketPolicy, CapacityError, CompileError, MultiTenantModel, Scheduler, SchedulerClosed, make_plan

POLICY = BucketPolicy.powers_of_two(4, 8)  # K in {1, 2, 4}, B in {1, 2, 4, 8}
FEATURES, CLASSES = 6, 3
SENTINEL = 1e30  # an input value that makes the run-time faulty model raise


def _params(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"w": rng.normal(size=(FEATURES, CLASSES)).astype(np.float32), "b": rng.normal(size=(CLASSES,)).astype(np.float32)}


def _linear(params, x):
    return jnp.tanh(x @ params["w"] + params["b"])


def _inputs(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.standard_normal((n, FEATURES), dtype=np.float32)


def _served(apply_fn, *, tenants=("a", "b", "c"), **kwargs):
    params = {t: _params(i + 1) for i, t in enumerate(tenants)}
    kwargs.setdefault("capacity", 4)
    mt = MultiTenantModel(apply_fn, _params(0), buckets=POLICY, row_shape=(FEATURES,), row_dtype=np.float32, **kwargs)
    for tenant, p in params.items():
        mt.add_tenant(tenant, p)
    return mt, params


def _store_state(mt: MultiTenantModel) -> tuple:
    store = mt.store
    return (store.tenants, store.capacity, store.version, sorted(store._free), [np.asarray(x).copy() for x in store.stacked_leaves])


def _assert_store_unchanged(mt: MultiTenantModel, before: tuple) -> None:
    tenants, capacity, version, free, leaves = before
    store = mt.store
    assert (store.tenants, store.capacity, store.version, sorted(store._free)) == (tenants, capacity, version, free)
    for old, new in zip(leaves, store.stacked_leaves):
        np.testing.assert_array_equal(old, np.asarray(new))


def _assert_serves(mt, params, rng, ids=None) -> None:
    ids = list(rng.choice(list(params), size=7)) if ids is None else ids
    x = _inputs(rng, len(ids))
    assert rel_error(mt.predict(ids, x), reference_predict(_linear, params, ids, x)) < 1e-5


# ------------------------------------------------------------------------ apply_fn at trace time
class _FailsWhenTracedAt:
    """apply_fn that raises while being traced for one row bucket (per-tenant batch size)."""

    def __init__(self, row_bucket: int):
        self.row_bucket = row_bucket
        self.broken = True

    def __call__(self, params, x):
        if self.broken and x.shape[0] == self.row_bucket:
            raise ValueError(f"model bug at batch {x.shape[0]}")
        return _linear(params, x)


def _row_buckets(mt: MultiTenantModel, ids: list) -> set[int]:
    return {step.row_bucket for step in make_plan(mt.store.slots_of(ids), mt.buckets).steps}


def test_a_trace_time_exception_fails_only_its_bucket(rng):
    apply_fn = _FailsWhenTracedAt(row_bucket=4)
    mt, params = _served(apply_fn)
    _assert_serves(mt, params, rng, ids=["a", "b", "b"])
    before = _store_state(mt)
    assert _row_buckets(mt, ["a"] * 4) == {4}
    with pytest.raises(CompileError, match=r"row_bucket=4.*ValueError: model bug at batch 4") as info:
        mt.predict(["a"] * 4, _inputs(rng, 4))
    assert isinstance(info.value.__cause__, ValueError)
    stats = mt.stats()
    assert stats["compile_failures"] == 1 and stats["steps"] == 1  # the failed request counts no step
    _assert_store_unchanged(mt, before)
    # A request fails exactly when its plan needs the broken bucket, every time it does.
    failures = 1
    for _ in range(12):
        ids = list(rng.choice(list(params), size=int(rng.integers(1, 20))))
        if 4 in _row_buckets(mt, ids):
            failures += 1
            with pytest.raises(CompileError, match="row_bucket=4"):
                mt.predict(ids, _inputs(rng, len(ids)))
        else:
            _assert_serves(mt, params, rng, ids=ids)
    assert mt.stats()["compile_failures"] == failures
    _assert_store_unchanged(mt, before)
    # A failure is not cached: once the model traces, the bucket compiles.
    apply_fn.broken = False
    _assert_serves(mt, params, rng, ids=["b"] * 4)


def test_warmup_reports_the_failing_bucket_and_keeps_the_others(rng):
    mt, params = _served(_FailsWhenTracedAt(row_bucket=2))
    with pytest.raises(CompileError, match=r"tenant_bucket=1, row_bucket=2"):
        mt.warmup()
    mt.warmup(row_buckets=[1, 4, 8])  # the rest of the ladder builds
    compiled = mt.stats()["compiles"]
    # every (K, B) of the ladder, plus the gather-free variant of K == capacity (4)
    assert compiled == len(POLICY.tenant_buckets) * 3 + 3
    ids = ["a"] * 4 + ["b"] * 4 + ["c"] * 4
    assert 2 not in _row_buckets(mt, ids)
    _assert_serves(mt, params, rng, ids=ids)  # compiled by warmup: no compile
    assert mt.stats()["compiles"] == compiled


# -------------------------------------------------------------------------- apply_fn at run time
def _raise_on_sentinel(x: np.ndarray) -> np.ndarray:
    if (np.abs(x) >= SENTINEL).any():
        raise FloatingPointError("sentinel input reached the device")
    return x


def _fails_at_run_time(params, x):
    """apply_fn whose program raises on the host mid-run (a callback) for sentinel inputs."""
    checked = jax.pure_callback(_raise_on_sentinel, jax.ShapeDtypeStruct(x.shape, x.dtype), x, vmap_method="sequential")
    return _linear(params, checked)


def test_a_run_time_exception_fails_its_request_and_nothing_else(rng):
    mt, params = _served(_fails_at_run_time)
    _assert_serves(mt, params, rng)
    before = _store_state(mt)
    x = _inputs(rng, 5)
    x[2, 1] = SENTINEL
    with pytest.raises(jax.errors.JaxRuntimeError, match="sentinel input reached the device"):
        mt.predict(["a", "b", "c", "a", "b"], x)
    _assert_store_unchanged(mt, before)
    for _ in range(3):
        _assert_serves(mt, params, rng)
    assert mt.stats()["compile_failures"] == 0


# ---------------------------------------------------------------------------- growing the store
def test_a_full_store_at_its_limit_raises_capacity_error_and_keeps_serving(rng):
    mt, params = _served(_linear, capacity=2, max_capacity=4)
    mt.add_tenant("d", _params(9))  # grows 2 -> 4
    params["d"] = _params(9)
    _assert_serves(mt, params, rng)
    before, compiles = _store_state(mt), mt.stats()["compiles"]
    with pytest.raises(CapacityError, match="max_capacity=4"):
        mt.add_tenant("e", _params(10))
    with pytest.raises(CapacityError, match="max_capacity=4"):
        mt.store.reserve(8)
    _assert_store_unchanged(mt, before)
    assert mt.stats()["compiles"] == compiles  # a refused add or reserve compiles nothing
    _assert_serves(mt, params, rng)
    mt.remove_tenant("b")  # a freed slot takes the next tenant without growing
    del params["b"]
    mt.add_tenant("e", _params(10))
    params["e"] = _params(10)
    assert mt.store.capacity == 4
    _assert_serves(mt, params, rng)


def test_a_failed_allocation_while_growing_keeps_the_old_store_serving(rng, monkeypatch):
    mt, params = _served(_linear, tenants=("a", "b"), capacity=2)
    _assert_serves(mt, params, rng)
    before = _store_state(mt)

    def out_of_memory(*args, **kwargs):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.00GiB")

    with monkeypatch.context() as patch:  # the copy into the doubled store cannot be allocated
        patch.setattr(jnp, "concatenate", out_of_memory)
        with pytest.raises(CapacityError, match=r"from 2 to 4 slots.*keeps serving.*RESOURCE_EXHAUSTED") as info:
            mt.add_tenant("c", _params(3))
        assert isinstance(info.value, MemoryError) and isinstance(info.value.__cause__, jax.errors.JaxRuntimeError)
        _assert_store_unchanged(mt, before)
        _assert_serves(mt, params, rng)
    mt.add_tenant("c", _params(3))  # memory is back: the same add succeeds
    params["c"] = _params(3)
    assert mt.store.capacity == 4
    _assert_serves(mt, params, rng)


@pytest.mark.parametrize("capacity", [4, 2], ids=["room-left", "full: the add grows the store first"])
def test_a_failed_slot_write_leaves_the_store_as_it_was(capacity, rng, monkeypatch):
    mt, params = _served(_linear, tenants=("a", "b"), capacity=capacity)
    before = _store_state(mt)

    def device_error(*args, **kwargs):
        raise jax.errors.JaxRuntimeError("INTERNAL: device lost while writing")

    with monkeypatch.context() as patch:
        patch.setattr(jaxmt.store, "_write_slot", device_error)
        patch.setattr(jaxmt.store, "_write_slots", device_error)
        with pytest.raises(jax.errors.JaxRuntimeError, match="device lost"):
            mt.add_tenant("c", _params(3))
        with pytest.raises(jax.errors.JaxRuntimeError, match="device lost"):
            mt.store.add_stacked(["c", "d", "e"], jax.tree.map(lambda *leaves: np.stack(leaves), *[_params(s) for s in (3, 4, 5)]))
        with pytest.raises(jax.errors.JaxRuntimeError, match="device lost"):
            mt.update_tenant("a", _params(3))
    tenants, capacity_before, version, free, leaves = before
    # The size and the free slots too: no grown store kept. The version moves only where the
    # store grew in between, and then past the grown store's (no reader saw it before).
    _assert_store_unchanged(mt, (tenants, capacity_before, mt.store.version, free, leaves))
    assert mt.store.version >= version + 2  # the add_stacked of three grows either store on its way
    _assert_serves(mt, params, rng)
    assert mt.store.add("c", _params(3)) == 2  # the slot the failed add took was given back


@pytest.mark.slow  # filling 60 GiB in pieces takes about a minute
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU whose memory can really be filled")
def test_a_real_out_of_memory_while_growing_keeps_the_old_store_serving(rng):
    """Fills the GPU until allocation fails, then asks the store to double."""
    big = 64 * 2**20  # 64 Mi float32 = 256 MiB per tenant

    def apply_fn(params, x):
        return _linear({"w": params["w"], "b": params["b"] + params["pad"][:CLASSES]}, x)

    def params_of(seed):
        return {**_params(seed), "pad": np.zeros(big, np.float32)}

    mt = MultiTenantModel(apply_fn, params_of(0), capacity=2, buckets=POLICY, row_shape=(FEATURES,), row_dtype=np.float32)
    params = {"a": params_of(1), "b": params_of(2)}
    for tenant, p in params.items():
        mt.add_tenant(tenant, p)
    ids = ["a", "b", "a"]
    x = _inputs(rng, 3)
    want = mt.predict(ids, x)
    filler, chunk = [], 2**30
    while chunk >= 2**20:  # take every byte we can, in ever smaller pieces
        try:
            filler.append(jnp.ones(chunk // 4, jnp.float32).block_until_ready())
        except jax.errors.JaxRuntimeError:
            chunk //= 4
    # Free 1 GiB: room for the new tenant's 256 MiB and the requests, not for a 1 GiB store.
    assert filler and filler[0].nbytes == 2**30, "could not fill the GPU in 1 GiB pieces"
    del filler[0]
    try:
        before = _store_state(mt)
        with pytest.raises(CapacityError, match="keeps serving"):
            mt.add_tenant("c", params_of(3))
        _assert_store_unchanged(mt, before)
        np.testing.assert_array_equal(mt.predict(ids, x), want)
    finally:
        del filler
    mt.add_tenant("c", params_of(3))
    assert mt.store.capacity == 4
    np.testing.assert_array_equal(mt.predict(ids, x), want)


# -------------------------------------------------------------------------------- scheduler
BLOCK = 7777.0  # an input value that holds its step on the device until the gate opens


class _Gate:
    """apply_fn whose step blocks, mid-run, on rows holding BLOCK until ``release`` is set."""

    def __init__(self):
        self.entered = threading.Event()
        self.release = threading.Event()

    def _hold(self, x: np.ndarray) -> np.ndarray:
        if (x == BLOCK).any():
            self.entered.set()
            self.release.wait(timeout=120)
        return x

    def __call__(self, params, x):
        held = jax.pure_callback(self._hold, jax.ShapeDtypeStruct(x.shape, x.dtype), x, vmap_method="sequential")
        return _linear(params, held)


def _wait_for(condition, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def _submit_mix(sched, rng, count: int) -> list:
    submitted = []
    for i in range(count):
        tenant = "abc"[i % 3]
        x = _inputs(rng, int(rng.integers(1, 4)))
        submitted.append((tenant, x, sched.submit(tenant, x)))
    return submitted


@pytest.mark.parametrize("drain", [True, False], ids=["drain", "no-drain"])
def test_close_while_a_step_runs_completes_every_future(drain, rng):
    gate = _Gate()
    mt, params = _served(gate)
    sched = Scheduler(mt, max_delay_ms=1.0, default_slo_ms=3_600_000.0)
    try:
        held_x = _inputs(rng, 2)
        held_x[1, 0] = BLOCK
        held = sched.submit("a", held_x)
        assert gate.entered.wait(timeout=60), "the held step never started"
        queued = _submit_mix(sched, rng, 9)  # wait behind (or beside) the running step
        closer = threading.Thread(target=sched.close, kwargs={"drain": drain})
        closer.start()
        _wait_for(lambda: sched.closed, "close() to stop intake")
        with pytest.raises(SchedulerClosed):
            sched.submit("b", _inputs(rng, 1))
    finally:
        gate.release.set()
    closer.join(timeout=120)
    assert not closer.is_alive(), "close() did not return"
    np.testing.assert_allclose(held.result(timeout=0), reference_predict(_linear, params, ["a", "a"], held_x), rtol=1e-5)
    outcomes = {"answered": 0, "closed": 0}
    for tenant, x, future in queued:
        assert future.done(), "a request vanished: its future never completed"
        if future.exception() is None:
            want = reference_predict(_linear, params, [tenant] * len(x), x)
            np.testing.assert_allclose(future.result(), want, rtol=1e-5, atol=1e-6)
            outcomes["answered"] += 1
        else:
            assert not drain and isinstance(future.exception(), SchedulerClosed)
            outcomes["closed"] += 1
    if drain:
        assert outcomes == {"answered": len(queued), "closed": 0}


def test_a_failing_step_fails_its_own_futures_and_the_scheduler_keeps_serving(rng):
    mt, params = _served(_fails_at_run_time)
    with Scheduler(mt, max_delay_ms=1.0, default_slo_ms=3_600_000.0) as sched:
        bad_x = _inputs(rng, 2)
        bad_x[0, 3] = SENTINEL
        bad = sched.submit("b", bad_x)
        with pytest.raises(jax.errors.JaxRuntimeError, match="sentinel input reached the device"):
            bad.result(timeout=60)
        after = _submit_mix(sched, rng, 12)
        for tenant, x, future in after:
            want = reference_predict(_linear, params, [tenant] * len(x), x)
            np.testing.assert_allclose(future.result(timeout=60), want, rtol=1e-5, atol=1e-6)
        steps = sched.metrics()["steps"]
    assert steps["failed_steps"] == 1 and steps["steps"] >= 1
    _assert_serves(mt, params, rng)


def test_a_bucket_that_fails_to_compile_fails_only_the_requests_that_need_it(rng):
    apply_fn = _FailsWhenTracedAt(row_bucket=8)
    mt, params = _served(apply_fn)
    with Scheduler(mt, max_delay_ms=1.0, default_slo_ms=3_600_000.0) as sched:
        needs_8 = sched.submit("a", _inputs(rng, 8))  # one tenant entry of 8 rows: B = 8
        with pytest.raises(CompileError, match="row_bucket=8"):
            needs_8.result(timeout=60)
        small = [(t, x, sched.submit(t, x)) for t, x in [("a", _inputs(rng, 1)), ("b", _inputs(rng, 2))]]
        for tenant, x, future in small:
            want = reference_predict(_linear, params, [tenant] * len(x), x)
            np.testing.assert_allclose(future.result(timeout=60), want, rtol=1e-5, atol=1e-6)
    assert mt.stats()["compile_failures"] >= 1
