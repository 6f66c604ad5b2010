"""Steps that take their inputs from pinned host buffers written in place (jaxmt.host_inputs)
answer as steps given NumPy arguments do, never let a write reach a program still reading
a buffer, and bound the pinned memory they hold."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import reference_predict, rel_error, tiny_spec

import models
from jaxmt import BucketPolicy, InputError, MultiTenantModel
from jaxmt import host_inputs as host_inputs_module
from jaxmt.jax_compat import single_device_sharding
from jaxmt.host_inputs import HostInputBuffers, host_inputs_by_default, with_token, writable_view
from jaxmt.rows import RowParts

POLICY = BucketPolicy.powers_of_two(8, 4)
CPU = jax.devices("cpu")[0]


def _model(name: str, n_tenants: int, seed: int, capacity: int | None = None, **kw):
    spec = tiny_spec(name)
    params = {f"t{i}": spec.init(seed * 100 + i) for i in range(n_tenants)}
    mt = MultiTenantModel(spec.apply_fn, params["t0"], capacity=capacity or n_tenants, buckets=POLICY,
                          row_shape=spec.input_shape, row_dtype=spec.input_dtype, **kw)
    for tenant, p in params.items():
        mt.add_tenant(tenant, p)
    return spec, mt, params


@pytest.mark.parametrize("name", models.ARCHITECTURES)
def test_predict_from_pinned_buffers_equals_the_reference_on_fresh_rows_every_call(name, rng):
    """Every call rewrites the same buffers: each answer must be of its own call's rows
    (random subsets, one-step and multi-step plans, whole-store steps)."""
    spec, mt, params = _model(name, 4, 1, host_inputs=True)
    for trial in range(6):
        if trial % 3 == 0:  # every tenant once, in slot order: a whole-store step
            ids = list(params)
        else:
            n = int(rng.integers(1, 40))
            ids = list(rng.choice(list(params), size=n))
        x = spec.random_input(rng, len(ids))
        assert rel_error(mt.predict(ids, x), reference_predict(spec.apply_fn, params, ids, x)) < 1e-5, (name, trial)
    keys = list(mt.programs._programs)
    assert keys and all(key.host_inputs for key in keys)
    assert any(key.whole_store for key in keys)
    assert mt.stats()["host_input_bytes"] > 0


def test_steps_dispatched_before_any_is_waited_for_answer_their_own_rows(rng):
    spec, mt, params = _model("mlp", 4, 2, host_inputs=True)
    ids = list(rng.choice(list(params), size=8))  # one step shape; fresh rows every time
    requests = []
    for _ in range(12):
        x = spec.random_input(rng, 8)
        requests.append((ids, x, mt.dispatch(ids, x)))
    for ids, x, pending in requests:
        assert rel_error(pending.result(), reference_predict(spec.apply_fn, params, ids, x)) < 1e-5


def test_run_step_takes_numpy_blocks_through_the_buffers_and_device_blocks_as_arguments(rng):
    spec, mt, params = _model("mlp", 4, 3, host_inputs=True)
    ids = list(rng.choice(list(params), size=6))
    x = spec.random_input(rng, 6)
    (step,) = mt.dispatch(ids, x).plan.steps
    x_kb = x[step.row_index]
    want = np.asarray(mt.run_step(step, x_kb))
    compiled = mt.stats()["compiles"]
    on_device = np.asarray(mt.run_step(step, jax.device_put(x_kb, mt.store.device)))
    assert mt.stats()["compiles"] == compiled + 1  # the device-input program of the shape
    np.testing.assert_allclose(on_device, want, rtol=1e-6, atol=1e-6)
    host_keys = [key for key in mt.programs._programs if key.host_inputs]
    assert len(host_keys) == 1 and len(mt.programs) == 2
    with pytest.raises(InputError, match="expected float32"):  # a block of another shape is not broadcast
        mt.run_step(step, x_kb[:1])


def test_warmup_with_device_inputs_compiles_both_kinds_and_nothing_after(rng):
    spec, mt, params = _model("mlp", 4, 4, host_inputs=True)
    per_kind = len(POLICY.row_buckets) * (len(POLICY.tenant_buckets) + 1)  # + the whole-store programs (capacity 4)
    assert mt.warmup(execute=False) == per_kind and all(key.host_inputs for key in mt.programs._programs)
    built = mt.warmup(device_inputs=True)
    assert built == per_kind
    compiled = mt.stats()["compiles"]
    for _ in range(10):
        n = int(rng.integers(1, 30))
        ids = list(rng.choice(list(params), size=n))
        x = spec.random_input(rng, n)
        pending = mt.dispatch(ids, x)
        for step in pending.plan.steps:
            mt.run_step(step, jax.device_put(x[step.row_index], mt.store.device))
        assert rel_error(pending.result(), reference_predict(spec.apply_fn, params, ids, x)) < 1e-5
    assert mt.stats()["compiles"] == compiled


def test_blocks_over_the_size_limit_go_as_arguments(rng, monkeypatch):
    spec, mt, params = _model("mlp", 4, 5, host_inputs=True)
    row_bytes = int(np.prod(spec.input_shape)) * np.dtype(spec.input_dtype).itemsize
    monkeypatch.setattr(host_inputs_module, "MAX_BLOCK_BYTES", 4 * row_bytes)  # blocks of up to 4 rows
    for n in (1, 3, 17, 30):
        ids = list(rng.choice(list(params), size=n))
        x = spec.random_input(rng, n)
        assert rel_error(mt.predict(ids, x), reference_predict(spec.apply_fn, params, ids, x)) < 1e-5
    keys = list(mt.programs._programs)
    assert {key.host_inputs for key in keys} == {False, True}
    assert all(key.host_inputs == (key.tenant_bucket * key.row_bucket <= 4) for key in keys)


def test_rows_of_several_requests_are_taken_into_the_buffers(rng):
    spec, mt, params = _model("mlp", 4, 6, host_inputs=True)
    parts = [spec.random_input(rng, n) for n in (3, 1, 5)]
    ids = list(rng.choice(list(params), size=9))
    got = mt.dispatch(ids, RowParts(parts)).result()
    assert rel_error(got, reference_predict(spec.apply_fn, params, ids, np.concatenate(parts))) < 1e-5


@pytest.mark.parametrize("row_shape", [(5,), (40, 40, 3)])  # under and over RowParts' direct-copy size
def test_row_parts_take_into_a_given_block_equals_numpy_indexing(row_shape, rng):
    parts = [rng.normal(size=(n, *row_shape)).astype(np.float32) for n in (2, 4, 1)]
    rows = RowParts(parts)
    index = rng.integers(0, 7, size=(3, 2))
    out = np.empty((3, 2, *row_shape), np.float32)
    assert rows.take(index, out=out) is out
    np.testing.assert_array_equal(out, np.concatenate(parts)[index])


def test_a_failed_launch_leaves_its_buffers_free(rng):
    spec, mt, params = _model("mlp", 2, 7, host_inputs=True)
    ids, x = ["t0", "t1"], spec.random_input(rng, 2)
    mt.predict(ids, x)
    (ring,) = [ring for ring in mt.host_input_buffers._rings.values() if ring]
    held = mt.stats()["host_input_bytes"]

    def failing(*args):
        raise RuntimeError("device lost")

    mt.programs.get = lambda key: failing
    try:
        for _ in range(8):
            with pytest.raises(RuntimeError, match="device lost"):
                mt.predict(ids, x)
    finally:
        del mt.programs.get
    pending = mt.dispatch(ids, x)  # a real launch, still running when the next one fails
    with pytest.raises(IndexError):  # rows that cannot be written: the set is handed back all the same
        mt._launch(pending.plan.steps[0], x[:1])
    pending.result()
    (ring,) = [ring for ring in mt.host_input_buffers._rings.values() if ring]
    for buffers in ring:  # the programs that ran are done; wait for their tokens too, not only their answers
        if buffers.token is not None:
            buffers.token.block_until_ready()
    # No failed launch kept a set: all are free, and no more were made than one in-flight step needs.
    assert all(b.idle() for b in ring) and len(ring) <= 2 and mt.stats()["host_input_bytes"] <= 2 * held
    assert rel_error(mt.predict(ids, x), reference_predict(spec.apply_fn, params, ids, x)) < 1e-5


def test_a_written_view_is_what_a_program_reads():
    buffers = HostInputBuffers(CPU)
    (array,), (view,) = (lambda s: (s.arrays, s.views))(buffers.acquire(_signature([((4, 3), np.float32)])))
    total = jax.jit(lambda a: jnp.sum(jax.device_put(a, single_device_sharding(CPU))))
    for value in (1.5, -2.0):
        view[...] = value
        assert float(total(array)) == pytest.approx(12 * value)
    assert writable_view(array).ctypes.data == view.ctypes.data


def test_sets_are_reused_when_idle_added_while_the_budget_allows_and_waited_for_past_it():
    small, large = _signature([((4,), np.int32)]), _signature([((64, 64), np.float32)])
    buffers = HostInputBuffers(CPU, max_total_bytes=16 + 2 * 64 * 64 * 4)
    first = buffers.acquire(small)
    buffers.release(first, None)
    assert buffers.acquire(small) is first  # idle: handed out again, nothing allocated
    buffers.release(first, _Token(ready=True))  # its program is done: idle again
    assert buffers.acquire(small) is first
    buffers.release(first, None)
    a = buffers.acquire(large)
    buffers.release(a, _Token())
    b = buffers.acquire(large)  # a is read by a running program: a second set, within the budget
    assert b is not a and buffers.nbytes == 16 + 2 * 64 * 64 * 4
    buffers.release(b, _Token())
    waited_for = buffers.acquire(large)  # none idle and no room (but for the idle small set, too small)
    assert waited_for is a and a.token.waited and buffers.nbytes <= 16 + 2 * 64 * 64 * 4
    buffers.release(a, None)
    buffers.acquire(_signature([((32, 64), np.float32)]))  # over budget: the idle sets go, least recently used first
    assert first not in buffers._rings.get(small, [])
    assert a not in buffers._rings[large]
    assert buffers.nbytes == 64 * 64 * 4 + 32 * 64 * 4


def test_a_set_is_not_rewritten_while_its_program_runs_even_if_the_answer_is_gone():
    """The caller may delete or donate an answer at once; the set waits for the program."""
    on_cpu = single_device_sharding(CPU)
    m = jax.device_put(jnp.eye(1200, dtype=jnp.float32), on_cpu)

    def slow(m, a):  # a product that takes a while, then the input (times 1)
        heavy = jax.lax.fori_loop(0, 40, lambda i, acc: acc @ m, m)
        return a * (heavy[0, 0] * 0 + 1)

    program = jax.jit(with_token(slow, on_cpu))
    buffers = HostInputBuffers(CPU)
    signature = _signature([((4,), np.float32)])
    first = buffers.acquire(signature)
    first.views[0][...] = 1.0
    jax.block_until_ready(program(m, first.arrays[0]))  # compiled
    answer, token = program(m, first.arrays[0])
    buffers.release(first, token)
    kept = jax.jit(lambda y: y + 0, donate_argnums=0)(answer)  # the answer is deleted at once
    again = buffers.acquire(signature)
    again.views[0][...] = 2.0
    np.testing.assert_array_equal(np.asarray(kept), np.ones(4, np.float32))


def test_with_room_for_one_set_each_step_waits_for_the_last_and_answers_its_own_rows():
    """A budget of one set: every acquire past the first waits for a running program."""
    on_cpu = single_device_sharding(CPU)
    m = jax.device_put(jnp.eye(400, dtype=jnp.float32), on_cpu)

    def slow(m, a):
        heavy = jax.lax.fori_loop(0, 10, lambda i, acc: acc @ m, m)
        return a * (heavy[0, 0] * 0 + 1)

    program = jax.jit(with_token(slow, on_cpu))
    signature = _signature([((4,), np.float32)])
    buffers = HostInputBuffers(CPU, max_total_bytes=16)
    answers = []
    for value in range(12):
        got = buffers.acquire(signature)
        got.views[0][...] = value
        answer, token = program(m, got.arrays[0])
        buffers.release(got, token)
        answers.append(answer)
    assert buffers.nbytes == 16  # one set throughout
    for value, answer in enumerate(answers):
        np.testing.assert_array_equal(np.asarray(answer), np.full(4, value, np.float32))


def test_a_set_is_handed_out_again_only_once_released():
    signature = _signature([((8,), np.float32)])
    buffers = HostInputBuffers(CPU)
    held = [buffers.acquire(signature) for _ in range(3)]
    assert len({id(b) for b in held}) == 3
    buffers.release(held[1], None)
    assert buffers.acquire(signature) is held[1]


def test_threads_sharing_the_buffers_never_hold_one_set_at_once():
    import threading
    import time

    signature = _signature([((16,), np.int32)])
    buffers = HostInputBuffers(CPU, max_total_bytes=128)  # room for two sets: the others are waited for
    holders: dict[int, int] = {}
    clashes = []
    guard = threading.Lock()

    def worker(me: int) -> None:
        for _ in range(200):
            got = buffers.acquire(signature)
            with guard:
                if id(got) in holders:
                    clashes.append((me, holders[id(got)]))
                holders[id(got)] = me
            got.views[0][...] = me
            time.sleep(1e-5)  # hold the set a while: another thread runs meanwhile
            if not (got.views[0] == me).all():
                clashes.append((me, "overwritten"))
            with guard:
                del holders[id(got)]
            buffers.release(got, jax.device_put(np.full(3, me), CPU))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not clashes


def test_when_other_threads_hold_every_set_past_the_budget_a_new_one_is_made():
    signature = _signature([((64,), np.float32)])
    buffers = HostInputBuffers(CPU, max_total_bytes=256)
    one, two = buffers.acquire(signature), buffers.acquire(signature)
    assert one is not two and buffers.nbytes == 512


def test_host_inputs_are_off_by_default_on_the_cpu_and_refused_by_the_sharded_model():
    assert not host_inputs_by_default(CPU)
    spec, mt, _ = _model("mlp", 2, 8, device=CPU)
    assert mt.host_input_buffers is None and mt.stats()["host_input_bytes"] == 0
    from jaxmt.sharding import ShardedMultiTenantModel

    with pytest.raises(ValueError, match="host_inputs=True is not supported"):
        ShardedMultiTenantModel(spec.apply_fn, spec.init(0), capacity=2, host_inputs=True)


_signature = HostInputBuffers.signature


class _Token:
    """Stands in for the token of a program: running until waited for (or ``ready``)."""

    def __init__(self, ready: bool = False):
        self.ready, self.waited = ready, False

    def is_ready(self) -> bool:
        return self.ready

    def block_until_ready(self) -> "_Token":
        self.ready = self.waited = True
        return self


@pytest.mark.parametrize("host_inputs", [True, False])
@pytest.mark.parametrize("n", [1, 3, 7])
def test_one_row_entries_in_request_order_answer_every_output_leaf_row_by_row(host_inputs, n, rng):
    """Steps whose entries are the request's rows in order (``Step.rows_in_order``: padded,
    tenants repeated) copy rows in and answers out without a gather or scatter; every leaf of
    a pytree answer must still be its own row's."""
    spec = tiny_spec("mlp")

    def two_leaves(p, x):
        y = spec.apply_fn(p, x)
        return {"y": y, "twice": 2 * y[:, :3]}

    params = {f"t{i}": spec.init(900 + i) for i in range(3)}
    one_row_entries = BucketPolicy((1, 2, 4, 8), (1, 2, 4), entry_cost_rows=0.0, step_cost_rows=0.0)  # B = 1 wins ties
    mt = MultiTenantModel(two_leaves, params["t0"], capacity=4, buckets=one_row_entries,
                          row_shape=spec.input_shape, row_dtype=spec.input_dtype, host_inputs=host_inputs)
    for tenant, p in params.items():
        mt.add_tenant(tenant, p)
    for _ in range(3):  # the same buffers rewritten with fresh rows
        ids = list(rng.choice(list(params), size=n))
        x = spec.random_input(rng, n)
        (step,) = mt.dispatch(ids, x).plan.steps
        assert step.rows_in_order or n == 1 and mt.store.slot_of(ids[0]) == 0
        got = mt.predict(ids, x)
        want = reference_predict(spec.apply_fn, params, ids, x)
        assert rel_error(got["y"], want) < 1e-5
        assert rel_error(got["twice"], 2 * want[:, :3]) < 1e-5
        assert got["y"].shape == want.shape and got["y"].base is None  # its own rows, not a view of the padded block


def test_pinned_bytes_count_what_the_buffers_hold_for_rows_jax_keeps_narrower():
    """Rows fixed as float64 (a first request of Python lists) are held as float32 by JAX:
    ``host_input_bytes`` and the budget count the bytes held, not twice as many."""
    mt = MultiTenantModel(lambda p, x: x @ p["w"], {"w": np.ones((3, 2), np.float32)}, capacity=2, host_inputs=True)
    mt.add_tenant("a", {"w": np.full((3, 2), 2, np.float32)})
    got = mt.predict(["a", "a"], [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    np.testing.assert_allclose(got, [[12, 12], [30, 30]])
    held = sum(a.nbytes for ring in mt.host_input_buffers._rings.values() for s in ring for a in s.arrays)
    assert mt.stats()["host_input_bytes"] == held
