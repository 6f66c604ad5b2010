"""What every server shares (the Scheduler and the baselines): requests, queues, futures, close.

One way to do a thing: validation at submit, admission control (overload), the
earliest-deadline-first queue, the dispatch and completion threads with a bounded pipeline,
completing futures, ``close`` and ``metrics`` live here. A server only decides which queued
requests form its next step (``_next_batch_locked``), how one step is launched (``_launch``)
and how many steps stand before a new request (``_steps_ahead_locked``).

Invariant: every accepted request's future completes exactly once, with its rows or with an
exception (the step's, ``UnknownTenantError``, ``Overloaded`` or ``SchedulerClosed``).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import dataclasses
import functools
import itertools
import logging
import math
import numbers
import queue
import threading
import weakref
from collections.abc import Hashable
from concurrent.futures import Future, InvalidStateError
from typing import Any

import jax
import numpy as np

from jaxmt._queue import _Batch, _EdfQueue, _Launched, _PartlyFailed, _Request, _Totals
from jaxmt.errors import InputError, Overloaded, SchedulerClosed, UnknownTenantError
from jaxmt.metrics import LatencyRecorder, StepRecorder
from jaxmt.rows import RowParts, as_row_array
from jaxmt.staging import RowStager, stage_by_default, warm_join

logger = logging.getLogger("jaxmt")

MAX_SLO_MS = 3_600_000.0  # one hour: a longer objective is a unit mistake, not an objective
_POLL_S = 0.05  # longest sleep of a waiting thread, so an injected (fake) clock is re-read


class _ServerBase:
    """Submit/future/metrics/close for a server whose steps a subclass forms and launches."""

    kind = "server"  # name in metrics and log lines

    def __init__(self, mt: Any, config: Any):
        self.mt = mt
        self.config = config
        self._clock = config.clock
        self._cond = threading.Condition()
        self._closed = False
        self._seq = itertools.count()
        self._lanes: dict[Hashable, _EdfQueue] = {}
        self._totals = _Totals()
        self._entry_rows = 1
        self._in_flight = 0  # launched steps not completed yet
        self._latency = LatencyRecorder(
            config.latency_window, config.flag_window, config.flag_min_requests, config.flag_below_attainment, self.kind
        )
        self._steps = StepRecorder(config.ewma_alpha)
        self._threads: list[threading.Thread] = []
        self._completions: queue.Queue[_Launched | None] = queue.Queue()
        self._slots = threading.Semaphore(config.pipeline_depth)
        self._last_ready_s: float | None = None
        # When the device is expected to finish the steps in flight (clock seconds), and an
        # EWMA of the host time one launch takes: a policy may hold a step until just before
        # the device is free, so that company arriving meanwhile still joins it.
        self._busy_until_s = -math.inf
        self._launch_ewma_s: float | None = None
        self._running = 0  # launched steps whose launch has returned and which have not completed
        self._running_predicted_s = 0.0  # the device time predicted for those steps, together
        self._running_unpredicted = 0  # those of them launched before any step time was known
        self._outstanding: dict[int, _Request] = {}  # accepted, future not completed yet
        self._stats_version: int | None = None  # store version when removed tenants' stats were last forgotten
        # Rows are staged (jaxmt.staging) when asked, or by default where it pays, which
        # depends on the row size: decided once the rows are known (the model's, fixed by the
        # first request at the latest), under self._cond; the stager starts with the server's threads.
        self._stager: RowStager | None = None
        self._staging_wanted = False
        self._staging_decided = config.stage_inputs is False
        self._rows_confirmed = False  # the model's rows found fixed under its store's lock (see _fix_rows_locked)
        if config.stage_inputs and mt.input_device is None:
            raise ValueError(f"stage_inputs=True, but {type(mt).__name__} places each step's rows itself; "
                             "leave stage_inputs at None or False")
        self._decide_staging_locked(mt.row_shape, mt.row_dtype)
        self._staging_lock = threading.Lock()
        self._staged_requests = 0  # launched with their rows on the device already
        self._host_requests = 0  # launched with their rows taken from the host

    # ------------------------------------------------------------------ public
    def submit(self, tenant_id: Hashable, x: Any, slo_ms: float | None = None, *, copy: bool = True) -> Future:
        """Queues one request: the rows ``x`` [r, *row_shape] for ``tenant_id``.

        ``x`` is copied, so the caller may reuse its buffer at once. With ``copy=False`` the
        server keeps ``x`` itself (when it is already a NumPy array of the model's dtype) and
        the caller must not change it until the future is done: for rows decoded into a fresh
        array per request, that saves one copy of every row (for a 224x224x3 float32 image,
        22-62 us on a 2-core CPU, from cache and from memory).

        Returns:
          A ``concurrent.futures.Future`` whose result is the NumPy output rows [r, ...] in
          order; it fails with ``Overloaded`` at once when the request is predicted to miss
          its deadline by more than ``overload_factor`` x SLO (policy "reject"; an idle
          server serves it anyway, counted late) or the queue is full, with
          ``UnknownTenantError`` when the tenant is removed while queued, with
          ``SchedulerClosed`` on ``close(drain=False)``, or with the exception of its step.

        Raises:
          UnknownTenantError: the tenant is not resident (the same error ``predict`` raises).
          InputError: x is not [r >= 1, *row_shape] of the model's dtype.
          ValueError: slo_ms is not a finite number in (0, 3_600_000] (or not a number).
          SchedulerClosed: the server is closed.
        """
        slo_ms = _check_slo(slo_ms, self.config.default_slo_ms)
        if tenant_id not in self.mt:
            raise UnknownTenantError(tenant_id, len(self.mt))
        x = as_row_array(x, copy)
        if x.ndim == 0 or x.shape[0] == 0:
            raise InputError(f"a request for tenant {tenant_id!r} needs rows [r >= 1, ...], got shape {list(x.shape)}")
        x = self.mt.check_input([tenant_id] * x.shape[0], x)  # refused alone, not with a shared step
        future: Future = Future()
        with self._cond:
            if self._closed:
                raise SchedulerClosed(f"{self.kind} is closed; request for tenant {tenant_id!r} not accepted")
            now = self._clock()
            req = _Request(tenant_id, x, future, now, now + slo_ms / 1e3, slo_ms, next(self._seq))
            error = self._admit_locked(req, now)
            if error is None:
                self._fix_rows_locked(x)
                self._outstanding[req.seq] = req
                if self._stager is not None:
                    req.staged = self._stager.stage(x)
                lane = self._lane(req.tenant_id)
                lane.push(req)
                if self._wakes_locked(lane, req):
                    self._cond.notify_all()
        if req.late:
            self._latency.note_admitted_late(tenant_id)
        if error is not None:
            self._finish(req, error=error)
        else:  # a request its owner cancels or completes leaves the queue at once, not when a step reaches it
            # (weakly: a future its client keeps must not keep the request's rows or the server)
            future.add_done_callback(functools.partial(_drop_if_given_up, weakref.ref(self), weakref.ref(req)))
        return future

    def _drop_given_up(self, req: _Request) -> None:
        """A queued request its owner cancelled (or completed) stops counting against the
        queue's limits and depth now (as a step would drop it: no record)."""
        lane = self._lanes.get(self._lane_key(req.tenant_id))
        if lane is None or not lane.holds(req):  # taken by a step (the server completed it): no lock
            return
        with self._cond:
            lane = self._lanes.get(self._lane_key(req.tenant_id))
            if lane is None or not lane.discard(req):
                return
            self._outstanding.pop(req.seq, None)
        _let_go_of_staged(req)

    async def submit_async(self, tenant_id: Hashable, x: Any, slo_ms: float | None = None, *, copy: bool = True) -> Any:
        """``await``-able ``submit``: the output rows, or the request's exception."""
        return await asyncio.wrap_future(self.submit(tenant_id, x, slo_ms, copy=copy))

    def latencies_by_tenant(self) -> dict[Hashable, np.ndarray]:
        """Each tenant's recent answered-request latencies (ms; the window the percentiles of
        ``metrics()`` come from), e.g. for ``jaxmt.metrics.spread_by_chance``."""
        return self._latency.samples_by_tenant()

    def metrics(self) -> dict[str, Any]:
        """Per tenant and overall: counts, latency percentiles (ms), SLO attainment, queue
        depth; step counters (steps, mean tenants and rows per step, padding waste) and
        where answered requests spent their latency (``queue_wait_ms``, ``in_step_ms``)."""
        self._forget_removed_tenants(force=True)
        with self._cond:
            depth: dict[Hashable, tuple[int, int]] = {}
            for lane in self._lanes.values():
                for t, n in lane.tenant_requests.items():
                    d, r = depth.get(t, (0, 0))
                    depth[t] = (d + n, r + lane.tenant_rows[t])
            in_flight = self._in_flight
        snapshot = {"server": self.kind, **self._latency.snapshot(depth)}
        snapshot["steps"] = {**self._steps.snapshot(), "in_flight": in_flight}
        with self._staging_lock:
            snapshot["staging"] = {"enabled": self._stager is not None, "staged_requests": self._staged_requests,
                                   "host_requests": self._host_requests,
                                   "failures": 0 if self._stager is None else self._stager.failures}
        snapshot["config"] = {f.name: getattr(self.config, f.name) for f in dataclasses.fields(self.config) if f.name != "clock"}
        return snapshot

    def latencies_ms(self, tenant_id: Hashable | None = None) -> np.ndarray:
        """Recent latencies (ms) of one tenant's answered requests, or of all tenants."""
        return self._latency.samples_ms(tenant_id)

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stops accepting requests; with ``drain`` serves every queued one first, without it
        fails them with ``SchedulerClosed`` (steps already launched still complete). Waits
        for the server's threads, except when called on one of them (from a future's
        done-callback, which runs on the completion thread): the dispatch thread may be
        waiting for that very callback to return, so the wait is left to a helper thread
        and ``close`` returns at once. Idempotent."""
        self._shut(drain)
        if threading.current_thread() in self._threads:
            threading.Thread(target=self._wait_for_threads, args=(timeout,), name=f"jaxmt-{self.kind}-close", daemon=True).start()
            return
        self._wait_for_threads(timeout)

    def _wait_for_threads(self, timeout: float | None) -> None:
        """Joins the dispatch and completion threads, then stops the stager."""
        for thread in self._threads:
            thread.join(timeout)
        with self._cond:
            stager = self._stager
        if stager is not None:
            stager.close(timeout)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self):
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close(drain=True)

    # ----------------------------------------------------------- subclass API
    def _next_batch_locked(self, now: float) -> tuple[_Batch | None, float | None]:
        """(batch to launch now, None) or (None, seconds until one may be due; None: idle)."""
        raise NotImplementedError

    def _launch(self, batch: _Batch, started_s: float) -> _Launched | None:
        raise NotImplementedError

    def _steps_ahead_locked(self, req: _Request) -> float:
        """Steps that must complete before ``req`` has its answer, its own included: an upper
        bound that counts every queued request, those due after ``req`` too (which EDF would
        serve later), so that admission stays O(1) a request; it errs toward refusing."""
        raise NotImplementedError

    def _lane_key(self, tenant_id: Hashable) -> Hashable:
        return None

    def _wakes_locked(self, lane: _EdfQueue, req: _Request) -> bool:
        """Whether pushing ``req`` may make a step due sooner (else waiters sleep on)."""
        return True

    def _observe_service(self, launched: _Launched, service_s: float) -> None:
        """A completed step's service time (for a subclass's cost model)."""

    def _has_work_locked(self) -> bool:
        return any(len(lane) for lane in self._lanes.values())

    # ------------------------------------------------------------- for subclasses
    def _rows_of(self, requests: list[_Request]) -> "np.ndarray | RowParts":
        """The requests' rows as one input, in order: with staging, a ``RowParts`` that joins
        the staged rows on the device (host rows for requests whose copy is not issued yet)."""
        if self._stager is None:
            return requests[0].x if len(requests) == 1 else RowParts([r.x for r in requests])
        device_rows = []
        for req in requests:  # one look at each copy: a request is served as counted
            staged, req.staged = req.staged, None
            rows = None if staged is None else staged.device_rows()
            if staged is not None:  # this launch holds the rows now, or takes host rows (a copy
                staged.abandon()  # not made yet is then skipped)
            device_rows.append(rows)
        ready = sum(rows is not None for rows in device_rows)
        with self._staging_lock:
            self._staged_requests += ready
            self._host_requests += len(requests) - ready
        return RowParts([r.x for r in requests], device_rows, self._stager.device)

    def _fix_rows_locked(self, x: np.ndarray) -> None:
        """The first admitted request fixes the model's rows, so that queued ones share them; a
        refused one (closed, queue full, overloaded) fixes nothing, or it would lock a model
        whose rows are not given to a client's mistaken dtype. Rows checked at submit while
        none were fixed are held to those fixed since (by another request, or a ``predict``):
        admitted, they would fail the step they share with other tenants' requests. Until the
        rows have been found fixed under the store's lock once, they are looked up there: a
        first ``predict`` fixes them while it launches and unfixes them if its launch fails,
        so rows read without that lock may be about to go (fixed under it, they never do)."""
        if not self._rows_confirmed or (x.shape[1:], x.dtype) != (self.mt.row_shape, self.mt.row_dtype):
            self.mt.fix_rows(x.shape[1:], x.dtype)  # InputError: another request fixed other rows
            self._rows_confirmed = True
        if not self._staging_decided:
            self._decide_staging_locked(x.shape[1:], x.dtype)

    def _decide_staging_locked(self, row_shape: Any, row_dtype: Any) -> None:
        """Starts the stager if rows of this shape and dtype are staged (see
        ``SchedulerConfig.stage_inputs``); a no-op once decided or while the rows are unknown."""
        if self._staging_decided or row_shape is None:
            return
        self._staging_decided = True
        device = self.mt.input_device
        row_nbytes = np.dtype(row_dtype).itemsize * math.prod(row_shape)
        self._staging_wanted = bool(self.config.stage_inputs or (self.config.stage_inputs is None
                                                                 and stage_by_default(device, row_nbytes)))
        self._start_stager_locked()

    def _start_stager_locked(self) -> None:
        """The stager's thread, once staging is wanted and the server runs (a constructor that
        fails leaves no thread behind, a closed server starts none)."""
        if self._staging_wanted and self._stager is None and self._threads and not self._closed:
            self._stager = RowStager(self.mt.input_device)

    def _warm_staging(self, position_shapes: list[tuple[int, ...]]) -> jax.Device | None:
        """When rows are staged (deciding it if the rows are known now), compiles the join
        program of each step block shape; returns where rows are staged (None: nowhere)."""
        shape, dtype = self.mt.row_shape, self.mt.row_dtype
        with self._cond:
            self._decide_staging_locked(shape, dtype)
            device = None if self._stager is None else self._stager.device
        if device is not None:
            warm_join(position_shapes, shape, dtype, device)
        return device

    # ------------------------------------------------------------- internals
    def _shut(self, drain: bool) -> None:
        with self._cond:
            self._closed = True
            dropped = [] if drain else [r for lane in self._lanes.values() for r in lane.drain()]
            self._cond.notify_all()
        for req in dropped:
            self._finish(req, error=SchedulerClosed(f"{self.kind} closed before the request for tenant {req.tenant_id!r} ran"))

    def _lane(self, tenant_id: Hashable) -> _EdfQueue:
        key = self._lane_key(tenant_id)
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _EdfQueue(self._entry_rows, self._totals)
        return lane

    def _admit_locked(self, req: _Request, now: float) -> Overloaded | None:
        cfg = self.config
        if cfg.max_queue_rows is not None and self._totals.rows + req.rows > cfg.max_queue_rows:
            return Overloaded(
                f"{self.kind}: queue full (max_queue_rows={cfg.max_queue_rows}); "
                f"request of {req.rows} rows for tenant {req.tenant_id!r} rejected"
            )
        est = self._steps.estimate_s
        if est is None:  # nothing observed yet: no basis for a prediction
            return None
        predicted_s = now + est * self._steps_ahead_locked(req)
        if predicted_s - req.deadline_s <= cfg.overload_factor * req.slo_ms / 1e3:
            return None
        idle = self._in_flight == 0 and self._totals.rows == 0
        if cfg.overload_policy == "serve_late" or idle:
            # Idle, the request's step starts now and measures the step time afresh: refusing
            # it on the estimate alone could refuse every request after one outlier step, and
            # with no step run the estimate would never recover. It is counted late.
            req.late = True
            return None
        return Overloaded(
            f"{self.kind}: tenant {req.tenant_id!r}: predicted completion {1e3 * (predicted_s - now):.1f} ms after submit "
            f"misses its {req.slo_ms:g} ms SLO by more than overload_factor={cfg.overload_factor:g} x SLO"
        )

    def _take_locked(self, lane: _EdfQueue, now: float, est: float | None, dropped: list,
                     oldest_first: bool = False) -> _Request | None:
        """The lane's next live request (EDF, or the oldest); cancelled and hopeless ones go to ``dropped``."""
        pop = lane.pop_oldest if oldest_first else lane.pop
        while (req := pop()) is not None:
            if req.future.cancelled():
                dropped.append((req, None))
            elif self._hopeless(req, now, est):
                dropped.append((req, Overloaded(
                    f"{self.kind}: tenant {req.tenant_id!r}: request waited {1e3 * (now - req.submitted_s):.1f} ms and "
                    f"would miss its {req.slo_ms:g} ms SLO by more than overload_factor={self.config.overload_factor:g} x SLO"
                )))
            else:
                return req
        return None

    def _put_back_locked(self, lane: _EdfQueue, req: _Request, dropped: list) -> None:
        """Returns a request taken off ``lane`` (a step formed without it) to the lane. One
        its owner gave up on while it was taken is dropped instead: its done-callback found
        it off the queue and left it there. Pushed before the look, so that an owner giving
        up after the look finds it queued."""
        lane.push(req)
        if req.future.done() and lane.discard(req):
            dropped.append((req, None))

    def _hopeless(self, req: _Request, now: float, est: float | None) -> bool:
        """Under policy "reject": would the request, sent now, miss its overload bound? While
        nothing is in flight only the time it has already waited counts, not the estimate:
        the step being formed measures the step time afresh (see ``_admit_locked``)."""
        cfg = self.config
        if cfg.overload_policy != "reject" or est is None:
            return False
        step_s = est if self._in_flight else 0.0
        return now + step_s - req.deadline_s > cfg.overload_factor * req.slo_ms / 1e3

    def _finish(self, req: _Request, result: Any = None, error: BaseException | None = None) -> None:
        """Records the request's latency and outcome, then completes its future; a request
        its owner cancelled or completed first is let go of without a record (its outcome
        is not the server's). A queued request is claimed first, so that a cancel cannot
        come between the record and the completion."""
        self._outstanding.pop(req.seq, None)
        _let_go_of_staged(req)
        if not (req.future.running() or _claim(req.future)):
            return
        self._latency.record(req.tenant_id, 1e3 * (self._clock() - req.submitted_s), req.slo_ms, error)
        # The tenant left (the store changed since the last look): keep no stats for it.
        self._forget_removed_tenants(force=isinstance(error, UnknownTenantError))
        try:
            if error is None:
                req.future.set_result(result)
            else:
                req.future.set_exception(error)
        except InvalidStateError:  # cancelled or completed by its owner
            pass
        except BaseException:  # noqa: BLE001 (the state is set: only a done-callback raises here)
            # concurrent.futures contains a callback's Exception but not its BaseException
            # (asyncio.CancelledError, SystemExit): on a server thread it would end the loop
            # that completes every later request.
            logger.exception("%s: a done-callback of a request for tenant %r raised; ignored", self.kind, req.tenant_id)

    def _forget_removed_tenants(self, force: bool = False) -> None:
        """Folds the stats of tenants no longer resident into the overall totals, however they
        left (idle or with requests queued), so that memory stays bounded under tenant churn;
        looks only when the store changed since the last look, unless ``force``d."""
        version = self.mt.store.version
        if force or version != self._stats_version:
            self._stats_version = version
            self._latency.forget_absent(lambda tenant_id: tenant_id in self.mt)

    def _finish_dropped(self, batch: _Batch) -> None:
        for req, error in batch.dropped:
            if error is not None:
                self._finish(req, error=error)
            else:  # cancelled by its owner
                self._outstanding.pop(req.seq, None)
                _let_go_of_staged(req)

    def _split_resident(self, requests: list[_Request]) -> tuple[list[_Request], list[_Request]]:
        """(requests whose tenant is resident, the others); call under ``mt.store.lock``."""
        live, gone = [], []
        for req in requests:
            (live if req.tenant_id in self.mt else gone).append(req)
        return live, gone

    def _fail_unknown(self, gone: list[_Request]) -> None:
        for req in gone:
            self._finish(req, error=UnknownTenantError(req.tenant_id, len(self.mt)))

    def _start_threads(self, targets: list[tuple[str, Any]]) -> None:
        _LIVE_SERVERS.add(self)
        for name, target in targets:
            thread = threading.Thread(target=target, name=f"jaxmt-{self.kind}-{name}", daemon=True)
            self._threads.append(thread)
            thread.start()
        with self._cond:
            self._start_stager_locked()

    def _start_pipeline(self) -> None:
        """One dispatch thread and one completion thread, at most ``pipeline_depth`` steps apart."""
        self._start_threads([("dispatch", self._dispatch_loop), ("complete", self._completion_loop)])

    def _wait_for_batch(self) -> _Batch | None:
        """Blocks until a batch is due; None when closed and nothing is left to serve."""
        with self._cond:
            while True:
                if self._closed and not self._has_work_locked():
                    return None
                batch, wait_s = self._next_batch_locked(self._clock())
                if batch is not None:
                    return batch
                self._cond.wait(_POLL_S if wait_s is None else min(max(wait_s, 1e-4), _POLL_S))

    def _dispatch_loop(self) -> None:
        try:
            while True:
                self._slots.acquire()
                launched = None
                while launched is None:
                    batch = self._wait_for_batch()
                    if batch is None:
                        return
                    self._finish_dropped(batch)
                    if batch.requests:
                        launched = self._launch_guarded(batch)
                self._completions.put(launched)
        except BaseException as exc:  # a bug here must not strand requests
            logger.exception("%s: dispatch loop failed; failing every request not answered", self.kind)
            self._shut(drain=False)
            self._completions.put(None)
            for thread in self._threads:  # launched steps complete first
                if thread is not threading.current_thread():
                    thread.join()
            self._fail_outstanding(exc)
        finally:
            self._completions.put(None)

    def _completion_loop(self) -> None:
        while (launched := self._completions.get()) is not None:
            try:
                self._complete(launched, pipelined=True)
            except BaseException as exc:  # a bug here must not strand requests, nor the dispatch loop waiting on a slot
                logger.exception("%s: completing a step failed; closing and failing every request not answered", self.kind)
                self._shut(drain=False)
                self._fail_outstanding(exc)
            finally:
                self._slots.release()

    def _fail_outstanding(self, error: BaseException) -> None:
        """Fails every request not answered yet with ``error`` (a server thread's bug); one
        that cannot be finished in the usual way still gets the error."""
        for req in list(self._outstanding.values()):
            try:
                self._finish(req, error=error)
            except BaseException:  # noqa: BLE001 (the bookkeeping is what failed: complete the future regardless)
                self._outstanding.pop(req.seq, None)
                with contextlib.suppress(InvalidStateError):
                    req.future.set_exception(error)

    def _launch_guarded(self, batch: _Batch) -> _Launched | None:
        """Launches a batch; if launching raises, only its requests fail."""
        running = [r for r in batch.requests if _claim(r.future)]
        if len(running) < len(batch.requests):
            for req in set(batch.requests) - set(running):  # cancelled or completed by their owners
                self._outstanding.pop(req.seq, None)
                _let_go_of_staged(req)
            batch.requests = running
        if not batch.requests:
            return None
        with self._cond:
            self._in_flight += 1
            self._cond.notify_all()
        launch_s = self._clock()
        try:
            launched = self._launch(batch, launch_s)
        except Exception as exc:  # noqa: BLE001 (the step's futures carry it)
            launched = None
            self._steps.record_failure()
            logger.warning("%s: launching a step of %d requests failed: %s: %s", self.kind, len(batch.requests), type(exc).__name__, exc)
            self._fail_unfinished(batch.requests, exc)
        with self._cond:
            self._cond.notify_all()
            if launched is None:
                self._in_flight -= 1
            else:
                done_s = self._clock()
                if launched.timed:  # a launch that compiled a program says nothing of the next one
                    took_s, old = done_s - launch_s, self._launch_ewma_s
                    self._launch_ewma_s = took_s if old is None else old + self.config.ewma_alpha * (took_s - old)
                self._running += 1
                try:
                    launched.predicted_s = self._predict_service_s(launched)
                except Exception:  # noqa: BLE001 (a cost model's failure must not stop the dispatch loop)
                    logger.exception("%s: predicting a step's time failed; using the average step's", self.kind)
                    launched.predicted_s = self._steps.estimate_s
                if launched.predicted_s is None:  # nothing observed yet: counted at the next estimate
                    self._running_unpredicted += 1
                else:  # the device takes this step after those already running
                    self._running_predicted_s += launched.predicted_s
                    self._busy_until_s = max(done_s, self._busy_until_s) + launched.predicted_s
        return launched

    def _predict_service_s(self, launched: _Launched) -> float | None:
        """How long the device will take for a launched step (None: nothing observed yet); a
        subclass with a cost model predicts from the step's size, the default is the EWMA."""
        return self._steps.estimate_s

    def _step_done_locked(self, launched: _Launched, ready_s: float) -> None:
        """A launched step left the pipeline: the others running should end their predicted
        times after now, a step launched before any prediction could be made counting as the
        average step (a step still being launched is added when its launch returns)."""
        self._in_flight -= 1
        self._running -= 1
        if launched.predicted_s is None:
            self._running_unpredicted -= 1
        else:
            self._running_predicted_s -= launched.predicted_s
        if self._running:
            unpredicted_s = (self._steps.estimate_s or 0.0) * self._running_unpredicted
            self._busy_until_s = ready_s + max(self._running_predicted_s, 0.0) + unpredicted_s
        else:
            self._busy_until_s = -math.inf
            self._running_predicted_s = 0.0  # no rounding residue carried over
        self._cond.notify_all()

    def _finish_rows(self, requests: list[_Request], answers: Any) -> None:
        """Completes each request with its rows of ``answers`` (the requests' rows in order)."""
        offset = 0
        for req in requests:
            rows_of_req = slice(offset, offset + req.rows)
            offset += req.rows
            self._finish(req, result=jax.tree_util.tree_map(lambda a, s=rows_of_req: _own_rows(a, s), answers))

    def _complete(self, launched: _Launched, pipelined: bool) -> None:
        """Waits for a step's results and completes its futures (off the dispatch path)."""
        requests = launched.requests
        counted = False
        try:
            answers = launched.pending.result()
            ready_s = self._clock()
            start_s = launched.started_s
            if pipelined:  # overlapping steps: the device started this one when the last ended
                start_s = max(start_s, self._last_ready_s if self._last_ready_s is not None else start_s)
                self._last_ready_s = ready_s
            rows = sum(r.rows for r in requests)
            service_s = ready_s - start_s if launched.timed else None
            self._steps.record(launched.tenants, rows, launched.padded_rows, service_s, launched.programs)
            self._steps.record_latency_parts((1e3 * (launched.started_s - r.submitted_s) for r in requests),
                                             1e3 * (ready_s - launched.started_s))
            if service_s is not None:
                self._observe_service(launched, service_s)
            self._latency.note_step({r.tenant_id for r in requests})
            with self._cond:
                self._step_done_locked(launched, ready_s)
            counted = True
            self._finish_rows(requests, answers)
        except Exception as exc:  # noqa: BLE001 (the step's futures carry it)
            self._steps.record_failure()
            logger.warning("%s: a step of %d requests failed: %s: %s", self.kind, len(requests), type(exc).__name__, exc)
            if not counted:
                with self._cond:
                    self._step_done_locked(launched, self._clock())
            # Of a step launched as several program calls, the calls that answered still count
            # and each failed call's requests get that call's error.
            calls = exc.calls if isinstance(exc, _PartlyFailed) else []
            for call_requests, answers, call_error in calls:
                if call_error is None:
                    self._finish_rows(call_requests, answers)
                else:
                    self._fail_unfinished(call_requests, call_error)
            self._fail_unfinished(requests, exc.error if isinstance(exc, _PartlyFailed) else exc)

    def _fail_unfinished(self, requests: list[_Request], error: BaseException) -> None:
        """Fails those of the requests not completed yet; the others (answered or failed apart,
        or completed by their owners while their step ran) are let go of all the same."""
        for req in requests:
            if not req.future.done():
                self._finish(req, error=error)
            else:
                self._outstanding.pop(req.seq, None)
                _let_go_of_staged(req)


