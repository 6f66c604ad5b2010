"""Request rows copied to the device as they arrive, so that a step's launch does not copy them.

Without staging, the dispatch thread copies every row of a step (padding included) into one
host block and hands it to the program, which copies it to the device: on an H200 host a
step of 16 float32 224x224x3 rows spent 2.25 ms there. With staging, a ``RowStager`` thread
puts each request's rows on the device while the request waits in its queue; the launch
then joins device rows into the step's block with one small program (16 rows: 0.13 ms on
the same host). The copy still costs the host (56-97 us a row in ``device_put``, see
``RowStager``), but off the dispatch thread, during the queue wait, and padding rows are
not copied at all. Rows whose copy has not been issued by the launch are taken from the
host, so staging never delays a step. Servers stage rows by default on a GPU when a row
holds at least ``STAGE_MIN_ROW_BYTES`` (below it staging measured slower than copying at
launch); ``SchedulerConfig.stage_inputs`` forces it.

The join program is one per block shape (a bucket's K x B, or a baseline's batch size);
``warm_join`` compiles them ahead of traffic. Every row handed to it is a committed device
array (rows taken from the host are put on the device first, in one call), so a mix of
staged and host rows runs the same program.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

logger = logging.getLogger("jaxmt")


# Rows at least this large are staged by default on a GPU. On an H200 host, ResNet-18
# serving of 588 KiB float32 rows sustained 2,691 req/s with staging against 1,600 without
# on one lease (3,200 with queued requests copied together, on another), while 147 KiB
# uint8 rows sustained 1,903-2,075 req/s staged against 3,644-4,525 copied at launch (other
# leases, time-only alike on all): a launch's copy of small rows costs the dispatch thread
# less than staging costs the staging thread, which competes with it (benchmarks/README.md,
# Serving: staged rows).
STAGE_MIN_ROW_BYTES = 256 * 1024

# The command lines' --stage choices, as SchedulerConfig.stage_inputs.
STAGE_CHOICES = {"auto": None, "on": True, "off": False}
STAGE_HELP = (f"stage each request's rows on the device at submit (SchedulerConfig.stage_inputs; auto: on a GPU "
              f"for rows of at least {STAGE_MIN_ROW_BYTES // 1024} KiB)")


def stage_by_default(device: Any, row_nbytes: int) -> bool:
    """Whether rows of ``row_nbytes`` bytes are staged on ``device`` unless told otherwise: on
    a GPU, for rows of at least ``STAGE_MIN_ROW_BYTES``; never where the model places its rows
    itself (``device`` None)."""
    return device is not None and device.platform == "gpu" and row_nbytes >= STAGE_MIN_ROW_BYTES


@functools.partial(jax.jit, static_argnums=0)
def _join(block_shape: tuple[int, ...], *rows: jax.Array) -> jax.Array:
    """Device rows [1, *row_shape] as one block of ``block_shape``."""
    return jnp.concatenate(rows).reshape(block_shape)


def join_rows(rows: Sequence[jax.Array], block_shape: Sequence[int]) -> jax.Array:
    """One device block of ``block_shape`` [*positions, *row_shape] from one [1, *row_shape]
    device row per position (positions in order; a row may repeat, as padding repeats real rows)."""
    return _join(tuple(int(d) for d in block_shape), *rows)


def warm_join(position_shapes: Iterable[Sequence[int]], row_shape: Sequence[int], row_dtype: Any,
              device: jax.Device) -> int:
    """Compiles and runs once the join program of each block [*positions, *row_shape], one
    per entry of ``position_shapes`` ((K, B) for a step, (n,) for a batch); returns how many."""
    row = jax.device_put(np.zeros((1, *row_shape), row_dtype), device)
    shapes = sorted({tuple(int(d) for d in positions) for positions in position_shapes})
    for positions in shapes:
        jax.block_until_ready(join_rows([row] * int(np.prod(positions)), (*positions, *row_shape)))
    return len(shapes)


class StagedRows:
    """One request's rows on their way to the device: one [1, *row_shape] array per row."""

    __slots__ = ("_rows", "_abandoned", "_done")

    def __init__(self) -> None:
        self._rows: list[jax.Array] | None = None
        self._abandoned = False
        self._done = threading.Event()

    def device_rows(self) -> list[jax.Array] | None:
        """The rows on the device once their copy has been issued; None while it is still
        waiting or when it failed (the host rows then serve)."""
        return self._rows

    def wait(self, timeout: float | None = None) -> list[jax.Array] | None:
        """Blocks until the copy is issued, has failed or was skipped; None unless issued."""
        self._done.wait(timeout)
        return self._rows

    def abandon(self) -> None:
        """Nobody will read these rows (their request was launched from host rows, or is
        done): a copy not started yet is skipped, and rows already copied are let go."""
        self._abandoned = True
        self._rows = None

    def _resolve(self, rows: list[jax.Array] | None) -> None:
        self._rows = None if self._abandoned else rows
        self._done.set()


