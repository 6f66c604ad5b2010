"""Requests and the earliest-deadline-first queue that servers keep them in (host code only).

A request may leave and re-enter a queue (a step formed without it puts it back); the heaps
delete lazily: an entry is live while its token is the request's current one. Heap entries
hold the token, not the request, so that a stale entry keeps no request (or its rows) alive.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
from collections.abc import Hashable
from concurrent.futures import Future
from typing import Any

import numpy as np


@dataclasses.dataclass(eq=False)
class _Request:
    tenant_id: Hashable
    x: np.ndarray  # [rows, *row_shape]
    future: Future
    submitted_s: float
    deadline_s: float
    slo_ms: float
    seq: int
    late: bool = False  # admitted although predicted past its overload bound
    token: int = -1  # identifies the live queue entries of this request (lazy deletion)
    staged: Any = None  # jaxmt.staging.StagedRows: the rows on their way to the device

    @property
    def rows(self) -> int:
        return int(self.x.shape[0])


@dataclasses.dataclass(eq=False)
class _Batch:
    """Requests chosen for one step, and those dropped on the way (cancelled or shed)."""

    requests: list[_Request]
    dropped: list[tuple[_Request, BaseException | None]] = dataclasses.field(default_factory=list)
    lane: Hashable = None


@dataclasses.dataclass(eq=False)
class _Launched:
    """A step on the device: ``pending.result()`` gives numpy rows of ``requests`` in order."""

    requests: list[_Request]
    pending: Any
    started_s: float
    tenants: int
    padded_rows: int
    timed: bool = True  # False when launching compiled a program: not a service time sample
    programs: int = 1  # program calls the step was launched as
    predicted_s: float | None = None  # device time the server expected for it at launch


class _PartlyFailed(Exception):
    """Some program calls of one step failed: ``calls`` holds (requests, answers, error) of
    each call (answers None where it failed, error None where it answered); ``error`` is the
    first failure."""

    def __init__(self, error: BaseException, calls: list[tuple[list[_Request], Any, BaseException | None]]):
        super().__init__(str(error))
        self.error, self.calls = error, calls


class _Totals:
    """Rows queued in all lanes of a server, and the batches of at most ``entry_rows`` rows
    they fill lane by lane (kept by the lanes, read at every submit without a pass over them)."""

    rows = 0
    lane_batches = 0


class _EdfQueue:
    """Queued requests by deadline (then arrival), with the oldest arrival and per-tenant rows.

    ``entries`` counts the tenant entries the queue would fill: a tenant's rows in pieces of
    at most ``entry_rows`` (the largest row bucket), as ``make_plan`` packs them.
    """

    _tokens = itertools.count()

    def __init__(self, entry_rows: int, totals: _Totals | None = None):
        self.entry_rows = int(entry_rows)
        self.totals = totals if totals is not None else _Totals()
        self._by_deadline: list[tuple[float, int, int]] = []  # (deadline_s, seq, token)
        self._by_arrival: list[tuple[float, int, int]] = []  # (submitted_s, seq, token)
        self._live: dict[int, _Request] = {}  # token -> request
        self.tenant_rows: dict[Hashable, int] = {}
        self.tenant_requests: dict[Hashable, int] = {}
        self.rows = 0
        self.entries = 0

    def __len__(self) -> int:
        return len(self._live)

    def _pieces(self, rows: int) -> int:
        return -(-rows // self.entry_rows)

    def entries_after(self, tenant_id: Hashable, rows: int) -> int:
        have = self.tenant_rows.get(tenant_id, 0)
        return self.entries - self._pieces(have) + self._pieces(have + rows)

    def _count(self, req: _Request, sign: int) -> None:
        t = req.tenant_id
        have = self.tenant_rows.get(t, 0)
        now = have + sign * req.rows
        self.entries += self._pieces(now) - self._pieces(have)
        lane_rows = self.rows + sign * req.rows
        self.totals.lane_batches += self._pieces(lane_rows) - self._pieces(self.rows)
        self.rows = lane_rows
        self.totals.rows += sign * req.rows
        count = self.tenant_requests.get(t, 0) + sign
        if count:
            self.tenant_rows[t], self.tenant_requests[t] = now, count
        else:
            self.tenant_rows.pop(t, None), self.tenant_requests.pop(t, None)

    def push(self, req: _Request) -> None:
        req.token = next(self._tokens)
        self._live[req.token] = req
        heapq.heappush(self._by_deadline, (req.deadline_s, req.seq, req.token))
        heapq.heappush(self._by_arrival, (req.submitted_s, req.seq, req.token))
        self._count(req, +1)

    def holds(self, req: _Request) -> bool:
        """Whether ``req`` is queued here now (a hint when read without the server's lock)."""
        return self._live.get(req.token) is req

    def discard(self, req: _Request) -> bool:
        """Removes ``req`` if it is still queued here (its owner cancelled it); False if a step
        took it already. Its heap entries go stale, dropped as the heaps are read."""
        if self._live.pop(req.token, None) is None:
            return False
        self._count(req, -1)
        self._compact("_by_deadline")
        self._compact("_by_arrival")
        return True

    def _compact(self, heap_name: str) -> None:
        """Drops a heap's stale entries once they pile up (amortised O(1) per removal)."""
        heap = getattr(self, heap_name)
        if len(heap) > 2 * len(self._live) + 64:
            heap = [entry for entry in heap if entry[2] in self._live]
            heapq.heapify(heap)
            setattr(self, heap_name, heap)

    def _top(self, heap: list) -> _Request | None:
        while heap and heap[0][2] not in self._live:
            heapq.heappop(heap)
        return self._live[heap[0][2]] if heap else None

    def pop(self) -> _Request | None:
        """The request with the earliest deadline, removed; None when empty."""
        return self._pop_top("_by_deadline", "_by_arrival")

    def pop_oldest(self) -> _Request | None:
        """The request submitted first, removed; None when empty."""
        return self._pop_top("_by_arrival", "_by_deadline")

    def _pop_top(self, heap_name: str, other_name: str) -> _Request | None:
        """Removes the top of one heap; the other keeps a stale entry, dropped when they pile up."""
        heap = getattr(self, heap_name)
        req = self._top(heap)
        if req is not None:
            heapq.heappop(heap)
            del self._live[req.token]
            self._count(req, -1)
            self._compact(other_name)
        return req

    def earliest_deadline(self) -> float:
        return self._top(self._by_deadline).deadline_s

    def oldest_submitted(self) -> float:
        return self._top(self._by_arrival).submitted_s

    def drain(self) -> list[_Request]:
        requests = sorted(self._live.values(), key=lambda r: r.seq)
        self.totals.rows -= self.rows
        self.totals.lane_batches -= self._pieces(self.rows)
        self.__init__(self.entry_rows, self.totals)
        return requests
