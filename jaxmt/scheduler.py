"""Scheduler: single requests of many tenants, with latency objectives, become shared steps.

Requests wait in one earliest-deadline-first queue. A dispatch thread forms a step when the
queue can fill the largest tenant bucket, when its oldest request has waited ``max_delay_ms``
and the device is about to be free (while steps are in flight, launching sooner would only
queue the step on the device, and the requests arriving meanwhile could not join it), or when
the most urgent deadline leaves no more time; it takes requests deadline-first up to
the largest bucket (the rest wait for the next step), trims optional company that would only
pad the tenant bucket, and launches the step with ``MultiTenantModel.dispatch`` without waiting
for the device. A completion thread copies results back and completes futures, so step n+1 is
planned and launched while step n runs; at most ``pipeline_depth`` steps are in flight.

Paced (``target_latency_ms``), the Scheduler holds each request until a step launched then
should answer it at that target, and a step takes only the requests due within one step
time: latency varies little between requests and tenants, at the cost of answering later
than the device could (``SchedulerConfig`` says how the due times are set).

Overload is explicit: an EWMA of observed step times and the queue ahead give each request a
predicted completion; when it lies past the deadline by more than ``overload_factor`` x SLO,
the request fails at once with ``Overloaded`` (policy "reject", which also sheds queued
requests that became hopeless) or is served and counted late (policy "serve_late"). An idle
server (nothing in flight or queued) serves the request whatever the estimate says, and
counts it late: its step measures the step time again, so one outlier step cannot make the
server refuse everything from then on.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jaxmt._queue import _Batch, _Launched, _PartlyFailed, _Request
from jaxmt._server import MAX_SLO_MS, _ServerBase
from jaxmt.buckets import BucketPolicy, Plan

OVERLOAD_POLICIES = ("reject", "serve_late")


def _check_real(name: str, value: Any, low: float, high: float, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    try:
        value = float(value)
    except OverflowError:  # an int beyond float's range: out of range like any other
        value = math.inf
    too_low = value <= low if low_open else value < low
    if not math.isfinite(value) or too_low or value > high:
        bracket = "(" if low_open else "["
        raise ValueError(f"{name} must be a finite number in {bracket}{low:g}, {high:g}], got {value!r}")
    return value


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """How the scheduler (and the baselines) batch, shed load and account latency.

    Attributes:
      max_delay_ms: longest a request waits for company while the device is free. While
        steps are in flight, the Scheduler forms the next step when the device is expected to
        be free (each step in flight taking the time the step-cost fit predicts for its size,
        or the average step's until the fit knows sizes), less twice the host time of a
        launch, unless a full bucket or a deadline sends it sooner; the baselines launch at
        max_delay_ms.
      default_slo_ms: latency objective of requests submitted without ``slo_ms``.
      target_latency_ms: None (the default) serves each request as soon as a step can take
        it. A number paces the Scheduler instead: each request is held until a step
        launched then is expected to answer it this long after it was submitted (or, if
        sooner, one step time before its deadline), and a step takes only the requests due
        to launch within one step time of it. Latency then varies little between requests and
        tenants (about the target, less up to one step time) instead of ranging from one
        step time to the SLO, at the cost of answering later than the device could; under
        overload requests are past their launch time and steps form as without pacing.
        Scheduler only: the baselines serve as soon as they can and refuse a target.
      overload_policy: "reject" (fail fast with ``Overloaded``) or "serve_late" (serve, count).
      overload_factor: a request is overloaded when its predicted completion lies past its
        deadline by more than this many SLOs (0: any predicted miss).
      max_queue_rows: rows that may wait at once; beyond, submit fails with ``Overloaded``
        under either policy (None: unbounded).
      pipeline_depth: steps in flight at once (2: plan and launch n+1 while n runs).
      ewma_alpha: weight of a new observation in the step-time estimate.
      flag_window, flag_min_requests, flag_below_attainment: a tenant is flagged (metrics
        and a log warning) when fewer than ``flag_below_attainment`` of its last
        ``flag_window`` requests (at least ``flag_min_requests``) met their SLO.
      latency_window: latency samples kept per tenant for percentiles.
      stage_inputs: copy each request's rows to the device at submit, on a thread of the
        server's, so that a step's launch joins device rows instead of copying host rows
        (``jaxmt.staging``). None: on a GPU, for a model on one device, when a row holds at
        least ``jaxmt.staging.STAGE_MIN_ROW_BYTES`` (256 KiB: a 224x224x3 float32 image, not
        its uint8 pixels), decided once the rows are known. True on a model that places its
        rows itself (``ShardedMultiTenantModel``) raises ValueError.
      clock: seconds, monotonic; injectable for tests.
    """

    max_delay_ms: float = 2.0
    default_slo_ms: float = 50.0
    target_latency_ms: float | None = None
    overload_policy: str = "reject"
    overload_factor: float = 1.0
    max_queue_rows: int | None = 100_000
    pipeline_depth: int = 2
    ewma_alpha: float = 0.2
    flag_window: int = 64
    flag_min_requests: int = 16
    flag_below_attainment: float = 0.9
    latency_window: int = 4096
    stage_inputs: bool | None = None
    clock: Callable[[], float] = dataclasses.field(default=time.monotonic, repr=False, compare=False)

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)
        set_("max_delay_ms", _check_real("max_delay_ms", self.max_delay_ms, 0.0, 60_000.0))
        set_("default_slo_ms", _check_real("default_slo_ms", self.default_slo_ms, 0.0, MAX_SLO_MS, low_open=True))
        if self.target_latency_ms is not None:
            set_("target_latency_ms", _check_real("target_latency_ms", self.target_latency_ms, 0.0, MAX_SLO_MS, low_open=True))
        if self.overload_policy not in OVERLOAD_POLICIES:
            raise ValueError(f"overload_policy must be one of {OVERLOAD_POLICIES}, got {self.overload_policy!r}")
        set_("overload_factor", _check_real("overload_factor", self.overload_factor, 0.0, 1e6))
        if self.max_queue_rows is not None:
            set_("max_queue_rows", _check_int("max_queue_rows", self.max_queue_rows, 1))
        set_("pipeline_depth", _check_int("pipeline_depth", self.pipeline_depth, 1))
        set_("ewma_alpha", _check_real("ewma_alpha", self.ewma_alpha, 0.0, 1.0, low_open=True))
        set_("flag_window", _check_int("flag_window", self.flag_window, 1))
        set_("flag_min_requests", _check_int("flag_min_requests", self.flag_min_requests, 1))
        if self.flag_min_requests > self.flag_window:  # the window of recent results could never hold enough
            raise ValueError(f"flag_min_requests ({self.flag_min_requests}) must not exceed flag_window ({self.flag_window})")
        set_("flag_below_attainment", _check_real("flag_below_attainment", self.flag_below_attainment, 0.0, 1.0))
        set_("latency_window", _check_int("latency_window", self.latency_window, 1))
        if not (self.stage_inputs is None or isinstance(self.stage_inputs, (bool, np.bool_))):  # (1 == True: `in` would take it)
            raise ValueError(f"stage_inputs must be None, True or False, got {self.stage_inputs!r}")
        if not callable(self.clock):
            raise TypeError(f"clock must be callable, got {type(self.clock).__name__}")


def make_config(config: SchedulerConfig | None = None, **overrides: Any) -> SchedulerConfig:
    """``config`` (or the defaults) with the given fields replaced; None values are ignored."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    base = config if config is not None else SchedulerConfig()
    if not isinstance(base, SchedulerConfig):
        raise TypeError(f"config must be a jaxmt.SchedulerConfig, got {type(base).__name__}")
    names = {f.name for f in dataclasses.fields(SchedulerConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise TypeError(f"unknown scheduler option(s) {unknown}; expected some of {sorted(names)}")
    return dataclasses.replace(base, **overrides)


class Scheduler(_ServerBase):
    """Serves single requests of many tenants of a ``MultiTenantModel`` as shared steps.

    Args:
      mt: the model whose resident tenants are served.
      max_delay_ms, default_slo_ms, **options: fields of ``SchedulerConfig``.
      config: a whole ``SchedulerConfig`` (the other arguments override its fields; None
        leaves a field as ``config`` has it, so an unpaced copy of a paced config is
        ``dataclasses.replace(config, target_latency_ms=None)``).

    Example:
      >>> import jax, jax.numpy as jnp, numpy as np, jaxmt
      >>> def apply_fn(params, x):
      ...     return x @ params["w"]
      >>> mt = jaxmt.MultiTenantModel(apply_fn, {"w": jnp.ones((3, 2))}, capacity=2,
      ...                             buckets=jaxmt.BucketPolicy.powers_of_two(2, 2))
      >>> mt.add_tenant("a", {"w": jnp.full((3, 2), 2.0)})
      >>> with jaxmt.Scheduler(mt, max_delay_ms=1.0) as sched:
      ...     future = sched.submit("a", np.ones((1, 3), np.float32))
      ...     future.result(timeout=60).tolist()
      [[6.0, 6.0]]
    """

    kind = "jaxmt"

    def __init__(
        self,
        mt: Any,
        max_delay_ms: float | None = None,
        default_slo_ms: float | None = None,
        *,
        config: SchedulerConfig | None = None,
        **options: Any,
    ):
        from jaxmt.model import MultiTenantModel

        if not isinstance(mt, MultiTenantModel):
            raise TypeError(f"mt must be a jaxmt.MultiTenantModel, got {type(mt).__name__}")
        super().__init__(mt, make_config(config, max_delay_ms=max_delay_ms, default_slo_ms=default_slo_ms, **options))
        self._entry_rows = mt.buckets.max_rows
        self._queue = self._lane(None)
        self._cost = _StepCost()
        self._start_pipeline()

    def warmup(self, **kwargs: Any) -> int:
        """Compiles the model's bucket programs now and runs each once (``MultiTenantModel.warmup``),
        and, when rows are staged, the program joining each bucket's block and the model's
        programs of device-resident blocks; returns how many model programs were new."""
        buckets = self.mt.buckets
        staged = self._warm_staging([(k, b) for k in buckets.tenant_buckets for b in buckets.row_buckets]) is not None
        return self.mt.warmup(**{"device_inputs": staged, **kwargs})

    # --------------------------------------------------------------- policy
    def _steps_ahead_locked(self, req: _Request) -> float:
        entries = self._queue.entries_after(req.tenant_id, req.rows)
        return self._in_flight + math.ceil(entries / self.mt.max_step_entries)

    def _wakes_locked(self, lane: Any, req: _Request) -> bool:
        # The due time moves only for a first request, a full bucket (unpaced) or a new earliest deadline.
        full = lane.entries >= self.mt.max_step_entries and self.config.target_latency_ms is None
        return len(lane) == 1 or full or lane.earliest_deadline() == req.deadline_s

    def _next_batch_locked(self, now: float) -> tuple[_Batch | None, float | None]:
        queue = self._queue
        if not len(queue):
            return None, None
        est = self._steps.estimate_s
        paced = self.config.target_latency_ms is not None
        if paced:  # the first request due to launch, by its target or by its deadline
            target_s, est_s = self.config.target_latency_ms / 1e3, est or 0.0
            due_s = min(queue.oldest_submitted() + target_s - est_s, queue.earliest_deadline() - 2.0 * est_s)
        else:
            due_s = queue.oldest_submitted() + self.config.max_delay_ms / 1e3
        if est is not None:
            if self._in_flight:  # launched earlier, the step would only wait on the device
                due_s = max(due_s, self._busy_until_s - 2.0 * (self._launch_ewma_s or 0.0))
            # the most urgent request must leave now to make its deadline
            due_s = min(due_s, queue.earliest_deadline() - est)
        # Paced, a full bucket does not launch early: it would answer its requests before their target.
        full = queue.entries >= self.mt.max_step_entries and not paced
        if not (self._closed or full or now >= due_s):
            return None, due_s - now
        return (self._form_paced_step_locked(now, est) if paced else self._form_step_locked(now, est)), None

    def _form_step_locked(self, now: float, est: float | None) -> _Batch:
        """Deadline-first requests up to the largest buckets; optional company that would
        only push the step into a larger, mostly padded tenant bucket waits for the next
        (where a step is one tenant bucket, not a sharded model's one per device)."""
        buckets = self.mt.buckets
        batch, rows_of, entries, skipped = self._fill_step_locked(now, est, ((False, None),))
        # Only where a step is one tenant bucket: a sharded model's ladder counts entries per
        # device, so a step's padding depends on how its tenants spread over the devices.
        one_bucket = self.mt.max_step_entries == buckets.max_tenants
        if not self._closed and one_bucket and entries not in buckets.tenant_buckets and entries < buckets.max_tenants:
            pieces = lambda rows: -(-rows // buckets.max_rows)
            skipped += self._trim_to_bucket_locked(batch.requests, rows_of, entries, now, est, pieces)
        for req in skipped:
            self._put_back_locked(self._queue, req, batch.dropped)
        return batch

    def _form_paced_step_locked(self, now: float, est: float | None) -> _Batch:
        """Paced: the requests due to launch within one step time (or max_delay) from now, up
        to the largest buckets, so that steps come about one step time apart.

        A request is due by its target (submitted + target - step time) or, if that comes
        first, by its deadline less two step times (room for one step longer than the
        estimate). Those due by deadline are a prefix of the deadline order and those due by
        target a prefix of the arrival order, so the step takes the first, then the second,
        and stops in each order at its first request not due. Due requests that do not fit
        wait for the next step. Closing, the step takes what the buckets hold. Paced steps
        are not trimmed: a trimmed request would wait one more step past its target.
        """
        est_s, target_s = est or 0.0, self.config.target_latency_ms / 1e3
        until_s = now + max(est_s, self.config.max_delay_ms / 1e3) if not self._closed else math.inf
        by_deadline = lambda r: r.deadline_s - 2.0 * est_s <= until_s
        by_target = lambda r: r.submitted_s + target_s - est_s <= until_s
        batch, _, _, skipped = self._fill_step_locked(now, est, ((False, by_deadline), (True, by_target)))
        for req in skipped:
            self._put_back_locked(self._queue, req, batch.dropped)
        return batch

    def _fill_step_locked(self, now: float, est: float | None, orders) -> tuple[_Batch, dict[Any, int], int, list[_Request]]:
        """Takes requests into a step, in each of ``orders`` in turn ((oldest_first, due)
        pairs: arrival or deadline order, and a test of whether a request is due, None for
        all), up to the largest buckets. In an order, the first request not due goes back
        to the queue and ends that order. Returns the batch, its rows per tenant, its
        tenant entries, and the requests skipped because they did not fit (the caller
        puts them back)."""
        max_k, max_b = self.mt.max_step_entries, self.mt.buckets.max_rows
        pieces = lambda rows: -(-rows // max_b)
        queue, batch = self._queue, _Batch(requests=[])
        rows_of: dict[Any, int] = {}
        entries, skipped = 0, []
        for oldest_first, due in orders:
            while len(skipped) < 4 * max_k:
                req = self._take_locked(queue, now, est, batch.dropped, oldest_first=oldest_first)
                if req is None:
                    break
                if due is not None and not due(req):
                    self._put_back_locked(queue, req, batch.dropped)
                    break
                have = rows_of.get(req.tenant_id, 0)
                after = entries - pieces(have) + pieces(have + req.rows)
                if batch.requests and after > max_k:  # would overflow the largest bucket
                    skipped.append(req)
                    continue
                batch.requests.append(req)
                rows_of[req.tenant_id] = have + req.rows
                entries = after
        return batch, rows_of, entries, skipped

    def _trim_to_bucket_locked(self, requests, rows_of, entries, now, est, pieces) -> list[_Request]:
        """Removes optional requests (younger than max_delay, not urgent) from the end so the
        step fits the next smaller tenant bucket; returns them, or nothing if it cannot.

        A removed request waits for this step and then runs in the next, so it is urgent
        when two steps (after the device's backlog) would take it past its deadline. Only a
        tail of the step's deadline order is removed: a request never waits while one due
        later than it runs."""
        ladder = self.mt.buckets.tenant_buckets
        target = max((k for k in ladder if k < entries), default=0)
        delay_s = self.config.max_delay_ms / 1e3
        backlog_s = max(0.0, self._busy_until_s - now) if self._in_flight else 0.0

        def optional(req: _Request) -> bool:
            urgent = est is not None and req.deadline_s - (backlog_s + 2.0 * est) <= now
            return req.submitted_s + delay_s > now and not urgent

        trial = dict(rows_of)
        removed = []
        for req in reversed(requests):
            if entries <= target or not optional(req):
                break
            have = trial[req.tenant_id]
            entries += pieces(have - req.rows) - pieces(have)
            trial[req.tenant_id] = have - req.rows
            removed.append(req)
        if entries > target or entries == 0 or not removed:
            return []
        gone = set(map(id, removed))
        requests[:] = [r for r in requests if id(r) not in gone]
        return removed

    def _segments(self, requests: list[_Request]) -> list[list[_Request]]:
        """Splits a step into program calls so that few tenants' many rows do not pad every
        tenant's entry up to their row bucket.

        Tenants are grouped by the row bucket their rows need; contiguous groups (by bucket)
        are merged when one program for both costs less than two, in padded rows, with a
        program launch valued at the fitted cost model's launch cost. At most one call per
        row bucket on the ladder; one call when the step holds more entries than one
        program call does (``max_step_entries``).
        """
        buckets = self.mt.buckets
        max_b = buckets.max_rows
        by_tenant: dict[Any, list[_Request]] = {}
        for req in requests:
            by_tenant.setdefault(req.tenant_id, []).append(req)
        groups: dict[int, list[Any]] = {}  # row bucket -> tenants
        entries: dict[int, int] = {}
        for tenant, reqs in by_tenant.items():
            rows = sum(r.rows for r in reqs)
            bucket = buckets.row_bucket(min(rows, max_b))
            groups.setdefault(bucket, []).append(tenant)
            entries[bucket] = entries.get(bucket, 0) + -(-rows // max_b)
        if len(groups) == 1 or sum(entries.values()) > self.mt.max_step_entries:
            return [requests]
        keys = sorted(groups)
        launch_rows = self._cost.launch_cost_rows(default=float(buckets.max_tenants))
        best, cut = [0.0] + [math.inf] * len(keys), [0] * (len(keys) + 1)
        for j in range(1, len(keys) + 1):  # best[j]: cheapest split of the first j groups
            for i in range(j, 0, -1):
                count = sum(entries[k] for k in keys[i - 1 : j])
                cost = best[i - 1] + launch_rows + _padded_entries(buckets, count) * keys[j - 1]
                if cost < best[j]:
                    best[j], cut[j] = cost, i - 1
        segments, j = [], len(keys)
        while j > 0:
            members = {t for k in keys[cut[j] : j] for t in groups[k]}
            segments.append([r for r in requests if r.tenant_id in members])
            j = cut[j]
        return sorted(segments, key=lambda seg: min(r.deadline_s for r in seg))

    def _launch(self, batch: _Batch, started_s: float) -> _Launched | None:
        mt = self.mt
        with mt.store.lock:  # the tenant check and the dispatch see the same store
            live, gone = self._split_resident(batch.requests)
            segments = self._segments(live) if live else []
            compiles = mt.programs.compiles
            pendings = []
            for segment in segments:
                tenant_ids = [r.tenant_id for r in segment for _ in range(r.rows)]
                x = self._rows_of(segment)
                try:
                    pendings.append(mt.dispatch(tenant_ids, x))
                except Exception as exc:  # noqa: BLE001 (that call's futures carry it; the others go on)
                    pendings.append(_FailedCall(exc))
            timed = mt.programs.compiles == compiles
        self._fail_unknown(gone)
        if not live:
            return None
        ordered = [r for segment in segments for r in segment]
        pending = _Joined(pendings, segments)
        tenants = len({r.tenant_id for r in live})
        return _Launched(ordered, pending, started_s, tenants, pending.padded_rows, timed, pending.programs)

    def _observe_service(self, launched: _Launched, service_s: float) -> None:
        self._cost.observe(launched.programs, launched.padded_rows, service_s)

    def _predict_service_s(self, launched: _Launched) -> float | None:
        """From the step's size once the cost model knows it (steps of a few rows and of a
        full bucket differ several-fold), else the EWMA of recent steps."""
        predicted = self._cost.predict_s(launched.programs, launched.padded_rows)
        return predicted if predicted is not None else super()._predict_service_s(launched)


def _padded_entries(buckets: BucketPolicy, entries: int) -> int:
    """Entries a step of ``entries`` computes, padding included: its tenant bucket, or, beyond
    the largest (a sharded model's step, spread over its devices), that many largest buckets."""
    if entries <= buckets.max_tenants:
        return buckets.tenant_bucket(entries)
    return -(-entries // buckets.max_tenants) * buckets.max_tenants


class _FailedCall:
    """A program call whose launch raised: it answers nothing and raises at ``result()``."""

    plan = Plan(steps=(), rows=0)

    def __init__(self, error: BaseException):
        self.error = error

    def result(self) -> Any:
        raise self.error


class _Joined:
    """Several dispatched predictions answered as one: rows in the order of the calls.

    A call that fails does not take the others' answers with it: ``result()`` then raises
    ``_PartlyFailed`` carrying each call's requests with its answers or its own error.
    """

    def __init__(self, pendings: list[Any], requests_per_call: list[list[_Request]]):
        self.pendings, self.requests_per_call = pendings, requests_per_call
        self.padded_rows = sum(p.plan.padded_rows for p in pendings)
        self.programs = sum(len(p.plan.steps) for p in pendings)

    def result(self) -> Any:
        if len(self.pendings) == 1:
            return self.pendings[0].result()
        calls, first_error = [], None
        for pending, requests in zip(self.pendings, self.requests_per_call):
            try:
                calls.append((requests, pending.result(), None))
            except Exception as exc:  # noqa: BLE001 (carried to the futures of that call, not of others)
                calls.append((requests, None, exc))
                first_error = first_error or exc
        if first_error is not None:
            raise _PartlyFailed(first_error, calls)
        return jax.tree_util.tree_map(lambda *leaves: np.concatenate(leaves), *[answers for _, answers, _ in calls])


class _StepCost:
    """Fit of step seconds = launch_s * programs + row_s * padded rows, least squares with
    exponential forgetting (recent steps weigh more)."""

    def __init__(self, forget: float = 0.98, min_samples: int = 8):
        self.forget, self.min_samples = forget, min_samples
        self._gram = np.zeros((2, 2))
        self._moment = np.zeros(2)
        self.samples = 0
        # The fit is solved when a step is observed (on the completion thread), so that the
        # dispatch thread only reads it; one tuple, replaced whole.
        self._fit: tuple[float, float] | None = None

    def observe(self, programs: int, padded_rows: int, seconds: float) -> None:
        features = np.array([float(programs), float(padded_rows)])
        self._gram = self.forget * self._gram + np.outer(features, features)
        self._moment = self.forget * self._moment + features * seconds
        self.samples += 1
        self._fit = self._solve()

    def _solve(self) -> tuple[float, float] | None:
        (g00, g01), (_, g11) = self._gram
        det = g00 * g11 - g01 * g01
        if self.samples < self.min_samples or det <= 1e-9 * g00 * g11:
            return None
        launch_s, row_s = np.linalg.solve(self._gram, self._moment)
        return None if row_s <= 0 else (float(launch_s), float(row_s))

    def coefficients(self) -> tuple[float, float] | None:
        """(launch_s, row_s) of the fit, or None while they are not identifiable (too few
        steps, or steps whose sizes never varied) or the fit is not physical (row_s <= 0)."""
        return self._fit

    def launch_cost_rows(self, default: float) -> float:
        """What one more program launch costs, in padded rows (``default`` until known)."""
        fit = self.coefficients()
        if fit is None:
            return default
        launch_s, row_s = fit
        return float(min(max(launch_s / row_s, 0.0), 1e6))

    def predict_s(self, programs: int, padded_rows: int) -> float | None:
        """Seconds a step of this many program calls and padded rows should take (None until known)."""
        fit = self.coefficients()
        if fit is None:
            return None
        launch_s, row_s = fit
        return max(launch_s, 0.0) * programs + row_s * padded_rows


__all__ = ["OVERLOAD_POLICIES", "Scheduler", "SchedulerConfig", "make_config"]