class RowStager:
    """Puts requests' rows on one device from a thread of its own.

    The thread takes every request queued since its last copy and puts all their rows in one
    ``jax.device_put`` call: on an H200 host a call cost its thread 97 us for one 588 KiB
    row and 56 us a row for 16 or more, so under load the fixed part is paid once per batch,
    not once per request (ResNet-18 serving: 3,200 against 2,691 req/s on one lease).

    Args:
      device: where the rows go (the device the step programs run on).
      max_batch: most requests in one call.
    """

    def __init__(self, device: jax.Device, max_batch: int = 64):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.device = device
        self.max_batch = max_batch
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self._failures = 0
        self.calls = 0  # device_put calls made (each for one or more requests)
        self._thread = threading.Thread(target=self._run, name="jaxmt-stage", daemon=True)
        self._thread.start()

    def stage(self, x: np.ndarray) -> StagedRows | None:
        """Starts copying ``x`` [r, *row_shape] to the device; None once closed."""
        with self._lock:
            if self._closed:
                return None
            staged = StagedRows()
            self._queue.put((x, staged))
            return staged

    def flush(self, timeout: float | None = None) -> bool:
        """Waits until every request staged so far has its copy issued (or failed, or skipped);
        False on timeout. (One thread copies in queue order, so a marker staged now is last.)"""
        marker = self.stage(np.zeros((0,), np.float32))
        return True if marker is None else marker._done.wait(timeout)

    def _run(self) -> None:
        stopping = False
        while not stopping:
            item = self._queue.get()
            if item is None:
                break
            batch = [item]
            while len(batch) < self.max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                    break
                batch.append(item)
            self._copy(batch)
        while True:  # closed: what is left is not copied
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[1]._resolve(None)

    def _copy(self, batch: list[tuple[np.ndarray, StagedRows]]) -> None:
        """Puts the batch's rows on the device in one call; if that fails, request by request,
        so that only the requests whose rows cannot be copied fall back to host rows. Rows
        abandoned while they waited are not copied."""
        kept = []
        for x, staged in batch:  # one look at each: an entry abandoned meanwhile is still resolved
            if staged._abandoned or self._closed:
                staged._resolve(None)
            else:
                kept.append((x, staged))
        batch = kept
        if not batch:
            return
        try:
            placed = self._put_batch([x for x, _ in batch])
        except Exception:  # noqa: BLE001 (retried one by one below)
            placed = None
        if placed is not None:
            for (_, staged), rows in zip(batch, placed):
                staged._resolve(rows)
            return
        for x, staged in batch:
            try:
                staged._resolve(self._put_batch([x])[0])
            except Exception as exc:  # noqa: BLE001 (the host rows serve)
                staged._resolve(None)
                self._note_failure(exc)

    def _put_batch(self, xs: list[np.ndarray]) -> list[list[jax.Array]]:
        """Each request's rows as device rows [1, *row_shape], all in one ``device_put``."""
        rows = [x[i : i + 1] for x in xs for i in range(x.shape[0])]
        arrays = jax.device_put(rows, self.device)
        self.calls += 1
        out, start = [], 0
        for x in xs:
            out.append(arrays[start : start + x.shape[0]])
            start += x.shape[0]
        return out

    def _note_failure(self, exc: Exception) -> None:
        with self._lock:
            self._failures += 1
            first = self._failures == 1
        if first:  # the host rows serve; say so once, not per request
            logger.warning("staging rows on %s failed (%s: %s); steps take those rows from the host",
                           self.device, type(exc).__name__, exc)

    @property
    def failures(self) -> int:
        """Requests whose rows could not be copied (their steps took host rows)."""
        return self._failures

    def close(self, timeout: float | None = None) -> None:
        """Stops taking rows; rows queued and not being copied yet are left to the host (their
        ``device_rows()`` stays None). Waits up to ``timeout`` for the thread. Idempotent."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._queue.put(None)
        self._thread.join(timeout)
