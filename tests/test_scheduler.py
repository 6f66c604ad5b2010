"""The Scheduler: every request answered exactly like its tenant's model, or failed explicitly.

No assertion depends on wall-clock speed: ordering and overload tests use an injected fake
clock and steps gated by events; waits use generous timeouts only to avoid hanging forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import threading
import time
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FakeClock, reference_predict
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxmt
from jaxmt._queue import _EdfQueue, _Request, _Totals
from jaxmt.rows import RowParts

TIMEOUT_S = 60.0  # generous: only to turn a hang into a failure
ROW = 6


def apply_fn(params, x):
    return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"]


def make_params(seed: int) -> dict:
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    return {"w1": jax.random.normal(k1, (ROW, 16)), "b1": jax.random.normal(k2, (16,)), "w2": jax.random.normal(k3, (16, 3))}


def make_model(tenants: int, max_tenants: int = 4, max_rows: int = 4, warm: bool = False):
    params = {f"t{i}": make_params(i + 1) for i in range(tenants)}
    mt = jaxmt.MultiTenantModel(apply_fn, make_params(0), capacity=max(tenants, 2),
                                buckets=jaxmt.BucketPolicy.powers_of_two(max_tenants, max_rows),
                                row_shape=(ROW,), row_dtype=np.float32)
    for name, p in params.items():
        mt.add_tenant(name, p)
    if warm:
        mt.warmup()
    return mt, params


@pytest.fixture(scope="module")
def served():
    """Six tenants, ladders K, B in (1, 2, 4), every program compiled once for the module."""
    return make_model(6, warm=True)


class RecordingDispatch:
    """Wraps ``mt.dispatch``: records each step's tenant ids and rows; a step can be held
    (its ``result()`` waits for ``release``), advance a fake clock, or raise."""

    def __init__(self, mt, clock: FakeClock | None = None, step_s: float = 0.0, hold: bool = False):
        self.mt, self.inner = mt, mt.dispatch
        self.clock, self.step_s = clock, step_s
        self.release = threading.Event()
        if not hold:
            self.release.set()
        self.calls: list[tuple[list, np.ndarray]] = []
        self.called = threading.Condition()
        self.raise_on_launch = None  # predicate(x) -> bool
        self.raise_on_result = None

    def __call__(self, tenant_ids, x):
        # A RowParts reads as its concatenation (built here from its parts, so that the
        # dispatch still takes the step's rows from the parts).
        rows_sent = np.concatenate(x.parts) if isinstance(x, RowParts) else np.array(x)
        with self.called:
            self.calls.append((list(tenant_ids), rows_sent))
            self.called.notify_all()
        if self.raise_on_launch is not None and self.raise_on_launch(rows_sent):
            raise RuntimeError("injected launch failure")
        pending = self.inner(tenant_ids, x)
        outer = self

        class Held:
            plan = pending.plan

            def result(self):
                assert outer.release.wait(TIMEOUT_S)
                if outer.clock is not None:
                    outer.clock.advance(outer.step_s)
                if outer.raise_on_result is not None and outer.raise_on_result(rows_sent):
                    raise RuntimeError("injected device failure")
                return pending.result()

        return Held()

    def wait_calls(self, n: int) -> None:
        with self.called:
            assert self.called.wait_for(lambda: len(self.calls) >= n, TIMEOUT_S)


def check_against_reference(params, requests) -> None:
    """requests: (tenant, x, y) triples; compares per tenant, all rows at once."""
    for tenant in {t for t, _, _ in requests}:
        xs = np.concatenate([x for t, x, _ in requests if t == tenant])
        ys = np.concatenate([y for t, _, y in requests if t == tenant])
        want = reference_predict(apply_fn, params, [tenant] * len(xs), xs)
        np.testing.assert_allclose(ys, want, rtol=1e-5, atol=1e-5)


def rows(rng, n: int = 1) -> np.ndarray:
    return rng.standard_normal((n, ROW)).astype(np.float32)


# ------------------------------------------------------------------ configuration
@pytest.mark.parametrize("field, value, error", [
    ("max_delay_ms", -1.0, ValueError), ("max_delay_ms", float("nan"), ValueError), ("max_delay_ms", "2", TypeError),
    ("default_slo_ms", 0.0, ValueError), ("default_slo_ms", float("inf"), ValueError), ("default_slo_ms", 1e12, ValueError),
    ("overload_policy", "drop", ValueError), ("overload_factor", -0.5, ValueError),
    ("max_queue_rows", 0, ValueError), ("pipeline_depth", 0, ValueError), ("pipeline_depth", 1.5, ValueError),
    ("ewma_alpha", 0.0, ValueError), ("flag_below_attainment", 1.5, ValueError), ("clock", 3, TypeError),
    ("target_latency_ms", 0.0, ValueError), ("target_latency_ms", -5.0, ValueError), ("target_latency_ms", "30", TypeError),
    pytest.param("default_slo_ms", 10**400, ValueError, id="default_slo_ms-beyond-float"),
    ("flag_min_requests", 65, ValueError),  # more than the default flag_window of 64 could ever hold
    ("stage_inputs", 1, ValueError), ("stage_inputs", "yes", ValueError),
])
def test_config_rejects_bad_values(field, value, error):
    with pytest.raises(error, match=field):
        jaxmt.SchedulerConfig(**{field: value})


def test_config_is_frozen_hashable_and_overridable(served):
    mt, _ = served
    config = jaxmt.SchedulerConfig(max_delay_ms=1, overload_policy="serve_late")
    assert config.max_delay_ms == 1.0 and isinstance(config.max_delay_ms, float)
    assert hash(config) == hash(jaxmt.SchedulerConfig(max_delay_ms=1.0, overload_policy="serve_late"))
    with pytest.raises(AttributeError):
        config.max_delay_ms = 3.0
    with pytest.raises(TypeError, match="unknown scheduler option"):
        jaxmt.Scheduler(mt, max_dealy_ms=1.0)
    with pytest.raises(TypeError, match="MultiTenantModel"):
        jaxmt.Scheduler(object())
    with jaxmt.Scheduler(mt, 3.0, config=config, pipeline_depth=1) as sched:
        assert (sched.config.max_delay_ms, sched.config.overload_policy, sched.config.pipeline_depth) == (3.0, "serve_late", 1)


# ------------------------------------------------------------------ correctness under load
@pytest.mark.parametrize("target_latency_ms", [None, 20.0])  # paced: mixed SLOs exercise both orders of due requests
def test_many_threads_thousands_of_requests_match_reference(served, monkeypatch, target_latency_ms):
    mt, params = served
    recorder = RecordingDispatch(mt)
    monkeypatch.setattr(mt, "dispatch", recorder)
    tenants, threads, per_thread = list(params), 8, 250
    results: list[list] = [[] for _ in range(threads)]

    def client(index: int) -> None:
        rng = np.random.default_rng(1000 + index)
        for _ in range(per_thread):
            tenant = tenants[rng.integers(len(tenants))]
            x = rows(rng, int(rng.integers(1, 7)))  # up to 6 rows: more than the largest row bucket
            slo = float(rng.choice([5.0, 50.0, 500.0]))
            results[index].append((tenant, x, sched.submit(tenant, x, slo_ms=slo)))

    with jaxmt.Scheduler(mt, max_delay_ms=1.0, overload_policy="serve_late", max_queue_rows=None,
                         target_latency_ms=target_latency_ms) as sched:
        workers = [threading.Thread(target=client, args=(i,)) for i in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        answered = [(t, x, f.result(timeout=TIMEOUT_S)) for part in results for t, x, f in part]
        metrics = sched.metrics()
        latencies = sched.latencies_by_tenant()
    check_against_reference(params, answered)
    total = threads * per_thread
    assert metrics["overall"]["count"] == metrics["overall"]["ok"] == total
    # The latencies behind the percentiles, per tenant: one per answered request.
    assert {t: len(v) for t, v in latencies.items()} == {t: m["ok"] for t, m in metrics["tenants"].items()}
    assert all(float(np.median(latencies[t])) == pytest.approx(m["p50_ms"], abs=1e-3) for t, m in metrics["tenants"].items())
    assert sum(m["count"] for m in metrics["tenants"].values()) == total
    assert metrics["overall"]["queue_depth"] == 0 and metrics["steps"]["in_flight"] == 0 and not sched._outstanding
    # Steps respect the largest bucket: every program call of a step is one planned program.
    assert sum(len(x) for _, x in recorder.calls) == sum(len(x) for t, x, _ in answered)
    for ids, _ in recorder.calls:
        assert len(jaxmt.make_plan(mt.store.slots_of(ids), mt.buckets).steps) == 1
    steps = metrics["steps"]
    assert round(steps["steps"] * steps["programs_per_step"]) == len(recorder.calls)
    assert 1.0 <= metrics["steps"]["mean_tenants_per_step"] <= 4.0


def test_submit_async_answers_like_submit(served, rng):
    mt, params = served

    async def main(sched):
        xs = [(f"t{i % 6}", rows(rng, 1 + i % 3)) for i in range(24)]
        ys = await asyncio.gather(*(sched.submit_async(t, x) for t, x in xs))
        with pytest.raises(jaxmt.UnknownTenantError):
            await sched.submit_async("nobody", rows(rng))
        return [(t, x, y) for (t, x), y in zip(xs, ys)]

    with jaxmt.Scheduler(mt, max_delay_ms=0.5, overload_policy="serve_late") as sched:
        answered = asyncio.run(main(sched))
    check_against_reference(params, answered)


# ------------------------------------------------------------------ validation at submit
def test_bad_requests_raise_at_submit_and_never_enter_the_queue(served, rng):
    mt, _ = served
    with pytest.raises(jaxmt.UnknownTenantError) as from_predict:
        mt.predict(["nobody"], rows(rng))
    with jaxmt.Scheduler(mt, max_delay_ms=10_000.0) as sched:
        with pytest.raises(jaxmt.UnknownTenantError) as from_submit:
            sched.submit("nobody", rows(rng))
        assert type(from_submit.value) is type(from_predict.value) and isinstance(from_submit.value, KeyError)
        with pytest.raises(jaxmt.UnknownTenantError):
            sched.submit(["unhashable"], rows(rng))
        with pytest.raises(jaxmt.InputError, match="shape"):
            sched.submit("t0", rng.standard_normal((2, ROW + 1)).astype(np.float32))
        with pytest.raises(jaxmt.InputError, match="dtype"):
            sched.submit("t0", rng.standard_normal((2, ROW)))  # float64
        with pytest.raises(jaxmt.InputError, match=r"tenant 't0' needs rows \[r >= 1, \.\.\.\], got shape \[0, "):
            sched.submit("t0", np.zeros((0, ROW), np.float32))
        with pytest.raises(jaxmt.InputError):
            sched.submit("t0", np.float32(1.0))
        for slo in (-1.0, 0.0, float("nan"), float("inf"), 1e12, 10**400, "fast", True, [50.0]):
            with pytest.raises(ValueError, match="slo_ms"):
                sched.submit("t0", rows(rng), slo_ms=slo)
        overall = sched.metrics()["overall"]
        assert overall["count"] == 0 and overall["queue_depth"] == 0


@pytest.mark.parametrize("server", ["scheduler", "time"])
def test_a_first_request_the_model_cannot_take_is_refused_and_fixes_nothing(server, rng):
    """Rows not known yet: the first request's rows are traced at submit, so a bad one fails
    alone with InputError and the next, good one fixes the rows and is served."""
    params = {f"t{i}": make_params(i + 1) for i in range(2)}
    mt = jaxmt.MultiTenantModel(apply_fn, make_params(0), capacity=2, buckets=jaxmt.BucketPolicy.powers_of_two(2, 2),
                                nonfinite_inputs="reject")
    for name, p in params.items():
        mt.add_tenant(name, p)
    make = {"scheduler": lambda: jaxmt.Scheduler(mt, max_delay_ms=1.0), "time": lambda: jaxmt.TimeOnlyServer(mt, max_delay_ms=1.0)}
    with make[server]() as sched:
        with pytest.raises(jaxmt.InputError, match=r"shape \[7\].*do not fit the model"):
            sched.submit("t0", rng.standard_normal((1, ROW + 1)).astype(np.float32))
        nan_rows = rows(rng, 2)
        nan_rows[1, 0] = np.nan
        with pytest.raises(jaxmt.InputError, match="row 1 .*'t1'.*NaN"):
            sched.submit("t1", nan_rows)
        assert mt.row_shape is None and mt.stats()["compiles"] == 0
        x = rows(rng, 2)
        got = sched.submit("t1", x).result(TIMEOUT_S)
    assert mt.row_shape == (ROW,)
    check_against_reference(params, [("t1", x, got)])


# ------------------------------------------------------------------ close
def test_close_drain_serves_everything_queued(served, rng):
    mt, params = served
    sched = jaxmt.Scheduler(mt, max_delay_ms=60_000.0)  # nothing is due before close
    queued = [(t, x, sched.submit(t, x)) for t, x in [("t0", rows(rng, 2)), ("t1", rows(rng)), ("t0", rows(rng, 3))]]
    sched.close(drain=True)
    check_against_reference(params, [(t, x, f.result(timeout=TIMEOUT_S)) for t, x, f in queued])
    with pytest.raises(jaxmt.SchedulerClosed):
        sched.submit("t0", rows(rng))
    sched.close()  # idempotent
    assert sched.closed


def test_close_without_drain_fails_queued_and_finishes_in_flight(served, monkeypatch, rng):
    mt, params = served
    held = RecordingDispatch(mt, hold=True)
    monkeypatch.setattr(mt, "dispatch", held)
    sched = jaxmt.Scheduler(mt, max_delay_ms=0.0, pipeline_depth=1)
    x0 = rows(rng)
    in_flight = sched.submit("t2", x0)
    held.wait_calls(1)  # launched, its result held back; pipeline depth 1: the rest must wait
    queued = [sched.submit(f"t{i}", rows(rng)) for i in range(4)]
    closer = threading.Thread(target=sched.close, kwargs={"drain": False})
    closer.start()
    for future in queued:
        with pytest.raises(jaxmt.SchedulerClosed):
            future.result(timeout=TIMEOUT_S)
    held.release.set()
    closer.join(TIMEOUT_S)
    assert not closer.is_alive()
    check_against_reference(params, [("t2", x0, in_flight.result(timeout=TIMEOUT_S))])
    overall = sched.metrics()["overall"]
    assert (overall["count"], overall["ok"], overall["errors"]) == (5, 1, 4)


def test_close_from_a_done_callback_drains_instead_of_hanging(served, rng):
    """A future's callback runs on the server's completion thread, which the dispatch thread
    waits for (pipeline_depth=1): close() there must return, and the queue still drains."""
    mt, params = served
    sched = jaxmt.Scheduler(mt, max_delay_ms=0.0, pipeline_depth=1)
    closed_in_callback = threading.Event()

    def close_on_first_answer(future):
        sched.close(drain=True)
        closed_in_callback.set()

    requests = [("t0", rows(rng)) for _ in range(5)]
    futures = [sched.submit(t, x) for t, x in requests]
    futures[0].add_done_callback(close_on_first_answer)
    assert closed_in_callback.wait(TIMEOUT_S)
    check_against_reference(params, [(t, x, f.result(timeout=TIMEOUT_S)) for (t, x), f in zip(requests, futures)])
    sched.close()
    assert sched.closed and not any(thread.is_alive() for thread in sched._threads)


def test_with_block_drains_on_exit(served, rng):
    mt, params = served
    with jaxmt.Scheduler(mt, max_delay_ms=60_000.0) as sched:
        queued = [(f"t{i}", x, sched.submit(f"t{i}", x)) for i, x in enumerate([rows(rng), rows(rng, 4)])]
    assert all(f.done() for _, _, f in queued)
    check_against_reference(params, [(t, x, f.result()) for t, x, f in queued])


def test_cancelled_request_is_skipped(served, rng):
    mt, params = served
    with jaxmt.Scheduler(mt, max_delay_ms=60_000.0) as sched:
        keep, drop = rows(rng), rows(rng)
        kept, cancelled = sched.submit("t0", keep), sched.submit("t1", drop)
        assert cancelled.cancel()
    assert cancelled.cancelled() and not sched._outstanding
    check_against_reference(params, [("t0", keep, kept.result(timeout=TIMEOUT_S))])


@pytest.mark.parametrize("give_up", ["cancel", "set_exception"])
@pytest.mark.parametrize("server", ["scheduler", "time"])
def test_a_request_its_owner_gave_up_on_leaves_the_queue_at_once(server, give_up, served, rng):
    """Its rows stop counting against max_queue_rows and in the queue depth when its owner
    cancels it or completes it (a client's own timeout), not when a step would have reached
    it (up to max_delay_ms later)."""
    mt, params = served
    make = jaxmt.Scheduler if server == "scheduler" else jaxmt.TimeOnlyServer
    with make(mt, max_delay_ms=60_000.0, max_queue_rows=4, clock=FakeClock()) as sched:
        mine = sched.submit("t0", rows(rng, 4))
        if give_up == "cancel":
            assert mine.cancel()
        else:
            mine.set_exception(TimeoutError("the client gave up"))
        assert sched.metrics()["overall"]["queue_depth"] == 0 and not sched._outstanding
        x = rows(rng, 4)
        taken = sched.submit("t1", x)  # would not fit beside the cancelled 4 rows
        assert not (taken.done() and taken.exception() is not None)
    check_against_reference(params, [("t1", x, taken.result(timeout=TIMEOUT_S))])


@pytest.mark.parametrize("case", ["trimmed", "paced, not due", "time-only, overflowing its batch"])
def test_a_request_given_up_on_while_a_step_is_formed_without_it_leaves_the_queue(served, monkeypatch, rng, case):
    """The owner cancels a request while the dispatch thread holds it off the queue (taken,
    then put back: trimmed, not due yet, or beyond the batch): its done-callback cannot find
    it queued, so putting it back must drop it, or its rows count against max_queue_rows
    and the queue depth until a step reaches it (here: never, the clock stands still)."""
    mt, params = served
    clock = FakeClock()
    recorder = RecordingDispatch(mt)
    monkeypatch.setattr(mt, "dispatch", recorder)
    make, options = {
        "trimmed": (jaxmt.Scheduler, {"max_delay_ms": 10.0}),
        "paced, not due": (jaxmt.Scheduler, {"target_latency_ms": 20.0, "max_delay_ms": 0.0}),
        "time-only, overflowing its batch": (jaxmt.TimeOnlyServer, {"max_delay_ms": 60_000.0}),
    }[case]
    limit = 5 if case.startswith("time") else 4  # time-only: room for the five rows that fill a batch
    with make(mt, max_queue_rows=limit, clock=clock, overload_policy="serve_late", **options) as sched:
        take, given_up = sched._take_locked, []

        def take_and_give_up(*args, **kwargs):  # the owner cancels the marked request as a step takes it
            req = take(*args, **kwargs)
            if req is not None and np.any(req.x == 777.0) and req.future.cancel():
                given_up.append(req)
            return req

        monkeypatch.setattr(sched, "_take_locked", take_and_give_up)
        victim = rows(rng, 2 if case.startswith("time") else 1)
        victim[0, 0] = 777.0
        if case == "trimmed":  # at 10 ms t0 is due; t1 and the victim (t2) are young company padding to 4
            sent = [("t0", rows(rng))]
            first = sched.submit(*sent[0])
            clock.advance(0.005)
            sent.append(("t1", rows(rng)))
            answered = [first, sched.submit(*sent[1]), sched.submit("t2", victim)]
            clock.advance(0.005)
        elif case == "paced, not due":  # at 20 ms t0 is due, the victim (due at 25 ms) is put back
            sent = [("t0", rows(rng))]
            answered = [sched.submit(*sent[0])]
            clock.advance(0.005)
            answered.append(sched.submit("t2", victim))
            clock.advance(0.015)
        else:  # five rows of t0 fill its batch of 4 at once: the victim's two wait for the next
            sent = [("t0", rows(rng, 3))]
            answered = [sched.submit(*sent[0]), sched.submit("t0", victim)]
        ys = [f.result(TIMEOUT_S) for f in answered[: len(sent)]]
        assert [r.future for r in given_up] == [answered[-1]] and answered[-1].cancelled()
        with sched._cond:
            assert not sched._has_work_locked() and not sched._outstanding
        assert sched.metrics()["overall"]["queue_depth"] == 0
        x = rows(rng, 4)
        taken = sched.submit("t3", x)  # would not fit beside the cancelled rows
        assert not (taken.done() and taken.exception() is not None)
        clock.advance(60.0)
        y = taken.result(TIMEOUT_S)
    check_against_reference(params, [*((t, x_, y_) for (t, x_), y_ in zip(sent, ys)), ("t3", x, y)])

def test_each_answer_holds_only_its_own_rows(served, monkeypatch, rng):
    """A request's answer does not keep the step's other answers reachable (``.base``):
    two tenants' requests answered from one step share no memory."""
    mt, params = served
    record = RecordingDispatch(mt)
    monkeypatch.setattr(mt, "dispatch", record)
    sched = jaxmt.Scheduler(mt, max_delay_ms=60_000.0)
    a, b = rows(rng, 2), rows(rng, 1)
    fa, fb = sched.submit("t0", a), sched.submit("t1", b)
    sched.close(drain=True)  # serves what is queued at once: one step
    got_a, got_b = fa.result(timeout=TIMEOUT_S), fb.result(timeout=TIMEOUT_S)
    assert len(record.calls) == 1  # one step answered both
    assert not np.shares_memory(got_a, got_b) and (got_a.base is None or got_a.base.shape == got_a.shape)
    check_against_reference(params, [("t0", a, got_a), ("t1", b, got_b)])


# ------------------------------------------------------------------ failures
@pytest.mark.parametrize("where", ["launch", "result"])
def test_a_failing_step_fails_only_its_own_requests(served, monkeypatch, rng, where):
    mt, params = served
    recorder = RecordingDispatch(mt)
    poisoned = lambda x: bool(np.any(x == 1234.0))
    setattr(recorder, f"raise_on_{where}", poisoned)
    monkeypatch.setattr(mt, "dispatch", recorder)
    with jaxmt.Scheduler(mt, max_delay_ms=0.5, overload_policy="serve_late") as sched:
        poison = np.full((1, ROW), 1234.0, np.float32)
        with pytest.raises(RuntimeError, match="injected"):
            sched.submit("t0", poison).result(timeout=TIMEOUT_S)
        mixed = []
        for i in range(60):  # concurrent company: some share the poisoned step, most do not
            tenant, x = f"t{i % 6}", (poison if i == 30 else rows(rng))
            mixed.append((tenant, x, sched.submit(tenant, x)))
        answered, failed = [], []
        for tenant, x, future in mixed:
            error = future.exception(timeout=TIMEOUT_S)
            (answered if error is None else failed).append((tenant, x, future))
        check_against_reference(params, [(t, x, f.result()) for t, x, f in answered])
        poisoned_steps = [x_step for _, x_step in recorder.calls if poisoned(x_step)]
        for _, x, future in failed:  # every failure was in a step with the poison
            assert any(np.any(np.all(x_step == x[0], axis=1)) for x_step in poisoned_steps)
            assert isinstance(future.exception(), RuntimeError)
        # The loop goes on after failures.
        x = rows(rng)
        check_against_reference(params, [("t3", x, sched.submit("t3", x).result(timeout=TIMEOUT_S))])
        assert sched.metrics()["steps"]["failed_steps"] == len(poisoned_steps)


def test_a_bug_in_the_dispatch_loop_fails_requests_instead_of_losing_them(served, monkeypatch, rng, caplog):
    mt, _ = served
    sched = jaxmt.Scheduler(mt, max_delay_ms=0.0)
    form = sched._form_step_locked

    def broken(now, est):  # takes the requests off the queue, then fails
        form(now, est)
        raise RuntimeError("injected scheduler bug")

    monkeypatch.setattr(sched, "_form_step_locked", broken)
    with caplog.at_level(logging.ERROR, logger="jaxmt"):
        future = sched.submit("t0", rows(rng))
        with pytest.raises(RuntimeError, match="injected scheduler bug"):
            future.result(TIMEOUT_S)
    sched.close()
    assert sched.closed and not sched._outstanding
    assert any("dispatch loop failed" in r.getMessage() for r in caplog.records)


def test_tenant_removed_while_queued_fails_through_its_future():
    mt, params = make_model(3, max_tenants=4, max_rows=2)
    rng = np.random.default_rng(7)
    with jaxmt.Scheduler(mt, max_delay_ms=60_000.0) as sched:
        x_gone, x_kept = rows(rng), rows(rng)
        gone, kept = sched.submit("t0", x_gone), sched.submit("t1", x_kept)
        mt.remove_tenant("t0")
        with pytest.raises(jaxmt.UnknownTenantError):
            sched.submit("t0", rows(rng))
    with pytest.raises(jaxmt.UnknownTenantError, match="t0") as info:
        gone.result(timeout=TIMEOUT_S)
    assert isinstance(info.value, KeyError)
    check_against_reference(params, [("t1", x_kept, kept.result(timeout=TIMEOUT_S))])
    assert "t0" not in sched.metrics()["tenants"] and "t1" in sched.metrics()["tenants"]  # a removed tenant's stats go too


# ------------------------------------------------------------------ step formation
def test_pipeline_launches_the_next_step_while_one_runs(served, monkeypatch, rng):
    mt, params = served
    held = RecordingDispatch(mt, hold=True)
    monkeypatch.setattr(mt, "dispatch", held)
    with jaxmt.Scheduler(mt, max_delay_ms=0.0, pipeline_depth=2) as sched:
        first = (rows(rng), rows(rng))
        futures = [sched.submit("t0", first[0])]
        held.wait_calls(1)
        futures.append(sched.submit("t1", first[1]))
        held.wait_calls(2)  # launched although step 1 has not finished
        assert not futures[0].done()
        held.release.set()
        check_against_reference(params, [("t0", first[0], futures[0].result(TIMEOUT_S)), ("t1", first[1], futures[1].result(TIMEOUT_S))])


def test_while_a_step_runs_the_next_is_formed_when_the_device_is_about_to_be_free(served, monkeypatch, rng):
    """Launched sooner, a step would only queue on the device; held, later arrivals join it.
    A deadline that the hold would miss sends the step sooner."""
    mt, params = served
    clock = FakeClock()
    held = RecordingDispatch(mt, clock=clock, step_s=0.010)  # every step takes 10 ms
    monkeypatch.setattr(mt, "dispatch", held)
    with jaxmt.Scheduler(mt, max_delay_ms=1.0, pipeline_depth=2, clock=clock, overload_policy="serve_late") as sched:
        x0 = rows(rng)
        first = sched.submit("t0", x0)
        clock.advance(0.001)
        y0 = first.result(TIMEOUT_S)  # the step-time estimate is now 10 ms
        held.release.clear()
        x1 = rows(rng)
        running = sched.submit("t1", x1)
        clock.advance(0.001)
        held.wait_calls(2)  # launched at max_delay: the device was free
        with sched._cond:  # and its launch has returned: the device is busy until 10 ms from now
            assert sched._cond.wait_for(lambda: sched._busy_until_s == pytest.approx(clock() + 0.010), TIMEOUT_S)
        x2 = rows(rng)
        company = sched.submit("t2", x2)
        clock.advance(0.002)  # t2 has waited 2 ms > max_delay_ms, but the device is busy for 8 ms more
        with sched._cond:
            batch, wait_s = sched._next_batch_locked(clock())
        assert batch is None and wait_s == pytest.approx(0.008, abs=1e-6)
        x3 = rows(rng)
        urgent = sched.submit("t3", x3, slo_ms=12.0)  # must leave within 2 ms to make its deadline
        with sched._cond:
            batch, wait_s = sched._next_batch_locked(clock())
        assert batch is None and wait_s == pytest.approx(0.002, abs=1e-6)
        clock.advance(0.002)
        held.wait_calls(3)
        held.release.set()
        answers = [("t0", x0, y0)] + [(t, x, f.result(TIMEOUT_S)) for t, x, f in [("t1", x1, running), ("t2", x2, company), ("t3", x3, urgent)]]
    check_against_reference(params, answers)
    assert sorted(set(held.calls[2][0])) == ["t2", "t3"]  # the held company went together


def test_a_step_that_ends_while_the_next_is_launching_is_not_counted_twice(served, monkeypatch, rng):
    """The device is expected busy for one step after a launch that returns once the step
    before it has ended (not for two: the ended step no longer holds the device)."""
    mt, _ = served
    clock = FakeClock()
    held = RecordingDispatch(mt, clock=clock, step_s=0.010)
    launch_gate = threading.Event()
    launch_gate.set()

    def gated(tenant_ids, x):
        assert launch_gate.wait(TIMEOUT_S)
        return held(tenant_ids, x)

    monkeypatch.setattr(mt, "dispatch", gated)
    with jaxmt.Scheduler(mt, max_delay_ms=0.0, pipeline_depth=2, clock=clock, overload_policy="serve_late") as sched:
        sched.submit("t0", rows(rng)).result(TIMEOUT_S)  # the step-time estimate is now 10 ms
        held.release.clear()
        first = sched.submit("t1", rows(rng))
        with sched._cond:  # its launch has returned
            assert sched._cond.wait_for(lambda: sched._running == 1, TIMEOUT_S)
        launch_gate.clear()
        second = sched.submit("t2", rows(rng))
        clock.advance(0.011)  # due now (the device is about to be free); its launch waits at the gate
        with sched._cond:
            assert sched._cond.wait_for(lambda: sched._in_flight == 2, TIMEOUT_S)
        held.release.set()
        first.result(TIMEOUT_S)  # the first step ends while the second is being launched
        held.release.clear()  # the second step stays on the device
        ended = clock()
        launch_gate.set()
        with sched._cond:
            assert sched._cond.wait_for(lambda: sched._running == 1, TIMEOUT_S)
            assert sched._busy_until_s == pytest.approx(ended + sched._steps.estimate_s, abs=1e-9)
        held.release.set()
        second.result(TIMEOUT_S)


def test_a_launch_that_compiles_is_not_taken_as_the_launch_time(rng, monkeypatch):
    """The hold before the next step uses the host time of a launch; a launch that compiled a
    program (a cache miss) took far longer than launches will, and is left out."""
    mt, _ = make_model(2)  # not warmed up: the first step compiles its program
    clock = FakeClock()
    inner = mt.dispatch

    def timed_dispatch(tenant_ids, x):
        compiles = mt.programs.compiles
        pending = inner(tenant_ids, x)
        clock.advance(0.5 if mt.programs.compiles != compiles else 0.001)
        return pending

    monkeypatch.setattr(mt, "dispatch", timed_dispatch)
    with jaxmt.Scheduler(mt, max_delay_ms=0.0, clock=clock, overload_policy="serve_late") as sched:
        sched.submit("t0", rows(rng)).result(TIMEOUT_S)
        assert mt.programs.compiles == 1 and sched._launch_ewma_s is None
        sched.submit("t0", rows(rng)).result(TIMEOUT_S)
        assert mt.programs.compiles == 1 and sched._launch_ewma_s == pytest.approx(0.001)


def test_steps_launched_before_any_step_time_was_known_count_as_the_average_step(served, monkeypatch, rng):
    """Steps launched while no step time was known get no prediction; once one is known,
    each of them still running is expected to hold the device for the average step."""
    mt, _ = served
    clock = FakeClock()
    inner, gates = mt.dispatch, []

    class Gated:  # a step that ends, 10 ms later on the clock, when its gate opens
        def __init__(self, pending, gate):
            self.plan, self.pending, self.gate = pending.plan, pending, gate

        def result(self):
            assert self.gate.wait(TIMEOUT_S)
            clock.advance(0.010)
            return self.pending.result()

    def dispatch(tenant_ids, x):
        gates.append(threading.Event())
        return Gated(inner(tenant_ids, x), gates[-1])

    monkeypatch.setattr(mt, "dispatch", dispatch)
    with jaxmt.Scheduler(mt, max_delay_ms=0.0, clock=clock, overload_policy="serve_late", pipeline_depth=2) as sched:
        first = sched.submit("t0", rows(rng))
        with sched._cond:
            assert sched._cond.wait_for(lambda: sched._running == 1, TIMEOUT_S)
        second = sched.submit("t1", rows(rng))
        with sched._cond:
            assert sched._cond.wait_for(lambda: sched._running == 2, TIMEOUT_S)
            assert sched._running_unpredicted == 2 and sched._busy_until_s == -math.inf
        gates[0].set()
        first.result(TIMEOUT_S)
        with sched._cond:
            assert sched._cond.wait_for(lambda: sched._running == 1, TIMEOUT_S)
            assert sched._steps.estimate_s == pytest.approx(0.010)
            assert sched._busy_until_s == pytest.approx(clock() + 0.010)  # the second step, still running
        gates[1].set()
        second.result(TIMEOUT_S)
        with sched._cond:
            assert sched._cond.wait_for(lambda: sched._running == 0, TIMEOUT_S)
            assert sched._running_unpredicted == 0 and sched._busy_until_s == -math.inf


def test_steps_are_deadline_first_up_to_the_largest_bucket(served, monkeypatch, rng):
    mt, _ = served
    clock = FakeClock()
    held = RecordingDispatch(mt, hold=True)
    monkeypatch.setattr(mt, "dispatch", held)
    with jaxmt.Scheduler(mt, max_delay_ms=0.0, pipeline_depth=1, clock=clock, overload_policy="serve_late") as sched:
        blocker = sched.submit("t0", rows(rng))
        held.wait_calls(1)
        # Six tenants queue behind the held step; deadlines are not in arrival order.
        slos = {"t0": 400.0, "t1": 100.0, "t2": 600.0, "t3": 200.0, "t4": 500.0, "t5": 300.0}
        futures = {t: sched.submit(t, rows(rng), slo_ms=slo) for t, slo in slos.items()}
        held.release.set()
        blocker.result(TIMEOUT_S)
        for future in futures.values():
            future.result(TIMEOUT_S)
    step_tenants = [sorted(set(ids)) for ids, _ in held.calls[1:]]
    assert step_tenants == [["t0", "t1", "t3", "t5"], ["t2", "t4"]]  # 4 = the largest tenant bucket


def test_optional_company_that_would_only_pad_waits_for_the_next_step(served, monkeypatch, rng):
    mt, _ = served
    clock = FakeClock()
    recorder = RecordingDispatch(mt)
    monkeypatch.setattr(mt, "dispatch", recorder)
    with jaxmt.Scheduler(mt, max_delay_ms=10.0, clock=clock, overload_policy="serve_late") as sched:
        oldest = sched.submit("t0", rows(rng))
        clock.advance(0.005)
        young = [sched.submit("t1", rows(rng)), sched.submit("t2", rows(rng))]
        clock.advance(0.005)  # t0 is due; t1, t2 are optional: 3 entries would pad to 4
        oldest.result(TIMEOUT_S)
        young[0].result(TIMEOUT_S)
        assert sorted(set(recorder.calls[0][0])) == ["t0", "t1"]
        assert not young[1].done()
        clock.advance(0.005)  # now t2 is due too
        young[1].result(TIMEOUT_S)
    assert [sorted(set(ids)) for ids, _ in recorder.calls] == [["t0", "t1"], ["t2"]]


# ------------------------------------------------------------------ pacing (target_latency_ms)
@pytest.mark.parametrize("slo_ms, target_ms, due_ms", [(100.0, 50.0, 50.0), (20.0, 50.0, 20.0)])
def test_paced_requests_wait_until_due_to_be_answered_on_target_or_by_their_deadline(served, monkeypatch, rng, slo_ms, target_ms, due_ms):
    mt, params = served
    clock = FakeClock()
    recorder = RecordingDispatch(mt)
    monkeypatch.setattr(mt, "dispatch", recorder)
    with jaxmt.Scheduler(mt, max_delay_ms=0.0, target_latency_ms=target_ms, clock=clock, overload_policy="serve_late") as sched:
        x = rows(rng)
        future = sched.submit("t1", x, slo_ms=slo_ms)
        clock.advance((due_ms - 1.0) / 1e3)
        with sched._cond:
            batch, wait_s = sched._next_batch_locked(clock())
        assert batch is None and wait_s == pytest.approx(1e-3)  # no step time known yet: due at the target
        assert not recorder.calls and not future.done()
        clock.advance(2e-3)
        y = future.result(TIMEOUT_S)
    check_against_reference(params, [("t1", x, y)])


def test_a_paced_step_takes_only_the_requests_due_within_one_step_time(served, monkeypatch, rng):
    mt, params = served
    clock = FakeClock()
    recorder = RecordingDispatch(mt)
    monkeypatch.setattr(mt, "dispatch", recorder)
    # No step time known yet: a step takes the requests due within max_delay_ms (5 ms).
    with jaxmt.Scheduler(mt, max_delay_ms=5.0, target_latency_ms=50.0, default_slo_ms=100.0, clock=clock,
                         overload_policy="serve_late") as sched:
        sent = []
        for tenant, after_s in [("t0", 0.0), ("t1", 0.003), ("t2", 0.017)]:  # due at 50, 53 and 70 ms
            clock.advance(after_s)
            x = rows(rng)
            sent.append((tenant, x, sched.submit(tenant, x)))
        clock.advance(0.030)  # 50 ms: t0 is due, t1 within 5 ms of it, t2 not
        sent[1][2].result(TIMEOUT_S)
        assert sorted(set(recorder.calls[0][0])) == ["t0", "t1"] and not sent[2][2].done()
        clock.advance(0.020)
        answers = [(tenant, x, future.result(TIMEOUT_S)) for tenant, x, future in sent]
    assert [sorted(set(ids)) for ids, _ in recorder.calls] == [["t0", "t1"], ["t2"]]
    check_against_reference(params, answers)


def test_a_full_bucket_waits_for_its_target_when_paced_and_closing_serves_the_held_requests_at_once(served, monkeypatch, rng):
    mt, params = served
    clock = FakeClock()
    recorder = RecordingDispatch(mt)
    monkeypatch.setattr(mt, "dispatch", recorder)
    sched = jaxmt.Scheduler(mt, max_delay_ms=0.0, target_latency_ms=10_000.0, default_slo_ms=60_000.0, clock=clock,
                            overload_policy="serve_late")
    try:
        sent = [(t, x, sched.submit(t, x)) for t in params for x in [rows(rng)]]  # six tenants: more than the largest bucket (4)
        with sched._cond:
            batch, wait_s = sched._next_batch_locked(clock())
        assert batch is None and wait_s > 1.0 and not recorder.calls
    finally:
        sched.close(drain=True)  # the clock never reaches the target: closing serves them anyway
    check_against_reference(params, [(t, x, future.result(TIMEOUT_S)) for t, x, future in sent])
    assert sorted(t for ids, _ in recorder.calls for t in set(ids)) == sorted(params)


def test_paced_launch_times_leave_one_step_time_for_the_target_and_two_before_the_deadline(served, monkeypatch, rng):
    """With a step time known (4 ms on the fake clock): due at submit + target - 4 ms, or at
    the deadline - 8 ms when that is sooner; a step takes those due within 4 ms (the step
    time, more than max_delay_ms)."""
    mt, params = served
    clock = FakeClock()
    recorder = RecordingDispatch(mt, clock=clock, step_s=0.004)
    monkeypatch.setattr(mt, "dispatch", recorder)
    with jaxmt.Scheduler(mt, max_delay_ms=1.0, target_latency_ms=30.0, clock=clock, overload_policy="serve_late") as sched:
        first = sched.submit("t0", rows(rng))
        clock.advance(0.030)
        first.result(TIMEOUT_S)  # one step: 4 ms learnt
        with sched._cond:
            assert sched._cond.wait_for(lambda: sched._in_flight == 0, TIMEOUT_S)
        assert sched._steps.estimate_s == pytest.approx(0.004)
        sent = [("t1", 100.0), ("t2", 20.0), ("t3", 100.0), ("t4", 100.0)]  # t2's deadline comes before its target
        futures, xs = {}, {}
        for tenant, slo in sent:
            xs[tenant] = rows(rng)
            futures[tenant] = sched.submit(tenant, xs[tenant], slo_ms=slo)
            clock.advance(0.001 if tenant != "t3" else 0.004)
        # Submitted at 0 (t1), 1 (t2), 2 (t3) and 6 ms (t4); now 7 ms. Due: t2 at 1 + 20 - 8 = 13 ms,
        # t1 at 0 + 30 - 4 = 26, t3 at 28, t4 at 32.
        with sched._cond:
            batch, wait_s = sched._next_batch_locked(clock())
        assert batch is None and wait_s == pytest.approx(0.006)
        clock.advance(0.006)  # 13 ms: t2 is due (by its deadline), nothing else within 4 ms
        futures["t2"].result(TIMEOUT_S)  # its step took 4 ms on the clock: now 17 ms
        assert sorted(set(recorder.calls[1][0])) == ["t2"]
        clock.advance(0.009)  # 26 ms: t1 is due, t3 within 4 ms, t4 not
        futures["t3"].result(TIMEOUT_S)
        assert sorted(set(recorder.calls[2][0])) == ["t1", "t3"] and not futures["t4"].done()
        clock.advance(0.010)
        answers = [(t, xs[t], futures[t].result(TIMEOUT_S)) for t, _ in sent]
    check_against_reference(params, answers)


def test_a_paced_request_with_a_long_slo_is_answered_on_target_not_behind_shorter_deadlines(served, monkeypatch, rng):
    """Due by its target, a request with a far deadline launches although requests with
    nearer deadlines (submitted after it, not due yet) are queued."""
    mt, params = served
    clock = FakeClock()
    recorder = RecordingDispatch(mt)
    monkeypatch.setattr(mt, "dispatch", recorder)
    with jaxmt.Scheduler(mt, max_delay_ms=1.0, target_latency_ms=20.0, clock=clock, overload_policy="serve_late") as sched:
        x_long = rows(rng)
        long_slo = sched.submit("t0", x_long, slo_ms=1000.0)  # due at 20 ms by its target
        clock.advance(0.005)
        x_short = rows(rng)
        short_slo = sched.submit("t1", x_short, slo_ms=100.0)  # due at 25 ms; its deadline comes first
        clock.advance(0.016)  # 21 ms
        y_long = long_slo.result(TIMEOUT_S)
        assert sorted(set(recorder.calls[0][0])) == ["t0"] and not short_slo.done()
        clock.advance(0.005)
        y_short = short_slo.result(TIMEOUT_S)
    check_against_reference(params, [("t0", x_long, y_long), ("t1", x_short, y_short)])


def test_a_cancelled_paced_request_does_not_launch_the_next_early(served, monkeypatch, rng):
    mt, params = served
    clock = FakeClock()
    recorder = RecordingDispatch(mt)
    monkeypatch.setattr(mt, "dispatch", recorder)
    with jaxmt.Scheduler(mt, max_delay_ms=0.0, target_latency_ms=20.0, clock=clock, overload_policy="serve_late") as sched:
        first = sched.submit("t0", rows(rng))
        clock.advance(0.010)
        x = rows(rng)
        second = sched.submit("t1", x)  # due at 30 ms
        assert first.cancel()
        clock.advance(0.011)  # 21 ms: the cancelled request's launch time has passed, not the second's
        # The dispatch thread (polling its clock) drops the cancelled request and keeps the second queued.
        give_up = time.monotonic() + TIMEOUT_S
        while len(sched._queue) != 1 and time.monotonic() < give_up:
            time.sleep(0.001)
        with sched._cond:
            assert len(sched._queue) == 1 and sched._next_batch_locked(clock()) == (None, pytest.approx(0.009))
        assert not recorder.calls and not second.done()
        clock.advance(0.010)
        y = second.result(TIMEOUT_S)
    check_against_reference(params, [("t1", x, y)])


@pytest.mark.parametrize("server", [jaxmt.TimeOnlyServer, jaxmt.SpaceOnlyServer, jaxmt.ExclusiveServer])
def test_baselines_refuse_a_latency_target(served, server):
    mt, _ = served
    with pytest.raises(ValueError, match="target_latency_ms"):
        server(mt, target_latency_ms=30.0)


def test_a_tenant_with_many_rows_gets_its_own_program_call(served, monkeypatch, rng):
    mt, params = served
    held = RecordingDispatch(mt, hold=True)
    monkeypatch.setattr(mt, "dispatch", held)
    with jaxmt.Scheduler(mt, max_delay_ms=0.0, pipeline_depth=1, overload_policy="serve_late") as sched:
        blocker = sched.submit("t5", rows(rng))
        held.wait_calls(1)
        queued = [("t0", rows(rng, 4)), ("t1", rows(rng)), ("t2", rows(rng)), ("t3", rows(rng))]
        futures = [(t, x, sched.submit(t, x)) for t, x in queued]
        held.release.set()
        blocker.result(TIMEOUT_S)
        answered = [(t, x, f.result(TIMEOUT_S)) for t, x, f in futures]
        steps = sched.metrics()["steps"]
    check_against_reference(params, answered)
    # One program for all four would pad every tenant to 4 rows (16 computed); two calls
    # (3 tenants x 1 row padded to K=4, and 1 x 4) compute 8, worth a launch (valued 4 rows).
    assert [sorted(set(ids)) for ids, _ in held.calls[1:]] == [["t0"], ["t1", "t2", "t3"]]
    assert (steps["steps"], steps["programs_per_step"]) == (2, 1.5)
    assert steps["padding_waste"] == pytest.approx(1 - 8 / 9, abs=1e-5)  # 1 + 7 real rows, 1 + 8 computed


@pytest.mark.parametrize("where", ["launch", "result"])
def test_a_failing_program_call_spares_the_other_calls_of_its_step(served, monkeypatch, rng, where):
    """A step launched as two program calls (as in the test above): the call holding a
    poisoned row fails its own requests only; the other call's requests are answered."""
    mt, params = served
    held = RecordingDispatch(mt, hold=True)
    setattr(held, f"raise_on_{where}", lambda x: bool(np.any(x == 1234.0)))
    monkeypatch.setattr(mt, "dispatch", held)
    with jaxmt.Scheduler(mt, max_delay_ms=0.0, pipeline_depth=1, overload_policy="serve_late") as sched:
        blocker = sched.submit("t5", rows(rng))
        held.wait_calls(1)
        poisoned = rows(rng, 4)
        poisoned[2] = 1234.0
        queued = [("t0", poisoned), ("t1", rows(rng)), ("t2", rows(rng)), ("t3", rows(rng))]
        futures = [(t, x, sched.submit(t, x)) for t, x in queued]
        held.release.set()
        blocker.result(TIMEOUT_S)
        with pytest.raises(RuntimeError, match="injected"):
            futures[0][2].result(TIMEOUT_S)
        answered = [(t, x, f.result(TIMEOUT_S)) for t, x, f in futures[1:]]
        steps = sched.metrics()["steps"]
    assert [sorted(set(ids)) for ids, _ in held.calls[1:]] == [["t0"], ["t1", "t2", "t3"]]
    check_against_reference(params, answered)
    assert steps["failed_steps"] == 1


@pytest.mark.parametrize("where", ["launch", "result"])
def test_each_failed_program_call_fails_its_requests_with_its_own_error(served, monkeypatch, rng, where):
    """The step of the tests above, launched as two program calls that both fail: each
    call's requests carry that call's error, not the first call's."""
    mt, _ = served
    held = RecordingDispatch(mt, hold=True)
    failing_calls = []

    def dispatch(tenant_ids, x):
        if not held.calls:  # the blocker
            return held(tenant_ids, x)
        tenants = sorted(set(tenant_ids))
        failing_calls.append(tenants)
        error = RuntimeError(f"the call for {tenants} failed")
        if where == "launch":
            raise error
        pending = held.inner(tenant_ids, x)

        class Failing:
            plan = pending.plan

            def result(self):
                raise error

        return Failing()

    monkeypatch.setattr(mt, "dispatch", dispatch)
    with jaxmt.Scheduler(mt, max_delay_ms=0.0, pipeline_depth=1, overload_policy="serve_late") as sched:
        blocker = sched.submit("t5", rows(rng))
        held.wait_calls(1)
        futures = {t: sched.submit(t, rows(rng, 4 if t == "t0" else 1)) for t in ("t0", "t1", "t2", "t3")}
        held.release.set()
        blocker.result(TIMEOUT_S)
        errors = {t: str(f.exception(TIMEOUT_S)) for t, f in futures.items()}
    assert failing_calls == [["t0"], ["t1", "t2", "t3"]]
    assert errors == {"t0": "the call for ['t0'] failed", **dict.fromkeys(["t1", "t2", "t3"], "the call for ['t1', 't2', 't3'] failed")}


def test_step_cost_model_learns_the_launch_cost():
    from jaxmt.scheduler import _StepCost

    cost = _StepCost(min_samples=4)
    assert cost.launch_cost_rows(default=7.0) == 7.0
    for programs, padded in [(1, 4), (1, 16), (2, 8), (1, 64), (3, 32), (2, 128)]:
        cost.observe(programs, padded, 0.002 * programs + 0.0001 * padded)
    assert cost.launch_cost_rows(default=7.0) == pytest.approx(20.0)
    assert cost.predict_s(2, 40) == pytest.approx(0.004 + 0.004)  # a size it never saw
    constant = _StepCost(min_samples=2)
    for _ in range(5):
        constant.observe(1, 16, 0.01)  # sizes never vary: launch and row costs not separable
    assert constant.launch_cost_rows(default=7.0) == 7.0 and constant.predict_s(1, 16) is None
    assert _StepCost().predict_s(1, 16) is None  # nothing observed
    unphysical = _StepCost(min_samples=2)
    for programs, padded in [(1, 4), (1, 64), (2, 8), (1, 32)]:
        unphysical.observe(programs, padded, 0.01 - 0.0001 * padded)  # bigger steps faster: row_s < 0
    assert unphysical.coefficients() is None and unphysical.predict_s(1, 16) is None
    assert unphysical.launch_cost_rows(default=7.0) == 7.0


def test_the_device_is_expected_busy_for_each_running_step_by_its_own_size(served, monkeypatch, rng):
    """Once the cost model knows the step sizes, a step in flight is expected to hold the
    device for its own predicted time (not the average step's), and that time leaves the
    expectation when the step ends."""
    mt, _ = served
    clock = FakeClock()
    held = RecordingDispatch(mt, clock=clock, step_s=0.0)
    monkeypatch.setattr(mt, "dispatch", held)
    with jaxmt.Scheduler(mt, max_delay_ms=0.0, clock=clock, overload_policy="serve_late", pipeline_depth=2) as sched:
        sched.submit("t0", rows(rng)).result(TIMEOUT_S)  # a step time is known: steps in flight hold the next
        monkeypatch.setattr(sched._cost, "predict_s", lambda programs, padded_rows: 0.001 * padded_rows)
        held.release.clear()
        small = sched.submit("t0", rows(rng))  # one tenant, one row: 1 padded row
        with sched._cond:
            assert sched._cond.wait_for(lambda: sched._running == 1, TIMEOUT_S)
            assert sched._busy_until_s == pytest.approx(clock() + 0.001)
        big = [sched.submit(f"t{i}", rows(rng, 3)) for i in (1, 2, 3)]  # held until the device is about free
        clock.advance(0.001)
        with sched._cond:  # three tenants of 3 rows: K=4, B=4, 16 padded rows
            assert sched._cond.wait_for(lambda: sched._running == 2, TIMEOUT_S)
            assert sched._busy_until_s == pytest.approx(clock() + 0.016)
        assert sorted(set(held.calls[-1][0])) == ["t1", "t2", "t3"]
        held.release.set()
        small.result(TIMEOUT_S)
        for future in big:
            future.result(TIMEOUT_S)
        with sched._cond:
            assert sched._cond.wait_for(lambda: sched._running == 0, TIMEOUT_S)
            assert sched._busy_until_s == -math.inf and sched._running_predicted_s == 0.0


# ------------------------------------------------------------------ SLO accounting and overload
def test_slo_misses_are_counted_and_a_straggler_is_flagged(served, monkeypatch, rng, caplog):
    mt, _ = served
    clock = FakeClock()
    monkeypatch.setattr(mt, "dispatch", RecordingDispatch(mt, clock=clock, step_s=0.1))  # every step: 100 ms
    options = {"max_delay_ms": 0.0, "clock": clock, "overload_policy": "serve_late", "overload_factor": 0.5,
               "flag_window": 8, "flag_min_requests": 4}
    with caplog.at_level(logging.WARNING, logger="jaxmt"), jaxmt.Scheduler(mt, **options) as sched:
        for _ in range(6):
            sched.submit("t0", rows(rng), slo_ms=50.0).result(TIMEOUT_S)  # misses
            sched.submit("t1", rows(rng), slo_ms=500.0).result(TIMEOUT_S)  # meets
        metrics = sched.metrics()
    slow, fast = metrics["tenants"]["t0"], metrics["tenants"]["t1"]
    assert (slow["count"], slow["ok"], slow["slo_met"], slow["slo_attainment"]) == (6, 6, 0, 0.0)
    assert (fast["count"], fast["slo_met"], fast["slo_attainment"]) == (6, 6, 1.0)
    assert slow["p50_ms"] == pytest.approx(100.0) and slow["max_ms"] == pytest.approx(100.0)
    assert slow["flagged"] and not fast["flagged"] and metrics["flagged_tenants"] == ["t0"]
    assert metrics["overall"]["slo_attainment"] == 0.5 and metrics["overall"]["count"] == 12
    assert slow["admitted_late"] == 5 and fast["admitted_late"] == 0  # late once 100 ms steps were seen
    assert metrics["steps"]["est_step_ms"] == pytest.approx(100.0)
    assert any("'t0'" in r.getMessage() and "SLO" in r.getMessage() for r in caplog.records)


def test_latency_splits_into_queue_wait_and_time_in_the_step(served, monkeypatch, rng):
    mt, _ = served
    clock = FakeClock()
    held = RecordingDispatch(mt, clock=clock, step_s=0.1, hold=True)  # each step: 100 ms
    monkeypatch.setattr(mt, "dispatch", held)
    options = {"max_delay_ms": 0.0, "clock": clock, "pipeline_depth": 1, "overload_policy": "serve_late"}
    with jaxmt.Scheduler(mt, **options) as sched:
        first = sched.submit("t0", rows(rng))
        held.wait_calls(1)
        second = sched.submit("t1", rows(rng))  # queued behind the step in flight
        held.release.set()
        first.result(TIMEOUT_S)
        second.result(TIMEOUT_S)
        steps = sched.metrics()["steps"]
    assert steps["queue_wait_ms"]["max_ms"] == pytest.approx(100.0) and steps["queue_wait_ms"]["mean_ms"] == pytest.approx(50.0)
    assert steps["in_step_ms"]["p50_ms"] == pytest.approx(100.0) and steps["in_step_ms"]["max_ms"] == pytest.approx(100.0)


@pytest.mark.parametrize("policy", ["reject", "serve_late"])
def test_overload_fails_fast_or_is_served_late(served, monkeypatch, rng, policy):
    mt, params = served
    clock = FakeClock()
    held = RecordingDispatch(mt, clock=clock, step_s=1.0)  # every step: 1 s
    monkeypatch.setattr(mt, "dispatch", held)
    with jaxmt.Scheduler(mt, max_delay_ms=0.0, clock=clock, overload_policy=policy) as sched:
        sched.submit("t0", rows(rng), slo_ms=5_000.0).result(TIMEOUT_S)  # teaches the 1 s step time
        held.release.clear()
        ahead = sched.submit("t0", rows(rng), slo_ms=5_000.0)
        held.wait_calls(2)  # a step in flight: the next request has work ahead of it
        x = rows(rng)
        future = sched.submit("t1", x, slo_ms=50.0)  # predicted 2000 ms: past 50 ms by > 1 x SLO
        if policy == "reject":
            assert future.done()  # failed fast, before any step
            with pytest.raises(jaxmt.Overloaded, match="t1"):
                future.result()
        held.release.set()
        ahead.result(TIMEOUT_S)
        if policy != "reject":
            check_against_reference(params, [("t1", x, future.result(TIMEOUT_S))])
        metrics = sched.metrics()["tenants"]["t1"]
    assert (metrics["rejected"], metrics["admitted_late"]) == ((1, 0) if policy == "reject" else (0, 1))
    assert metrics["slo_met"] == 0


def test_an_idle_server_serves_a_request_its_estimate_would_refuse_and_measures_again(served, monkeypatch, rng):
    """One outlier step (10 s) must not make an idle server refuse everything: with nothing
    in flight a request runs, and the step time is measured again."""
    mt, params = served
    clock = FakeClock()
    held = RecordingDispatch(mt, clock=clock, step_s=10.0)
    monkeypatch.setattr(mt, "dispatch", held)
    with jaxmt.Scheduler(mt, max_delay_ms=0.0, clock=clock, overload_policy="reject") as sched:
        sched.submit("t0", rows(rng), slo_ms=60_000.0).result(TIMEOUT_S)  # estimate: 10 s a step
        held.step_s = 0.001
        x = rows(rng)
        y = sched.submit("t1", x, slo_ms=50.0).result(TIMEOUT_S)  # predicted 10 s, but the server is idle
        assert sched.metrics()["steps"]["est_step_ms"] < 10_000.0
    check_against_reference(params, [("t1", x, y)])


def test_queued_requests_that_became_hopeless_are_shed(served, monkeypatch, rng):
    mt, _ = served
    clock = FakeClock()
    held = RecordingDispatch(mt, clock=clock, step_s=1.0, hold=True)
    monkeypatch.setattr(mt, "dispatch", held)
    with jaxmt.Scheduler(mt, max_delay_ms=0.0, clock=clock, pipeline_depth=1, overload_factor=0.0) as sched:
        held.release.set()
        sched.submit("t0", rows(rng), slo_ms=10_000.0).result(TIMEOUT_S)  # est: 1 s per step
        held.release.clear()
        blocker = sched.submit("t0", rows(rng), slo_ms=10_000.0)
        held.wait_calls(2)
        waiting = sched.submit("t1", rows(rng), slo_ms=5_000.0)  # predicted 2 s: admitted
        clock.advance(10.0)  # while it waits, its deadline passes
        held.release.set()
        blocker.result(TIMEOUT_S)
        with pytest.raises(jaxmt.Overloaded, match="waited"):
            waiting.result(TIMEOUT_S)
    assert len(held.calls) == 2  # the hopeless request never reached the device


def test_full_queue_rejects_under_either_policy(served, rng):
    mt, _ = served
    with jaxmt.Scheduler(mt, max_delay_ms=60_000.0, max_queue_rows=4, overload_policy="serve_late") as sched:
        accepted = [sched.submit("t0", rows(rng, 2)), sched.submit("t1", rows(rng, 2))]
        with pytest.raises(jaxmt.Overloaded, match="queue full"):
            sched.submit("t2", rows(rng)).result(timeout=0)
    assert all(f.result(TIMEOUT_S).shape == (2, 3) for f in accepted)


# ------------------------------------------------------------------ step forming, timing, outputs
def test_a_full_tenant_bucket_launches_without_waiting_for_max_delay(served, monkeypatch, rng):
    """A step that fills the largest tenant bucket gains nothing by waiting: it goes at once."""
    mt, params = served
    clock = FakeClock()  # never advanced: only a full bucket can make the step due
    rec = RecordingDispatch(mt)
    monkeypatch.setattr(mt, "dispatch", rec)
    with jaxmt.Scheduler(mt, max_delay_ms=60_000.0, clock=clock, overload_policy="serve_late") as sched:
        futures = [sched.submit(f"t{i}", rows(rng)) for i in range(4)]  # 4 entries = max_tenants
        rec.wait_calls(1)
        assert sorted(set(rec.calls[0][0])) == ["t0", "t1", "t2", "t3"]
        for f in futures:
            f.result(TIMEOUT_S)


@contextlib.contextmanager
def _after_one_step(mt, monkeypatch, rng, step_s: float):
    """A scheduler (10 ms max delay, a fake clock, steps of ``step_s``) that has run one step,
    so that it knows the step time; yields it with its clock and recorded dispatch."""
    clock = FakeClock()
    rec = RecordingDispatch(mt, clock=clock, step_s=step_s)
    monkeypatch.setattr(mt, "dispatch", rec)
    with jaxmt.Scheduler(mt, max_delay_ms=10.0, clock=clock, overload_policy="serve_late") as sched:
        first = sched.submit("t5", rows(rng), slo_ms=5_000.0)
        clock.advance(0.010)
        first.result(TIMEOUT_S)
        yield sched, clock, rec


def test_an_urgent_young_request_is_not_trimmed_into_the_next_step(served, monkeypatch, rng):
    """Company that would only pad a step may wait for the next one; a request whose deadline
    the next one would miss may not."""
    with _after_one_step(served[0], monkeypatch, rng, step_s=0.010) as (sched, clock, rec):  # estimate: 10 ms a step
        old = sched.submit("t3", rows(rng), slo_ms=5_000.0)
        clock.advance(0.005)
        urgent = [sched.submit(t, rows(rng), slo_ms=14.0) for t in ("t1", "t2")]  # must leave within 4 ms
        clock.advance(0.005)  # 3 entries would pad to 4, but none of them is optional
        for f in (old, *urgent):
            f.result(TIMEOUT_S)
    assert sorted(set(rec.calls[1][0])) == ["t1", "t2", "t3"]


def test_a_request_that_two_steps_would_make_late_is_not_trimmed(served, monkeypatch, rng):
    """A trimmed request waits for the step being launched and then for its own: one due in
    under two steps stays in this one, and no request due later than it runs in its place."""
    with _after_one_step(served[0], monkeypatch, rng, step_s=0.005) as (sched, clock, rec):  # estimate: 5 ms a step
        company = [sched.submit(t, rows(rng), slo_ms=5_000.0) for t in ("t1", "t2")]
        clock.advance(0.009)
        due_soon = sched.submit("t0", rows(rng), slo_ms=8.0)  # one step (5 ms) in time, two (10 ms) not
        clock.advance(0.0015)  # t1, t2 waited max_delay: 3 entries would pad to 4
        for f in (*company, due_soon):
            f.result(TIMEOUT_S)
        assert sched.metrics()["tenants"]["t0"]["slo_met"] == 1
    assert sorted(set(rec.calls[1][0])) == ["t0", "t1", "t2"]


def test_overload_prediction_counts_the_steps_in_flight(served, monkeypatch, rng):
    """One 1 s step running and one request of its own: 2 steps of 1 s before the answer."""
    mt, params = served
    clock = FakeClock()
    held = RecordingDispatch(mt, clock=clock, step_s=1.0)
    monkeypatch.setattr(mt, "dispatch", held)
    with jaxmt.Scheduler(mt, max_delay_ms=0.0, clock=clock, overload_policy="reject") as sched:
        sched.submit("t0", rows(rng), slo_ms=5_000.0).result(TIMEOUT_S)
        held.release.clear()
        ahead = sched.submit("t0", rows(rng), slo_ms=5_000.0)
        held.wait_calls(2)
        f = sched.submit("t1", rows(rng), slo_ms=50.0)
        with pytest.raises(jaxmt.Overloaded, match=r"predicted completion 2000\.0 ms"):
            f.result(0)
        held.release.set()
        ahead.result(TIMEOUT_S)


def test_a_pipelined_step_is_timed_from_when_the_one_before_it_ended(served, monkeypatch, rng):
    """Two steps launched together run one after the other on the device: the second's
    service time starts when the first ends, not at its launch."""
    mt, params = served
    clock = FakeClock()
    held = RecordingDispatch(mt, clock=clock, step_s=0.010, hold=True)
    monkeypatch.setattr(mt, "dispatch", held)
    with jaxmt.Scheduler(mt, max_delay_ms=0.0, clock=clock, pipeline_depth=2, overload_policy="serve_late") as sched:
        a = sched.submit("t0", rows(rng))
        held.wait_calls(1)
        b = sched.submit("t1", rows(rng))
        held.wait_calls(2)  # both launched at the same clock time; each takes 10 ms on the device
        held.release.set()
        a.result(TIMEOUT_S)
        b.result(TIMEOUT_S)
        est = sched.metrics()["steps"]["est_step_ms"]
    assert est == pytest.approx(10.0)  # not (10 + 0.2 * (20 - 10)) from timing b since its launch


def test_scheduler_answers_pytree_outputs(rng):
    """A model whose answer is a dict: every request gets its own rows of every leaf."""
    def apply_tree(params, x):
        h = x @ params["w"]
        return {"logits": h, "norm": (h * h).sum(-1)}
    params = {f"t{i}": {"w": rng.standard_normal((6, 3)).astype(np.float32)} for i in range(3)}
    mt = jaxmt.MultiTenantModel(apply_tree, params["t0"], capacity=4, buckets=jaxmt.BucketPolicy.powers_of_two(4, 4))
    for t, p in params.items():
        mt.add_tenant(t, p)
    with jaxmt.Scheduler(mt, max_delay_ms=0.5, overload_policy="serve_late") as sched:
        reqs = [(f"t{i % 3}", rows(rng, 1 + i % 5)) for i in range(12)]
        futs = [(t, x, sched.submit(t, x)) for t, x in reqs]
        for t, x, f in futs:
            got = f.result(TIMEOUT_S)
            np.testing.assert_allclose(got["logits"], x @ params[t]["w"], rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(got["norm"], ((x @ params[t]["w"]) ** 2).sum(-1), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ the queue itself
@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(1, 9), st.integers(0, 50),
                          st.sampled_from(["push", "pop", "oldest", "pop and push back", "oldest and push back"])),
                min_size=80, max_size=300))  # long enough to pass the point where stale entries are dropped
