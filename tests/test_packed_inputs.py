"""Steps of host rows may hand their slots and input block to the program as one byte buffer
(``pack_inputs``): the same answers as two arrays, for every architecture and row dtype,
through ``predict``, ``run_step`` and the servers, with nothing compiled after warm-up.

Packing is on by default only off the CPU; these tests force it on (and off) wherever they run.
"""

from __future__ import annotations

import hypothesis.strategies as st
import jax
import ml_dtypes
import numpy as np
import pytest
from conftest import reference_predict, rel_error, tiny_spec
from hypothesis import given, settings
from test_baselines import apply_fn, make_params, rows, submit_from_threads

import jaxmt
import models
from jaxmt import BucketPolicy, MultiTenantModel
from jaxmt.rows import DIRECT_ROW_BYTES, RowParts
from jaxmt.steps import _unpack_step_inputs, pack_step_inputs, packable, packed_nbytes

POLICY = BucketPolicy.powers_of_two(8, 4)
TIMEOUT_S = 60.0
ROW_DTYPES = [np.float32, np.float16, ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn, np.uint8, np.int8, np.int32, np.uint16, np.bool_]


def _random_rows(rng: np.random.Generator, shape: tuple[int, ...], dtype) -> np.ndarray:
    if np.dtype(dtype) == np.bool_:
        return rng.integers(0, 2, size=shape).astype(bool)
    if np.issubdtype(np.dtype(dtype), np.integer):
        info = np.iinfo(dtype)
        return rng.integers(info.min, int(info.max) + 1, size=shape, dtype=np.int64).astype(dtype)
    return (rng.standard_normal(shape) * 4).astype(dtype)


def _models(name: str, tenants: int, seed: int, **kwargs) -> tuple:
    """The same tenants in a packing model and a model sending two arrays."""
    spec = tiny_spec(name)
    params = {f"t{i}": spec.init(seed * 100 + i) for i in range(tenants)}
    built = []
    for pack in (True, False):
        mt = MultiTenantModel(spec.apply_fn, params["t0"], capacity=tenants, buckets=POLICY, pack_inputs=pack, **kwargs)
        for tenant, p in params.items():
            mt.add_tenant(tenant, p)
        built.append(mt)
    return spec, params, *built


