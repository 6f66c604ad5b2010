"""Rows staged on the device at submit give the same answers as rows copied at launch.

Staging is on by default on a GPU only; these tests force it on (``stage_inputs=True``) on
whatever device runs them, and check every server against the per-tenant reference, the
joined blocks against NumPy indexing, the fallback to host rows when a copy is not issued by
the launch, and that nothing compiles after warm-up.
"""

from __future__ import annotations

import logging
import threading

import hypothesis.strategies as st
import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from conftest import reference_predict
from test_baselines import ROW, SERVERS, apply_fn, expected, make_model, make_params, rows, submit_from_threads

import jaxmt
from jaxmt import staging
from jaxmt.rows import RowParts

TIMEOUT_S = 60.0
DEVICE = jax.devices()[0]


def staged_parts(rng, dtype, row_shape, staged_mask: list[bool]):
    """Parts of 1-4 rows, and per part its rows on the device (where the mask says) or None."""
    parts, staged = [], []
    stager = staging.RowStager(DEVICE)
    try:
        for on_device in staged_mask:
            part = (rng.standard_normal((int(rng.integers(1, 5)), *row_shape)) * 50).astype(dtype)
            parts.append(part)
            if on_device:
                rows_ = stager.stage(part).wait(TIMEOUT_S)
                assert rows_ is not None
                staged.append(rows_)
            else:
                staged.append(None)
    finally:
        stager.close()
    return parts, staged


@pytest.mark.parametrize("dtype", [np.float32, np.uint8])
@pytest.mark.parametrize("row_shape", [(5,), (3, 4, 2)])
@pytest.mark.parametrize("mask", [[True, True, True], [True, False, False, True], [False, True], [False, False]])
def test_take_joins_staged_rows_like_numpy_indexing(rng, dtype, row_shape, mask):
    parts, staged = staged_parts(rng, dtype, row_shape, mask)
    x = RowParts(parts, staged, DEVICE)
    joined = np.concatenate(parts)
    for index_shape in [(7,), (3, 2), (len(joined),)]:
        index = rng.integers(len(joined), size=index_shape)
        got = x.take(index)
        np.testing.assert_array_equal(np.asarray(got), joined[index])
        assert got.dtype == dtype and got.shape == (*index_shape, *row_shape)
        # a device block exactly when some part's rows are on the device
        assert isinstance(got, jax.Array) == any(mask)
    start, stop = 1, len(joined) - 1
    np.testing.assert_array_equal(np.asarray(x.rows(start, stop)), joined[start:stop])
    np.testing.assert_array_equal(np.asarray(x), joined)
    with pytest.raises(IndexError):
        x.take(np.array([len(joined)]))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lengths=st.lists(st.integers(1, 4), min_size=1, max_size=5), data=st.data())
def test_any_mix_of_staged_and_host_parts_takes_like_numpy(lengths, data):
    """Property: for any parts, any of them staged, and any index (repeats, any order, one or
    two position axes), the joined block equals NumPy indexing of the concatenation."""
    rng = np.random.default_rng(len(lengths) * 7 + sum(lengths))
    parts = [rng.integers(0, 255, size=(n, 3, 2)).astype(np.uint8) for n in lengths]
    mask = data.draw(st.lists(st.booleans(), min_size=len(parts), max_size=len(parts)))
    staged = [list(jax.device_put([p[i : i + 1] for i in range(len(p))], DEVICE)) if on else None
              for p, on in zip(parts, mask)]
    total = sum(lengths)
    shape = data.draw(st.sampled_from([(1,), (4,), (8,), (2, 2), (4, 2)]))
    index = np.array(data.draw(st.lists(st.integers(0, total - 1), min_size=int(np.prod(shape)),
                                        max_size=int(np.prod(shape))))).reshape(shape)
    got = RowParts(parts, staged, DEVICE).take(index)
    np.testing.assert_array_equal(np.asarray(got), np.concatenate(parts)[index])


def test_row_parts_needs_one_staged_entry_per_part_and_row(rng):
    with pytest.raises(ValueError, match="one entry per part"):
        RowParts([rows(rng, 2), rows(rng, 1)], [None])
    with pytest.raises(ValueError, match="part 0 has 2 rows but 1 staged rows"):
        RowParts([rows(rng, 2)], [[jax.device_put(rows(rng, 1), DEVICE)]])


def test_a_closed_stager_stages_nothing(rng):
    stager = staging.RowStager(DEVICE)
    stager.close()
    stager.close()  # idempotent
    assert stager.stage(rows(rng, 2)) is None
    with pytest.raises(ValueError, match="max_batch"):
        staging.RowStager(DEVICE, max_batch=0)