def test_edf_queue_pops_by_deadline_or_arrival_and_keeps_counts(ops):
    """Pops in either order, and requests put back (as a step formed without them does),
    keep the counts; long runs pass the point where stale heap entries are dropped."""
    queue, live = _EdfQueue(entry_rows=4), []
    for seq, (tenant, n_rows, deadline, op) in enumerate(ops):
        if op != "push" and live:
            by_deadline = op.startswith("pop")
            req = queue.pop() if by_deadline else queue.pop_oldest()
            order = (lambda r: (r.deadline_s, r.seq)) if by_deadline else (lambda r: (r.submitted_s, r.seq))
            best = min(live, key=order)
            assert req is best
            if op.endswith("push back"):
                queue.push(req)
            else:
                live.remove(req)
        else:
            req = _Request(tenant, np.zeros((n_rows, 1)), None, float(seq), float(deadline), 1.0, seq)
            queue.push(req)
            live.append(req)
        assert len(queue) == len(live) and queue.rows == sum(r.rows for r in live)
        per_tenant = {}
        for r in live:
            per_tenant[r.tenant_id] = per_tenant.get(r.tenant_id, 0) + r.rows
        assert queue.tenant_rows == per_tenant
        assert queue.entries == sum(-(-v // 4) for v in per_tenant.values())
        if live:
            assert queue.oldest_submitted() == min(r.submitted_s for r in live)
            assert queue.earliest_deadline() == min(r.deadline_s for r in live)
        assert max(len(queue._by_deadline), len(queue._by_arrival)) <= 2 * len(live) + 64 + 1  # stale entries dropped
    assert [r.seq for r in queue.drain()] == sorted(r.seq for r in live) and len(queue) == 0


@pytest.mark.parametrize("pop, other_heap", [("pop", "_by_arrival"), ("pop_oldest", "_by_deadline")])
def test_a_popped_request_is_not_kept_alive_by_the_queue_behind_one_that_waits(pop, other_heap):
    """One request waits (an old one with a late deadline, or a young one with an early
    deadline) while thousands come and go by the other order: the queue must not hold on to
    the served ones (nor their rows)."""
    queue = _EdfQueue(entry_rows=4)
    waits_by_deadline = pop == "pop"
    queue.push(_Request("waits", np.zeros((1, 1)), None, 0.0 if waits_by_deadline else 1e9, 1e9 if waits_by_deadline else 0.0, 1.0, 0))
    served = []
    for seq in range(1, 2001):
        queue.push(_Request("busy", np.zeros((1, 1)), None, float(seq), float(seq), 1.0, seq))
        served.append(weakref.ref(getattr(queue, pop)()))
    assert len(getattr(queue, other_heap)) <= 2 * len(queue) + 64  # stale entries are dropped as they pile up
    assert len(queue) == 1 and [r.tenant_id for r in queue.drain()] == ["waits"]
    gc.collect()
    assert sum(ref() is not None for ref in served) == 0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(1, 9), st.booleans()), max_size=40), st.integers(0, 3))
