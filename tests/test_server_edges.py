"""Edges of the contract every server shares (the Scheduler and the baselines alike).

Whatever a client, a callback, a tenant's removal or a bug in a server thread does, every
accepted request completes exactly once, the server serves on where it can, and what it
counts and keeps stays true. No assertion depends on wall-clock speed: steps become due by
an injected clock; waits use generous timeouts only to turn a hang into a failure.
"""

from __future__ import annotations

import logging
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import AskedForLock, FakeClock, reference_predict

import jaxmt

TIMEOUT_S = 60.0  # generous: only to turn a hang into a failure
ROW = 5
KINDS = ["jaxmt", "exclusive", "time", "space"]
SERVERS = {"jaxmt": jaxmt.Scheduler, "exclusive": jaxmt.ExclusiveServer,
           "time": jaxmt.TimeOnlyServer, "space": jaxmt.SpaceOnlyServer}
# Steps go when the test advances the clock past max_delay_ms; an SLO of an hour and
# "serve_late" keep the jumps of the clock from shedding anything.
PATIENT = {"max_delay_ms": 10.0, "default_slo_ms": 3_600_000.0, "overload_policy": "serve_late"}


def apply_fn(params, x):
    return jnp.sin(x @ params["w"]) + params["b"]


def make_params(seed: int) -> dict:
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {"w": jax.random.normal(k1, (ROW, 4)), "b": jax.random.normal(k2, (4,))}


def make_model(tenants: int = 4, rows_given: bool = True):
    params = {f"t{i}": make_params(10 + i) for i in range(tenants)}
    rows = {"row_shape": (ROW,), "row_dtype": np.float32} if rows_given else {}
    mt = jaxmt.MultiTenantModel(apply_fn, make_params(0), capacity=max(2, tenants),
                                buckets=jaxmt.BucketPolicy.powers_of_two(4, 4), **rows)
    for name, p in params.items():
        mt.add_tenant(name, p)
    return mt, params


def rows(rng, n: int = 1, dtype=np.float32) -> np.ndarray:
    return rng.standard_normal((n, ROW)).astype(dtype)


def check_answer(server, params: dict, tenant, x: np.ndarray, y: np.ndarray) -> None:
    owner = server.tenant_id if isinstance(server, jaxmt.ExclusiveServer) else tenant
    np.testing.assert_allclose(y, reference_predict(apply_fn, params, [owner] * len(x), x), rtol=1e-5, atol=1e-5)


def served_after(clock: FakeClock, futures: list) -> list:
    """Moves the clock past max_delay so the queued batches go, then waits for every answer."""
    clock.advance(1.0)
    return [f.result(TIMEOUT_S) for f in futures]


# ------------------------------------------------------------------ clients and callbacks
@pytest.mark.parametrize("kind", KINDS)
def test_a_request_its_client_completed_is_dropped_and_the_server_serves_on(kind, rng):
    mt, params = make_model()
    clock = FakeClock()
    with SERVERS[kind](mt, clock=clock, **PATIENT) as server:
        mine = server.submit("t0", rows(rng))
        others = [(t, x, server.submit(t, x)) for t, x in [(f"t{i}", rows(rng)) for i in (1, 2, 3)]]
        mine.set_exception(TimeoutError("the client gave up"))  # before its step launches
        for (t, x, _), y in zip(others, served_after(clock, [f for _, _, f in others])):
            check_answer(server, params, t, x, y)
        assert not server.closed
        x = rows(rng)
        check_answer(server, params, "t1", x, served_after(clock, [server.submit("t1", x)])[0])
    assert isinstance(mine.exception(), TimeoutError) and not server._outstanding


def _fail_while_running(mt, monkeypatch, box: dict) -> None:
    """The step is dispatched; waiting for its answer, the client completes and the step fails."""
    dispatch = mt.dispatch

    class FailsAfterTheClient:
        def __init__(self, pending):
            self.plan = pending.plan

        def result(self):
            box["mine"].set_exception(TimeoutError("the client gave up"))
            raise RuntimeError("the step failed")

    monkeypatch.setattr(mt, "dispatch", lambda tenant_ids, x: FailsAfterTheClient(dispatch(tenant_ids, x)))


