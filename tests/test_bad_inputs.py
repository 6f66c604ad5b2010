"""Bad inputs: each raises its exact exception and changes nothing.

"Nothing" is checked, not assumed: the store's tenants, slots, version and every stacked
leaf; the model's counters, compiled programs and fixed input rows; the answers every other
tenant gets afterwards; and, behind a ``Scheduler``, the queue (depth, rows, finished count)
and the futures of other tenants' queued requests, which must still be pending and then be
answered right. Requests larger than the largest bucket are split, not rejected.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import reference_predict, rel_error, tiny_spec

from jaxmt import (
    BucketPolicy,
    CompileError,
    InputError,
    MultiTenantModel,
    NonFiniteParamsError,
    ParamMismatchError,
    Scheduler,
    UnknownTenantError,
)

POLICY = BucketPolicy.powers_of_two(8, 8)
ROOT = Path(__file__).resolve().parents[1]


def _served(nonfinite_inputs: str = "pass", declare_rows: bool = True, seed: int = 0):
    spec = tiny_spec("mlp")  # rows [16] float32 -> logits [10]
    params = {t: spec.init(seed * 10 + i) for i, t in enumerate("abc")}
    rows = dict(row_shape=spec.input_shape, row_dtype=spec.input_dtype) if declare_rows else {}
    mt = MultiTenantModel(spec.apply_fn, params["a"], capacity=4, buckets=POLICY, nonfinite_inputs=nonfinite_inputs, **rows)
    for tenant, p in params.items():
        mt.add_tenant(tenant, p)
    return spec, mt, params


_COUNTERS = ("steps", "rows", "padded_rows", "nonfinite_rows", "compiles", "programs", "resident_tenants", "capacity")


def _snapshot(mt: MultiTenantModel) -> dict:
    stats = mt.stats()
    return {
        "tenants": mt.tenants,
        "slots": {t: mt.store.slot_of(t) for t in mt.tenants},
        "version": mt.store.version,
        "rows": (mt.row_shape, mt.row_dtype),
        "counters": {k: stats[k] for k in _COUNTERS},
        "leaves": [np.asarray(leaf).copy() for leaf in mt.store.stacked_leaves],
    }


def _assert_unchanged(mt: MultiTenantModel, before: dict) -> None:
    after = _snapshot(mt)
    for key in ("tenants", "slots", "version", "rows", "counters"):
        assert after[key] == before[key], key
    for old, new in zip(before["leaves"], after["leaves"]):
        np.testing.assert_array_equal(old, new)


def _assert_everyone_still_served(spec, mt, params, rng) -> None:
    ids = list(rng.choice(list(params), size=9))
    x = spec.random_input(rng, 9)
    assert rel_error(mt.predict(ids, x), reference_predict(spec.apply_fn, params, ids, x)) < 1e-5


# ------------------------------------------------------------------------------ request rows
def _case(name: str, rng: np.random.Generator):
    """(tenant_ids, x, the message the InputError must contain) for one malformed request."""
    good = rng.standard_normal((3, 16), dtype=np.float32)
    cases = {
        "scalar": (["a"], np.float32(1.5), "leading row axis"),
        "rank-1": (["a", "b", "c"], good[:, 0], "expected [16]"),
        "rank-3": (["a", "b", "c"], good[:, :, None], "expected [16]"),
        "trailing-shape": (["a", "b", "c"], good[:, :15], "shape [15], expected [16]"),
        "float64": (["a", "b", "c"], good.astype(np.float64), "dtype float64, expected float32"),
        "int32": (["a", "b", "c"], (good * 10).astype(np.int32), "dtype int32, expected float32"),
        "float16": (["a", "b", "c"], good.astype(np.float16), "dtype float16, expected float32"),
        "fewer-ids": (["a", "b"], good, "len(tenant_ids) is 2 but x has 3 rows"),
        "more-ids": (["a", "b", "c", "a"], good, "len(tenant_ids) is 4 but x has 3 rows"),
        "ids-as-string": ("abc", good, "must be a sequence of ids"),
        "ids-not-a-sequence": (iter(["a", "b", "c"]), good, "must be a sequence of ids"),
        "ids-0-d-array": (np.array("a"), good[:1], "must be a sequence of ids (one per row), got a 0-d array"),
        "ids-2-d-array": (np.array([["a", "b", "c"]]), good, "got a 2-d array"),
    }
    return cases[name]


BAD_ROWS = ["scalar", "rank-1", "rank-3", "trailing-shape", "float64", "int32", "float16", "fewer-ids", "more-ids",
            "ids-as-string", "ids-not-a-sequence", "ids-0-d-array", "ids-2-d-array"]  # fmt: skip


@pytest.mark.parametrize("name", BAD_ROWS)
def test_malformed_rows_raise_input_error_and_change_nothing(name, rng):
    spec, mt, params = _served()
    mt.predict(["a"], spec.random_input(rng, 1))  # some history to keep
    before = _snapshot(mt)
    ids, x, message = _case(name, rng)
    with pytest.raises(InputError, match=re.escape(message)):
        mt.predict(ids, x)
    _assert_unchanged(mt, before)
    _assert_everyone_still_served(spec, mt, params, rng)


@pytest.mark.parametrize(
    "bad_id", [["a"], {"tenant": "a"}, {"a"}, "zz", 3], ids=["list", "dict", "set", "unknown-str", "unknown-int"]
)
def test_unhashable_or_unknown_tenant_ids_raise_unknown_tenant_and_change_nothing(bad_id, rng):
    spec, mt, params = _served()
    before = _snapshot(mt)
    with pytest.raises(UnknownTenantError) as info:
        mt.predict(["a", bad_id, "b"], spec.random_input(rng, 3))
    assert info.value.tenant_id == bad_id and repr(bad_id) in str(info.value)
    _assert_unchanged(mt, before)
    # Tenant changes with such ids: an unhashable id cannot be added, nor be resident.
    if isinstance(bad_id, (list, dict, set)):
        with pytest.raises(TypeError, match="hashable"):
            mt.add_tenant(bad_id, params["a"])
    for change in (lambda: mt.update_tenant(bad_id, params["a"]), lambda: mt.remove_tenant(bad_id)):
        with pytest.raises(UnknownTenantError):
            change()
    _assert_unchanged(mt, before)
    _assert_everyone_still_served(spec, mt, params, rng)


# ------------------------------------------------------------------------------ NaN and Inf
def _with_nonfinite(spec, rng, value: float):
    ids = ["b", "a", "c", "a", "b"]
    x = spec.random_input(rng, len(ids))
    x[3, 5] = value  # row 3, tenant "a"
    x[4, 0] = value  # row 4, tenant "b"
    return ids, x


@pytest.mark.parametrize("declare_rows", [True, False], ids=["rows-declared", "first-request"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nonfinite_rows_are_rejected_naming_the_first_row_and_tenant(value, declare_rows, rng):
    spec, mt, params = _served(nonfinite_inputs="reject", declare_rows=declare_rows)
    before = _snapshot(mt)
    ids, x = _with_nonfinite(spec, rng, value)
    with pytest.raises(InputError, match=r"row 3 \(tenant 'a'\) holds NaN or Inf values; 2 of 5 rows"):
        mt.predict(ids, x)
    _assert_unchanged(mt, before)  # a refused first request fixes no rows either
    _assert_everyone_still_served(spec, mt, params, rng)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_nonfinite_rows_pass_through_flagged_and_other_rows_are_exact(value, rng):
    spec, mt, params = _served(nonfinite_inputs="pass")
    ids, x = _with_nonfinite(spec, rng, value)
    pending = mt.dispatch(ids, x)
    got = pending.result()
    np.testing.assert_array_equal(pending.nonfinite_rows, [3, 4])
    assert mt.stats()["nonfinite_rows"] == 2
    clean = [0, 1, 2]
    want = reference_predict(spec.apply_fn, params, [ids[i] for i in clean], x[clean])
    assert rel_error(got[clean], want) < 1e-5  # the poisoned rows do not leak into their neighbours
    assert not np.isfinite(got[3:]).all(axis=-1).any()


@pytest.mark.parametrize("dtype", [np.float16, jnp.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("policy", ["reject", "pass"])
def test_nonfinite_rows_of_half_precision_inputs_are_seen(policy, dtype, rng):
    """NaN in float16 or bfloat16 rows (bfloat16 is not a NumPy inexact type) is rejected or flagged."""
    def apply_fn(params, x):
        return x @ params["w"]

    mt = MultiTenantModel(apply_fn, {"w": jnp.ones((3, 2), dtype)}, capacity=2, buckets=POLICY, nonfinite_inputs=policy)
    mt.add_tenant("a", {"w": jnp.asarray(rng.standard_normal((3, 2)), dtype)})
    x = rng.standard_normal((3, 3)).astype(dtype)
    x[1, 2] = np.nan
    if policy == "reject":
        with pytest.raises(InputError, match=r"row 1 \(tenant 'a'\) holds NaN or Inf"):
            mt.predict(["a"] * 3, x)
        assert mt.stats()["steps"] == 0
    else:
        pending = mt.dispatch(["a"] * 3, x)
        np.testing.assert_array_equal(pending.nonfinite_rows, [1])
        assert mt.stats()["nonfinite_rows"] == 1 and np.isnan(pending.result()[1]).all()


def test_integer_inputs_are_never_flagged(rng):
    spec = tiny_spec("transformer")  # token ids
    mt = MultiTenantModel(spec.apply_fn, spec.init(0), capacity=2, buckets=POLICY, nonfinite_inputs="reject")
    mt.add_tenant("a", spec.init(1))
    assert mt.predict(["a"] * 3, spec.random_input(rng, 3)).shape == (3, spec.num_classes)
    assert mt.stats()["nonfinite_rows"] == 0


@pytest.mark.skipif(jax.config.jax_enable_x64, reason="with 64-bit mode JAX keeps int64 rows as they are")
@pytest.mark.parametrize("dtype", [np.int64, np.uint64])
@pytest.mark.parametrize("declare_rows", [True, False], ids=["rows-declared", "first-request"])
def test_64_bit_integer_rows_that_int32_cannot_hold_are_refused_not_wrapped(dtype, declare_rows):
    """Without 64-bit mode JAX runs int64 rows (NumPy's default integers) as int32 (uint64 as
    uint32), wrapping what does not fit: 2**32 + 1 would be looked up as id 1. In-range
    rows are served as they are; out-of-range ones are refused, naming the row and tenant."""
    def apply_fn(p, ids):
        return p["table"][ids % 8] + (ids // 8).astype(jnp.float32)[:, None]

    params = {"table": np.arange(16, dtype=np.float32).reshape(8, 2)}
    rows = dict(row_shape=(), row_dtype=dtype) if declare_rows else {}
    mt = MultiTenantModel(apply_fn, params, capacity=2, buckets=POLICY, **rows)
    mt.add_tenant("a", params)
    with pytest.raises(InputError, match=re.escape(f"row 1 (tenant 'a') holds {2**32 + 1}")):
        mt.predict(["a", "a"], np.array([3, 2**32 + 1], dtype))
    with pytest.raises(InputError, match="cannot hold"):
        with Scheduler(mt) as scheduler:
            scheduler.submit("a", np.array([2**40], dtype))
    fine = np.array([3, 2**31 - 1 if dtype == np.int64 else 2**32 - 1], dtype)
    np.testing.assert_array_equal(mt.predict(["a", "a"], fine), apply_fn(params, fine))


def test_unknown_nonfinite_policy_is_a_value_error():
    spec = tiny_spec("mlp")
    with pytest.raises(ValueError, match="nonfinite_inputs must be one of"):
        MultiTenantModel(spec.apply_fn, spec.init(0), nonfinite_inputs="drop")


# ------------------------------------------------------------------------- first request rows
def test_a_first_request_the_model_cannot_take_is_refused_before_compiling(rng):
    spec, mt, params = _served(declare_rows=False)
    before = _snapshot(mt)
    with pytest.raises(InputError, match=r"shape \[15\] and dtype float32 do not fit the model"):  # 15 features, not 16
        mt.predict(["a", "b"], rng.standard_normal((2, 15), dtype=np.float32))
    assert mt.row_shape is None and mt.row_dtype is None
    assert mt.stats()["compiles"] == 0 and mt.stats()["compile_failures"] == 0
    _assert_unchanged(mt, before)
    _assert_everyone_still_served(spec, mt, params, rng)
    assert mt.row_shape == spec.input_shape


def test_a_first_request_whose_program_fails_to_compile_does_not_fix_the_row_shape(rng, monkeypatch):
    spec, mt, params = _served(declare_rows=False)
    before = _snapshot(mt)
    build = mt.programs._build

    def fail_once(key):
        monkeypatch.setattr(mt.programs, "_build", build)
        raise RuntimeError("RESOURCE_EXHAUSTED: out of memory while compiling")

    monkeypatch.setattr(mt.programs, "_build", fail_once)
    with pytest.raises(CompileError, match="RESOURCE_EXHAUSTED"):
        mt.predict(["a", "b"], spec.random_input(rng, 2))
    assert mt.row_shape is None and mt.row_dtype is None
    assert mt.stats()["compile_failures"] == 1
    _assert_unchanged(mt, before)
    _assert_everyone_still_served(spec, mt, params, rng)  # the next build succeeds
    assert mt.row_shape == spec.input_shape
    _assert_everyone_still_served(spec, mt, params, rng)
    assert mt.row_shape == spec.input_shape


# ------------------------------------------------------------------ outputs without the row axis
def _dense(seed: int) -> dict:
    r = np.random.default_rng(seed)
    return {"w": r.standard_normal((3, 2)).astype(np.float32)}


# apply_fns whose answer does not hold one row per input row on every output leaf's leading axis
ROWLESS_OUTPUTS = {
    "summed-over-rows": lambda p, x: (x @ p["w"]).sum(0),
    "one-scalar": lambda p, x: (x @ p["w"]).sum(),
    "rows-doubled": lambda p, x: jnp.concatenate([x @ p["w"], x @ p["w"]]),
    "weights-only": lambda p, x: p["w"],
    "a-per-tenant-leaf": lambda p, x: {"y": x @ p["w"], "norm": jnp.sum(p["w"])},
}


@pytest.mark.parametrize("name", sorted(ROWLESS_OUTPUTS))
def test_a_model_whose_output_has_no_row_axis_is_refused_at_the_first_request(name):
    """Row i of the answer is read from row i of every output leaf: an output that sums over
    the rows, or holds other than one row per input row, would be scattered into wrong
    answers (or fail reshaping them after the step ran), so the traced first request is refused."""
    mt = MultiTenantModel(ROWLESS_OUTPUTS[name], _dense(0), capacity=2, buckets=POLICY)
    mt.add_tenant("a", _dense(1))
    before = _snapshot(mt)
    with pytest.raises(InputError, match="needs one row per input row on its leading axis"):
        mt.predict(["a", "a"], np.ones((2, 3), np.float32))
    _assert_unchanged(mt, before)
    assert mt.stats()["compiles"] == 0


@pytest.mark.parametrize("declare_rows", [True, False], ids=["rows-declared", "rows-unknown"])
@pytest.mark.parametrize("name", sorted({**ROWLESS_OUTPUTS, "first-row-only": None}))
def test_no_answer_comes_back_from_a_model_whose_output_rows_differ_from_the_step_rows(name, declare_rows):
    """Declared rows are traced only with the first step, and a model that answers only its
    first row looks right for one row: the step's program, built for two rows, refuses it."""
    apply_fn = ROWLESS_OUTPUTS.get(name) or (lambda p, x: {"y": (x @ p["w"])[:1]})
    rows = dict(row_shape=(3,), row_dtype=np.float32) if declare_rows else {}
    mt = MultiTenantModel(apply_fn, _dense(0), capacity=2, buckets=POLICY, **rows)
    mt.add_tenant("a", _dense(1))
    with pytest.raises((InputError, CompileError), match=r"has shape \[.*\] for [12] input rows: every output leaf needs"):
        mt.predict(["a", "a"], np.ones((2, 3), np.float32))
    assert mt.stats()["steps"] == 0 and mt.row_shape == rows.get("row_shape")