def test_lanes_keep_the_sum_of_their_batches(ops, drained):
    """Lanes sharing one ``_Totals`` keep its rows and its batches of at most ``entry_rows``
    rows lane by lane equal to a count over the lanes, through pushes, pops and a drain."""
    totals = _Totals()
    lanes = {key: _EdfQueue(entry_rows=4, totals=totals) for key in range(4)}
    for seq, (key, n_rows, pop) in enumerate(ops):
        if pop:
            lanes[key].pop()
        else:
            lanes[key].push(_Request(f"t{key}", np.zeros((n_rows, 1)), None, float(seq), float(seq), 1.0, seq))
        assert totals.rows == sum(lane.rows for lane in lanes.values())
        assert totals.lane_batches == sum(-(-lane.rows // 4) for lane in lanes.values())
    lanes[drained].drain()
    assert totals.rows == sum(lane.rows for lane in lanes.values())
    assert totals.lane_batches == sum(-(-lane.rows // 4) for lane in lanes.values())


def test_a_future_its_client_keeps_keeps_neither_the_server_nor_the_rows(served, rng):
    """The done-callback that takes a cancelled request out of the queue holds both weakly."""
    mt, _ = served
    sched = jaxmt.Scheduler(mt, max_delay_ms=0.0)
    x = rows(rng, 2)
    future = sched.submit("t0", x, copy=False)
    future.result(timeout=TIMEOUT_S)
    sched.close()
    server, rows_sent = weakref.ref(sched), weakref.ref(x)
    del sched, x
    gc.collect()
    assert server() is None and rows_sent() is None and future.done()
