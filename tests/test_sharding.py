"""The tenant axis over a device mesh: same answers as one device, weights stay where they live.

Tests named ``test_multi_device_*`` need several devices. On a one-device host,
``test_subprocess_runs_the_multi_device_tests`` reruns them in a child pytest with 8 forced
CPU devices (``XLA_FLAGS`` must be set before JAX starts, so it cannot be done in-process).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import reference_predict, rel_error, tiny_spec
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxmt
from jaxmt import BucketPolicy, CapacityError, ParamMismatchError, ShardedMultiTenantModel, TenantStore, tenant_mesh
from jaxmt.jax_compat import single_device_sharding
from jaxmt.sharding import make_sharded_plan, pick_free_slot, renumber_slot

POLICY = BucketPolicy.powers_of_two(8, 8)
ROOT = Path(__file__).resolve().parent.parent
FORCED_DEVICES = 8
COLLECTIVES = ("all-gather", "all-to-all", "collective-permute", "all-reduce", "reduce-scatter")

multi_device = pytest.mark.skipif(
    jax.device_count() < 2, reason="needs several devices (test_subprocess_runs_the_multi_device_tests runs it)"
)


def _sharded_model(name: str, n_tenants: int, seed: int, *, mesh: Mesh | None = None, capacity: int | None = None, **kw):
    spec = tiny_spec(name)
    params = {f"t{i}": spec.init(seed * 1000 + i) for i in range(n_tenants)}
    mt = ShardedMultiTenantModel(spec.apply_fn, params["t0"], capacity=capacity or n_tenants, buckets=POLICY, mesh=mesh, **kw)
    for tenant, p in params.items():
        mt.add_tenant(tenant, p)
    return spec, mt, params


def _random_request(spec, params, rng, max_rows=40):
    active = rng.choice(list(params), size=rng.integers(1, len(params) + 1), replace=False)
    n = int(rng.integers(1, max_rows))
    ids = list(rng.choice(active, size=n))
    return ids, spec.random_input(rng, n)


def _assert_laid_out(mt: ShardedMultiTenantModel) -> None:
    """Every stacked leaf keeps the store sharding, each block on its own device."""
    per = mt.slots_per_device
    for leaf in mt.store.stacked_leaves:
        assert leaf.sharding == mt.store.sharding
        assert leaf.shape[0] == mt.store.capacity and mt.store.capacity % mt.devices == 0
        for shard in leaf.addressable_shards:
            start = shard.index[0].indices(leaf.shape[0])[0]
            assert shard.data.shape[0] == per
            assert shard.device == mt.store.devices[start // per]


def _assert_tenant_on_device(mt: ShardedMultiTenantModel, tenant, params) -> None:
    """The tenant's slot, read from its owner device's shard alone, holds its params."""
    per = mt.slots_per_device
    slot = mt.store.slot_of(tenant)
    device = mt.device_of(tenant)
    for leaf, want in zip(mt.store.stacked_leaves, jax.tree_util.tree_leaves(params)):
        (shard,) = [s for s in leaf.addressable_shards if s.device == device]
        np.testing.assert_array_equal(np.asarray(shard.data[slot % per]), np.asarray(want))


# ------------------------------------------------------------------ pure plans
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("devices", [1, 2, 3, 8])
def test_sharded_plan_answers_every_row_once_from_its_own_device(devices, seed):
    rng = np.random.default_rng(seed)
    per = int(rng.integers(1, 6))
    n = int(rng.integers(1, 200))
    slots = rng.integers(0, devices * per, size=n)
    plan = make_sharded_plan(slots, POLICY, devices, per)
    answered = np.concatenate([step.out_rows for step in plan.steps])
    assert sorted(answered.tolist()) == list(range(n))
    for step in plan.steps:
        k, b = step.tenant_bucket // devices, step.row_bucket
        assert step.tenant_bucket == devices * k and k in POLICY.tenant_buckets and b in POLICY.row_buckets
        block_of_entry = np.arange(step.tenant_bucket) // k
        assert np.array_equal(step.slots // per, block_of_entry), "an entry sits in another device's block"
        flat_rows = step.row_index.reshape(-1)
        assert np.array_equal(flat_rows[step.out_positions], step.out_rows)
        entry = step.out_positions // b
        assert np.array_equal(step.slots[entry], slots[step.out_rows]), "a row is computed with another tenant's slot"


def test_sharded_plan_of_nothing_is_empty():
    plan = make_sharded_plan(np.zeros(0, np.int64), POLICY, 4, 2)
    assert plan.steps == () and plan.rows == 0


@pytest.mark.parametrize("free, per, want", [([0, 1, 2, 3, 4, 5], 3, 0), ([1, 2, 4, 5], 3, 1), ([1, 2, 3, 4, 5], 3, 3), ([2, 5, 7, 8], 3, 7), ([5], 3, 5)])
def test_new_tenants_go_to_the_device_with_most_free_slots(free, per, want):
    assert pick_free_slot(free, per) == want


@pytest.mark.parametrize("slot, old_per, new_per, want", [(0, 2, 4, 0), (1, 2, 4, 1), (2, 2, 4, 4), (5, 2, 4, 9), (3, 4, 8, 3), (7, 4, 8, 11)])
def test_growth_renumbers_slots_within_their_device(slot, old_per, new_per, want):
    assert renumber_slot(slot, old_per, new_per) == want


# -------------------------------------------------------- any device count
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", ["mlp", "resnet18"])
def test_predict_on_a_mesh_equals_the_per_tenant_reference(name, seed):
    spec, mt, params = _sharded_model(name, 5, seed)
    rng = np.random.default_rng(seed)
    for _ in range(3):
        ids, x = _random_request(spec, params, rng)
        got = mt.predict(ids, x)
        want = reference_predict(spec.apply_fn, params, ids, x)
        assert got.shape == want.shape and got.dtype == want.dtype
        assert rel_error(got, want) < 1e-5
    _assert_laid_out(mt)


def test_bad_configurations_raise():
    spec = tiny_spec("mlp")
    example = spec.init(0)
    with pytest.raises(TypeError, match="mesh=, not device="):
        ShardedMultiTenantModel(spec.apply_fn, example, device=jax.devices()[0])
    two_axes = Mesh(np.asarray(jax.devices()[:1], dtype=object).reshape(1, 1), ("a", "b"))
    with pytest.raises(ValueError, match="1-D"):
        ShardedMultiTenantModel(spec.apply_fn, example, mesh=two_axes)
    with pytest.raises(ValueError, match="at least one device"):
        tenant_mesh([])
    with pytest.raises(ValueError, match="give device or sharding"):
        TenantStore(example, sharding=NamedSharding(tenant_mesh(), P("tenants")), device=jax.devices()[0])
    with pytest.raises(TypeError, match="NamedSharding"):
        TenantStore(example, sharding=single_device_sharding(jax.devices()[0]))


def test_public_surface():
    for name in ("ShardedMultiTenantModel", "tenant_mesh"):
        assert name in jaxmt.__all__ and hasattr(jaxmt, name)


# -------------------------------------------------------- several devices
@multi_device
@pytest.mark.parametrize("name, seed", [("mlp", 0), ("mlp", 1), ("resnet18", 2)])
def test_multi_device_predict_equals_reference_without_moving_weights(name, seed):
    n_devices = jax.device_count()
    spec, mt, params = _sharded_model(name, n_devices + 3, seed)
    rng = np.random.default_rng(seed)
    for _ in range(2):
        ids, x = _random_request(spec, params, rng)
        assert rel_error(mt.predict(ids, x), reference_predict(spec.apply_fn, params, ids, x)) < 1e-5
    stats = mt.stats()
    assert stats["devices"] == n_devices
    assert stats["max_device_tenants"] - stats["min_device_tenants"] <= 1, "tenants are not spread evenly"
    _assert_laid_out(mt)
    for tenant, p in params.items():
        _assert_tenant_on_device(mt, tenant, p)
    for program in mt.programs._programs.values():  # no step moves weights (or anything) between devices
        hlo = program.as_text()
        assert not [op for op in COLLECTIVES if op in hlo], "the step program communicates between devices"


@multi_device
def test_multi_device_warmup_on_worker_threads_then_no_compiles(rng):
    spec, mt, params = _sharded_model("mlp", jax.device_count() + 1, 4, row_shape=tiny_spec("mlp").input_shape,
                                      row_dtype=tiny_spec("mlp").input_dtype)
    built = mt.warmup(workers=3)
    assert built > 0 and mt.warmup(workers=3) == 0
    for _ in range(3):
        ids, x = _random_request(spec, params, rng)
        assert rel_error(mt.predict(ids, x), reference_predict(spec.apply_fn, params, ids, x)) < 1e-5
    assert mt.stats()["compiles"] == built and mt.stats()["cache_misses"] == 0
    for tenant, p in params.items():  # a slot read from the sharded store is the tenant's own params
        np.testing.assert_array_equal(
            np.concatenate([np.ravel(a) for a in jax.tree_util.tree_leaves(mt.get_params(tenant))]),
            np.concatenate([np.ravel(a) for a in jax.tree_util.tree_leaves(p)]),
        )


@multi_device
def test_multi_device_growth_keeps_each_tenant_on_its_device(rng):
    n_devices = jax.device_count()
    spec, mt, params = _sharded_model("mlp", n_devices, 2, capacity=n_devices)
    before = {t: mt.device_of(t) for t in params}
    version = mt.store.version
    more = {f"u{i}": spec.init(500 + i) for i in range(2 * n_devices + 1)}  # grows twice: 1 -> 2 -> 4 slots per device
    for tenant, p in more.items():
        mt.add_tenant(tenant, p)
    params.update(more)
    assert mt.store.capacity == 4 * n_devices and mt.store.version > version
    assert {t: mt.device_of(t) for t in before} == before, "growth moved a tenant to another device"
    _assert_laid_out(mt)
    for tenant, p in params.items():
        _assert_tenant_on_device(mt, tenant, p)
        np.testing.assert_array_equal(
            np.concatenate([np.ravel(a) for a in jax.tree_util.tree_leaves(mt.get_params(tenant))]),
            np.concatenate([np.ravel(a) for a in jax.tree_util.tree_leaves(p)]),
        )
    ids, x = _random_request(spec, params, rng, max_rows=80)
    assert rel_error(mt.predict(ids, x), reference_predict(spec.apply_fn, params, ids, x)) < 1e-5


@multi_device
def test_multi_device_remove_update_and_reuse(rng):
    n_devices = jax.device_count()
    spec, mt, params = _sharded_model("mlp", 2 * n_devices, 3)
    gone = [t for t in params if mt.device_of(t) == mt.store.devices[-1]]
    for tenant in gone:
        mt.remove_tenant(tenant)
        del params[tenant]
    capacity = mt.store.capacity
    fresh = {f"n{i}": spec.init(900 + i) for i in range(len(gone))}
    for tenant, p in fresh.items():
        mt.add_tenant(tenant, p)
        assert mt.device_of(tenant) == mt.store.devices[-1], "a freed device's slots were not reused first"
    params.update(fresh)
    assert mt.store.capacity == capacity
    updated = next(iter(params))
    device = mt.device_of(updated)
    params[updated] = spec.init(4242)
    mt.update_tenant(updated, params[updated])
    assert mt.device_of(updated) == device
    _assert_tenant_on_device(mt, updated, params[updated])
    _assert_laid_out(mt)
    ids, x = _random_request(spec, params, rng)
    assert rel_error(mt.predict(ids, x), reference_predict(spec.apply_fn, params, ids, x)) < 1e-5


@multi_device
def test_multi_device_bad_params_and_full_store_change_nothing(rng):
    n_devices = jax.device_count()
    spec, mt, _ = _sharded_model("mlp", n_devices, 4, max_capacity=n_devices)
    version, tenants = mt.store.version, mt.tenants
    leaves = [np.asarray(leaf) for leaf in mt.store.stacked_leaves]
    wrong = jax.tree_util.tree_map(lambda a: a[..., :1] if a.ndim else a, spec.init(7))
    with pytest.raises(ParamMismatchError, match="tenant 'x'"):
        mt.add_tenant("x", wrong)
    with pytest.raises(CapacityError, match="max_capacity"):
        mt.add_tenant("x", spec.init(7))
    with pytest.raises(ValueError, match="not a multiple"):
        TenantStore(spec.init(0), sharding=mt.store.sharding, max_capacity=n_devices + 1)
    assert mt.store.version == version and mt.tenants == tenants
    for before, after in zip(leaves, mt.store.stacked_leaves):
        np.testing.assert_array_equal(before, np.asarray(after))
    _assert_laid_out(mt)


@multi_device
def test_multi_device_warmup_covers_the_ladder_and_a_sub_mesh_stays_on_it(rng):
    devices = jax.devices()[-2:]
    spec = tiny_spec("mlp")
    params = {f"t{i}": spec.init(50 + i) for i in range(5)}
    policy = BucketPolicy.powers_of_two(2, 4)
    mt = ShardedMultiTenantModel(
        spec.apply_fn, params["t0"], capacity=5, buckets=policy, mesh=tenant_mesh(devices),
        row_shape=spec.input_shape, row_dtype=spec.input_dtype,
    )
    for tenant, p in params.items():
        mt.add_tenant(tenant, p)
    assert mt.devices == 2 and mt.store.capacity == 6
    assert mt.warmup() == len(policy.shapes)
    compiles = mt.stats()["compiles"]
    for _ in range(6):
        ids, x = _random_request(spec, params, rng, max_rows=60)
        y = mt.dispatch(ids, x)
        assert {d for out in y.outputs for d in out.sharding.device_set} <= set(devices)
        assert rel_error(y.result(), reference_predict(spec.apply_fn, params, ids, x)) < 1e-5
    assert mt.stats()["compiles"] == compiles, "a warmed-up ladder recompiled"
    for leaf in mt.store.stacked_leaves:
        assert leaf.sharding.device_set == set(devices)


@multi_device
def test_multi_device_add_stacked_and_from_flax(rng):
    spec = tiny_spec("resnet18")
    variables = {f"f{i}": spec.init(60 + i) for i in range(5)}
    mt = ShardedMultiTenantModel.from_flax(spec.module, variables, buckets=POLICY, mesh=tenant_mesh())
    assert mt.store.capacity % jax.device_count() == 0
    stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *[spec.init(70 + i) for i in range(3)])
    if hasattr(mt.store, "add_stacked"):
        mt.store.add_stacked(["s0", "s1", "s2"], stacked)
        variables.update({f"s{i}": spec.init(70 + i) for i in range(3)})
    _assert_laid_out(mt)
    ids, x = _random_request(spec, variables, rng)
    assert rel_error(mt.predict(ids, x), reference_predict(spec.apply_fn, variables, ids, x)) < 1e-5


@multi_device
def test_multi_device_scheduler_serves_a_sharded_model_unchanged(rng):
    spec, mt, params = _sharded_model("mlp", 2 * jax.device_count(), 6)
    requests = [(str(rng.choice(list(params))), spec.random_input(rng, int(rng.integers(1, 5)))) for _ in range(24)]
    with jaxmt.Scheduler(mt, max_delay_ms=5.0, default_slo_ms=60_000.0) as scheduler:
        futures = [scheduler.submit(tenant, x) for tenant, x in requests]
        answers = [f.result(timeout=120) for f in futures]
    for (tenant, x), got in zip(requests, answers):
        assert rel_error(got, reference_predict(spec.apply_fn, params, [tenant] * len(x), x)) < 1e-5


@multi_device
@pytest.mark.parametrize("saved_on_a_mesh", [False, True])
def test_multi_device_restore_model_onto_a_mesh_spreads_the_saved_tenants(tmp_path, rng, saved_on_a_mesh):
    """A store checkpoint, saved from one device or from a mesh, restores with ``mesh=`` into
    a sharded model: same ids in the same order, each tenant's weights on its own device,
    answers equal to the per-tenant reference."""
    n = 2 * jax.device_count() + 1
    if saved_on_a_mesh:
        spec, saved, params = _sharded_model("mlp", n, 8)
    else:
        spec = tiny_spec("mlp")
        params = {f"t{i}": spec.init(8000 + i) for i in range(n)}
        saved = jaxmt.MultiTenantModel(spec.apply_fn, params["t0"], capacity=n, buckets=POLICY)
        for tenant, p in params.items():
            saved.add_tenant(tenant, p)
    path = jaxmt.save_store(saved, tmp_path / "ckpt")
    restored = jaxmt.restore_model(path, spec.apply_fn, mesh=tenant_mesh())
    assert isinstance(restored, ShardedMultiTenantModel) and restored.devices == jax.device_count()
    assert restored.tenants == saved.tenants and restored.buckets == POLICY
    _assert_laid_out(restored)
    assert len({restored.device_of(t) for t in restored.tenants}) == jax.device_count()
    for tenant in restored.tenants:
        _assert_tenant_on_device(restored, tenant, params[tenant])
    ids, x = _random_request(spec, params, rng)
    assert rel_error(restored.predict(ids, x), reference_predict(spec.apply_fn, params, ids, x)) < 1e-5


@multi_device
def test_multi_device_scheduler_fills_a_step_with_the_largest_bucket_on_every_device(rng):
    """A sharded step holds max_tenants entries per device: queued requests of that many
    tenants on each device go out as one step, not one step per max_tenants of them."""
    per_device = POLICY.max_tenants
    spec, mt, params = _sharded_model("mlp", per_device * jax.device_count(), 9)
    assert mt.max_step_entries == per_device * jax.device_count()
    tenants = list(params)
    rng.shuffle(tenants)
    scheduler = jaxmt.Scheduler(mt, max_delay_ms=60_000.0, default_slo_ms=600_000.0)
    requests = [(t, spec.random_input(rng, 1)) for t in tenants]
    futures = [scheduler.submit(t, x) for t, x in requests]
    scheduler.close(drain=True)
    for (tenant, x), future in zip(requests, futures):
        assert rel_error(future.result(timeout=120), reference_predict(spec.apply_fn, params, [tenant], x)) < 1e-5, tenant
    assert scheduler.metrics()["steps"]["steps"] == 1


# -------------------------------------------------------- the launcher
@pytest.mark.skipif(jax.device_count() > 1, reason="this process has several devices: the multi-device tests ran here")
def test_subprocess_runs_the_multi_device_tests():
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={FORCED_DEVICES}".strip()
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, "-m", "pytest", __file__, "-q", "-x", "-p", "no:cacheprovider", "-k", "multi_device and not subprocess"]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    report = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, report
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], report



@multi_device
def test_multi_device_a_failed_write_in_add_stacked_leaves_the_store_as_it_was(rng, monkeypatch):
    """add_stacked is all or nothing on a mesh too: when the copy to the second new tenant's
    device fails (device lost, out of memory) after the first tenant was written on its own
    device, the store is restored as it was and keeps serving its tenants."""
    spec, mt, params = _sharded_model("mlp", 2, 8)  # slots 0 and 1 taken: the new go to devices 2 and 3
    tenants, capacity, free = mt.tenants, mt.store.capacity, sorted(mt.store._free)
    leaves = [np.array(leaf) for leaf in mt.store.stacked_leaves]
    real, copies = jax.device_put, []

    def second_copy_to_another_device_fails(x, device=None, *args, **kwargs):
        if isinstance(device, jax.Device) and device != mt.store.device:
            copies.append(device)
            if len(copies) == 2:
                raise jax.errors.JaxRuntimeError("INTERNAL: device lost while writing")
        return real(x, device, *args, **kwargs)

    new = [spec.init(80 + i) for i in range(2)]
    with monkeypatch.context() as patch:
        patch.setattr(jax, "device_put", second_copy_to_another_device_fails)
        with pytest.raises(jax.errors.JaxRuntimeError, match="device lost"):
            mt.store.add_stacked(["n0", "n1"], jax.tree_util.tree_map(lambda *xs: np.stack(xs), *new))
    assert len(copies) == 2 and mt.tenants == tenants and mt.store.capacity == capacity
    assert sorted(mt.store._free) == free
    for before, after in zip(leaves, mt.store.stacked_leaves):
        assert not after.is_deleted() and not any(s.data.is_deleted() for s in after.addressable_shards)
        np.testing.assert_array_equal(before, np.array(after))
    ids, x = _random_request(spec, params, rng)
    assert rel_error(mt.predict(ids, x), reference_predict(spec.apply_fn, params, ids, x)) < 1e-5


@multi_device
def test_multi_device_stats_waiting_on_a_growing_store_counts_tenants_on_their_devices():
    """stats() read slots_per_device before taking the store lock: a stats() call waiting on
    the lock while another thread grew the store divided the new slot numbers by the old
    block size, counting tenants on devices that don't exist (min_device_tenants 0 while
    every device holds one)."""
    import threading
    import time

    n_devices = jax.device_count()
    _, mt, _ = _sharded_model("mlp", n_devices, 9, capacity=n_devices)  # one tenant per device
    assert (mt.stats()["max_device_tenants"], mt.stats()["min_device_tenants"]) == (1, 1)
    seen = {}
    with mt.store.lock:  # another thread is mid-change: stats() waits for it
        reader = threading.Thread(target=lambda: seen.update(mt.stats()))
        reader.start()
        time.sleep(0.5)
        mt.store.reserve(4 * n_devices)  # renumbers every slot (1 -> 4 slots per device)
    reader.join(timeout=60)
    assert seen["resident_tenants"] == n_devices and seen["capacity"] == 4 * n_devices
    assert (seen["max_device_tenants"], seen["min_device_tenants"]) == (1, 1), "stats() mixed two store layouts"


@multi_device
def test_multi_device_device_of_during_growth_names_the_tenants_own_device(monkeypatch):
    """device_of read the slot and the block size without the store lock: a growth between
    the two reads named another device than the one holding the tenant's weights."""
    import threading
    import time

    n_devices = jax.device_count()
    _, mt, params = _sharded_model("mlp", n_devices, 10, capacity=n_devices)
    tenant = list(params)[-1]  # on the last device
    want = mt.device_of(tenant)
    real_slot_of = mt.store.slot_of

    def slot_of_then_pause(tenant_id):  # widens the window between the two reads
        slot = real_slot_of(tenant_id)
        grown.wait(timeout=5)  # another thread grows the store meanwhile (unless device_of holds the lock)
        return slot

    grown = threading.Event()
    grower = threading.Thread(target=lambda: (time.sleep(0.1), mt.store.reserve(4 * n_devices), grown.set()))
    monkeypatch.setattr(mt.store, "slot_of", slot_of_then_pause)
    grower.start()
    got = mt.device_of(tenant)
    grower.join(timeout=60)
    monkeypatch.undo()
    assert mt.store.capacity == 4 * n_devices
    assert got == want == mt.device_of(tenant), f"device_of named {got}, the tenant lives on {want}"



