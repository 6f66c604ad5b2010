"""MultiTenantModel.predict equals each tenant's own apply, for every architecture of the zoo."""

from __future__ import annotations

import dataclasses
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import reference_predict, rel_error, tiny_spec

import jaxmt
import models
from jaxmt import BucketPolicy, InputError, MultiTenantModel, UnknownTenantError

POLICY = BucketPolicy.powers_of_two(8, 4)


def _model_with_tenants(name: str, n_tenants: int, seed: int, *, declare_rows: bool = False):
    spec = tiny_spec(name)
    params = {f"t{i}": spec.init(seed * 1000 + i) for i in range(n_tenants)}
    rows = dict(row_shape=spec.input_shape, row_dtype=spec.input_dtype) if declare_rows else {}
    mt = MultiTenantModel(spec.apply_fn, params["t0"], capacity=n_tenants, buckets=POLICY, **rows)
    for tenant, p in params.items():
        mt.add_tenant(tenant, p)
    return spec, mt, params


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", models.ARCHITECTURES)
def test_predict_equals_per_tenant_reference(name, seed):
    spec, mt, params = _model_with_tenants(name, 6, seed)
    rng = np.random.default_rng(seed)
    for _ in range(3):
        active = rng.choice(list(params), size=rng.integers(1, 6), replace=False)
        n = int(rng.integers(1, 14))
        ids = list(rng.choice(active, size=n))
        x = spec.random_input(rng, n)
        got = mt.predict(ids, x)
        want = reference_predict(spec.apply_fn, params, ids, x)
        assert got.shape == want.shape and got.dtype == want.dtype
        assert rel_error(got, want) < 1e-5, name


@pytest.mark.parametrize("name", models.IMAGE_ARCHITECTURES)
def test_predict_of_a_uint8_pixel_model_equals_per_tenant_reference(name, rng):
    """Pixel models (uint8 rows, mapped to floats inside the program) batch like any other;
    float rows are refused with the dtype the model takes."""
    spec = models.make(name, "tiny", pixels=True)
    params = {f"t{i}": spec.init(900 + i) for i in range(4)}
    mt = MultiTenantModel(spec.apply_fn, params["t0"], capacity=4, buckets=POLICY, row_shape=spec.input_shape, row_dtype=spec.input_dtype)
    for tenant, p in params.items():
        mt.add_tenant(tenant, p)
    ids = [f"t{i}" for i in rng.integers(4, size=9)]
    x = spec.random_input(rng, len(ids))
    assert rel_error(mt.predict(ids, x), reference_predict(spec.apply_fn, params, ids, x)) < 1e-5
    with pytest.raises(InputError, match="expected uint8"):
        mt.predict(ids, x.astype(np.float32))


@pytest.mark.parametrize("name", ["mlp", "resnet18", "transformer"])
def test_answers_written_to_host_memory_equal_answers_kept_on_the_device(name, rng):
    """outputs_to_host=True (the program copies its answer out into pinned host memory)
    changes where the answer lands, not what it is; run_step's outputs then live in host memory."""
    spec = tiny_spec(name)
    params = {f"t{i}": spec.init(700 + i) for i in range(5)}
    on_host, on_device = (MultiTenantModel(spec.apply_fn, params["t0"], capacity=8, buckets=POLICY, outputs_to_host=where)
                          for where in (True, False))
    for mt in (on_host, on_device):
        for tenant, p in params.items():
            mt.add_tenant(tenant, p)
    ids = [f"t{i}" for i in rng.integers(5, size=11)]
    x = spec.random_input(rng, len(ids))
    got = on_host.predict(ids, x)
    assert rel_error(got, reference_predict(spec.apply_fn, params, ids, x)) < 1e-5
    np.testing.assert_array_equal(got, on_device.predict(ids, x))
    kinds = {leaf.sharding.memory_kind for leaf in jax.tree_util.tree_leaves(on_host.dispatch(ids, x).outputs)}
    assert kinds == {"pinned_host"}
    assert on_device.output_sharding is None


