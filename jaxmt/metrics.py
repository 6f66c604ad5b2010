"""Serving metrics: per-tenant latency, SLO attainment, step statistics, a Prometheus exporter.

Shared by the scheduler, the baselines, ``scripts/simulate.py`` and ``benchmarks/`` so that
every number in a comparison is computed by the same code. Counters are exact; percentiles
are computed over bounded windows of the most recent latencies (``window`` samples of each
tenant for its own, ``window`` of all tenants for the overall ones), so memory stays bounded
on a long-running server.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from jaxmt.errors import Overloaded

logger = logging.getLogger("jaxmt")

QUANTILES: tuple[float, ...] = (50.0, 90.0, 99.0)


def percentiles(samples_ms: Sequence[float] | np.ndarray, qs: Iterable[float] = QUANTILES) -> dict[str, float | None]:
    """``{"p50_ms": ..., "p90_ms": ..., "p99_ms": ..., "max_ms": ..., "mean_ms": ...}`` of the samples.

    Linear interpolation between order statistics (NumPy's default). Every value is None when
    there are no samples (JSON ``null``), never NaN.
    """
    samples = np.asarray(samples_ms, dtype=np.float64)
    qs = tuple(qs)  # read twice: a generator would be used up by the names
    names = [f"p{q:g}_ms" for q in qs] + ["max_ms", "mean_ms"]
    if samples.size == 0:
        return dict.fromkeys(names, None)
    values = list(np.percentile(samples, list(qs))) + [samples.max(), samples.mean()]
    return {name: round(float(v), 4) for name, v in zip(names, values)}


class _TenantStats:
    """Counters and recent samples of one tenant (guarded by the recorder's lock)."""

    COUNTERS = ("count", "ok", "errors", "rejected", "slo_met", "admitted_late")

    def __init__(self, window: int, flag_window: int):
        self.count = 0  # finished requests: results and errors
        self.ok = 0
        self.errors = 0
        self.rejected = 0  # errors that are Overloaded
        self.slo_met = 0
        self.admitted_late = 0
        self.steps = 0
        self.latencies_ms: collections.deque[float] = collections.deque(maxlen=window)
        self.recent_met: collections.deque[bool] = collections.deque(maxlen=flag_window)
        self.recent_met_count = 0  # sum(recent_met), kept as it moves: a sum per record is O(flag_window)
        self.flagged = False

    def note_met(self, met: bool) -> None:
        """Appends one outcome to ``recent_met``, keeping ``recent_met_count`` equal to its sum."""
        recent = self.recent_met
        if recent.maxlen == 0:
            return
        if len(recent) == recent.maxlen:
            self.recent_met_count -= recent[0]
        recent.append(met)
        self.recent_met_count += met


class LatencyRecorder:
    """Thread-safe per-tenant latency and SLO accounting.

    A tenant is *flagged* when, over its last ``flag_window`` finished requests (at least
    ``flag_min_requests`` of them), the fraction that met its SLO is below
    ``flag_below_attainment``; flagging logs a warning on the ``jaxmt`` logger once, and a
    recovery logs an info line.

    Args:
      window: latency samples kept per tenant, and of all tenants together, for percentiles.
      flag_window, flag_min_requests, flag_below_attainment: the straggler rule above.
      name: the server's name, for log lines.
    """

    def __init__(
        self,
        window: int = 4096,
        flag_window: int = 64,
        flag_min_requests: int = 16,
        flag_below_attainment: float = 0.9,
        name: str = "jaxmt",
    ):
        self.window = int(window)
        self.flag_window = int(flag_window)
        self.flag_min_requests = int(flag_min_requests)
        self.flag_below_attainment = float(flag_below_attainment)
        self.name = name
        self._lock = threading.Lock()
        self._tenants: dict[Hashable, _TenantStats] = {}
        # The last ``window`` answered requests of all tenants, for the overall percentiles:
        # pooling the tenants' own windows would keep all of a quiet tenant's samples and only
        # the last ``window`` of a busy one's, describing neither recent nor all traffic.
        self._overall_ms: collections.deque[float] = collections.deque(maxlen=self.window)
        # The counters of forgotten tenants: overall totals are counters (Prometheus's), which
        # must never go down when a removed tenant's stats are dropped. No samples are kept.
        self._retired = _TenantStats(window=0, flag_window=0)

    def _stats(self, tenant_id: Hashable) -> _TenantStats:
        stats = self._tenants.get(tenant_id)
        if stats is None:
            stats = self._tenants[tenant_id] = _TenantStats(self.window, self.flag_window)
        return stats

    def record(self, tenant_id: Hashable, latency_ms: float, slo_ms: float, error: BaseException | None = None) -> None:
        """One finished request: its latency (submit to completion) and outcome."""
        with self._lock:
            stats = self._stats(tenant_id)
            stats.count += 1
            met = bool(error is None and latency_ms <= slo_ms)  # a Python bool: NumPy latencies would make counts np.int64
            if error is None:
                stats.ok += 1
                stats.latencies_ms.append(float(latency_ms))
                self._overall_ms.append(float(latency_ms))
            else:
                stats.errors += 1
                stats.rejected += isinstance(error, Overloaded)
            stats.slo_met += met
            stats.note_met(met)
            self._update_flag(tenant_id, stats)

    def forget_absent(self, resident: Callable[[Hashable], bool]) -> int:
        """Drops the records of tenants for which ``resident(tenant_id)`` is False (removed
        tenants), so a server with tenant churn holds bounded memory; their counters stay in
        the overall totals and their recent requests in the overall latency window (their own
        windows go). Returns how many were dropped."""
        with self._lock:
            gone = [t for t in self._tenants if not resident(t)]
            for tenant_id in gone:
                stats = self._tenants.pop(tenant_id)
                for name in _TenantStats.COUNTERS:
                    setattr(self._retired, name, getattr(self._retired, name) + getattr(stats, name))
            return len(gone)

    def note_admitted_late(self, tenant_id: Hashable) -> None:
        """A request admitted although predicted to finish past its overload bound."""
        with self._lock:
            self._stats(tenant_id).admitted_late += 1

    def note_step(self, tenant_ids: Iterable[Hashable]) -> None:
        """One step served these (distinct) tenants."""
        with self._lock:
            for tenant_id in tenant_ids:
                self._stats(tenant_id).steps += 1

    def _update_flag(self, tenant_id: Hashable, stats: _TenantStats) -> None:
        recent, met = len(stats.recent_met), stats.recent_met_count
        if recent == 0 or recent < self.flag_min_requests:  # flag_window 0: nothing to judge
            return
        attainment = met / recent
        if not stats.flagged and attainment < self.flag_below_attainment:
            stats.flagged = True
            logger.warning(
                "%s: tenant %r keeps missing its SLO: %d of its last %d requests met it (%.1f%% < %.1f%%)",
                self.name, tenant_id, met, recent, 100 * attainment, 100 * self.flag_below_attainment,
            )
        elif stats.flagged and attainment >= self.flag_below_attainment:
            stats.flagged = False
            logger.info("%s: tenant %r meets its SLO again (%.1f%% of its last %d requests)", self.name, tenant_id, 100 * attainment, recent)

    def samples_by_tenant(self) -> dict[Hashable, np.ndarray]:
        """Each tenant's latency window (float64 ms), for ``spread_by_chance``."""
        with self._lock:
            return {t: np.asarray(s.latencies_ms, dtype=np.float64) for t, s in self._tenants.items()}

    def samples_ms(self, tenant_id: Hashable | None = None) -> np.ndarray:
        """The latency window of one tenant, or the last ``window`` answered requests of all
        tenants (float64 ms)."""
        with self._lock:
            if tenant_id is not None:
                stats = self._tenants.get(tenant_id)
                return np.asarray(stats.latencies_ms if stats else [], dtype=np.float64)
            return np.asarray(self._overall_ms, dtype=np.float64)

    def snapshot(self, queue_depth: Mapping[Hashable, tuple[int, int]] | None = None) -> dict[str, Any]:
        """``{"overall": {...}, "tenants": {id: {...}}, "flagged_tenants": [...]}``.

        Args:
          queue_depth: tenant -> (queued requests, queued rows) right now.
        """
        queue_depth = dict(queue_depth or {})
        with self._lock:
            tenant_ids = list(self._tenants) + [t for t in queue_depth if t not in self._tenants]
            tenants = {t: self._summary([self._stats(t)], *queue_depth.get(t, (0, 0))) for t in tenant_ids}
            for t in tenant_ids:
                tenants[t]["steps"] = self._tenants[t].steps
                tenants[t]["flagged"] = self._tenants[t].flagged
            depth = sum(d for d, _ in queue_depth.values())
            rows = sum(r for _, r in queue_depth.values())
            overall = self._summary([*self._tenants.values(), self._retired], depth, rows, samples=self._overall_ms)
            flagged = [t for t in tenant_ids if self._tenants[t].flagged]
        overall["flagged"] = len(flagged)
        return {"overall": overall, "tenants": tenants, "flagged_tenants": flagged}

    @staticmethod
    def _summary(group: list[_TenantStats], queue_depth: int, queued_rows: int, samples: Any = None) -> dict[str, Any]:
        """Counters summed over ``group``; percentiles of ``samples`` (default: the group's
        latency windows pooled)."""
        count = sum(s.count for s in group)
        met = sum(s.slo_met for s in group)
        if samples is None:
            samples = [v for s in group for v in s.latencies_ms]
        return {
            "count": count,
            "ok": sum(s.ok for s in group),
            "errors": sum(s.errors for s in group),
            "rejected": sum(s.rejected for s in group),
            "admitted_late": sum(s.admitted_late for s in group),
            "slo_met": met,
            "slo_attainment": None if count == 0 else round(met / count, 6),
            **percentiles(samples),
            "queue_depth": queue_depth,
            "queued_rows": queued_rows,
        }


class StepRecorder:
    """Step counters (tenants, rows, padding), an EWMA of the step service time, and where
    answered requests spent their latency.

    The service time of a step is how long the device needed for it: from its launch, or
    from the completion of the step before it when they overlapped, to its results on the
    host. The scheduler predicts completion times from ``estimate_s``. A request's latency
    splits into its queue wait (submit to the launch of its step) and its time in the step
    (launch to results on the host): the recent ``window`` of each is kept.
    """

    def __init__(self, ewma_alpha: float = 0.2, window: int = 4096):
        if not 0.0 < ewma_alpha <= 1.0:
            raise ValueError(f"ewma_alpha must be in (0, 1], got {ewma_alpha}")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.ewma_alpha = float(ewma_alpha)
        self._wait_ms: collections.deque[float] = collections.deque(maxlen=window)
        self._in_step_ms: collections.deque[float] = collections.deque(maxlen=window)
        self._lock = threading.Lock()
        self.steps = 0
        self.failed_steps = 0
        self.tenants = 0
        self.rows = 0
        self.padded_rows = 0
        self.programs = 0
        self._estimate_s: float | None = None

    @property
    def estimate_s(self) -> float | None:
        """Smoothed seconds per step; None before the first observation."""
        return self._estimate_s

    def record(self, tenants: int, rows: int, padded_rows: int, service_s: float | None, programs: int = 1) -> None:
        """Counts one finished step and folds its service time (when known and finite) into the
        smoothed estimate the scheduler predicts completion times from."""
        with self._lock:
            self.steps += 1
            self.programs += programs
            self.tenants += tenants
            self.rows += rows
            self.padded_rows += padded_rows
            if service_s is not None and math.isfinite(service_s) and service_s >= 0:
                old = self._estimate_s
                self._estimate_s = service_s if old is None else old + self.ewma_alpha * (service_s - old)

    def record_failure(self) -> None:
        """Counts a step that raised (its requests got the error)."""
        with self._lock:
            self.failed_steps += 1

    def record_latency_parts(self, waits_ms: Iterable[float], in_step_ms: float) -> None:
        """The queue waits of one answered step's requests and the time they spent in it."""
        with self._lock:
            for wait in waits_ms:
                self._wait_ms.append(float(wait))
                self._in_step_ms.append(float(in_step_ms))

    def snapshot(self) -> dict[str, Any]:
        """Step counters, padding waste, the estimate and queue-wait/in-step percentiles, for a
        server's ``metrics()["steps"]``."""
        with self._lock:
            steps = self.steps
            return {
                "steps": steps,
                "failed_steps": self.failed_steps,
                "mean_tenants_per_step": None if steps == 0 else round(self.tenants / steps, 4),
                "mean_rows_per_step": None if steps == 0 else round(self.rows / steps, 4),
                "programs_per_step": None if steps == 0 else round(self.programs / steps, 4),
                "padding_waste": 0.0 if self.padded_rows == 0 else round(1.0 - self.rows / self.padded_rows, 6),
                "est_step_ms": None if self._estimate_s is None else round(1e3 * self._estimate_s, 4),
                "queue_wait_ms": percentiles(self._wait_ms),
                "in_step_ms": percentiles(self._in_step_ms),
            }


def tenant_spread(metrics: Mapping[str, Any], min_count: int = 10) -> dict[str, Any]:
    """How evenly tenants are served: worst per-tenant p99/p50, and the gap between the
    slowest and the fastest tenant's mean latency relative to the fastest.

    Only tenants with at least ``min_count`` answered requests count; the ratio is None
    without one such tenant, the gap without two.
    """
    rows = [m for m in metrics["tenants"].values() if m["ok"] >= min_count and m["p50_ms"]]
    if not rows:
        return {"tenants_counted": 0, "max_p99_over_p50": None, "mean_latency_gap": None}
    means = [m["mean_ms"] for m in rows]
    return {
        "tenants_counted": len(rows),
        "max_p99_over_p50": round(max(m["p99_ms"] / m["p50_ms"] for m in rows), 4),
        "mean_latency_gap": None if len(rows) < 2 else round((max(means) - min(means)) / min(means), 4),
    }


def spread_by_chance(
    samples_by_tenant: Mapping[Hashable, Sequence[float] | np.ndarray], min_count: int = 10, draws: int = 200, seed: int = 0
) -> dict[str, Any]:
    """The ``tenant_spread`` of a server that treats every tenant alike, for comparison.

    The latencies of the tenants that ``tenant_spread`` counts (those with at least
    ``min_count`` samples), pooled, are dealt out to those tenants again at random, each
    keeping its number of samples, ``draws`` times. What that gives is the spread that
    sampling alone produces at their latency distribution and request counts: a measured
    spread near it says the tenants were served alike and the rest is noise; a measured
    spread well above it says some were served worse. Returns the median and the 95th
    percentile over the draws of each statistic (None without two counted tenants).
    """
    counted = [v for v in (np.asarray(x, dtype=np.float64) for x in samples_by_tenant.values()) if v.size >= min_count]
    result: dict[str, Any] = {"tenants_counted": len(counted), "draws": int(draws)}
    if len(counted) < 2:
        return {**result, "max_p99_over_p50": None, "mean_latency_gap": None}
    pooled = np.concatenate(counted)
    bounds = np.cumsum([v.size for v in counted])[:-1]
    rng = np.random.default_rng(seed)
    ratios, gaps = [], []
    for _ in range(draws):
        dealt = np.split(rng.permutation(pooled), bounds)
        p50, p99 = np.array([np.percentile(d, [50, 99]) for d in dealt]).T
        means = np.array([d.mean() for d in dealt])
        served = p50 > 0  # as tenant_spread: a tenant whose median is 0 has no ratio
        if served.any():
            ratios.append(float(np.max(p99[served] / p50[served])))
        if means.min() > 0:
            gaps.append(float((means.max() - means.min()) / means.min()))

    def summary(values: list[float]) -> dict[str, float] | None:
        return {"median": round(float(np.median(values)), 4), "p95": round(float(np.percentile(values, 95)), 4)} if values else None

    return {**result, "max_p99_over_p50": summary(ratios), "mean_latency_gap": summary(gaps)}


def _label(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _sample(value: float) -> str:
    """A sample value in full: integers as integers, floats to every digit (``:g`` would
    round a count of 1,234,567 to 1.23457e+06, and ``rate()`` would see it stand still)."""
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return repr(float(value))


def _tenant_labels(tenants: Any) -> dict[Any, str]:
    """Each tenant's label value: its str, or its repr where two ids print alike (1 and "1"
    would otherwise make one series twice, and Prometheus keeps one of the two)."""
    plain = {t: _label(t) for t in tenants}
    by_repr: set[Any] = set()
    while True:  # a repr may equal another tenant's str ("1" -> "'1'", the str of tenant "'1'")
        labels = {t: _label(repr(t)) if t in by_repr else label for t, label in plain.items()}
        shared = {label for label, n in collections.Counter(labels.values()).items() if n > 1}
        clash = {t for t, label in labels.items() if label in shared} - by_repr
        if not clash:
            return labels
        by_repr |= clash


def to_prometheus(metrics: Mapping[str, Any], prefix: str = "jaxmt") -> str:
    """The metrics dict of a server (``Scheduler.metrics()``) in Prometheus text format.

    Per-tenant series carry a ``tenant`` label, overall series none; every series carries the
    ``server`` label. Values that are not known yet (None) are left out.
    """
    server = _label(metrics.get("server", "jaxmt"))
    fields = [  # (name in the dict, metric name, type, help)
        ("count", "requests_total", "counter", "finished requests (results and errors)"),
        ("errors", "request_errors_total", "counter", "requests that finished with an exception"),
        ("rejected", "requests_rejected_total", "counter", "requests failed with Overloaded"),
        ("admitted_late", "requests_admitted_late_total", "counter", "requests served although predicted late"),
        ("slo_met", "requests_slo_met_total", "counter", "requests answered within their SLO"),
        ("slo_attainment", "slo_attainment", "gauge", "fraction of finished requests that met their SLO"),
        ("queue_depth", "queue_depth", "gauge", "requests waiting in the queue"),
        ("queued_rows", "queued_rows", "gauge", "rows waiting in the queue"),
        ("flagged", "tenant_flagged", "gauge", "1 when the tenant keeps missing its SLO"),
    ]
    groups = [("", metrics["overall"])] + [(f'tenant="{label}",', metrics["tenants"][t]) for t, label in _tenant_labels(metrics["tenants"]).items()]
    lines: list[str] = []
    for key, name, kind, help_text in fields:
        lines += [f"# HELP {prefix}_{name} {help_text}", f"# TYPE {prefix}_{name} {kind}"]
        for labels, values in groups:
            value = values.get(key)
            if value is not None:
                lines.append(f'{prefix}_{name}{{{labels}server="{server}"}} {_sample(value)}')
    lines += [f"# HELP {prefix}_latency_ms request latency, submit to result", f"# TYPE {prefix}_latency_ms summary"]
    for labels, values in groups:
        for q in QUANTILES:
            value = values.get(f"p{q:g}_ms")
            if value is not None:
                lines.append(f'{prefix}_latency_ms{{{labels}server="{server}",quantile="{q / 100:g}"}} {_sample(value)}')
    for key, value in metrics.get("steps", {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            lines += [f"# TYPE {prefix}_step_{key} gauge", f'{prefix}_step_{key}{{server="{server}"}} {_sample(value)}']
    return "\n".join(lines) + "\n"