@multi_device
def test_multi_device_stats_during_a_change_reports_one_store_state(monkeypatch):
    """stats() counted the per-device spread under the store lock but the tenants and slots
    (``MultiTenantModel.stats``) after releasing it: tenants added and a growth in between
    were reported with the old spread (more tenants resident than the devices hold, a
    device's count above its slots)."""
    import threading

    n_devices = jax.device_count()
    spec, mt, _ = _sharded_model("mlp", n_devices, 11, capacity=n_devices)  # one tenant per device, no free slot
    real_programs_stats = mt.programs.stats
    entered, changed = threading.Event(), threading.Event()

    def programs_stats_then_pause():  # widens the window between the two reads
        entered.set()
        changed.wait(timeout=5)  # another thread adds tenants meanwhile (unless stats() holds the lock)
        return real_programs_stats()

    def grow():
        entered.wait(timeout=60)
        for i in range(n_devices):  # grows to 2 slots per device, one more tenant on each
            mt.add_tenant(f"u{i}", spec.init(1100 + i))
        changed.set()

    grower = threading.Thread(target=grow)
    monkeypatch.setattr(mt.programs, "stats", programs_stats_then_pause)
    grower.start()
    seen = mt.stats()
    grower.join(timeout=60)
    monkeypatch.undo()
    assert len(mt.tenants) == 2 * n_devices
    got = tuple(seen[k] for k in ("resident_tenants", "capacity", "free_slots", "max_device_tenants", "min_device_tenants"))
    assert got in [(n_devices, n_devices, 0, 1, 1), (2 * n_devices, 2 * n_devices, 0, 2, 2)], f"stats() mixed two store states: {got}"