def test_answers_go_to_pinned_host_memory_by_default_only_on_a_gpu():
    """outputs_to_host=None (the default) picks pinned host memory where it was measured to
    pay, a GPU; a CPU device keeps its answers where they are."""
    spec = tiny_spec("mlp")
    mt = MultiTenantModel(spec.apply_fn, spec.init(0), capacity=2, buckets=POLICY)
    device = mt.store.device
    on_gpu = device.platform == "gpu" and "pinned_host" in {m.kind for m in device.addressable_memories()}
    assert (mt.output_sharding is not None) == on_gpu
    if on_gpu:
        assert mt.output_sharding.memory_kind == "pinned_host"


def test_rows_in_swapped_byte_order_are_served_like_native_rows(rng):
    """Rows read from a big-endian file are the model's dtype in another byte order: served,
    on a first request and after the rows are fixed."""
    spec, mt, params = _model_with_tenants("mlp", 3, 8)
    ids = ["t2", "t0", "t2"]
    x = spec.random_input(rng, len(ids))
    swapped = x.astype(x.dtype.newbyteorder(">" if x.dtype.isnative and np.little_endian else "<"))
    assert not swapped.dtype.isnative
    want = reference_predict(spec.apply_fn, params, ids, x)
    for _ in range(2):
        assert rel_error(mt.predict(ids, swapped), want) < 1e-5
    assert mt.row_dtype == x.dtype


def test_rows_beyond_the_largest_buckets_are_split_not_rejected(rng):
    spec, mt, params = _model_with_tenants("mlp", 12, 3)
    ids = list(rng.choice(list(params), size=150))  # 12 tenants > 8 per step, ~12 rows > 4 per entry
    x = spec.random_input(rng, 150)
    got = mt.predict(ids, x)
    assert rel_error(got, reference_predict(spec.apply_fn, params, ids, x)) < 1e-5
    assert mt.stats()["steps"] >= 2


def test_compiles_are_bounded_by_the_ladder_and_zero_after_warmup(rng):
    spec, mt, params = _model_with_tenants("mlp", 10, 4, declare_rows=True)
    assert mt.warmup(progress=False) == len(POLICY.shapes)
    compiled = mt.stats()["compiles"]
    for _ in range(25):
        active = rng.choice(list(params), size=rng.integers(1, 11), replace=False)
        n = int(rng.integers(1, 60))
        mt.predict(list(rng.choice(active, size=n)), spec.random_input(rng, n))
    stats = mt.stats()
    assert stats["compiles"] == compiled  # nothing compiled after warm-up
    assert stats["cache_misses"] == 0 and stats["cache_hits"] == stats["steps"] > 0


@pytest.mark.parametrize("arch", ["mlp", "resnet18"])
@pytest.mark.parametrize("workers", [1, 3])
def test_warmup_on_worker_threads_compiles_the_whole_ladder_once(arch, workers, rng):
    spec, mt, params = _model_with_tenants(arch, 6, 4, declare_rows=True)
    assert mt.warmup(workers=workers) == len(POLICY.shapes)
    assert mt.warmup(workers=workers) == 0
    compiled = mt.stats()["compiles"]
    for _ in range(4):
        active = rng.choice(list(params), size=rng.integers(1, 7), replace=False)
        ids = list(rng.choice(active, size=int(rng.integers(1, 20))))
        x = spec.random_input(rng, len(ids))
        assert rel_error(mt.predict(ids, x), reference_predict(spec.apply_fn, params, ids, x)) < 1e-5
    assert mt.stats()["compiles"] == compiled and mt.stats()["cache_misses"] == 0


def test_a_store_grown_while_warmup_compiles_keeps_no_programs_of_the_old_capacity(rng):
    """Other threads double the store and serve from it after warmup took its program keys
    and before it compiles them: the programs warmup then builds for the old capacity can
    never run, so none stay cached."""
    spec, mt, params = _model_with_tenants("mlp", 4, 22, declare_rows=True)
    ensure_many = mt.programs.ensure_many
    ids = ["t4", "t0", "t4"]

    def grown_and_served_meanwhile(keys, **kwargs):
        params["t4"] = spec.init(22_004)
        mt.add_tenant("t4", params["t4"])  # capacity 4 -> 8
        mt.predict(ids, spec.random_input(rng, len(ids)))
        return ensure_many(keys, **kwargs)

    mt.programs.ensure_many = grown_and_served_meanwhile
    mt.warmup(tenant_buckets=[1, 2], row_buckets=[1], execute=False)
    del mt.programs.ensure_many
    x = spec.random_input(rng, len(ids))
    assert rel_error(mt.predict(ids, x), reference_predict(spec.apply_fn, params, ids, x)) < 1e-5
    assert mt.store.capacity == 8
    assert {key.capacity for key in mt.programs._programs} == {8}


