"""Step inputs handed to the device through pinned host buffers that the host writes in place.

A jitted call given NumPy arguments copies each one into a staging buffer and hands its
transfer to a runtime thread; the program then waits for that thread. On an H100 host that
cost 40-60 us per argument over a device-resident one (one step from host inputs to a host
answer: 180-204 us as two NumPy arguments, 105-158 us from pinned buffers written in place,
86-122 us with the inputs on the device already; benchmarks/README.md, Host overhead). A
program whose inputs live in pinned host memory copies them to the device itself, as its
first operations, on its own stream: the host's part is writing the step's slots and rows
into those buffers, and the gather of the rows is that write.

JAX arrays are immutable by contract, and these are written behind JAX's back through a
NumPy view of their memory. That is sound here because:
  - the arrays never leave ``HostInputBuffers`` and the programs it serves (no other
    computation reads them, none is donated);
  - a set is handed to one caller at a time (``acquire`` claims it, ``release`` returns it);
  - a set is written only once the program that last read it has finished: every such
    program returns, besides its answer, a token output that only this module holds (an
    answer its caller deletes or donates says nothing of when the program ends; a token
    nobody else holds does), and a set is handed out again only once that token is ready;
  - the views are taken from the arrays' own buffer pointers and live beside the arrays.

Each ``HostInputBuffers`` (one per model, one per baseline program) keeps its pinned bytes
under its own budget by freeing sets no program reads; when none can be freed it waits for
the oldest set of the signature asked for, or, if other threads hold every one, allocates
past the budget.
"""

from __future__ import annotations

import ctypes
import dataclasses
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmt.jax_compat import single_device_sharding
PyTree = Any

# A step's input block larger than this takes the NumPy-argument path (a transfer through
# the runtime) instead of a pinned buffer, so that huge image blocks do not pin host memory.
MAX_BLOCK_BYTES = 64 * 1024 * 1024
# Pinned bytes one HostInputBuffers keeps before it frees sets no program is reading (least
# recently used signature first) or waits for a running program to finish with one.
MAX_TOTAL_BYTES = 512 * 1024 * 1024


def has_pinned_host(device: jax.Device) -> bool:
    """Whether ``device`` offers pinned host memory, which host input buffers and host outputs need."""
    return "pinned_host" in {memory.kind for memory in device.addressable_memories()}


def host_inputs_by_default(device: jax.Device) -> bool:
    """On a GPU with pinned host memory (where it was measured to pay), else not."""
    return device.platform == "gpu" and has_pinned_host(device)


def fits(nbytes: int) -> bool:
    """Whether an input block of ``nbytes`` goes through pinned buffers (else as an argument)."""
    return nbytes <= MAX_BLOCK_BYTES


