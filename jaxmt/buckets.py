"""Plans: how the rows of one request become fixed-shape steps (host code: NumPy, and plain
Python for small requests).

A step computes K tenant entries of B rows each, as one compiled program of shape [K, B, ...].
K and B are padded up a small ladder so that a random mix of tenants and row counts hits a
bounded set of programs. A tenant with more rows than the largest row bucket is split into
several entries (the same slot may appear twice in one step); more entries than the largest
tenant bucket are split into several steps. Entries are sorted by row count so that each
step's entries have similar sizes and little padding.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import numpy as np


def _powers_of_two(limit: int) -> tuple[int, ...]:
    ladder, value = [], 1
    while value < limit:
        ladder.append(value)
        value *= 2
    ladder.append(limit)
    return tuple(ladder)


def _checked_ladder(name: str, values: Any) -> tuple[int, ...]:
    """``values`` as a ladder of Python ints; ValueError unless they are positive integers
    (not floats, strings or bools, which ``int`` would quietly round or parse) in strictly
    increasing order."""
    ladder = tuple(values)
    if not ladder:
        raise ValueError(f"{name} must not be empty")
    if any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1 for v in ladder):
        raise ValueError(f"{name} must hold positive integers, got {ladder}")
    ladder = tuple(int(v) for v in ladder)
    if list(ladder) != sorted(set(ladder)):
        raise ValueError(f"{name} must be strictly increasing, got {ladder}")
    return ladder


@dataclasses.dataclass(frozen=True)
class BucketPolicy:
    """The ladders that K (tenants per step) and B (rows per tenant) are padded up to.

    Attributes:
      tenant_buckets: allowed K values, increasing; the last is the most tenants per step.
      row_buckets: allowed B values, increasing; the last is the most rows per tenant entry.
      entry_cost_rows: what one more tenant entry in a step costs, in padded rows (each
        entry gathers a copy of its tenant's weights). The planner picks the entry size that
        minimises padded rows + entry_cost_rows * padded entries, so one busy tenant may be
        split into several entries rather than padding every other tenant up to its size.
      step_cost_rows: what one more step (one more program launch) costs, in padded rows.
    """

    tenant_buckets: tuple[int, ...] = _powers_of_two(64)
    row_buckets: tuple[int, ...] = _powers_of_two(64)
    entry_cost_rows: float = 1.0
    step_cost_rows: float = 8.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "tenant_buckets", _checked_ladder("tenant_buckets", self.tenant_buckets))
        object.__setattr__(self, "row_buckets", _checked_ladder("row_buckets", self.row_buckets))
        for name in ("entry_cost_rows", "step_cost_rows"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
            # As a Python float: the planner keeps its weighing of row buckets per policy (a
            # cache keyed by it), which a NumPy or JAX array scalar would not hash for, and a
            # float32 that equals a float would share the float's entries while weighing in float32.
            object.__setattr__(self, name, float(getattr(self, name)))

    @classmethod
    def powers_of_two(cls, max_tenants: int = 64, max_rows: int = 64) -> "BucketPolicy":
        """Ladders 1, 2, 4, ... up to (and including) the given maxima."""
        return cls(_powers_of_two(max_tenants), _powers_of_two(max_rows))

    @property
    def max_tenants(self) -> int:
        """The largest tenant bucket: the most tenant entries one step holds."""
        return self.tenant_buckets[-1]

    @property
    def max_rows(self) -> int:
        """The largest row bucket: the most rows one tenant entry holds."""
        return self.row_buckets[-1]

    def tenant_bucket(self, count: int) -> int:
        """The K that ``count`` tenant entries are padded up to; ValueError past the ladder."""
        return _round_up(self.tenant_buckets, count, "tenant_buckets", "tenant entries")

    def row_bucket(self, count: int) -> int:
        """The B that ``count`` rows of one entry are padded up to; ValueError past the ladder."""
        return _round_up(self.row_buckets, count, "row_buckets", "rows")

    @property
    def shapes(self) -> list[tuple[int, int]]:
        """Every (K, B) pair of the ladder: one program each for ``warmup`` to compile, and
        one more for the K equal to the store capacity, whose steps over the whole store in
        slot order run a program without the weight gather."""
        return [(k, b) for k in self.tenant_buckets for b in self.row_buckets]


def _round_up(ladder: tuple[int, ...], count: int, name: str, what: str) -> int:
    index = bisect.bisect_left(ladder, count)
    if index == len(ladder):
        raise ValueError(f"{count} {what} exceed the largest of {name} {list(ladder)}; expected at most {ladder[-1]}")
    return ladder[index]


@dataclasses.dataclass(frozen=True)
class Step:
    """One fixed-shape program call.

    Attributes:
      slots: int32 [K]: the store slot of each entry; padding entries repeat a real slot.
      row_index: int32 [K, B]: which request row feeds each position; padding repeats a row
        of the same entry, so padded positions compute real (discarded) values.
      out_positions: int64 [m]: flat positions k * B + b of this step's real rows.
      out_rows: int64 [m]: the request row each of those positions answers.
      slots_in_order: whether ``slots`` is 0, 1, ..., K-1 (every entry real, one per slot):
        decided here on the host, so that a step whose slots were moved to the device is not
        read back to tell; on a store of capacity K such a step reads the stacked weights as
        they are, with no gather.
      rows_in_order: whether entry e holds request row e alone (B = 1, every row of the
        request in this step, padding entries repeating row 0): the step's input block is then
        the request's rows as they are and its answers come back in request order, so the
        host copies rows instead of gathering and scattering them.
    """

    slots: np.ndarray
    row_index: np.ndarray
    out_positions: np.ndarray
    out_rows: np.ndarray
    slots_in_order: bool = False
    rows_in_order: bool = False

    def __post_init__(self) -> None:
        # A copy with other host slots (dataclasses.replace) must not keep a stale claim; slots
        # moved to the device are taken as the same slots (checking them would read them back).
        if self.slots_in_order and isinstance(self.slots, np.ndarray) and not np.array_equal(self.slots, np.arange(len(self.slots))):
            raise ValueError(f"slots_in_order=True but slots are {self.slots.tolist()}, not 0..{len(self.slots) - 1}")
        if self.rows_in_order and self.row_index.shape[1:] != (1,):
            raise ValueError(f"rows_in_order=True but the step has {self.row_index.shape[1]} rows per entry, not 1")

    @property
    def tenant_bucket(self) -> int:
        """K: the step's tenant entries, padding included."""
        return int(self.row_index.shape[0])

    @property
    def row_bucket(self) -> int:
        """B: rows per entry, padding included."""
        return int(self.row_index.shape[1])

    @property
    def rows(self) -> int:
        """The request rows this step answers (padding excluded)."""
        return int(self.out_rows.shape[0])

    @property
    def padded_rows(self) -> int:
        """K x B: the rows the step computes, padding included."""
        return int(self.row_index.size)


@dataclasses.dataclass(frozen=True)
class Plan:
    """The steps that together answer every row of one request."""

    steps: tuple[Step, ...]
    rows: int

    @property
    def padded_rows(self) -> int:
        """Rows computed over all steps, padding included."""
        return sum(step.padded_rows for step in self.steps)

    @property
    def padding_waste(self) -> float:
        """Fraction of computed rows that are padding (0 when nothing is computed)."""
        padded = self.padded_rows
        return 0.0 if padded == 0 else 1.0 - self.rows / padded


def make_plan(slots: Sequence[int] | np.ndarray, policy: BucketPolicy) -> Plan:
    """Groups request rows by slot and packs them into bucketed steps.

    Args:
      slots: int [n]: the store slot of each request row, in request order.
      policy: the bucket ladders.

    Returns:
      A Plan whose steps, taken together, answer each of the n rows exactly once.
    """
    slots = np.asarray(slots, dtype=np.int64)
    n = int(slots.shape[0])
    if n == 0:
        return Plan(steps=(), rows=0)
    if n <= SMALL_REQUEST_ROWS:
        step = _small_one_step(slots, policy)
        if step is not None:
            return Plan(steps=(step,), rows=n)
    return _plan_arrays(slots, policy)


# Requests of at most this many rows that fit one step are planned with few NumPy calls and
# Python loops per tenant, not per row (NumPy's per-call cost dominates small arrays). On a
# 2-core CPU a 64-row request over 16 tenants planned in 19-22 us this way, 31-33 us with
# the rows grouped by a Python loop, and 58 us on the array path (a one-row request: 10
# against 12 us, eight rows 19 against 16); at 128 rows most requests of many
# tenants need two steps, where trying one first only adds. The result is the same Plan as
# the array path's (a property test checks it). Later, on another 2-core CPU, the 64-row
# request (one step of 64 one-row entries) planned in 5.7 us against 11.1 once its tenants
# were counted by row count straight from the per-slot counts, the weighing of row buckets
# kept per entry counts and a rows-in-order step's index arrays kept per shape.
SMALL_REQUEST_ROWS = 64
# Slots below this are counted with np.bincount (an array as long as the largest slot).
BINCOUNT_SLOTS = 4096


def _small_one_step(slots: np.ndarray, policy: BucketPolicy) -> Step | None:
    """The one step answering ``slots`` (int64, as ``_plan_arrays`` builds it), or None if
    they need more than one step."""
    if slots.shape[0] == 1 and policy.row_buckets[0] == 1:  # one row: one entry of B = 1, nothing to weigh
        return _one_row_entries(slots, policy, distinct_to_n=int(slots[0]) == 0)
    top = int(slots.max())
    per_slot = _slot_counts(slots) if top < BINCOUNT_SLOTS else None
    if per_slot is not None:
        # Tenants by row count straight from the per-slot counts: the absent slots land in
        # entry 0, so the counts of the present ones need no filtering (one NumPy call less).
        per_count = np.bincount(per_slot)
        distinct = top + 1 - per_count.item(0)
        per_count[0] = 0
    else:  # large or negative slot numbers: counted by sorting, not by an array as long as the largest
        counts = np.unique(slots, return_counts=True)[1]
        per_count, distinct = np.bincount(counts), counts.shape[0]
    if distinct > policy.max_tenants:  # at least one entry per slot: more than one step
        return None
    max_rows = _entry_rows_by_count(per_count, policy)
    if max_rows == 1:  # an entry per row (B = 1, the common step of single-row requests)
        # Slots 0..n-1, each once, when n distinct slots reach no higher than n - 1 (and none is negative).
        n = slots.shape[0]
        return _one_row_entries(slots, policy, distinct_to_n=distinct == n and top == n - 1 and per_slot is not None)
    rows_of: dict[int, list[int]] = {}
    for row, slot in enumerate(slots.tolist()):
        group = rows_of.get(slot)
        if group is None:
            rows_of[slot] = [row]
        else:
            group.append(row)
    entries = [(slot, rows_of[slot][start : start + max_rows]) for slot in sorted(rows_of) for start in range(0, len(rows_of[slot]), max_rows)]
    if len(entries) > policy.max_tenants:
        return None
    k = policy.tenant_bucket(len(entries))
    b = policy.row_bucket(max(len(rows) for _, rows in entries))
    index: list[int] = []
    out_positions: list[int] = []
    out_rows: list[int] = []
    for e, (_, rows) in enumerate(entries):
        count = len(rows)
        index.extend(rows if count == b else (rows * (b // count + 1))[:b])  # padding repeats the entry's rows
        out_positions.extend(range(e * b, e * b + count))
        out_rows.extend(rows)
    index.extend(index[:b] * (k - len(entries)))  # padding entries repeat the first
    step_slots = [slot for slot, _ in entries] + [entries[0][0]] * (k - len(entries))
    return Step(
        slots=np.array(step_slots, np.int32),
        row_index=np.array(index, np.int32).reshape(k, b),
        out_positions=np.array(out_positions, np.int64),
        out_rows=np.array(out_rows, np.int64),
        slots_in_order=len(entries) == k and step_slots == list(range(k)),
    )


def _slot_counts(slots: np.ndarray) -> np.ndarray | None:
    """Rows per slot (``np.bincount``), or None if a slot is negative. NumPy's own refusal of
    negative values tells, instead of a pass for the smallest slot first: a NumPy reduction
    costs about as much as the count itself on a small request (0.8 us on a 2-core CPU)."""
    try:
        return np.bincount(slots)
    except ValueError:  # "'list' argument must have no negative elements"
        return None


def _one_row_entries(slots: np.ndarray, policy: BucketPolicy, distinct_to_n: bool) -> Step | None:
    """``_small_one_step`` where every entry holds one row. ``distinct_to_n``: the slots are
    0..n-1 in some order.

    The entries keep request order (``Step.rows_in_order``: no gather or scatter of rows on
    the host), except where every slot 0..n-1 comes once and fills the step: in slot order
    that step reads a store of capacity n as it is (``Step.slots_in_order``), with no weight
    gather on the device, which outweighs the rows' gather and scatter.
    """
    n = slots.shape[0]
    if n > policy.max_tenants:
        return None
    k = policy.tenant_bucket(n)
    if distinct_to_n and k == n:
        order = np.argsort(slots, kind="stable")
        return Step(slots=np.arange(n, dtype=np.int32), row_index=order.astype(np.int32).reshape(n, 1),
                    out_positions=np.arange(n, dtype=np.int64), out_rows=order, slots_in_order=True)
    step_slots = np.empty(k, np.int32)
    step_slots[:n] = slots
    if n < k:
        step_slots[n:] = slots[0]  # padding entries repeat the first
    index, rows = _rows_in_order_arrays(n, k)
    return Step(slots=step_slots, row_index=index, out_positions=rows, out_rows=rows, rows_in_order=True)


@functools.lru_cache(maxsize=1024)
def _rows_in_order_arrays(n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The row index [k, 1] (rows 0..n-1, then row 0 for the padding entries) and the rows
    0..n-1 (int64) of a ``Step.rows_in_order`` step: the same for every request of n rows in
    k entries, so built once per shape and shared, read-only (on a 2-core CPU building them
    was four NumPy calls, about 1 us of a 64-row request's plan)."""
    index = np.zeros((k, 1), np.int32)
    index[:n, 0] = np.arange(n, dtype=np.int32)
    rows = np.arange(n, dtype=np.int64)
    index.flags.writeable = rows.flags.writeable = False
    return index, rows


def _plan_arrays(slots: np.ndarray, policy: BucketPolicy) -> Plan:
    """``make_plan`` on NumPy arrays, for any request."""
    n = int(slots.shape[0])
    order, entry_slot, entry_start, entry_count = _split_entries(slots, policy)
    max_tenants = policy.max_tenants
    if len(entry_slot) <= max_tenants:  # one step; entries come in slot order already
        return Plan(steps=(_make_step(order, entry_slot, entry_start, entry_count, policy),), rows=n)
    # Largest entries first, so each step holds entries of similar size.
    by_size = np.argsort(-entry_count, kind="stable")
    steps = []
    for first in range(0, len(by_size), max_tenants):
        chosen = by_size[first : first + max_tenants]
        # Entries in slot order: a step that holds every slot once then reads the store as is.
        chosen = chosen[np.argsort(entry_slot[chosen], kind="stable")]
        steps.append(_make_step(order, entry_slot[chosen], entry_start[chosen], entry_count[chosen], policy))
    return Plan(steps=tuple(steps), rows=n)


def _split_entries(slots: np.ndarray, policy: BucketPolicy) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Rows grouped by slot and split into entries: (order, entry_slot, entry_start, entry_count).

    ``order`` sorts the request rows by slot (stable); entry e answers the sorted rows
    ``[entry_start[e], entry_start[e] + entry_count[e])`` with the weights of ``entry_slot[e]``.
    """
    # Group rows by slot, keeping request order inside each group (stable sort).
    order = np.argsort(slots, kind="stable")
    sorted_slots = slots[order]
    starts = np.flatnonzero(np.concatenate(([True], sorted_slots[1:] != sorted_slots[:-1])))
    counts = np.diff(np.append(starts, sorted_slots.shape[0]))
    unique_slots = sorted_slots[starts]
    # Split groups larger than the chosen entry size into entries of at most max_rows rows.
    max_rows = _entry_rows(counts, policy)
    pieces = -(-counts // max_rows)
    entry_group = np.repeat(np.arange(len(unique_slots)), pieces)
    entry_piece = np.arange(len(entry_group)) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    entry_start = starts[entry_group] + entry_piece * max_rows
    entry_count = np.minimum(counts[entry_group] - entry_piece * max_rows, max_rows)
    entry_slot = unique_slots[entry_group]
    return order, entry_slot, entry_start, entry_count


def _entry_rows(counts: np.ndarray, policy: BucketPolicy) -> int:
    """The row bucket to split tenants at: the one with the least padded cost."""
    largest = int(counts.max())
    if largest <= SMALL_REQUEST_ROWS:  # tenants counted by row count, times a table: fewer NumPy calls
        return _entry_rows_by_count(np.bincount(counts), policy)
    candidates = policy.row_buckets[: bisect.bisect_left(policy.row_buckets, largest) + 1]
    if len(candidates) == 1:
        return candidates[0]
    entries_per_bucket = (-(-counts[:, None] // np.asarray(candidates)[None, :])).sum(axis=0)
    return _cheapest_row_bucket(candidates, entries_per_bucket.tolist(), policy)


def _entry_rows_by_count(per_count: np.ndarray, policy: BucketPolicy) -> int:
    """``_entry_rows`` of tenants given as ``per_count[c]``: how many have c rows (c up to
    ``SMALL_REQUEST_ROWS``; ``per_count[0]`` is 0 and the last entry is not). Small requests
    count their tenants this way, which spares the NumPy calls of the row counts' maximum."""
    largest = per_count.shape[0] - 1
    # Only buckets up to the first that holds the largest tenant: beyond it, only padding grows.
    candidates = policy.row_buckets[: bisect.bisect_left(policy.row_buckets, largest) + 1]
    if len(candidates) == 1:  # the smallest bucket holds every tenant's rows (one-row requests), or the ladder has one rung
        return candidates[0]
    # ndarray.dot, not ``@``: the same integers, with less per-call cost on arrays this small.
    entries_per_bucket = per_count.dot(_entries_table(policy.row_buckets)[: largest + 1, : len(candidates)])
    return _cheapest_row_bucket(candidates, entries_per_bucket.tolist(), policy)


@functools.lru_cache(maxsize=64)
def _entries_table(row_buckets: tuple[int, ...]) -> np.ndarray:
    """How many entries of B = row_buckets[j] a tenant of c rows needs (ceil(c / B)),
    for c up to ``SMALL_REQUEST_ROWS``: [c, j]."""
    rows = np.arange(SMALL_REQUEST_ROWS + 1, dtype=np.int64)[:, None]
    table = -(-rows // np.asarray(row_buckets, dtype=np.int64)[None, :])
    table.flags.writeable = False
    return table


def _cheapest_row_bucket(candidates: Sequence[int], entries_per_bucket: list[int], policy: BucketPolicy) -> int:
    """Of the candidate row buckets (entries needed with each), the one with the least padded cost."""
    return _cheapest_row_bucket_of(policy, tuple(candidates), tuple(entries_per_bucket))


@functools.lru_cache(maxsize=4096)
def _cheapest_row_bucket_of(policy: BucketPolicy, candidates: tuple[int, ...], entries_per_bucket: tuple[int, ...]) -> int:
    """``_cheapest_row_bucket``, kept per policy and entry counts: the counts a workload needs
    are few (random 64-row requests over 16 to 64 tenants needed 300-550 distinct ones in
    50,000), and the weighing is a Python loop over the candidates that took 1.3 us of a
    64-row request's plan on a 2-core CPU, the look-up 0.2 us."""
    best, best_cost = policy.max_rows, None
    k_max = policy.max_tenants
    for b, entries in zip(candidates, entries_per_bucket):
        full_steps, rest = divmod(entries, k_max)
        padded_entries = full_steps * k_max + (policy.tenant_bucket(rest) if rest else 0)
        steps = full_steps + (rest > 0)
        cost = (padded_entries * (b + policy.entry_cost_rows) + steps * policy.step_cost_rows, steps)
        if best_cost is None or cost < best_cost:
            best, best_cost = b, cost
    return best


def _make_step(
    order: np.ndarray,
    entry_slot: np.ndarray,
    entry_start: np.ndarray,
    entry_count: np.ndarray,
    policy: BucketPolicy,
    *,
    tenant_bucket: int | None = None,
    row_bucket: int | None = None,
) -> Step:
    """One step of the given entries; K and B are the smallest buckets that fit unless given."""
    entries = len(entry_slot)
    k = policy.tenant_bucket(entries) if tenant_bucket is None else tenant_bucket
    b = policy.row_bucket(int(entry_count.max())) if row_bucket is None else row_bucket
    # Position (e, j) reads sorted row start_e + (j mod count_e): padding repeats the entry's rows.
    j = np.arange(b)
    sorted_pos = entry_start[:, None] + (j[None, :] % entry_count[:, None])
    row_index = np.empty((k, b), dtype=np.int32)
    row_index[:entries] = order[sorted_pos]
    row_index[entries:] = row_index[0]
    slots = np.empty(k, dtype=np.int32)
    slots[:entries] = entry_slot
    slots[entries:] = entry_slot[0]
    real = j[None, :] < entry_count[:, None]  # [entries, b]
    e_idx, j_idx = np.nonzero(real)
    out_positions = e_idx * b + j_idx
    out_rows = order[entry_start[e_idx] + j_idx]
    in_order = entries == k and bool((entry_slot == np.arange(k)).all())
    return Step(slots=slots, row_index=row_index, out_positions=out_positions, out_rows=out_rows, slots_in_order=in_order)