def test_warmup_runs_every_program_once_so_first_requests_pay_no_first_run(rng):
    spec, mt, params = _model_with_tenants("mlp", 4, 21, declare_rows=True)
    runs: dict = {}
    build = mt.programs._build

    def counting_build(key):
        program = build(key)

        def run(*args):
            runs[key] = runs.get(key, 0) + 1
            return program(*args)

        return run

    mt.programs._build = counting_build
    built = mt.warmup()
    assert built == len(mt.programs) and set(runs) == set(mt.programs._programs) and set(runs.values()) == {1}
    assert any(key.whole_store for key in runs)  # capacity 4 is on the ladder: its whole-store program ran too
    assert (mt.stats()["cache_hits"], mt.stats()["cache_misses"]) == (0, 0)
    mt.warmup(execute=False)
    assert set(runs.values()) == {1}
    ids = ["t1", "t3", "t0"]
    x = spec.random_input(rng, 3)
    assert rel_error(mt.predict(ids, x), reference_predict(spec.apply_fn, params, ids, x)) < 1e-5


def test_a_random_workload_compiles_at_most_the_ladder(rng):
    spec, mt, params = _model_with_tenants("mlp", 10, 5)
    for _ in range(30):
        active = rng.choice(list(params), size=rng.integers(1, 11), replace=False)
        n = int(rng.integers(1, 60))
        mt.predict(list(rng.choice(active, size=n)), spec.random_input(rng, n))
    assert mt.stats()["compiles"] <= len(POLICY.tenant_buckets) * len(POLICY.row_buckets)


@pytest.mark.parametrize("whole_store_steps", [True, False])
def test_with_the_capacity_on_the_ladder_whole_store_steps_add_one_program_per_row_bucket(whole_store_steps, rng):
    """Capacity 4 is a tenant bucket, so steps over every tenant in slot order may run the
    gather-free program: at most len(B ladder) programs more than the ladder, none with the
    option off, and every answer equal to the reference either way."""
    spec = tiny_spec("mlp")
    params = {f"t{i}": spec.init(60 + i) for i in range(4)}
    mt = MultiTenantModel(spec.apply_fn, params["t0"], capacity=4, buckets=POLICY, whole_store_steps=whole_store_steps)
    for tenant, p in params.items():
        mt.add_tenant(tenant, p)
    ladder = len(POLICY.tenant_buckets) * len(POLICY.row_buckets)
    for i in range(40):
        active = list(params) if i % 4 == 0 else list(rng.choice(list(params), size=rng.integers(1, 5), replace=False))
        ids = [t for t in active for _ in range(int(rng.integers(1, 5)))] if i % 4 == 0 else list(rng.choice(active, size=int(rng.integers(1, 20))))
        x = spec.random_input(rng, len(ids))
        assert rel_error(mt.predict(ids, x), reference_predict(spec.apply_fn, params, ids, x)) < 1e-5
    whole = sum(key.whole_store for key in mt.programs.keys())
    assert (whole > 0) == whole_store_steps and whole <= len(POLICY.row_buckets)
    assert mt.stats()["compiles"] <= ladder + (len(POLICY.row_buckets) if whole_store_steps else 0)


def test_tenants_without_rows_are_not_computed(rng):
    spec, mt, params = _model_with_tenants("mlp", 8, 6)
    x = spec.random_input(rng, 3)
    mt.predict(["t1", "t1", "t1"], x)
    stats = mt.stats()
    assert stats["steps"] == 1 and stats["padded_rows"] == 4  # K=1, B=4: one tenant only