# --------------------------------------------------------------------------- zero and huge
@pytest.mark.parametrize("declare_rows", [True, False], ids=["rows-declared", "rows-unknown"])
def test_zero_row_requests_return_zero_rows_and_compute_nothing(declare_rows, rng):
    spec, mt, params = _served(declare_rows=declare_rows)
    before = _snapshot(mt)
    got = mt.predict([], np.empty((0, *spec.input_shape), spec.input_dtype))
    assert got.shape == (0, spec.num_classes) and got.dtype == np.float32
    _assert_unchanged(mt, before)  # no step, no compile, and the row shape stays as it was
    if declare_rows:
        with pytest.raises(InputError, match=r"expected \[16\]"):
            mt.predict([], np.empty((0, 15), np.float32))
    else:
        with pytest.raises(InputError, match="do not fit the model"):
            mt.predict([], np.empty((0, 15), np.float32))
    _assert_unchanged(mt, before)
    _assert_everyone_still_served(spec, mt, params, rng)


@pytest.mark.parametrize("empty", [[], ()], ids=["list", "tuple"])
def test_an_empty_list_is_an_empty_request_whatever_the_row_shape(empty):
    """``predict([], [])``: no rows, so none of a wrong shape or dtype, for scalar rows too
    (where ``[]`` would otherwise read as a float64 array of zero scalar rows)."""
    mt = MultiTenantModel(lambda p, x: x * p["a"], {"a": np.float32(2)}, capacity=1, row_shape=(), row_dtype=np.float32)
    mt.add_tenant("t", {"a": np.float32(3)})
    got = mt.predict([], empty)
    assert got.shape == (0,) and got.dtype == np.float32
    np.testing.assert_allclose(mt.predict(["t", "t"], np.array([1, 2], np.float32)), [3, 6])
    with pytest.raises(InputError, match="dtype float64, expected float32"):  # an array says its dtype
        mt.predict([], np.zeros((0,), np.float64))


