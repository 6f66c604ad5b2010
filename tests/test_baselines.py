"""The baselines answer like the reference, behind the same submit/future/metrics contract.

The shared contract (validation, close, unknown tenants, overload) is checked for every
server, the Scheduler included, so that a comparison between them compares scheduling only.
"""

from __future__ import annotations

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import AskedForLock, reference_predict

import jaxmt

TIMEOUT_S = 60.0
ROW = 5
SERVERS = {
    "jaxmt": jaxmt.Scheduler,
    "exclusive": jaxmt.ExclusiveServer,
    "time": jaxmt.TimeOnlyServer,
    "space": jaxmt.SpaceOnlyServer,
}


def apply_fn(params, x):
    return jnp.sin(x @ params["w"]) + params["b"]


def make_params(seed: int) -> dict:
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {"w": jax.random.normal(k1, (ROW, 4)), "b": jax.random.normal(k2, (4,))}


def make_model(tenants: int = 5):
    params = {f"t{i}": make_params(10 + i) for i in range(tenants)}
    mt = jaxmt.MultiTenantModel(apply_fn, make_params(0), capacity=max(2, tenants),
                                buckets=jaxmt.BucketPolicy.powers_of_two(4, 4), row_shape=(ROW,), row_dtype=np.float32)
    for name, p in params.items():
        mt.add_tenant(name, p)
    return mt, params


@pytest.fixture(scope="module")
def served():
    mt, params = make_model()
    mt.warmup()
    return mt, params


class FakeClock:
    def __init__(self):
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def rows(rng, n: int = 1) -> np.ndarray:
    return rng.standard_normal((n, ROW)).astype(np.float32)


def expected(kind, params, tenant, x, server=None):
    owner = server.tenant_id if kind == "exclusive" else tenant
    return reference_predict(apply_fn, params, [owner] * len(x), x)