def test_add_update_remove_take_effect(rng):
    spec, mt, params = _model_with_tenants("mlp", 3, 7)
    x = spec.random_input(rng, 4)
    new = spec.init(99)
    mt.update_tenant("t1", new)
    params["t1"] = new
    mt.remove_tenant("t2")
    mt.add_tenant("t9", spec.init(98))
    params["t9"] = spec.init(98)
    ids = ["t1", "t9", "t0", "t1"]
    assert rel_error(mt.predict(ids, x), reference_predict(spec.apply_fn, params, ids, x)) < 1e-5
    assert mt.tenants == ["t0", "t1", "t9"]
    with pytest.raises(UnknownTenantError, match="'t2'"):
        mt.predict(["t2"], x[:1])


def _stats_without_timing(mt):
    return {k: v for k, v in mt.stats().items() if k != "compile_seconds"}


@pytest.mark.parametrize(
    "ids, make_x, error, message",
    [
        (["t0", "nope"], lambda x: x[:2], UnknownTenantError, "'nope'"),
        (["t0", "t1", "t0"], lambda x: x[:2], InputError, "len\\(tenant_ids\\) is 3 but x has 2 rows"),
        (["t0"], lambda x: x[:1, :-1], InputError, "shape"),
        (["t0"], lambda x: x[:1, None], InputError, "shape"),
        (["t0"], lambda x: x[:1].astype(np.float64), InputError, "dtype float64, expected float32"),
        ("t0", lambda x: x[:1], InputError, "sequence"),
    ],
)
def test_bad_requests_raise_and_change_nothing(rng, ids, make_x, error, message):
    spec, mt, params = _model_with_tenants("mlp", 2, 8)
    x = spec.random_input(rng, 4)
    mt.predict(["t0", "t1"], x[:2])
    before = _stats_without_timing(mt)
    with pytest.raises(error, match=message):
        mt.predict(ids, make_x(x))
    assert _stats_without_timing(mt) == before
    assert rel_error(mt.predict(["t1"], x[:1]), reference_predict(spec.apply_fn, params, ["t1"], x[:1])) < 1e-5


def test_empty_request_returns_empty_result(rng):
    spec, mt, _ = _model_with_tenants("mlp", 2, 9)
    y = mt.predict([], spec.random_input(rng, 1)[:0])
    assert y.shape == (0, spec.num_classes) and y.dtype == np.float32
    assert mt.stats()["steps"] == 0
    mt.predict(["t0"], spec.random_input(rng, 1))  # rows fixed: [] is no rows (of no shape to be wrong)
    for empty in ([], np.zeros((0,)), ()):
        y = mt.predict([], empty)
        assert y.shape == (0, spec.num_classes) and y.dtype == np.float32
    assert mt.stats()["steps"] == 1


@pytest.mark.parametrize("bad", ["unknown tenant", "rows the model cannot take"])
def test_first_bad_request_does_not_fix_the_row_shape(rng, bad):
    spec, mt, _ = _model_with_tenants("mlp", 2, 10)
    if bad == "unknown tenant":
        with pytest.raises(UnknownTenantError, match="ghost"):
            mt.predict(["ghost"], spec.random_input(rng, 1))
    else:  # traced before anything is compiled: an InputError, not a compile failure
        with pytest.raises(InputError, match=r"shape \[99\].*do not fit the model"):
            mt.predict(["t0"], np.ones((1, 99), np.float32))
        assert mt.stats()["compiles"] == 0
    assert mt.row_shape is None
    mt.predict(["t0"], spec.random_input(rng, 1))
    assert mt.row_shape == spec.input_shape


def test_stats_report_counters_and_bytes(rng):
    spec, mt, params = _model_with_tenants("mlp", 4, 11)
    mt.predict(["t0", "t1", "t1"], spec.random_input(rng, 3))
    stats = mt.stats()
    for key in ("compiles", "cache_hits", "cache_misses", "compile_seconds", "padding_waste", "resident_tenants", "param_bytes"):
        assert key in stats
    n_params = sum(np.size(leaf) for leaf in jax.tree.leaves(params["t0"]))
    assert stats["bytes_per_tenant"] == 4 * n_params and stats["resident_tenants"] == 4
    assert stats["padding_waste"] == pytest.approx(1 - 3 / 4)