def held_stager(**kwargs):
    """A stager whose copies wait for ``release``; ``entered`` is set when one starts."""
    entered, release = threading.Event(), threading.Event()
    stager = staging.RowStager(DEVICE, **kwargs)
    real = stager._put_batch
    stager._put_batch = lambda xs: (entered.set(), release.wait(TIMEOUT_S), real(xs))[2]
    return stager, entered, release


def test_a_failed_copy_falls_back_to_host_rows_and_warns_once(rng, caplog):
    """A request whose rows cannot be copied fails alone, not the requests copied with it."""
    stager, entered, release = held_stager()
    stager.stage(rows(rng, 1))
    assert entered.wait(TIMEOUT_S)  # the thread is copying that one: the next three queue up
    bad = np.array([[object()] * ROW], dtype=object)  # device_put refuses object arrays
    good = rows(rng, 3)
    with caplog.at_level(logging.WARNING, logger="jaxmt"):
        first, fine, second = stager.stage(bad), stager.stage(good), stager.stage(bad)
        release.set()
        assert first.wait(TIMEOUT_S) is None and second.wait(TIMEOUT_S) is None
        copied = fine.wait(TIMEOUT_S)
    stager.close()
    assert first.device_rows() is None and stager.failures == 2
    np.testing.assert_array_equal(np.concatenate([np.asarray(r) for r in copied]), good)
    assert sum("staging rows" in r.message for r in caplog.records) == 1


def test_abandoned_and_closed_rows_are_not_copied(rng):
    stager, entered, release = held_stager()
    first = stager.stage(rows(rng, 1))
    assert entered.wait(TIMEOUT_S)
    dropped, kept = stager.stage(rows(rng, 2)), stager.stage(rows(rng, 2))
    dropped.abandon()  # e.g. its request was launched from host rows meanwhile
    release.set()
    assert kept.wait(TIMEOUT_S) is not None and dropped.wait(TIMEOUT_S) is None
    assert first.wait(TIMEOUT_S) is not None and stager.calls == 2
    first.abandon()
    assert first.device_rows() is None  # let go
    release.clear()
    entered.clear()
    busy = stager.stage(rows(rng, 1))
    assert entered.wait(TIMEOUT_S)
    left = stager.stage(rows(rng, 1))
    closing = threading.Thread(target=stager.close)
    closing.start()
    while not stager._closed:
        pass
    release.set()
    closing.join(TIMEOUT_S)
    assert busy.wait(TIMEOUT_S) is not None  # being copied when close came
    assert left.wait(TIMEOUT_S) is None and stager.calls == 3  # queued behind it: left to the host


def test_requests_queued_together_are_copied_in_one_call(rng):
    stager, entered, release = held_stager(max_batch=8)
    first = stager.stage(rows(rng, 1))
    assert entered.wait(TIMEOUT_S)  # the thread took it alone and is copying it
    xs = [rows(rng, int(rng.integers(1, 4))) for _ in range(12)]
    staged = [stager.stage(x) for x in xs]
    release.set()
    for x, s in zip(xs, staged):
        np.testing.assert_array_equal(np.concatenate([np.asarray(r) for r in s.wait(TIMEOUT_S)]), x)
    assert first.wait(TIMEOUT_S) is not None
    stager.close()
    assert stager.calls == 3  # the first alone, then the 12 queued meanwhile in batches of at most 8


@pytest.mark.parametrize("kind", list(SERVERS))
def test_every_server_with_staged_rows_matches_the_reference(kind):
    mt, params = make_model()
    with SERVERS[kind](mt, max_delay_ms=0.5, overload_policy="serve_late", stage_inputs=True) as server:
        server.warmup()
        results = submit_from_threads(server, params, requests=60, seed=100)
        metrics = server.metrics()
    for tenant, x, y in results:
        np.testing.assert_allclose(y, expected(kind, params, tenant, x, server), rtol=1e-5, atol=1e-5)
    counts = metrics["staging"]
    assert counts["enabled"] and counts["failures"] == 0
    # each launch counts its requests, staged in time or not (which, depends on timing here;
    # test_after_warmup_staged_steps_compile_nothing pins it down)
    assert counts["staged_requests"] + counts["host_requests"] >= len(results)


@pytest.mark.parametrize("kind", list(SERVERS))
def test_requests_whose_copy_is_not_issued_are_served_from_the_host(kind, rng, monkeypatch):
    """The launch never waits for a staging copy: until it is issued, the host rows serve."""
    release = threading.Event()
    real_put = staging.RowStager._put_batch

    def held_put(self, xs):
        release.wait(TIMEOUT_S)
        return real_put(self, xs)

    monkeypatch.setattr(staging.RowStager, "_put_batch", held_put)
    mt, params = make_model(3)
    with SERVERS[kind](mt, max_delay_ms=0.5, stage_inputs=True, overload_policy="serve_late") as server:
        requests = [(f"t{i % 3}", rows(rng, 1 + i % 3)) for i in range(8)]
        futures = [(t, x, server.submit(t, x)) for t, x in requests]
        results = [(t, x, f.result(TIMEOUT_S)) for t, x, f in futures]
        release.set()
        counts = server.metrics()["staging"]
    for tenant, x, y in results:
        np.testing.assert_allclose(y, expected(kind, params, tenant, x, server), rtol=1e-5, atol=1e-5)
    assert counts["staged_requests"] == 0 and counts["host_requests"] >= len(requests)


