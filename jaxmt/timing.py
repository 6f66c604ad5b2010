"""Timing compiled calls in rounds: what the autotuner and the benchmarks measure with.

Every round times one sample of each function in turn, so that a drift of the device's
clocks or of a neighbour's load over the run shifts all of them alike instead of whichever
was timed during it (on a shared H100 the same kernel timed in separate runs differed by up to
1.5x). A sample is a burst of asynchronous calls closed by one wait, sized so that it lasts
about ``min_sample_s``: calls shorter than the host's launch-and-wait time would otherwise
time the host, not the device.

A burst waits for its last answer only, which covers the whole burst when that answer depends
on all the device work each call launches (one device runs a thread's programs in the order
they were dispatched). Waiting for every answer would hold up to ``MOST_CALLS`` of them in
device memory. A function whose answer holds nothing to wait for (no leaf with
``block_until_ready``) is timed one call a sample.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax

# Most calls in one burst: short calls get bursts shorter than ``min_sample_s``.
MOST_CALLS = 200


def calls_per_sample(call_s: float, min_sample_s: float, most: int = MOST_CALLS) -> int:
    """How many back-to-back calls of ``call_s`` each make a sample of at least
    ``min_sample_s`` (one where no minimum is asked or the call was not timed; at most ``most``)."""
    if min_sample_s <= 0 or call_s <= 0:
        return 1
    return max(1, min(most, math.ceil(min_sample_s / call_s - 1e-9)))  # 1e-9: 0.01 / 0.001 is 10.000000000000002


def time_in_rounds(fns: dict[str, Callable[[], Any]], *, warmup: int = 2, repeats: int = 7,
                   min_sample_s: float = 0.0, clock: Callable[[], float] | None = None
                   ) -> dict[str, dict[str, float | int]]:
    """Seconds per call of each ``fns[name]()``: median, min and p90 over ``repeats`` rounds
    (with bursts, of each burst's mean), the repeats and the calls per sample.

    Bursts are sized from the fastest of the warm-up calls, each timed alone (one such call
    where ``warmup`` is 0 and bursts are asked for). ``clock``: seconds, by default
    ``time.perf_counter``.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    clock = clock or time.perf_counter
    calls: dict[str, int] = {}
    for name, fn in fns.items():
        fastest, waitable = math.inf, True
        for _ in range(max(warmup, 1 if min_sample_s > 0 else 0)):
            start = clock()
            out = fn()
            jax.block_until_ready(out)
            fastest = min(fastest, clock() - start)
            waitable = _can_wait_for(out)
        calls[name] = calls_per_sample(fastest if math.isfinite(fastest) and waitable else 0.0, min_sample_s)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(_sample(fn, calls[name], clock))
    out = {}
    for name, values in samples.items():
        values.sort()
        out[name] = {"median_s": statistics.median(values), "min_s": values[0], "p90_s": percentile(values, 0.9),
                     "repeats": len(values), "calls_per_sample": calls[name]}
    return out


def percentile(sorted_values: list[float], q: float) -> float:
    """The smallest value at or above a fraction ``q`` of ``sorted_values`` (nearest rank):
    never below the median for q > 0.5, the largest value for q = 1."""
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]


def _can_wait_for(out: Any) -> bool:
    """Whether ``out`` holds something ``jax.block_until_ready`` waits for."""
    return any(hasattr(leaf, "block_until_ready") for leaf in jax.tree.leaves(out))


def _sample(fn: Callable[[], Any], calls: int, clock: Callable[[], float]) -> float:
    """Seconds per call of ``calls`` calls of ``fn`` issued back to back, closed by a wait
    for the last answer."""
    start = clock()
    out = None
    for _ in range(calls):
        out = fn()
    jax.block_until_ready(out)
    return (clock() - start) / calls