def with_token(program: Callable[..., PyTree], on_device: jax.sharding.Sharding) -> Callable[..., tuple[PyTree, jax.Array]]:
    """``program(params, *inputs)`` on inputs given in pinned host memory: the inputs are
    copied to the device first, and the result is ``(answer, token)``, the token a one-element
    array read from the copied inputs for ``release`` (every output of one execution becomes
    ready when the execution ends). The inputs must be in host memory: an input already on
    the device would make the copy, and so the token, the input itself, ready at once."""

    def run(params: PyTree, *inputs: jax.Array) -> tuple[PyTree, jax.Array]:
        moved = [jax.device_put(a, on_device) for a in inputs]
        return program(params, *moved), jnp.ravel(moved[0])[:1]

    return run


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
    the same bytes (written by the host), in the order of the signature asked for."""

    arrays: tuple[jax.Array, ...]
    views: tuple[np.ndarray, ...]
    nbytes: int
    token: Any = None  # the token of the last program that read these buffers; None: none
    claimed: bool = False  # handed out by ``acquire`` and not released yet

    def idle(self) -> bool:
        """Neither handed out nor read by a program still running."""
        return not self.claimed and (self.token is None or self.token.is_ready())


class HostInputBuffers:
    """Sets of pinned host buffers, kept per input signature (shapes and dtypes).

    ``acquire`` hands out a set no program is reading; the caller writes the inputs into its
    ``views``, launches a ``with_token`` program on its ``arrays`` and calls ``release`` with
    the token that program returned (None when the launch failed before running). Thread-safe.
    """

    def __init__(self, device: jax.Device, *, max_total_bytes: int = MAX_TOTAL_BYTES):
        if not has_pinned_host(device):
            raise ValueError(f"device {device} has no pinned host memory")
        self.sharding = single_device_sharding(device, memory_kind="pinned_host")
        self.max_total_bytes = int(max_total_bytes)
        self._rings: OrderedDict[tuple, list[BufferSet]] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()
        self.nbytes = 0  # pinned bytes held
        self.acquired = 0  # sets handed out so far

    @staticmethod
    def signature(inputs: Sequence[tuple[Sequence[int], Any]]) -> tuple:
        """(shape, dtype) pairs as ``acquire`` takes them (callers keep it: one per program). The
        dtypes are those JAX keeps (float64 is float32 without 64-bit mode), so that the bytes
        counted are the bytes the buffers hold."""
        return tuple((tuple(int(d) for d in shape), np.dtype(jax.dtypes.canonicalize_dtype(dtype))) for shape, dtype in inputs)

    def acquire(self, signature: tuple) -> BufferSet:
        """A set of buffers of these inputs (a ``signature``) that no program is reading: an
        idle one, a new one while the pinned bytes allow, else the oldest one once its
        program is done (waited for), else (every set held by other threads) a new one."""
        with self._lock:
            self.acquired += 1
            ring = self._rings.setdefault(signature, [])
            self._rings.move_to_end(signature)
            for i, buffers in enumerate(ring):
                if buffers.idle():
                    ring.append(ring.pop(i))  # the set handed out goes last: the others are older
                    buffers.claimed = True
                    return buffers
            nbytes = _nbytes(signature)
            oldest = next((b for b in ring if not b.claimed), None)
            budget = self.max_total_bytes - nbytes
            if self.nbytes > budget and (oldest is None or self.nbytes - self._idle_bytes() <= budget):
                self._free_idle(budget)  # only where that makes room, or no set can be waited for
                ring = self._rings.setdefault(signature, ring)  # dropped while empty: back in its place
            if oldest is None or self.nbytes <= budget:
                # Allocated under the lock (rare: a new shape, or more steps in flight than before).
                buffers = self._allocate(signature, nbytes)
                ring.append(buffers)
                return buffers
            ring.remove(oldest)
            ring.append(oldest)
            oldest.claimed = True
        try:  # outside the lock: other threads go on meanwhile
            oldest.token.block_until_ready()
        except Exception:  # the program failed: it is done with the buffers all the same
            pass
        except BaseException:  # interrupted: the set goes back, still waiting on its program
            self.release(oldest, oldest.token)
            raise
        return oldest

    def release(self, buffers: BufferSet, token: Any) -> None:
        """Hands ``buffers`` back with the token of the program launched on them (None: no
        program was launched on them)."""
        with self._lock:
            buffers.token = token
            buffers.claimed = False

    def _allocate(self, signature: tuple, nbytes: int) -> BufferSet:
        arrays = tuple(jax.device_put(np.zeros(shape, dtype), self.sharding) for shape, dtype in signature)
        jax.block_until_ready(arrays)
        self.nbytes += nbytes
        return BufferSet(arrays, tuple(writable_view(a) for a in arrays), nbytes, claimed=True)

    def _idle_bytes(self) -> int:
        return sum(b.nbytes for ring in self._rings.values() for b in ring if b.idle())

    def _free_idle(self, budget: int) -> None:
        """Drops idle sets, least recently used signature first, until the pinned bytes fit
        ``budget`` or no idle set is left (a signature's ring goes once empty)."""
        for signature, ring in list(self._rings.items()):
            for buffers in [b for b in ring if b.idle()]:
                if self.nbytes <= budget:
                    return
                ring.remove(buffers)
                self.nbytes -= buffers.nbytes
            if not ring:
                del self._rings[signature]


def _nbytes(signature: tuple) -> int:
    return sum(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize for shape, dtype in signature)