@pytest.mark.parametrize("rows", [9, 64, 257])
def test_requests_beyond_the_largest_bucket_are_split_not_rejected(rows, rng):
    spec, mt, params = _served()
    hot = ["a"] * rows  # one tenant with more rows than the largest row bucket (8)
    ids = hot + list(rng.choice(list(params), size=rows // 3))
    order = rng.permutation(len(ids))
    ids = [ids[i] for i in order]
    x = spec.random_input(rng, len(ids))
    got = mt.predict(ids, x)
    assert rel_error(got, reference_predict(spec.apply_fn, params, ids, x)) < 1e-5
    stats = mt.stats()
    assert stats["rows"] == len(ids) and stats["padded_rows"] >= len(ids)
    assert stats["steps"] >= -(-rows // (POLICY.max_rows * POLICY.max_tenants))


# ---------------------------------------------------------------------------------- params
def _missing_leaf(params):
    params = jax.tree.map(np.asarray, params)
    first_layer = sorted(params["params"])[0]
    del params["params"][first_layer]["bias"]
    return params, "bias"


def _extra_leaf(params):
    params = jax.tree.map(np.asarray, params)
    params["params"]["extra"] = {"kernel": np.ones((2, 2), np.float32)}
    return params, "extra"


def _wrong_shape(params):
    params = jax.tree.map(np.asarray, params)
    first_layer = sorted(params["params"])[0]
    params["params"][first_layer]["bias"] = params["params"][first_layer]["bias"][:-1]
    return params, "bias"


def _wrong_dtype(params):  # (float64 would do: JAX keeps it as float32, and so does the store)
    return jax.tree.map(lambda leaf: np.asarray(leaf, np.float16), params), "float16"


def _key_of_another_type(params):  # keys JAX cannot sort together: its own flatten raises a bare ValueError
    params = jax.tree.map(np.asarray, params)
    params["params"][1] = np.zeros(2, np.float32)
    return params, "unexpected extra entry ['params'][1]"


def _nan_weight(params):
    params = jax.tree.map(lambda leaf: np.array(leaf), params)
    first_layer = sorted(params["params"])[0]
    params["params"][first_layer]["kernel"][0, 0] = np.nan
    return params, "kernel"


BAD_PARAMS = {
    "missing-leaf": (_missing_leaf, ParamMismatchError),
    "extra-leaf": (_extra_leaf, ParamMismatchError),
    "wrong-shape": (_wrong_shape, ParamMismatchError),
    "wrong-dtype": (_wrong_dtype, ParamMismatchError),
    "key-of-another-type": (_key_of_another_type, ParamMismatchError),
    "nan-weight": (_nan_weight, NonFiniteParamsError),
}


@pytest.mark.parametrize("operation", ["add_tenant", "update_tenant"])
@pytest.mark.parametrize("kind", sorted(BAD_PARAMS))
def test_bad_params_raise_naming_the_leaf_and_change_nothing(kind, operation, rng):
    spec, mt, params = _served()
    make_bad, error = BAD_PARAMS[kind]
    bad, leaf_name = make_bad(spec.init(77))
    before = _snapshot(mt)
    tenant = "new" if operation == "add_tenant" else "b"
    with pytest.raises(error, match=f"tenant '{tenant}'") as info:
        getattr(mt, operation)(tenant, bad)
    assert leaf_name in str(info.value)
    _assert_unchanged(mt, before)
    _assert_everyone_still_served(spec, mt, params, rng)


_OTHER_DEVICE_SCRIPT = textwrap.dedent(
    """
    import jax, numpy as np
    import jaxmt, models
    d0, d1 = jax.devices()
    spec = models.make("mlp", "tiny")
    host = {name: spec.init(seed) for seed, name in enumerate(["a", "b", "c"])}
    on = lambda params, device: jax.device_put(params, device)
    x = spec.random_input(0, 6)
    ids = ["a", "b", "c", "c", "a", "b"]
    want = np.concatenate([np.asarray(spec.apply_fn(host[t], x[i:i + 1])) for i, t in enumerate(ids)])
    for store_device, param_device in [(d0, d1), (d1, d0)]:
        mt = jaxmt.MultiTenantModel(spec.apply_fn, host["a"], capacity=2, device=store_device,
                                    buckets=jaxmt.BucketPolicy.powers_of_two(4, 4))
        mt.add_tenant("a", on(host["a"], param_device))
        mt.add_tenant("b", on(host["b"], param_device))
        mt.add_tenant("c", host["c"])  # from the host, and a store that grows on its device
        mt.update_tenant("b", on(host["b"], param_device))
        assert all(leaf.devices() == {store_device} for leaf in mt.store.stacked_leaves), store_device
        for x_in in (x, on(x, param_device)):
            got = mt.predict(ids, x_in)
            err = np.linalg.norm(got - want) / np.linalg.norm(want)
            assert err < 1e-5, (store_device, param_device, err)
    print("ok")
    """
)


def test_params_on_another_device_are_moved_to_the_store_device():
    """Two host devices exist only in a fresh process (XLA_FLAGS is read at start-up)."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-c", _OTHER_DEVICE_SCRIPT], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


# ------------------------------------------------------------------------------- scheduler
QUEUE_DELAY_MS = 60_000.0  # long enough that queued requests wait until close() drains them


def _queue_state(sched: Scheduler) -> tuple:
    overall = sched.metrics()["overall"]
    return overall["queue_depth"], overall["queued_rows"], overall["count"]


@contextlib.contextmanager
def _pending_requests(rng, nonfinite_inputs: str = "pass"):
    """A scheduler holding queued requests of tenants b and c (fewer entries than a full step)."""
    spec, mt, params = _served(nonfinite_inputs=nonfinite_inputs)
    sched = Scheduler(mt, max_delay_ms=QUEUE_DELAY_MS, default_slo_ms=3_600_000.0)
    try:
        pending = []
        for tenant, n in [("b", 3), ("c", 1), ("b", 2)]:
            x = spec.random_input(rng, n)
            pending.append((tenant, x, sched.submit(tenant, x)))
        yield spec, mt, params, sched, pending
    finally:
        sched.close(drain=True)


def _assert_pending_served(spec, params, sched, pending) -> None:
    assert not any(future.done() for _, _, future in pending)  # still queued: nothing touched them
    sched.close(drain=True)
    for tenant, x, future in pending:
        got = future.result(timeout=60)
        assert rel_error(got, reference_predict(spec.apply_fn, params, [tenant] * len(x), x)) < 1e-5


def _bad_submit(name: str, rng: np.random.Generator):
    """(tenant, x, slo_ms, exception type, message) for one bad submit."""
    good = rng.standard_normal((2, 16), dtype=np.float32)
    nan = good.copy()
    nan[1, 3] = np.nan
    cases = {
        "scalar": ("a", np.float32(2.0), None, InputError, "needs rows"),
        "rank-1": ("a", good[0], None, InputError, "expected [16]"),
        "rank-3": ("a", good[:, :, None], None, InputError, "expected [16]"),
        "trailing-shape": ("a", good[:, :8], None, InputError, "shape [8], expected [16]"),
        "dtype": ("a", good.astype(np.float64), None, InputError, "dtype float64, expected float32"),
        "zero-rows": ("a", good[:0], None, InputError, "needs rows [r >= 1"),
        "unknown-tenant": ("zz", good, None, UnknownTenantError, "unknown tenant 'zz'"),
        "unhashable-tenant": (["a"], good, None, UnknownTenantError, "unknown tenant ['a']"),
        "negative-slo": ("a", good, -5.0, ValueError, "slo_ms must be a finite number"),
        "zero-slo": ("a", good, 0.0, ValueError, "slo_ms must be a finite number"),
        "nan-slo": ("a", good, float("nan"), ValueError, "slo_ms must be a finite number"),
        "infinite-slo": ("a", good, float("inf"), ValueError, "slo_ms must be a finite number"),
        "absurd-slo": ("a", good, 1e12, ValueError, "slo_ms must be a finite number"),
        "bool-slo": ("a", good, True, ValueError, "slo_ms must be a number"),
        "string-slo": ("a", good, "50", ValueError, "slo_ms must be a number"),
        "nan-input-rejected": ("a", nan, None, InputError, "row 1 (tenant 'a') holds NaN or Inf"),
    }
    return cases[name]


BAD_SUBMITS = ["scalar", "rank-1", "rank-3", "trailing-shape", "dtype", "zero-rows", "unknown-tenant",
               "unhashable-tenant", "negative-slo", "zero-slo", "nan-slo", "infinite-slo", "absurd-slo", "bool-slo",
               "string-slo", "nan-input-rejected"]  # fmt: skip


@pytest.mark.parametrize("name", BAD_SUBMITS)
def test_bad_submits_raise_at_once_and_leave_the_queue_and_other_futures(name, rng):
    with _pending_requests(rng, nonfinite_inputs="reject") as (spec, mt, params, sched, pending):
        store_before, queue_before = _snapshot(mt), _queue_state(sched)
        tenant, x, slo_ms, error, message = _bad_submit(name, rng)
        with pytest.raises(error, match=re.escape(message)):
            sched.submit(tenant, x, slo_ms=slo_ms)
        assert _queue_state(sched) == queue_before
        _assert_unchanged(mt, store_before)
        _assert_pending_served(spec, params, sched, pending)


def test_nonfinite_rows_pass_through_the_scheduler_without_touching_other_requests(rng):
    with _pending_requests(rng, nonfinite_inputs="pass") as (spec, mt, params, sched, pending):
        x = spec.random_input(rng, 2)
        x[0, 0] = np.inf
        flagged = sched.submit("a", x)
        _assert_pending_served(spec, params, sched, pending)
        got = flagged.result(timeout=60)
        assert not np.isfinite(got[0]).all()
        assert rel_error(got[1:], reference_predict(spec.apply_fn, params, ["a"], x[1:])) < 1e-5
        assert mt.stats()["nonfinite_rows"] == 1


def test_bad_tenant_changes_while_requests_wait_leave_them_alone(rng):
    with _pending_requests(rng) as (spec, mt, params, sched, pending):
        store_before, queue_before = _snapshot(mt), _queue_state(sched)
        bad, _ = _missing_leaf(spec.init(5))
        with pytest.raises(ParamMismatchError):
            mt.update_tenant("b", bad)
        with pytest.raises(NonFiniteParamsError):
            mt.add_tenant("d", _nan_weight(spec.init(6))[0])
        with pytest.raises(UnknownTenantError):
            mt.remove_tenant("zz")
        assert _queue_state(sched) == queue_before
        _assert_unchanged(mt, store_before)
        _assert_pending_served(spec, params, sched, pending)


def test_a_tenant_removed_while_queued_fails_through_its_future_only(rng):
    with _pending_requests(rng) as (spec, mt, params, sched, pending):
        x = spec.random_input(rng, 2)
        doomed = sched.submit("a", x)
        mt.remove_tenant("a")
        _assert_pending_served(spec, params, sched, pending)
        with pytest.raises(UnknownTenantError, match="unknown tenant 'a'"):
            doomed.result(timeout=60)


@pytest.mark.parametrize("rows", [9, 100])
def test_huge_submits_are_split_not_rejected(rows, rng):
    spec, mt, params = _served()
    with Scheduler(mt, max_delay_ms=1.0) as sched:
        x = spec.random_input(rng, rows)  # more rows than the largest row bucket (8)
        small = spec.random_input(rng, 2)
        futures = [sched.submit("a", x), sched.submit("b", small)]
        got = [f.result(timeout=120) for f in futures]
    assert rel_error(got[0], reference_predict(spec.apply_fn, params, ["a"] * rows, x)) < 1e-5
    assert rel_error(got[1], reference_predict(spec.apply_fn, params, ["b"] * 2, small)) < 1e-5


def test_ragged_rows_are_an_input_error_at_predict_and_at_submit():
    spec, mt, _ = _served()
    ragged = [[0.0] * 16, [0.0] * 15]
    with pytest.raises(InputError, match="not one array of rows"):
        mt.predict(["a", "b"], ragged)
    with Scheduler(mt, max_delay_ms=1.0) as sched:
        with pytest.raises(InputError, match="not one array of rows"):
            sched.submit("a", ragged)
