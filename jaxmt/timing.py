"""Timing compiled calls in rounds: what the autotuner and the benchmarks measure with.

Every round times one sample of each function in turn, so that a drift of the device's
clocks or of a neighbour's load over the run shifts all of them alike instead of whichever
was timed during it (on a shared H100 the same kernel timed in separate runs differed by up to
1.5x). A sample is a burst of asynchronous calls closed by one ``block_until_ready``, sized
so that it lasts at least ``min_sample_s``: calls shorter than the host's launch-and-wait
time would otherwise time the host, not the device.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax


def calls_per_sample(call_s: float, min_sample_s: float, most: int = 200) -> int:
    """How many back-to-back calls of ``call_s`` each make a sample of at least
    ``min_sample_s`` (one where no minimum is asked or the call was not timed; at most ``most``)."""
    if min_sample_s <= 0 or call_s <= 0:
        return 1
    return max(1, min(most, math.ceil(min_sample_s / call_s)))


def time_in_rounds(fns: dict[str, Callable[[], Any]], *, warmup: int = 2, repeats: int = 7,
                   min_sample_s: float = 0.0) -> dict[str, dict[str, float]]:
    """Seconds per call of each ``fns[name]()``: median, min and p90 over ``repeats`` rounds,
    with the repeats and the calls per sample (sized from the fastest warm-up call)."""
    calls: dict[str, int] = {}
    for name, fn in fns.items():
        fastest = math.inf
        for _ in range(warmup):
            start = time.perf_counter()
            jax.block_until_ready(fn())
            fastest = min(fastest, time.perf_counter() - start)
        calls[name] = calls_per_sample(fastest if warmup else 0.0, min_sample_s)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(_sample(fn, calls[name]))
    out = {}
    for name, values in samples.items():
        values.sort()
        out[name] = {"median_s": statistics.median(values), "min_s": values[0],
                     "p90_s": values[int(0.9 * (len(values) - 1))], "repeats": len(values),
                     "calls_per_sample": calls[name]}
    return out


def _sample(fn: Callable[[], Any], calls: int) -> float:
    """Seconds per call of ``calls`` calls of ``fn`` issued back to back. Only the last
    answer is waited for: one device runs a thread's calls in order."""
    start = time.perf_counter()
    out = None
    for _ in range(calls):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / calls
