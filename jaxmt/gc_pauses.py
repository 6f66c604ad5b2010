"""Pauses of Python's cyclic garbage collector, which stop every thread of a server at once.

A process that has imported JAX and built a model holds some 10^5 tracked objects; a full
(generation 2) collection walks all of them with the GIL held, so the dispatch, completion
and client threads all stop. On a 2-core CPU such a collection took 40 ms after setup and
65-93 ms during serving trials (``benchmarks/serving.py --host-only --no-gc-freeze``), long
enough to push a 50 ms SLO's tail over; with the heap frozen no pause exceeded 1.5 ms. Two tools:

- ``freeze_heap()`` collects once, then moves every surviving object into the permanent
  generation (``gc.freeze``), so later collections walk only what was allocated since:
  call it after the model is built and warmed up, before traffic.
- ``GcPauses`` records each collection (generation, duration) while it is active, so a
  latency measurement can tell a collector pause from a slow server.
"""

from __future__ import annotations

import gc
import threading
import time
from typing import Any


def freeze_heap() -> int:
    """Collects garbage, then freezes every live object out of future collections.

    Returns how many objects are frozen. Objects frozen stay alive until ``gc.unfreeze()``
    (a cycle among them is not collected): call it once the long-lived state (models,
    compiled programs, servers) exists, not in a loop.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


class GcPauses:
    """Records the collector's pauses while active (a context manager; re-entrant use is not supported).

    ``snapshot()`` gives ``{"collections": [n0, n1, n2], "max_ms": ..., "total_ms": ...,
    "gen2_max_ms": ...}`` over the pauses seen so far.
    """

    def __init__(self) -> None:
        # Re-entrant: a collection can start inside ``snapshot`` (it allocates), and its
        # callback then takes the lock on the same thread.
        self._lock = threading.RLock()
        self._started: float | None = None
        self._counts = [0, 0, 0]
        self._max_s = self._total_s = self._gen2_max_s = 0.0

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        if self._started is None:  # registered in the middle of a collection
            return
        took = time.perf_counter() - self._started
        self._started = None
        generation = min(int(info.get("generation", 0)), 2)
        with self._lock:
            self._counts[generation] += 1
            self._total_s += took
            self._max_s = max(self._max_s, took)
            if generation == 2:
                self._gen2_max_s = max(self._gen2_max_s, took)

    def __enter__(self) -> "GcPauses":
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def snapshot(self) -> dict[str, Any]:
        """Collections per generation and pause times (longest, total, longest of generation 2) so far,
        in milliseconds: what a latency report sets beside its tail."""
        with self._lock:
            counts, max_s, total_s, gen2_max_s = tuple(self._counts), self._max_s, self._total_s, self._gen2_max_s
        return {
            "collections": list(counts),
            "max_ms": round(1e3 * max_s, 3),
            "total_ms": round(1e3 * total_s, 3),
            "gen2_max_ms": round(1e3 * gen2_max_s, 3),
        }
