"""ProgramCache: counted misses, LRU bound, and a failing build that spares other buckets."""

import numpy as np
import pytest

from jaxmt import BucketPolicy, CompileError, InputError, MultiTenantModel, ProgramCache, ProgramKey


def _key(k: int, b: int = 1) -> ProgramKey:
    return ProgramKey(k, b, capacity=4, row_shape=(3,), row_dtype="float32")


def test_hits_misses_and_lru_eviction():
    built = []
    cache = ProgramCache(lambda key: built.append(key) or f"program{key.tenant_bucket}", max_programs=2)
    assert cache.get(_key(1)) == "program1"
    assert cache.get(_key(2)) == "program2"
    assert cache.get(_key(1)) == "program1"  # hit, now most recent
    cache.get(_key(4))  # evicts key 2, the least recently used
    assert _key(2) not in cache and _key(1) in cache
    stats = cache.stats()
    assert (stats["cache_hits"], stats["cache_misses"], stats["compiles"], stats["evictions"]) == (1, 3, 3, 1)
    assert built == [_key(1), _key(2), _key(4)]


def test_failed_build_raises_compile_error_and_caches_nothing():
    def build(key):
        if key.tenant_bucket == 3:
            raise RuntimeError("boom")
        return "ok"

    cache = ProgramCache(build)
    with pytest.raises(CompileError, match="tenant_bucket=3.*boom"):
        cache.get(_key(3))
    assert _key(3) not in cache and cache.get(_key(2)) == "ok"
    assert cache.stats()["compile_failures"] == 1


def test_a_bucket_whose_trace_fails_does_not_take_down_others():
    def apply_fn(params, x):
        if x.shape[0] == 2:  # this row bucket cannot be traced
            raise ValueError("unsupported batch of 2")
        return x * params["scale"]

    mt = MultiTenantModel(apply_fn, {"scale": np.ones(3, np.float32)}, buckets=BucketPolicy((1, 2), (1, 2)))
    mt.add_tenant("a", {"scale": np.full(3, 2.0, np.float32)})
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    with pytest.raises(CompileError, match="row_bucket=2"):
        mt.predict(["a", "a"], x)
    np.testing.assert_allclose(mt.predict(["a"], x[:1]), 2 * x[:1])
    assert mt.stats()["compile_failures"] == 1


def test_parallel_compiles_keep_the_good_programs_and_name_the_failing_one():
    import jax
    import jax.numpy as jnp

    def lower(key):
        if key.tenant_bucket == 3:
            raise ValueError("boom at trace")
        return jax.jit(lambda x: x * key.tenant_bucket).lower(jnp.zeros(key.row_shape, jnp.float32))

    cache = ProgramCache(lambda key: lower(key).compile(), lower=lower)
    assert cache.ensure_many([_key(1), _key(2), _key(4)], workers=3) == 3
    assert cache.stats()["compiles"] == 3 and cache.stats()["cache_misses"] == 0
    np.testing.assert_allclose(cache.get(_key(4))(np.ones(3, np.float32)), 4.0)
    with pytest.raises(CompileError, match="tenant_bucket=3.*boom at trace"):
        cache.ensure_many([_key(3), _key(8), _key(1)], workers=2)
    assert _key(8) in cache and _key(3) not in cache
    assert cache.stats()["compile_failures"] == 1 and cache.stats()["compiles"] == 4
    with pytest.raises(ValueError, match="workers"):
        cache.ensure_many([_key(1)], workers=0)


class _FakeLowered:
    """Stands in for ``jax.stages.Lowered``: records the thread its compile ran on."""

    def __init__(self, key, threads, fail=False):
        self.key, self.threads, self.fail = key, threads, fail

    def compile(self):
        import threading

        self.threads.append(threading.current_thread().name)
        if self.fail:
            raise RuntimeError(f"no kernel for K={self.key.tenant_bucket}")
        return f"program{self.key.tenant_bucket}"


def test_compiles_run_on_worker_threads_and_every_failing_key_is_named():
    threads, built = [], []

    def lower(key):
        return _FakeLowered(key, threads, fail=key.tenant_bucket in (3, 5))

    cache = ProgramCache(lambda key: lower(key).compile(), lower=lower)
    keys = [_key(k) for k in (1, 2, 3, 4, 5)]
    with pytest.raises(CompileError, match=r"2 program\(s\).*tenant_bucket=3.*K=3.*tenant_bucket=5.*K=5"):
        cache.ensure_many(keys, workers=2, on_built=built.append)
    assert all(name.startswith("jaxmt-compile") for name in threads) and len(threads) == 5
    assert sorted(k.tenant_bucket for k in built) == [1, 2, 3, 4, 5]  # every key reported once
    assert [k for k in keys if k in cache] == [_key(1), _key(2), _key(4)]
    stats = cache.stats()
    assert stats["compiles"] == 3 and stats["compile_failures"] == 2
    # One worker builds on this thread through ``build``, stopping at the first failure.
    threads.clear()
    with pytest.raises(CompileError, match="tenant_bucket=3"):
        cache.ensure_many(keys, workers=1)
    assert threads and not any(name.startswith("jaxmt-compile") for name in threads)


def test_a_step_finds_the_program_of_the_current_capacity_and_rows():
    """Program keys are kept between steps; a grown store gets keys and programs of its own,
    and those of the smaller store are dropped; a first request that failed fixes no rows."""
    def apply_fn(params, x):
        if x.dtype == np.int32:
            raise ValueError("no integer rows")
        return x * params["scale"]

    mt = MultiTenantModel(apply_fn, {"scale": np.ones(3, np.float32)}, capacity=2, buckets=BucketPolicy((1, 2), (1,)))
    mt.add_tenant("a", {"scale": np.full(3, 2.0, np.float32)})
    with pytest.raises(InputError, match="no integer rows"):
        mt.predict(["a"], np.ones((1, 3), np.int32))  # fixes no rows
    x = np.arange(3, dtype=np.float32).reshape(1, 3)
    np.testing.assert_allclose(mt.predict(["a"], x), 2 * x)
    assert mt._key(1, 1) is mt._key(1, 1) and mt._key(1, 1).row_dtype == "float32" and mt._key(1, 1).capacity == 2
    mt.store.reserve(8)
    assert mt._key(1, 1).capacity == 8
    np.testing.assert_allclose(mt.predict(["a"], x), 2 * x)
    assert {key.capacity for key in mt.programs.keys()} == {8}  # the old capacity's programs can never run again
    assert mt.stats()["evictions"] == 0