def test_warmup_validates_buckets_and_needs_row_shape():
    spec, mt, _ = _model_with_tenants("mlp", 2, 12)
    with pytest.raises(InputError, match="row shape"):
        mt.warmup()
    mt2 = MultiTenantModel(spec.apply_fn, spec.init(0), buckets=POLICY, row_shape=spec.input_shape, row_dtype=spec.input_dtype)
    with pytest.raises(ValueError, match="not on the ladder"):
        mt2.warmup(tenant_buckets=[3])
    assert mt2.warmup(tenant_buckets=[2], row_buckets=[1, 2]) == 2


def test_from_flax_linen_with_batch_stats(rng):
    spec = tiny_spec("resnet18")
    variables = {i: spec.init(100 + i) for i in range(3)}
    assert "batch_stats" in variables[0]
    mt = MultiTenantModel.from_flax(spec.module, variables, buckets=POLICY)
    ids = [2, 0, 2, 1]
    x = spec.random_input(rng, 4)
    assert rel_error(mt.predict(ids, x), reference_predict(spec.apply_fn, variables, ids, x)) < 1e-5


def test_from_flax_nnx(rng):
    from flax import nnx

    class Classifier(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.hidden = nnx.Linear(5, 7, rngs=rngs)
            self.out = nnx.Linear(7, 3, rngs=rngs)

        def __call__(self, x):
            return self.out(nnx.gelu(self.hidden(x)))

    tenants = {f"m{i}": Classifier(nnx.Rngs(i)) for i in range(3)}
    mt = MultiTenantModel.from_flax(Classifier(nnx.Rngs(0)), tenants, buckets=POLICY)
    x = rng.normal(size=(6, 5)).astype(np.float32)
    ids = ["m2", "m0", "m1", "m1", "m2", "m2"]
    want = np.stack([np.asarray(tenants[t](x[i : i + 1]))[0] for i, t in enumerate(ids)])
    assert rel_error(mt.predict(ids, x), want) < 1e-5


def test_public_surface():
    for name in ("MultiTenantModel", "BucketPolicy", "TenantStore", "UnknownTenantError", "InputError", "ParamMismatchError"):
        assert name in jaxmt.__all__ and hasattr(jaxmt, name)


def test_a_step_over_the_whole_store_skips_the_gather_and_stays_exact(rng):
    spec, mt, params = _model_with_tenants("mlp", 4, 13)  # capacity 4 == tenant bucket 4
    ids = ["t3", "t0", "t2", "t1", "t1", "t3"]
    x = spec.random_input(rng, len(ids))
    assert rel_error(mt.predict(ids, x), reference_predict(spec.apply_fn, params, ids, x)) < 1e-5
    assert any(key.whole_store for key in mt.programs._programs)
    # A server-style step with its slots and rows already on the device takes the same
    # program (decided from the plan, not by reading the slots back) and stays exact.
    (step,) = mt.dispatch(ids, x).plan.steps
    assert step.slots_in_order
    on_device = dataclasses.replace(step, slots=jax.device_put(step.slots))
    misses = mt.stats()["cache_misses"]
    with mt.store.lock:
        y_kb = np.asarray(mt.run_step(on_device, jax.device_put(x[step.row_index])))
    assert mt.stats()["cache_misses"] == misses
    got = np.empty_like(np.asarray(mt.predict(ids, x)))
    got[step.out_rows] = y_kb.reshape(-1, *y_kb.shape[2:])[step.out_positions]
    assert rel_error(got, reference_predict(spec.apply_fn, params, ids, x)) < 1e-5
    mt.remove_tenant("t2")  # three tenants now: a gathered step again, still exact
    ids = ["t3", "t0", "t1"]
    assert rel_error(mt.predict(ids, x[:3]), reference_predict(spec.apply_fn, params, ids, x[:3])) < 1e-5


def test_by_default_nonfinite_inputs_are_computed_unchecked_and_stay_in_their_tenant(rng):
    spec, mt, params = _model_with_tenants("mlp", 3, 14)
    x = spec.random_input(rng, 4)
    x[1, 0] = np.nan  # tenant t1's row
    ids = ["t0", "t1", "t2", "t0"]
    got = mt.predict(ids, x)
    assert np.isnan(got[1]).any() and np.isfinite(got[[0, 2, 3]]).all()
    keep = [0, 2, 3]
    want = reference_predict(spec.apply_fn, params, [ids[i] for i in keep], x[keep])
    assert rel_error(got[keep], want) < 1e-5
    assert mt.stats()["nonfinite_rows"] == 0  # not looked for under "ignore"


def test_two_first_requests_of_different_rows_at_once_one_fixes_them_the_other_gets_input_error(rng):
    """Both pass the checks made before the store lock while the rows are unknown; the one
    that takes the lock second finds them fixed and is refused, not run on the wrong program."""
    mt = MultiTenantModel(lambda p, x: x * p["s"], {"s": jnp.float32(1.0)}, capacity=2, lowering="vmap")
    mt.add_tenant("a", {"s": jnp.float32(2.0)})
    checked, go_on = threading.Event(), threading.Event()
    check = mt.check_input

    def check_then_wait(ids, x):
        x = check(ids, x)
        checked.set()
        assert go_on.wait(60)
        return x

    mt.check_input = check_then_wait
    outcome = {}

    def second():
        try:
            outcome["y"] = mt.predict(["a"], np.ones((1, 4), np.float32))
        except Exception as exc:  # noqa: BLE001 (the test reads which)
            outcome["error"] = exc

    thread = threading.Thread(target=second)
    thread.start()
    assert checked.wait(60)
    del mt.check_input  # the first request runs unhindered and fixes rows of 3
    x = rng.standard_normal((2, 3)).astype(np.float32)
    np.testing.assert_allclose(mt.predict(["a", "a"], x), 2 * x, rtol=1e-6)
    go_on.set()
    thread.join(60)
    assert isinstance(outcome.get("error"), InputError), outcome
    assert "shape [4], expected [3]" in str(outcome["error"])
    assert mt.row_shape == (3,)


@pytest.mark.parametrize("buckets", [{"tenant_buckets": [2.0]}, {"row_buckets": [True]}, {"tenant_buckets": ["2"]}])
def test_warmup_refuses_bucket_values_that_are_not_integers_before_compiling_anything(buckets):
    """2.0 and True compare equal to rungs of the ladder, but a program of such a key does not
    build (or runs on a bool shape): refused as values off the ladder, with nothing compiled."""
    spec = tiny_spec("mlp")
    mt = MultiTenantModel(spec.apply_fn, spec.init(0), buckets=POLICY, row_shape=spec.input_shape, row_dtype=spec.input_dtype)
    with pytest.raises(ValueError, match=r"not on the ladder"):
        mt.warmup(**buckets)
    assert mt.stats()["compiles"] == 0 and mt.stats()["compile_failures"] == 0


def test_warmup_takes_numpy_integer_buckets_as_rungs_of_the_ladder():
    spec = tiny_spec("mlp")
    mt = MultiTenantModel(spec.apply_fn, spec.init(0), buckets=POLICY, row_shape=spec.input_shape, row_dtype=spec.input_dtype)
    assert mt.warmup(tenant_buckets=np.array([1, 2]), row_buckets=[np.int64(2)], execute=False) == 2


def test_a_python_number_leaf_is_stored_as_float32_so_answers_take_the_promoted_dtype(rng):
    """README: a leaf given as a Python number is not JAX's weakly typed scalar once stored,
    so bfloat16 rows times it answer in float32 (apply_fn alone would keep bfloat16); the
    values still equal the per-tenant reference."""
    def apply_fn(params, x):
        return x * params["scale"]

    mt = MultiTenantModel(apply_fn, {"scale": 1.0})
    mt.add_tenant("a", {"scale": 3.0})
    x = rng.standard_normal((3, 4)).astype(jnp.bfloat16)
    got = mt.predict(["a"] * 3, x)
    assert mt.get_params("a")["scale"].dtype == np.float32
    assert apply_fn({"scale": 3.0}, jnp.asarray(x)).dtype == jnp.bfloat16
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, np.asarray(x, np.float32) * 3.0, rtol=1e-6)


def test_row_shape_without_row_dtype_names_what_was_given():
    spec = tiny_spec("mlp")
    with pytest.raises(ValueError, match=r"together, or neither; got row_shape=\(3,\) and row_dtype=None"):
        jaxmt.MultiTenantModel(spec.apply_fn, spec.init(0), row_shape=(3,))