@settings(max_examples=60, deadline=None)
@given(
    dtype=st.sampled_from(ROW_DTYPES),
    row_shape=st.sampled_from([(), (3,), (2, 5), (48, 48, 3)]),
    k=st.integers(1, 5),
    b=st.integers(1, 3),
    parts=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_a_packed_buffer_unpacks_to_the_gathered_block_and_the_slots(dtype, row_shape, k, b, parts, seed):
    rng = np.random.default_rng(seed)
    pieces = [_random_rows(rng, (int(rng.integers(1, 4)), *row_shape), dtype) for _ in range(parts)]
    joined = np.concatenate(pieces)
    index = rng.integers(0, len(joined), size=(k, b)).astype(np.int32)
    slots = rng.integers(0, 1 << 20, size=k).astype(np.int32)
    for x in (joined, RowParts(pieces)):  # RowParts: gathered, or copied row by row for large rows
        packed = pack_step_inputs(x, index, slots)
        assert packed.dtype == np.uint8 and packed.shape == (packed_nbytes((k, b, *row_shape), dtype),)
        block, got_slots = jax.jit(lambda p: _unpack_step_inputs(p, (k, b, *row_shape), dtype))(packed)
        assert block.dtype == np.dtype(dtype) and block.shape == (k, b, *row_shape)
        np.testing.assert_array_equal(np.asarray(block), joined[index])  # bytes moved, not converted: exact
        np.testing.assert_array_equal(np.asarray(got_slots), slots)


def test_the_row_shapes_above_cover_both_copy_paths_of_row_parts():
    assert 4 * 48 * 48 * 3 >= DIRECT_ROW_BYTES > 4 * 2 * 5


def test_only_dtypes_that_travel_as_they_are_are_packed():
    assert all(packable(dtype) for dtype in ROW_DTYPES)
    assert not packable(np.complex64)
    if not jax.config.jax_enable_x64:  # a program narrows 64-bit rows: they go as an array
        assert not packable(np.float64) and not packable(np.int64)


@pytest.mark.parametrize("name", models.ARCHITECTURES)
def test_packed_steps_answer_as_two_arrays_do(name, rng):
    spec, params, packed, separate = _models(name, 6, 3)
    for _ in range(3):
        active = rng.choice(list(params), size=rng.integers(1, 7), replace=False)
        ids = list(rng.choice(active, size=int(rng.integers(1, 20))))
        x = spec.random_input(rng, len(ids))
        got = packed.predict(ids, x)
        assert rel_error(got, reference_predict(spec.apply_fn, params, ids, x)) < 1e-5
        np.testing.assert_allclose(got, separate.predict(ids, x), rtol=1e-5, atol=1e-6)
    keys = packed.programs.keys()
    assert any(key.packed for key in keys) and all(key.packed or key.whole_store for key in keys)
    assert not any(key.packed for key in separate.programs.keys())


@pytest.mark.parametrize("name", models.IMAGE_ARCHITECTURES)
def test_packed_uint8_pixel_rows_answer_as_the_reference(name, rng):
    spec = models.make(name, "tiny", pixels=True)
    params = {f"t{i}": spec.init(300 + i) for i in range(3)}
    mt = MultiTenantModel(spec.apply_fn, params["t0"], capacity=4, buckets=POLICY, pack_inputs=True)
    for tenant, p in params.items():
        mt.add_tenant(tenant, p)
    ids = [f"t{i}" for i in rng.integers(3, size=7)]
    x = spec.random_input(rng, len(ids))
    assert x.dtype == np.uint8
    assert rel_error(mt.predict(ids, x), reference_predict(spec.apply_fn, params, ids, x)) < 1e-5


def test_after_warmup_packed_steps_compile_nothing(rng):
    spec, params, mt, _ = _models("mlp", 10, 4, row_shape=tiny_spec("mlp").input_shape, row_dtype=tiny_spec("mlp").input_dtype)
    assert mt.warmup() == len(POLICY.shapes)
    compiled = mt.stats()["compiles"]
    for _ in range(20):
        active = rng.choice(list(params), size=rng.integers(1, 11), replace=False)
        ids = list(rng.choice(active, size=int(rng.integers(1, 60))))
        x = spec.random_input(rng, len(ids))
        assert rel_error(mt.predict(ids, x), reference_predict(spec.apply_fn, params, ids, x)) < 1e-5
    assert mt.stats()["compiles"] == compiled and mt.stats()["cache_misses"] == 0


def test_run_step_packs_a_host_block_and_sends_a_device_block_as_it_is(rng):
    """A block already on the device (a server's staged rows) runs the program that takes
    slots and rows apart, which ``warmup(device_rows=True)`` builds; both answer alike."""
    spec, params, mt, _ = _models("mlp", 5, 6, row_shape=tiny_spec("mlp").input_shape, row_dtype=tiny_spec("mlp").input_dtype)
    mt.warmup()
    built = mt.warmup(device_rows=True)
    assert built == len(POLICY.shapes)  # the ladder again, for device blocks
    assert mt.warmup(device_rows=True) == 0
    ids = ["t3", "t0", "t3", "t1"]
    x = spec.random_input(rng, len(ids))
    (step,) = mt.dispatch(ids, x).plan.steps
    misses = mt.stats()["cache_misses"]
    with mt.store.lock:
        from_host = np.asarray(mt.run_step(step, x[step.row_index]))
        from_device = np.asarray(mt.run_step(step, jax.device_put(x[step.row_index])))
    assert mt.stats()["cache_misses"] == misses
    np.testing.assert_allclose(from_host, from_device, rtol=1e-6, atol=1e-6)
    got = np.empty((len(ids), *from_host.shape[2:]), from_host.dtype)
    got[step.out_rows] = from_host.reshape(-1, *from_host.shape[2:])[step.out_positions]
    assert rel_error(got, reference_predict(spec.apply_fn, params, ids, x)) < 1e-5


def test_packing_defaults_to_devices_other_than_the_cpu():
    spec = tiny_spec("mlp")
    mt = MultiTenantModel(spec.apply_fn, spec.init(0), capacity=2, buckets=POLICY)
    assert mt._packs_host_rows == (mt.store.device.platform != "cpu")


@pytest.mark.parametrize("stage_inputs", [False, True])
def test_a_scheduler_over_a_packing_model_matches_the_reference_and_compiles_nothing_after_warmup(stage_inputs):
    """Requests' rows reach the packed buffer straight from each request (``RowParts``); with
    staged rows, steps whose rows are on the device take the other program, warmed up too."""
    params = {f"t{i}": make_params(10 + i) for i in range(5)}
    mt = jaxmt.MultiTenantModel(apply_fn, make_params(0), capacity=5, buckets=BucketPolicy.powers_of_two(4, 4),
                                row_shape=(rows(np.random.default_rng(0)).shape[1],), row_dtype=np.float32, pack_inputs=True)
    for name, p in params.items():
        mt.add_tenant(name, p)
    with jaxmt.Scheduler(mt, max_delay_ms=0.5, overload_policy="serve_late", stage_inputs=stage_inputs) as server:
        server.warmup()
        compiled = mt.programs.compiles
        results = submit_from_threads(server, params, requests=60, seed=7)
        assert mt.programs.compiles == compiled
    for tenant, x, y in results:
        np.testing.assert_allclose(y, reference_predict(apply_fn, params, [tenant] * len(x), x), rtol=1e-5, atol=1e-5)
    assert {key.packed for key in mt.programs.keys() if not key.whole_store} == ({True, False} if stage_inputs else {True})


def test_a_sharded_model_refuses_to_pack():
    from jaxmt.sharding import ShardedMultiTenantModel, tenant_mesh

    spec = tiny_spec("mlp")
    with pytest.raises(ValueError, match="pack_inputs"):
        ShardedMultiTenantModel(spec.apply_fn, spec.init(0), capacity=2, mesh=tenant_mesh(), pack_inputs=True)
    assert not ShardedMultiTenantModel(spec.apply_fn, spec.init(0), capacity=2, mesh=tenant_mesh())._packs_host_rows