def submit_from_threads(server, params: dict, clients: int = 4, requests: int = 120, seed: int = 0) -> list:
    """Each client thread submits ``requests`` random requests of 1-6 rows (5 and 6: split at
    the largest batch size) for random tenants; returns (tenant, x, answer) of every one."""
    answered, lock = [], threading.Lock()

    def client(seed: int) -> None:
        rng = np.random.default_rng(seed)
        mine = []
        for _ in range(requests):
            tenant = f"t{rng.integers(len(params))}"
            x = rows(rng, int(rng.integers(1, 7)))
            mine.append((tenant, x, server.submit(tenant, x)))
        with lock:
            answered.extend(mine)

    threads = [threading.Thread(target=client, args=(seed + s,)) for s in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [(t, x, f.result(TIMEOUT_S)) for t, x, f in answered]


@pytest.mark.parametrize("kind", ["exclusive", "time", "space"])
def test_many_threads_match_the_reference(served, kind):
    mt, params = served
    with SERVERS[kind](mt, max_delay_ms=0.5, overload_policy="serve_late") as server:
        results = submit_from_threads(server, params)
        metrics = server.metrics()
    for tenant, x, y in results:
        np.testing.assert_allclose(y, expected(kind, params, tenant, x, server), rtol=1e-5, atol=1e-5)
    assert metrics["server"] == kind and metrics["overall"]["ok"] == len(results) == 480
    if kind != "exclusive":
        assert metrics["steps"]["mean_tenants_per_step"] == 1.0  # one tenant's program per step


@pytest.mark.parametrize("kind", list(SERVERS))
def test_with_answers_in_host_memory_every_server_matches_the_reference(kind, rng):
    """The baselines put their answers where jaxmt's steps do, so that both pay the same copy."""
    params = {f"t{i}": make_params(40 + i) for i in range(3)}
    mt = jaxmt.MultiTenantModel(apply_fn, make_params(0), capacity=4, buckets=jaxmt.BucketPolicy.powers_of_two(4, 4),
                                row_shape=(ROW,), row_dtype=np.float32, outputs_to_host=True)
    for name, p in params.items():
        mt.add_tenant(name, p)
    with SERVERS[kind](mt, overload_policy="serve_late") as server:  # cold programs: no overload verdicts
        requests = [(f"t{i % 3}", rows(rng, 1 + i % 2)) for i in range(9)]
        futures = [(t, x, server.submit(t, x)) for t, x in requests]
        for tenant, x, future in futures:
            np.testing.assert_allclose(future.result(TIMEOUT_S), expected(kind, params, tenant, x, server), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("staged", [False, True])
@pytest.mark.parametrize("kind", list(SERVERS))
def test_with_inputs_from_pinned_host_buffers_every_server_matches_the_reference(kind, staged, rng):
    """The baselines take host rows as jaxmt's steps do (``host_inputs``); staged rows reach
    every server as device blocks, and a warmed-up server compiles nothing for either."""
    params = {f"t{i}": make_params(60 + i) for i in range(3)}
    mt = jaxmt.MultiTenantModel(apply_fn, make_params(0), capacity=4, buckets=jaxmt.BucketPolicy.powers_of_two(4, 4),
                                row_shape=(ROW,), row_dtype=np.float32, outputs_to_host=True, host_inputs=True)
    for name, p in params.items():
        mt.add_tenant(name, p)
    from jaxmt.baselines import _program_for

    _program_for.cache_clear()  # a fresh baseline program: its compiles are this test's
    with SERVERS[kind](mt, overload_policy="serve_late", stage_inputs=staged) as server:
        server.warmup()
        program = None if kind == "jaxmt" else server._programs.program
        buffers = mt.host_input_buffers if program is None else program.host_input_buffers
        compiled, acquired = (mt.stats()["compiles"], None if program is None else set(program.compiled)), buffers.acquired
        requests = [(f"t{i % 3}", rows(rng, 1 + i % 3)) for i in range(12)]
        futures = [(t, x, server.submit(t, x)) for t, x in requests]
        for tenant, x, future in futures:
            np.testing.assert_allclose(future.result(TIMEOUT_S), expected(kind, params, tenant, x, server), rtol=1e-5, atol=1e-5)
        assert (mt.stats()["compiles"], None if program is None else set(program.compiled)) == compiled
        if not staged:  # every step's rows went through the pinned buffers
            assert buffers.acquired > acquired


def test_synchronous_helpers_match_the_reference(served, rng):
    mt, params = served
    ids = [f"t{i}" for i in rng.integers(len(params), size=23)]
    x = rows(rng, 23)
    want = reference_predict(apply_fn, params, ids, x)
    np.testing.assert_allclose(jaxmt.time_only_predict(mt, ids, x), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mt.predict(ids, x), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jaxmt.exclusive_predict(mt, x, "t2"), reference_predict(apply_fn, params, ["t2"] * 23, x),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(jaxmt.UnknownTenantError):
        jaxmt.time_only_predict(mt, ["t0", "nobody"], rows(rng, 2))
    with pytest.raises(jaxmt.InputError):
        jaxmt.time_only_predict(mt, ["t0"], rows(rng, 2))
    with pytest.raises(jaxmt.InputError):
        jaxmt.exclusive_predict(mt, rng.standard_normal((2, ROW)))


@pytest.mark.parametrize("kind", list(SERVERS))
def test_every_server_validates_the_same_way(served, rng, kind):
    mt, _ = served
    with pytest.raises(jaxmt.UnknownTenantError) as from_predict:
        mt.predict(["nobody"], rows(rng))
    server = SERVERS[kind](mt, max_delay_ms=60_000.0)
    with pytest.raises(jaxmt.UnknownTenantError) as from_submit:
        server.submit("nobody", rows(rng))
    assert type(from_submit.value) is type(from_predict.value)
    with pytest.raises(jaxmt.InputError):
        server.submit("t0", rows(rng)[:, :-1])
    with pytest.raises(ValueError, match="slo_ms"):
        server.submit("t0", rows(rng), slo_ms=-3.0)
    queued = server.submit("t1", rows(rng))
    server.close(drain=False)
    with pytest.raises(jaxmt.SchedulerClosed):
        queued.result(TIMEOUT_S)
    with pytest.raises(jaxmt.SchedulerClosed):
        server.submit("t0", rows(rng))
    assert server.metrics()["overall"]["errors"] == 1


@pytest.mark.parametrize("kind", ["time", "space"])
def test_a_full_preferred_batch_goes_without_waiting(served, rng, kind):
    mt, params = served
    with SERVERS[kind](mt, max_delay_ms=60_000.0) as server:  # only a full batch (4 rows) may go
        xs = [rows(rng) for _ in range(4)]
        futures = [server.submit("t3", x) for x in xs]
        ys = [f.result(TIMEOUT_S) for f in futures]  # answered before close
        assert server.metrics()["steps"]["steps"] == 1
    np.testing.assert_allclose(np.concatenate(ys), expected(kind, params, "t3", np.concatenate(xs)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["exclusive", "time", "space"])
def test_tenant_removed_while_queued(kind):
    mt, params = make_model(3)
    rng = np.random.default_rng(3)
    server = SERVERS[kind](mt, max_delay_ms=60_000.0, tenant_id="t1") if kind == "exclusive" else \
        SERVERS[kind](mt, max_delay_ms=60_000.0)
    with server:
        x_kept = rows(rng)
        gone, kept = server.submit("t0", rows(rng)), server.submit("t1", x_kept)
        mt.remove_tenant("t0")
    with pytest.raises(jaxmt.UnknownTenantError, match="t0"):
        gone.result(TIMEOUT_S)
    np.testing.assert_allclose(kept.result(TIMEOUT_S), expected(kind, params, "t1", x_kept, server), rtol=1e-5, atol=1e-5)


def test_overload_control_is_shared(served, rng, monkeypatch):
    mt, _ = served
    clock = FakeClock()
    server = jaxmt.TimeOnlyServer(mt, max_delay_ms=0.0, clock=clock)
    launch = server._programs.launch
    release = threading.Event()
    release.set()
    launched = threading.Semaphore(0)

    def slow_launch(params, x):  # each batch takes one (fake) second
        pending = launch(params, x)
        inner = pending.result
        launched.release()

        def result():
            assert release.wait(TIMEOUT_S)
            clock.now += 1.0
            return inner()

        pending.result = result
        return pending

    monkeypatch.setattr(server._programs, "launch", slow_launch)
    with server:
        server.submit("t0", rows(rng), slo_ms=10_000.0).result(TIMEOUT_S)
        release.clear()
        ahead = server.submit("t0", rows(rng), slo_ms=10_000.0)
        assert launched.acquire(timeout=TIMEOUT_S) and launched.acquire(timeout=TIMEOUT_S)  # one in flight now
        with pytest.raises(jaxmt.Overloaded):
            server.submit("t1", rows(rng), slo_ms=50.0).result(timeout=0)
        release.set()
        ahead.result(TIMEOUT_S)
    assert server.metrics()["overall"]["rejected"] == 1


def test_space_only_workers_and_exclusive_defaults(served):
    mt, _ = served
    with jaxmt.SpaceOnlyServer(mt) as space, jaxmt.SpaceOnlyServer(mt, workers=2) as pool:
        assert space.workers == len(mt) and pool.workers == 2
    with pytest.raises(ValueError, match="workers"):
        jaxmt.SpaceOnlyServer(mt, workers=0)
    with jaxmt.ExclusiveServer(mt) as exclusive:
        assert exclusive.tenant_id == mt.tenants[0]
        assert exclusive._programs.batch_sizes == (1, 2, 4, 8, 16)  # up to one full jaxmt step
    with pytest.raises(jaxmt.UnknownTenantError):
        jaxmt.ExclusiveServer(mt, tenant_id="nobody")


def test_time_only_counts_every_lane_ahead_of_a_request(served, rng):
    """Time-only serves one lane after another: a request waits for the batches of every
    queued lane, its own lane holding it too (a count kept up to date as lanes change)."""
    from jaxmt._queue import _Request

    mt, _ = served
    clock = FakeClock()  # still: no batch falls due, every request stays queued
    with jaxmt.TimeOnlyServer(mt, max_delay_ms=1000.0, clock=clock, overload_policy="serve_late") as server:
        for tenant, count in [("t0", 3), ("t1", 1), ("t2", 2)]:
            for _ in range(count):  # below the largest batch (4 rows): not due
                server.submit(tenant, rng.normal(size=(1, ROW)).astype(np.float32))
        with server._cond:
            for tenant, rows in [("t0", 1), ("t0", 2), ("t3", 4), ("t1", 3), ("t4", 1)]:
                probe = _Request(tenant, np.zeros((rows, ROW), np.float32), None, clock(), clock() + 1.0, 1000.0, -1)
                want = sum(-(-(lane.rows + (rows if key == tenant else 0)) // 4) for key, lane in server._lanes.items())
                want += 0 if tenant in server._lanes else -(-rows // 4)
                assert server._steps_ahead_locked(probe) == server._in_flight + want
        clock.now += 10.0  # due: the queue drains on close


@pytest.mark.parametrize("kind", list(SERVERS))
def test_rows_are_copied_at_submit_unless_the_caller_hands_them_over(served, rng, kind):
    mt, params = served
    clock = FakeClock()  # still: the requests stay queued while their buffers change
    server = SERVERS[kind](mt, max_delay_ms=1000.0, clock=clock, overload_policy="serve_late")
    try:
        reused = rng.normal(size=(1, ROW)).astype(np.float32)
        sent = reused.copy()
        copied = server.submit("t1", reused)
        reused[:] = np.nan  # the caller reuses its buffer at once
        handed = rng.normal(size=(1, ROW)).astype(np.float32)
        kept = server.submit("t2", handed, copy=False)
        with server._cond:
            assert any(req.x is handed for req in server._outstanding.values())
        clock.now += 10.0
        owner = lambda tenant: server.tenant_id if kind == "exclusive" else tenant  # noqa: E731
        np.testing.assert_allclose(copied.result(TIMEOUT_S), reference_predict(apply_fn, params, [owner("t1")], sent), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(kept.result(TIMEOUT_S), reference_predict(apply_fn, params, [owner("t2")], handed), rtol=1e-5, atol=1e-5)
    finally:
        server.close()


@pytest.mark.parametrize("kind", ["exclusive", "time", "space"])
def test_warmup_without_execute_runs_only_programs_not_compiled_yet(served, monkeypatch, kind):
    mt, _ = served
    with SERVERS[kind](mt) as first:
        first.warmup()  # compiles (or finds compiled) and runs every batch size
        program = first._programs.program
        runs = []
        real_fn = program.fn
        monkeypatch.setattr(program, "fn", lambda params, x: runs.append(x.shape) or real_fn(params, x))
        assert first.warmup(execute=False) == 0 and runs == []
        first.warmup()
        assert sorted(shape[0] for shape in runs) == sorted(first._programs.batch_sizes)
        compiled_before = set(program.compiled)
        program.compiled.clear()  # as if never compiled: execute=False runs them all
        runs.clear()
        first.warmup(execute=False)
        assert len(runs) == len(first._programs.batch_sizes)
        program.compiled |= compiled_before


# ------------------------------------------------------------------ the synchronous helpers at their edges
def _cast_apply(p, x):  # one function for every model below: their programs are shared where their keys agree
    return x @ p["w"].astype(jnp.float32)


def _one_tenant_model(value: float = 1.0, dtype=np.float32, capacity: int = 2) -> jaxmt.MultiTenantModel:
    def params(v):
        return {"w": np.full((ROW, 2), v, np.float32).astype(dtype)}

    mt = jaxmt.MultiTenantModel(_cast_apply, params(0), capacity=capacity, row_shape=(ROW,), row_dtype=np.float32)
    mt.add_tenant("t0", params(value))
    return mt


def test_the_helpers_answer_zero_rows_and_row_parts_as_predict_does():
    from jaxmt.rows import RowParts

    mt = _one_tenant_model()
    assert jaxmt.exclusive_predict(mt, np.zeros((0, ROW), np.float32)).shape == (0, 2)
    a, b = np.ones((1, ROW), np.float32), 2 * np.ones((2, ROW), np.float32)
    np.testing.assert_allclose(jaxmt.time_only_predict(mt, ["t0"] * 3, RowParts([a, b])), mt.predict(["t0"] * 3, RowParts([a, b])))


def test_the_helpers_do_not_keep_a_model_alive():
    import gc
    import weakref

    mt = _one_tenant_model()
    jaxmt.time_only_predict(mt, ["t0"], np.ones((1, ROW), np.float32))
    jaxmt.exclusive_predict(mt, np.ones((1, ROW), np.float32))
    ref = weakref.ref(mt)
    del mt
    gc.collect()
    assert ref() is None


def test_a_launch_that_compiles_is_never_taken_for_a_timed_sample():
    """Params of two float8 kinds share NumPy's dtype string ('<V1'): keyed by it, the second
    model's first launch compiled but was reported as compiled before (a timed sample)."""
    import ml_dtypes

    from jaxmt.baselines import _sync_programs

    x = np.ones((4, ROW), np.float32)
    first, second = (_one_tenant_model(dtype=d) for d in (ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e4m3fnuz))
    programs = [_sync_programs(mt, (4,)) for mt in (first, second)]
    assert programs[0].launch(programs[0].params("t0"), x).compiled
    assert programs[1].launch(programs[1].params("t0"), x).compiled
    assert not programs[1].launch(programs[1].params("t0"), x).compiled


def test_exclusive_access_reads_the_weights_after_a_rolled_back_add_and_an_update(monkeypatch):
    """An add that grows the store and then fails rolls back; a reader that saw the grown
    store's version must not take the store after the next change for the one it cached."""
    mt = _one_tenant_model(1.0, capacity=1)
    x = np.ones((1, ROW), np.float32)
    jaxmt.exclusive_predict(mt, x, "t0")
    started, readers = threading.Event(), []

    def failing_write(slot, leaves):  # a reader runs while the grown store is current
        reader = threading.Thread(target=lambda: (started.set(), jaxmt.exclusive_predict(mt, x, "t0")))
        readers.append(reader)
        reader.start()
        started.wait(10)
        reader.join(0.5)
        raise RuntimeError("write failed")

    with monkeypatch.context() as patch:
        patch.setattr(mt.store, "_write", failing_write)
        with pytest.raises(RuntimeError, match="write failed"):
            mt.add_tenant("t1", {"w": np.full((ROW, 2), 5.0, np.float32)})
    readers[0].join(60)
    mt.update_tenant("t0", {"w": np.full((ROW, 2), 2.0, np.float32)})
    np.testing.assert_allclose(jaxmt.exclusive_predict(mt, x, "t0"), mt.predict(["t0"], x))


@pytest.mark.parametrize("kind", ["exclusive", "time", "space"])
def test_a_step_split_at_the_largest_batch_counts_each_program_call(served, rng, kind):
    """A request larger than the largest batch size runs as several program calls; the step's
    ``programs_per_step`` counts them, as the Scheduler's steps count theirs."""
    mt, params = served
    with SERVERS[kind](mt, max_delay_ms=0.0, batch_sizes=(1, 2, 4)) as server:
        x = rows(rng, 6)  # 4 + 2 rows: two program calls
        y = server.submit("t1", x).result(TIMEOUT_S)
        steps = server.metrics()["steps"]
    np.testing.assert_allclose(y, expected(kind, params, "t1", x, server), rtol=1e-5, atol=1e-5)
    assert (steps["steps"], steps["programs_per_step"]) == (1, 2.0)


def test_exclusive_server_answers_with_its_tenants_current_weights():
    """After ``update_tenant`` the exclusive server computes with the new weights, as
    ``exclusive_predict`` and the other servers do, not with those read at construction."""
    mt = _one_tenant_model(1.0)
    x = np.ones((1, ROW), np.float32)
    with jaxmt.ExclusiveServer(mt, max_delay_ms=0.0) as server:
        np.testing.assert_allclose(server.submit("t0", x).result(TIMEOUT_S), mt.predict(["t0"], x))
        mt.update_tenant("t0", {"w": np.full((ROW, 2), 2.0, np.float32)})
        np.testing.assert_allclose(server.submit("t0", x).result(TIMEOUT_S), mt.predict(["t0"], x))
        np.testing.assert_allclose(server.submit("t0", x).result(TIMEOUT_S), jaxmt.exclusive_predict(mt, x, "t0"))



@pytest.mark.parametrize("kind", ["exclusive", "time", "space"])
def test_warmup_while_the_server_launches_a_step_does_not_deadlock(kind, rng):
    """``warmup`` on a serving baseline reads a tenant's params again when the store changed
    after it preloaded them, while a launch holds the store's lock and reads params too: both
    must take the store's lock before the params cache's, or each waits for the other forever."""
    mt, params = make_model(2)
    x = rows(rng, 1)
    server = SERVERS[kind](mt, max_delay_ms=0.0)
    try:
        launch_asked = threading.Event()
        mt.store.lock = AskedForLock(mt.store.lock, lambda: threading.current_thread() in server._threads and launch_asked.set())
        preload, armed, futures = server._programs.preload, threading.Event(), []

        def preload_then_the_store_changes(tenants):
            preload(tenants)
            mt.update_tenant("t0", params["t0"])  # the params warmup reads next are stale
            armed.set()

        def read_once_a_launch_asks_for_the_store(tenant_id, read=mt.get_params):
            if armed.is_set() and threading.current_thread() is warming:
                armed.clear()
                futures.append(server.submit("t1", x))
                assert launch_asked.wait(TIMEOUT_S)
            return read(tenant_id)

        server._programs.preload = preload_then_the_store_changes
        mt.get_params = read_once_a_launch_asks_for_the_store
        warming = threading.Thread(target=server.warmup, daemon=True)
        warming.start()
        warming.join(10)
        assert not warming.is_alive(), "warmup and the launch wait for each other"
        y = futures[0].result(TIMEOUT_S)
        np.testing.assert_allclose(y, expected(kind, params, "t1", x, server), rtol=1e-5, atol=1e-5)
    finally:
        server.close(drain=False, timeout=1.0)