# Servers whose threads may still run. Their threads are daemons (a forgotten server must not
# hang interpreter exit), so at exit each is closed before the runtime tears JAX down under a
# running step.
_LIVE_SERVERS: weakref.WeakSet[_ServerBase] = weakref.WeakSet()


@atexit.register
def _close_at_exit() -> None:
    for server in list(_LIVE_SERVERS):
        server.close(drain=False, timeout=5.0)


def _claim(future: Future) -> bool:
    """Marks a request's future running; False when its owner cancelled it or completed it
    (a client may time its own request out with ``set_exception``): the request is dropped,
    where ``set_running_or_notify_cancel`` would raise and stop the server."""
    if future.done() and not future.cancelled():  # (asked first: that call logs before it raises)
        return False
    try:
        return future.set_running_or_notify_cancel()
    except RuntimeError:  # completed by its owner since the look above
        return False


def _drop_if_given_up(server_ref: weakref.ref, req_ref: weakref.ref, future: Future) -> None:
    """Done-callback of a queued request's future (see ``submit``): a request its owner
    cancelled or completed (``set_exception``) leaves the queue."""
    server, req = server_ref(), req_ref()
    if server is not None and req is not None:
        server._drop_given_up(req)


def _own_rows(answers: Any, rows: slice) -> Any:
    """A request's rows of a step's answers, in an array of their own: a NumPy slice would
    keep the whole step's block (other tenants' answers included) reachable through ``.base``."""
    piece = answers[rows]
    return piece.copy() if isinstance(piece, np.ndarray) else piece


def _let_go_of_staged(req: _Request) -> None:
    """A request that is done needs its staged rows no more (a pending copy is skipped)."""
    staged, req.staged = req.staged, None
    if staged is not None:
        staged.abandon()


def _check_slo(slo_ms: Any, default_ms: float) -> float:
    if slo_ms is None:
        return default_ms
    if isinstance(slo_ms, bool) or not isinstance(slo_ms, numbers.Real):  # any bad SLO is a ValueError
        raise ValueError(f"slo_ms must be a number of milliseconds, got {type(slo_ms).__name__} {slo_ms!r}")  # noqa: TRY004
    try:
        value = float(slo_ms)
    except OverflowError:  # an int beyond float's range: out of range like any other
        value = math.inf
    if not (math.isfinite(value) and 0.0 < value <= MAX_SLO_MS):
        raise ValueError(f"slo_ms must be a finite number in (0, {MAX_SLO_MS:g}], got {slo_ms!r}")
    return value
