"""Request rows copied to the device as they arrive, so that a step's launch does not copy them.

Without staging, the dispatch thread copies every row of a step (padding included) into one
host block and hands it to the program, which copies it to the device: on an H200 host a
step of 16 float32 224x224x3 rows spent 2.25 ms there, most of a ResNet-18 step's host time.
With staging, a ``RowStager`` thread puts each request's rows on the device while the
request waits in its queue; the launch then joins device rows into the step's block with one
small program (16 rows: 0.13 ms on the same host). The copy costs the host about the same
(one ``device_put`` a row, 142 us for such a row), but off the dispatch thread, during the
queue wait, and padding rows are not copied at all. Rows whose copy has not been issued by
the launch are taken from the host, so staging never delays a step.

The join program is one per block shape (a bucket's K x B, or a baseline's batch size);
``warm_join`` compiles them ahead of traffic. Every row handed to it is a committed device
array (rows taken from the host are put on the device first, in one call), so a mix of
staged and host rows runs the same program.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

logger = logging.getLogger("jaxmt")


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

    __slots__ = ("_future",)

    def __init__(self, future: "Future[list[jax.Array]]"):
        self._future = future

    def device_rows(self) -> list[jax.Array] | None:
        """The rows on the device once their copy has been issued; None while it is still
        being made or when it failed (the host rows then serve)."""
        future = self._future
        if not future.done() or future.cancelled() or future.exception() is not None:
            return None
        return future.result()

    def wait(self, timeout: float | None = None) -> list[jax.Array] | None:
        """Blocks until the copy is issued (tests and warm-up); None when it failed."""
        try:
            return self._future.result(timeout)
        except Exception:  # noqa: BLE001 (a failed copy means: use the host rows)
            return None


class RowStager:
    """Puts requests' rows on one device from a thread of its own.

    Args:
      device: where the rows go (the device the step programs run on).
      threads: copying threads. On an H200 host one thread copied a 588 KiB row in 142 us and
        more threads were slower per row (169 us with two), so one is the default.
    """

    def __init__(self, device: jax.Device, threads: int = 1):
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.device = device
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="jaxmt-stage")
        self._lock = threading.Lock()
        self._closed = False
        self._failures = 0

    def stage(self, x: np.ndarray) -> StagedRows | None:
        """Starts copying ``x`` [r, *row_shape] to the device; None once closed."""
        with self._lock:
            if self._closed:
                return None
            return StagedRows(self._pool.submit(self._put, x))

    def _put(self, x: np.ndarray) -> list[jax.Array]:
        try:
            return jax.device_put([x[i : i + 1] for i in range(x.shape[0])], self.device)
        except Exception as exc:
            with self._lock:
                self._failures += 1
                first = self._failures == 1
            if first:  # the host rows serve; say so once, not per request
                logger.warning("staging rows on %s failed (%s: %s); steps take those rows from the host",
                               self.device, type(exc).__name__, exc)
            raise

    @property
    def failures(self) -> int:
        return self._failures

    def close(self) -> None:
        """Stops taking rows; copies already started finish. Idempotent."""
        with self._lock:
            self._closed = True
        self._pool.shutdown(wait=True)