class FakeClock:
    def __init__(self):
        self.now = 10.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("kind", list(SERVERS))
def test_after_warmup_staged_steps_compile_nothing(kind, rng):
    """Groups of requests whose copies are issued before their step is due (a frozen clock
    holds the step until then): every one is served from device rows, and nothing compiles."""
    mt, params = make_model()
    clock = FakeClock()
    with SERVERS[kind](mt, max_delay_ms=5.0, stage_inputs=True, clock=clock) as server:
        server.warmup()
        compiled = lambda: (staging._join._cache_size(), mt.programs.compiles,  # noqa: E731
                            server._programs.program.fn._cache_size() if kind != "jaxmt" else 0)
        before = compiled()
        answered = []
        for _ in range(6):  # 3 one-row requests of distinct tenants: no bucket or batch is full
            group = [(f"t{t}", rows(rng)) for t in rng.choice(len(params), 3, replace=False)]
            futures = [(t, x, server.submit(t, x)) for t, x in group]
            assert server._stager.flush(TIMEOUT_S)
            clock.now += 0.006  # now the group is due (5 ms), and within its 50 ms SLO
            answered += [(t, x, f.result(TIMEOUT_S)) for t, x, f in futures]
        for tenant, x, y in answered:
            np.testing.assert_allclose(y, expected(kind, params, tenant, x, server), rtol=1e-5, atol=1e-5)
        counts = server.metrics()["staging"]
        assert counts["staged_requests"] == len(answered) and counts["host_requests"] == 0
        assert compiled() == before  # join programs, jaxmt's step programs, the baselines' jitted model


@pytest.mark.parametrize("kind", list(SERVERS))
def test_a_server_lets_go_of_staged_rows_once_requests_are_done(kind, rng, monkeypatch):
    created = []
    real_stage = staging.RowStager.stage
    monkeypatch.setattr(staging.RowStager, "stage", lambda self, x: created.append(real_stage(self, x)) or created[-1])
    mt, params = make_model(3)
    with SERVERS[kind](mt, max_delay_ms=0.5, stage_inputs=True, overload_policy="serve_late") as server:
        futures = [server.submit(f"t{i % 3}", rows(rng, 1 + i % 3)) for i in range(12)]
        for future in futures:
            future.result(TIMEOUT_S)
        assert len(created) == 12
        assert all(s.device_rows() is None for s in created)


def test_a_server_that_fails_to_start_leaves_no_staging_thread():
    mt, _ = make_model(2)
    before = sum(t.name == "jaxmt-stage" for t in threading.enumerate())
    with pytest.raises(jaxmt.UnknownTenantError):
        jaxmt.ExclusiveServer(mt, tenant_id="nobody", stage_inputs=True)
    with pytest.raises(ValueError):
        jaxmt.TimeOnlyServer(mt, batch_sizes=[4, 2], stage_inputs=True)
    assert sum(t.name == "jaxmt-stage" for t in threading.enumerate()) == before


class FakeDevice:
    def __init__(self, platform: str):
        self.platform = platform


@pytest.mark.parametrize(("platform", "row_nbytes", "staged"), [
    ("gpu", 224 * 224 * 3 * 4, True),  # a float32 image
    ("gpu", 224 * 224 * 3, False),  # its uint8 pixels
    ("gpu", staging.STAGE_MIN_ROW_BYTES, True),
    ("cpu", 224 * 224 * 3 * 4, False),
    (None, 224 * 224 * 3 * 4, False),  # a model that places its rows itself
])
def test_rows_are_staged_by_default_on_a_gpu_when_large(platform, row_nbytes, staged):
    device = None if platform is None else FakeDevice(platform)
    assert staging.stage_by_default(device, row_nbytes) == staged


@pytest.mark.parametrize("kind", list(SERVERS))
def test_without_known_rows_the_first_request_decides_staging(kind, rng):
    params = {"a": make_params(1)}
    mt = jaxmt.MultiTenantModel(apply_fn, make_params(0), capacity=2, buckets=jaxmt.BucketPolicy.powers_of_two(2, 2))
    mt.add_tenant("a", params["a"])
    with SERVERS[kind](mt, stage_inputs=True) as server:
        assert not server.metrics()["staging"]["enabled"]  # no rows known yet
        x = rows(rng, 3)
        np.testing.assert_allclose(server.submit("a", x).result(TIMEOUT_S), expected(kind, params, "a", x, server),
                                   rtol=1e-5, atol=1e-5)
        assert server.metrics()["staging"]["enabled"]