def _fail_at_launch(mt, monkeypatch, box: dict) -> None:
    """The launch itself raises (planning the step's program calls, before any dispatch)."""
    def failing_segments(self, requests):
        box["mine"].set_exception(TimeoutError("the client gave up"))
        raise RuntimeError("the launch failed")

    monkeypatch.setattr(jaxmt.Scheduler, "_segments", failing_segments)


@pytest.mark.parametrize("fail", [_fail_while_running, _fail_at_launch], ids=["while running", "at launch"])
def test_a_request_its_client_completes_while_its_step_fails_is_let_go(fail, rng, monkeypatch):
    """The server fails the other request of the step and keeps nothing of the completed one."""
    mt, _ = make_model()
    clock, box = FakeClock(), {}
    fail(mt, monkeypatch, box)
    with jaxmt.Scheduler(mt, clock=clock, **PATIENT) as server:
        box["mine"] = mine = server.submit("t0", rows(rng))
        other = server.submit("t1", rows(rng))
        clock.advance(1.0)
        assert isinstance(other.exception(TIMEOUT_S), RuntimeError)
        assert isinstance(mine.exception(TIMEOUT_S), TimeoutError)
        deadline = time.monotonic() + TIMEOUT_S  # the server thread goes on after other's future
        while server._outstanding and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not server._outstanding and not server.closed


class CallbackEscape(BaseException):
    """What asyncio.CancelledError or SystemExit is to concurrent.futures: not an Exception."""


