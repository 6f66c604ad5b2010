"""Step inputs handed to the device through pinned host buffers that the host writes in place.

A jitted call given NumPy arguments copies each one into a staging buffer and hands its
transfer to a runtime thread; the program then waits for that thread. On an H100 host that
cost 40-60 us per argument over a device-resident one (``benchmarks/overhead.py``: one step
from host inputs to a host answer 180-204 us as two NumPy arguments, 105-158 us from
pinned buffers written in place, 86-122 us with the inputs on the device already). A
program whose inputs live in pinned host memory copies them to the device itself, as its
first operations, on its own stream: the host's part is writing the step's slots and rows
into those buffers, and the gather of the rows is that write.

JAX arrays are immutable by contract, and these are written behind JAX's back through a
NumPy view of their memory. That is sound here because:
  - the arrays never leave ``HostInputBuffers`` and the step programs it serves (no other
    computation, no donation, no aliasing by a jitted identity);
  - a buffer is written only while no program that reads it is in flight: each use records
    the outputs of the program that read it, and the buffer is handed out again only once
    those outputs are ready (a program's outputs are ready only after its input copies
    are done);
  - the views are taken from the arrays' own buffer pointers, which stay valid while the
    arrays are alive (the ring keeps both together).
"""

from __future__ import annotations

import ctypes
import dataclasses
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

PyTree = Any

# A step's input block larger than this takes the NumPy-argument path (a transfer through
# the runtime) instead of a pinned buffer, so that huge image blocks do not pin host memory.
MAX_BLOCK_BYTES = 64 * 1024 * 1024
# Pinned bytes kept across all shapes before buffers no program is reading are freed
# (least recently used first). A shape always keeps at least one buffer set.
MAX_TOTAL_BYTES = 512 * 1024 * 1024
# Buffer sets per input shape: as many steps of one shape can be in flight at once before
# a step waits for the oldest of them to finish.
RING = 4


def has_pinned_host(device: jax.Device) -> bool:
    return "pinned_host" in {memory.kind for memory in device.addressable_memories()}


def host_inputs_by_default(device: jax.Device) -> bool:
    """On a GPU with pinned host memory (where it was measured to pay), else not."""
    return device.platform == "gpu" and has_pinned_host(device)


def writable_view(array: jax.Array) -> np.ndarray:
    """A writable NumPy view of a single-device array in host memory (its own bytes)."""
    nbytes = int(array.nbytes)
    if nbytes == 0:
        return np.zeros(array.shape, array.dtype)
    raw = (ctypes.c_uint8 * nbytes).from_address(array.unsafe_buffer_pointer())
    return np.frombuffer(raw, dtype=np.uint8).view(array.dtype).reshape(array.shape)


@dataclasses.dataclass(eq=False)  # compared by identity: a ring removes this set, not an equal one
class BufferSet:
    """Pinned host arrays of one step's inputs (handed to its program) and NumPy views of
    the same bytes (written by the host)."""

    arrays: tuple[jax.Array, ...]
    views: tuple[np.ndarray, ...]
    nbytes: int
    reader: PyTree = None  # outputs of the last program that read these buffers; None: none in flight
    claimed: bool = False  # handed out by ``acquire`` and not released yet

    def idle(self) -> bool:
        """Neither handed out nor read by a program still running (an output deleted by its
        owner counts as finished: JAX frees it only once its program is done)."""
        return not self.claimed and (self.reader is None or all(_finished(leaf) for leaf in jax.tree_util.tree_leaves(self.reader)))


def _finished(leaf: Any) -> bool:
    """Whether an output leaf's program is done (leaves that are not arrays are)."""
    if not hasattr(leaf, "is_ready"):
        return True
    deleted = getattr(leaf, "is_deleted", None)
    return (deleted is not None and deleted()) or leaf.is_ready()


class HostInputBuffers:
    """Rings of pinned host buffer sets, one ring per input signature (shapes and dtypes).

    ``acquire`` hands out a set no program is reading; the caller writes the step's inputs
    into its ``views``, launches the program on its ``arrays`` and calls ``release`` with the
    program's outputs (or with None when the launch failed). Thread-safe.
    """

    def __init__(self, device: jax.Device, *, max_total_bytes: int = MAX_TOTAL_BYTES, ring: int = RING):
        if not has_pinned_host(device):
            raise ValueError(f"device {device} has no pinned host memory")
        self.sharding = jax.sharding.SingleDeviceSharding(device, memory_kind="pinned_host")
        self.max_total_bytes = int(max_total_bytes)
        self.ring = int(ring)
        self._rings: OrderedDict[tuple, list[BufferSet]] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()
        self.nbytes = 0  # pinned bytes held

    def acquire(self, signature: Sequence[tuple[tuple[int, ...], Any]]) -> BufferSet:
        """A buffer set of these (shape, dtype) inputs that no program is reading: an idle
        one, a new one (up to ``ring`` per signature), or else the oldest once its reader
        has finished (waited for)."""
        signature = tuple((tuple(shape), np.dtype(dtype)) for shape, dtype in signature)
        with self._lock:
            ring = self._rings.get(signature)
            if ring is None:
                ring = self._rings[signature] = []
            self._rings.move_to_end(signature)
            for i, buffers in enumerate(ring):
                if buffers.idle():
                    ring.append(ring.pop(i))  # the set handed out goes last: the others are older
                    buffers.claimed = True
                    return buffers
            if len(ring) < self.ring:
                buffers = self._allocate(signature)
                buffers.claimed = True
                ring.append(buffers)
                return buffers
            # Every set is handed out or being read: wait for the oldest one being read.
            oldest = next((b for b in ring if not b.claimed), None)
            if oldest is not None:
                ring.remove(oldest)
                ring.append(oldest)
                oldest.claimed = True
        if oldest is None:  # all handed out to other threads at once: a set of its own
            with self._lock:
                buffers = self._allocate(signature)
                buffers.claimed = True
                self._rings[signature].append(buffers)
                return buffers
        jax.block_until_ready([leaf for leaf in jax.tree_util.tree_leaves(oldest.reader) if not _finished(leaf)])
        return oldest  # waited for outside the lock: other threads go on meanwhile

    def release(self, buffers: BufferSet, reader: PyTree) -> None:
        """Hands ``buffers`` back with the outputs of the program launched on them (None:
        nothing reads them, e.g. the launch failed)."""
        with self._lock:
            buffers.reader = reader
            buffers.claimed = False

    def _allocate(self, signature: tuple) -> BufferSet:
        nbytes = sum(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize for shape, dtype in signature)
        self._free_idle(self.max_total_bytes - nbytes)
        arrays = tuple(jax.device_put(np.zeros(shape, dtype), self.sharding) for shape, dtype in signature)
        jax.block_until_ready(arrays)
        self.nbytes += nbytes
        return BufferSet(arrays, tuple(writable_view(a) for a in arrays), nbytes)

    def _free_idle(self, budget: int) -> None:
        """Drops idle buffer sets, least recently used signature first, until the pinned bytes
        fit ``budget`` or none is left to drop: first sets beyond a signature's last one,
        then signatures whose only set is idle."""
        for signature, ring in list(self._rings.items()):
            for buffers in [b for b in ring if b.idle()][: len(ring) - 1]:
                if self.nbytes <= budget:
                    return
                ring.remove(buffers)
                self.nbytes -= buffers.nbytes
        for signature, ring in list(self._rings.items()):
            if self.nbytes <= budget:
                return
            if len(ring) == 1 and ring[0].idle():
                self.nbytes -= ring.pop().nbytes
                del self._rings[signature]