def test_staging_defaults_to_gpus_and_refuses_models_that_place_rows_themselves(rng):
    mt, _ = make_model(2)
    with jaxmt.Scheduler(mt) as server:  # rows of 5 floats: not worth staging anywhere
        assert not server.metrics()["staging"]["enabled"]
    with jaxmt.TimeOnlyServer(mt, stage_inputs=False) as server:
        assert not server.metrics()["staging"]["enabled"]
    with pytest.raises(ValueError, match="stage_inputs"):
        jaxmt.Scheduler(mt, stage_inputs="yes")
    sharded = jaxmt.ShardedMultiTenantModel(apply_fn, make_params(0), capacity=2, row_shape=(ROW,), row_dtype=np.float32)
    sharded.add_tenant("a", make_params(1))
    with pytest.raises(ValueError, match="places each step's rows itself"):
        jaxmt.Scheduler(sharded, stage_inputs=True)
    with jaxmt.Scheduler(sharded) as server:  # the default leaves it off
        x = rows(rng, 2)
        np.testing.assert_allclose(server.submit("a", x).result(TIMEOUT_S),
                                   reference_predict(apply_fn, {"a": make_params(1)}, ["a", "a"], x), rtol=1e-5, atol=1e-5)
        assert not server.metrics()["staging"]["enabled"]


@pytest.mark.parametrize("kind", list(SERVERS))
def test_with_staged_rows_close_without_drain_completes_every_future(kind, rng):
    mt, params = make_model(3)
    server = SERVERS[kind](mt, max_delay_ms=60_000.0, stage_inputs=True)  # nothing is due: all stay queued
    requests = [(f"t{i % 3}", rows(rng)) for i in range(9)]
    futures = [(t, x, server.submit(t, x)) for t, x in requests]
    assert server._stager.flush(TIMEOUT_S)
    server.close(drain=False)
    for tenant, x, future in futures:
        assert future.done()
        if future.exception() is None:  # a step already launched still answers
            np.testing.assert_allclose(future.result(), expected(kind, params, tenant, x, server), rtol=1e-5, atol=1e-5)
        else:
            assert isinstance(future.exception(), jaxmt.SchedulerClosed)
    assert not server._stager._thread.is_alive()


@pytest.mark.parametrize("kind", list(SERVERS))
def test_with_staged_rows_a_tenant_removed_while_queued_fails_alone(kind, rng):
    mt, params = make_model(3)
    options = {"tenant_id": "t1"} if kind == "exclusive" else {}
    with SERVERS[kind](mt, max_delay_ms=200.0, stage_inputs=True, **options) as server:
        x_kept = rows(rng, 2)
        gone, kept = server.submit("t0", rows(rng)), server.submit("t1", x_kept)
        mt.remove_tenant("t0")
        with pytest.raises(jaxmt.UnknownTenantError, match="t0"):
            gone.result(TIMEOUT_S)
        np.testing.assert_allclose(kept.result(TIMEOUT_S), expected(kind, params, "t1", x_kept, server),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mask", [[True], [True, False]])
def test_staged_parts_take_no_rows_as_an_empty_block(rng, mask):
    """An empty index (or an empty row range) gives an empty block, as for host parts."""
    parts, staged = staged_parts(rng, np.float32, (3, 2), mask)
    x = RowParts(parts, staged, DEVICE)
    for index_shape in [(0,), (2, 0)]:
        got = x.take(np.zeros(index_shape, np.int64))
        assert got.shape == (*index_shape, 3, 2) and got.dtype == np.float32
    assert np.asarray(x.rows(1, 1)).shape == (0, 3, 2)


def test_rows_abandoned_while_the_stager_sorts_their_batch_are_still_resolved(rng):
    """Rows abandoned while the stager's thread sorts their batch (the dispatch thread took
    their request from the host meanwhile) are resolved, never left for ``wait()`` to hang on."""
    stager, entered, release = held_stager(max_batch=8)
    stager.stage(rows(rng, 1))
    assert entered.wait(TIMEOUT_S)  # the thread is copying that one: the next two queue up
    late, gone = stager.stage(rows(rng, 1)), stager.stage(rows(rng, 1))  # late is looked at first
    gone.abandon()

    class AbandonsTheOther(threading.Event):  # resolving `gone` is when `late` is abandoned
        def set(self):
            late.abandon()
            super().set()

    gone._done = AbandonsTheOther()
    release.set()
    assert stager.flush(TIMEOUT_S)  # both entries went through the thread
    try:
        assert late._done.is_set() and late.wait(0) is None
    finally:
        stager.close()