@pytest.mark.parametrize("kind", KINDS)
def test_a_done_callback_raising_a_base_exception_stops_nothing(kind, rng, caplog):
    mt, params = make_model()
    clock = FakeClock()
    server = SERVERS[kind](mt, clock=clock, pipeline_depth=1, **PATIENT)

    def escape(future):
        raise CallbackEscape

    with caplog.at_level(logging.ERROR, logger="jaxmt"):
        sent = [(f"t{i}", rows(rng)) for i in range(3)]
        futures = [server.submit(t, x) for t, x in sent]
        futures[0].add_done_callback(escape)  # still queued: the clock has not moved
        for (t, x), y in zip(sent, served_after(clock, futures)):
            check_answer(server, params, t, x, y)
        x = rows(rng)
        check_answer(server, params, "t3", x, served_after(clock, [server.submit("t3", x)])[0])
        closer = threading.Thread(target=server.close, daemon=True)
        closer.start()
        closer.join(TIMEOUT_S)
    assert not closer.is_alive() and not server._outstanding
    assert any("done-callback" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------ a bug in a server thread
@pytest.mark.parametrize("kind", KINDS)
def test_a_bug_in_a_server_thread_fails_the_requests_it_took_instead_of_losing_them(kind, monkeypatch, rng, caplog):
    mt, _ = make_model(2)
    server = SERVERS[kind](mt, max_delay_ms=0.0)
    take = server._take_locked

    def broken(*args, **kwargs):  # takes a request off its queue, then fails
        if take(*args, **kwargs) is not None:
            raise RuntimeError("injected server bug")
        return None

    monkeypatch.setattr(server, "_take_locked", broken)
    with caplog.at_level(logging.ERROR, logger="jaxmt"):
        future = server.submit("t0", rows(rng))
        with pytest.raises(RuntimeError, match="injected server bug"):
            future.result(TIMEOUT_S)
    server.close(timeout=TIMEOUT_S)
    assert server.closed and not server._outstanding


def test_a_bug_in_the_completion_thread_fails_every_request_instead_of_hanging(monkeypatch, rng, caplog):
    """The completion thread's own bookkeeping fails, twice (in the step's normal path and in
    its failure path): every request still completes with the error and close() returns."""
    mt, _ = make_model(2)
    server = jaxmt.Scheduler(mt, max_delay_ms=0.0, pipeline_depth=1)
    done_locked, failures = server._step_done_locked, []

    def broken(launched, ready_s):
        if len(failures) < 2:
            failures.append(1)
            raise RuntimeError("injected completion bug")
        return done_locked(launched, ready_s)

    monkeypatch.setattr(server, "_step_done_locked", broken)
    with caplog.at_level(logging.ERROR, logger="jaxmt"):
        first = server.submit("t0", rows(rng))
        with pytest.raises(RuntimeError, match="injected completion bug"):
            first.result(TIMEOUT_S)
    later = []
    try:
        later.append(server.submit("t1", rows(rng)))
    except jaxmt.SchedulerClosed:  # the server closed itself
        pass
    for future in later:
        with pytest.raises((RuntimeError, jaxmt.SchedulerClosed)):
            future.result(TIMEOUT_S)
    server.close(timeout=TIMEOUT_S)
    assert server.closed and not server._outstanding
    assert not any(thread.is_alive() for thread in server._threads)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("drain", [True, False], ids=["drain", "no drain"])
def test_a_request_its_owner_cancelled_is_not_counted_when_the_server_closes(kind, drain, rng):
    mt, _ = make_model(2)
    server = SERVERS[kind](mt, clock=FakeClock(), **PATIENT)
    future = server.submit("t0", rows(rng))
    assert future.cancel()
    server.close(drain=drain, timeout=TIMEOUT_S)
    overall = server.metrics()["overall"]
    assert (overall["count"], overall["errors"]) == (0, 0) and not server._outstanding


# ------------------------------------------------------------------ tenants that leave
@pytest.mark.parametrize("kind", KINDS)
def test_overall_counts_never_go_down_when_removed_tenants_are_forgotten(kind, rng):
    mt, _ = make_model(3)
    clock = FakeClock()
    options = {"tenant_id": "t1"} if kind == "exclusive" else {}
    with SERVERS[kind](mt, clock=clock, **PATIENT, **options) as server:
        for tenant in ("t0", "t1", "t2"):
            served_after(clock, [server.submit(tenant, rows(rng))])
        assert server.metrics()["overall"]["count"] == 3
        mt.remove_tenant("t2")  # idle
        queued = server.submit("t0", rows(rng))
        mt.remove_tenant("t0")  # with a request queued
        clock.advance(1.0)
        with pytest.raises(jaxmt.UnknownTenantError, match="t0"):
            queued.result(TIMEOUT_S)
        metrics = server.metrics()
    overall = metrics["overall"]
    assert (overall["count"], overall["ok"], overall["errors"]) == (4, 3, 1)
    assert list(metrics["tenants"]) == ["t1"]  # however a tenant left, its own stats go


@pytest.mark.parametrize("kind", ["time", "space"])
def test_lanes_are_kept_only_for_resident_tenants_under_churn(kind, rng):
    mt, _ = make_model(1)
    with SERVERS[kind](mt, max_delay_ms=0.0) as server:
        for i in range(20):
            tenant = f"churn{i}"
            mt.add_tenant(tenant, make_params(50 + i))
            server.submit(tenant, rows(rng)).result(TIMEOUT_S)
            mt.remove_tenant(tenant)
        with server._cond:
            assert server._cond.wait_for(lambda: not server._busy, TIMEOUT_S)  # the last batch let go of its lane
            server._next_batch_locked(server._clock())  # a scan for the next batch, as the servers' threads make
            kept = set(server._lanes)
    assert kept <= set(mt.tenants) and len(kept) <= len(mt)


# ------------------------------------------------------------------ refused requests
@pytest.mark.parametrize("kind", KINDS)
def test_a_refused_first_request_does_not_fix_the_models_rows(kind, rng):
    mt, params = make_model(2, rows_given=False)
    closed = SERVERS[kind](mt)
    closed.close()
    with pytest.raises(jaxmt.SchedulerClosed):
        closed.submit("t0", rows(rng, dtype=np.float64))
    assert mt.row_shape is None
    with SERVERS[kind](mt, max_queue_rows=4) as server:
        too_many = server.submit("t0", rows(rng, 8, dtype=np.float64))
        assert isinstance(too_many.exception(TIMEOUT_S), jaxmt.Overloaded)
        assert mt.row_shape is None
        x = rows(rng)  # the model's rows after all: the first admitted request fixes them
        check_answer(server, params, "t1", x, server.submit("t1", x).result(TIMEOUT_S))
    assert (mt.row_shape, mt.row_dtype) == ((ROW,), np.float32)


@pytest.mark.parametrize("kind", KINDS)
def test_rows_fixed_by_another_request_while_one_was_checked_refuse_it_alone(kind, rng, monkeypatch):
    """A request checked while the model's rows were unknown, whose rows another request then
    fixed otherwise (float32 against its float64), is refused at submit. Admitted, on the
    Scheduler it failed the step it shared with the other tenant's request (their rows cannot
    form one block); on the baselines it was served rows the model's are not."""
    mt, params = make_model(2, rows_given=False)
    clock = FakeClock()
    server = SERVERS[kind](mt, clock=clock, **PATIENT)
    first, real_check = [], mt.check_input

    def check_then_let_another_request_fix_the_rows(tenant_ids, x):
        checked = real_check(tenant_ids, x)
        if not first:  # the float64 request has passed its check: a float32 one comes first
            first.append((xa := rows(rng)))
            first.append(server.submit("t0", xa))
        return checked

    monkeypatch.setattr(mt, "check_input", check_then_let_another_request_fix_the_rows)
    try:
        with pytest.raises(jaxmt.InputError, match="float64"):
            server.submit("t1", rows(rng, dtype=np.float64))
        assert (mt.row_shape, mt.row_dtype) == ((ROW,), np.float32)
        xa, future = first
        check_answer(server, params, "t0", xa, served_after(clock, [future])[0])
    finally:
        server.close(drain=False)



@pytest.mark.parametrize("kind", KINDS)
def test_rows_a_failing_first_predict_fixed_for_its_launch_do_not_admit_a_request(kind, rng, monkeypatch):
    """A first ``predict`` fixes the model's rows while it launches and unfixes them when its
    launch fails. A request submitted meanwhile must find the rows as they are under the
    store's lock: admitted on the passing ones, it let a request of other rows (float64) be
    admitted after it, and on the Scheduler the two failed the step they shared instead of
    the second being refused alone at submit."""
    mt, params = make_model(2, rows_given=False)
    clock = FakeClock()
    server = SERVERS[kind](mt, clock=clock, **PATIENT)
    xa, admitted, submitter = rows(rng), [], []
    asked_or_admitted = threading.Event()

    def submit_first():
        admitted.append(server.submit("t0", xa))
        asked_or_admitted.set()

    def launch_fails_once_a_request_came_meanwhile(step, x):
        submitter.append(threading.Thread(target=submit_first, daemon=True))
        submitter[0].start()
        assert asked_or_admitted.wait(TIMEOUT_S)
        raise RuntimeError("the device ran out of memory")

    mt.store.lock = AskedForLock(mt.store.lock, lambda: submitter and threading.current_thread() is submitter[0]
                                 and asked_or_admitted.set())
    monkeypatch.setattr(mt, "_launch", launch_fails_once_a_request_came_meanwhile)
    try:
        with pytest.raises(RuntimeError, match="out of memory"):
            mt.predict(["t1"], rows(rng))
        monkeypatch.undo()
        submitter[0].join(TIMEOUT_S)
        assert (mt.row_shape, mt.row_dtype) == ((ROW,), np.float32)  # the admitted request's rows
        with pytest.raises(jaxmt.InputError, match="float64"):
            server.submit("t1", rows(rng, dtype=np.float64))
        check_answer(server, params, "t0", xa, served_after(clock, admitted)[0])
    finally:
        server.close(drain=False)

# ------------------------------------------------------------------ baselines' programs
def test_models_of_one_apply_fn_with_other_param_shapes_compile_their_own_programs():
    def apply_hidden(params, x):  # defined here: a program no other test shares
        return jnp.tanh(x @ params["w1"]) @ params["w2"]

    def model(hidden: int):
        k1, k2 = jax.random.split(jax.random.key(hidden))
        p = {"w1": jax.random.normal(k1, (ROW, hidden)), "w2": jax.random.normal(k2, (hidden, 2))}
        mt = jaxmt.MultiTenantModel(apply_hidden, p, capacity=2, buckets=jaxmt.BucketPolicy.powers_of_two(2, 4),
                                    row_shape=(ROW,), row_dtype=np.float32)
        mt.add_tenant("t0", p)
        return mt

    new_programs = []
    for mt in (model(4), model(32), model(4)):
        with jaxmt.TimeOnlyServer(mt) as server:
            new_programs.append(server.warmup(execute=False))
    sizes = len(jaxmt.BucketPolicy.powers_of_two(2, 4).row_buckets)
    assert new_programs == [sizes, sizes, 0]  # the third model's shapes were compiled for the first