@multi_device
def test_multi_device_scheduler_does_not_hold_back_a_request_for_a_padding_its_step_never_has(rng):
    """The scheduler trimmed a step whose tenant entries were off the tenant ladder (3 of 1,
    2, 4) to fit the rung below, holding back its youngest request to spare padding. On a
    sharded model the ladder counts entries per device: 3 tenants on 3 devices are one
    entry each, no padding to spare, and the held-back request only waited for a second step."""
    import time

    policy = BucketPolicy.powers_of_two(4, 4)
    spec = tiny_spec("mlp")
    params = {f"t{i}": spec.init(1200 + i) for i in range(jax.device_count())}
    mt = ShardedMultiTenantModel(spec.apply_fn, params["t0"], capacity=len(params), buckets=policy,
                                 row_shape=spec.input_shape, row_dtype=spec.input_dtype)
    for tenant, p in params.items():
        mt.add_tenant(tenant, p)
    assert len({mt.device_of(t) for t in ["t0", "t1", "t2"]}) == 3
    mt.warmup()
    requests = [(t, spec.random_input(rng, 1)) for t in ["t0", "t1", "t2"]]
    with jaxmt.Scheduler(mt, max_delay_ms=1000.0, default_slo_ms=600_000.0) as scheduler:
        futures = [scheduler.submit(t, x) for t, x in requests[:2]]
        time.sleep(0.2)  # the third is younger than max_delay when the first two are due
        futures.append(scheduler.submit(*requests[2]))
        answers = [f.result(timeout=60) for f in futures]
        steps = scheduler.metrics()["steps"]
    for (tenant, x), got in zip(requests, answers):
        assert rel_error(got, reference_predict(spec.apply_fn, params, [tenant], x)) < 1e-5
    assert steps["steps"] == 1 and steps["programs_per_step"] == 1.0, steps
