"""What one step is: its jitted programs, and a launched prediction waiting on the device.

The step programs take the store's stacked leaves, the K slots of the step (unless the step
reads the whole store in slot order) and its input block [K, B, ...]; ``PendingPrediction``
holds the dispatched steps of one request and scatters their rows back to request order
when asked.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.profiler import TraceAnnotation

from jaxmt.buckets import Plan
from jaxmt.jax_compat import single_device_sharding
from jaxmt.rows import RowParts
from jaxmt.validation import abstract_rows

PyTree = Any


def check_output_rows(y: PyTree, rows: int, tenant_axis: bool = True) -> None:
    """Raises ValueError naming the first leaf of a model's output ``y`` (traced) that does
    not hold ``rows`` rows on its leading axis (after the tenant axis of a step): answers
    are read back row by row from every leaf, so an output summed over the rows, or holding
    other than one row per input row, would be scattered into wrong answers or fail to
    reshape after the step ran."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(y)[0]:
        shape = tuple(jnp.shape(leaf))[1 if tenant_axis else 0 :]
        if shape[:1] != (rows,):
            where = jax.tree_util.keystr(path) or "(a single array)"
            raise ValueError(f"apply_fn's output {where} has shape {list(shape)} for {rows} input rows: every output "
                             f"leaf needs one row per input row on its leading axis (row i answering row i of x)")


def _step_program(apply_kb: Callable, treedef: Any, leaves: list[jax.Array], slots: jax.Array, x_kb: PyTree) -> PyTree:
    """One step: gather K slots of every stacked leaf, run the tenant-batched model."""
    params_k = jax.tree_util.tree_unflatten(treedef, [jnp.take(leaf, slots, axis=0) for leaf in leaves])
    y_kb = apply_kb(params_k, x_kb)
    check_output_rows(y_kb, x_kb.shape[1])
    return y_kb


def _whole_store_program(apply_kb: Callable, treedef: Any, leaves: list[jax.Array], x_kb: PyTree) -> PyTree:
    """A step whose K entries are slots 0..K-1 of a store of capacity K: the stacked leaves
    are the batched weights already, so the per-step copy of every tenant's weights that the
    gather costs is skipped, and no slots travel to the device."""
    y_kb = apply_kb(jax.tree_util.tree_unflatten(treedef, leaves), x_kb)
    check_output_rows(y_kb, x_kb.shape[1])
    return y_kb


@dataclasses.dataclass
class PendingPrediction:
    """Steps dispatched to the device whose outputs have not been copied back yet.

    ``result()`` blocks on the device, scatters rows back to request order and returns
    NumPy arrays; the dispatch itself never waits for the device.
    """

    plan: Plan
    outputs: list[PyTree]
    empty_output: PyTree  # ShapeDtypeStruct pytree of one row, for allocating the answer
    # Request rows holding NaN or Inf, passed through under nonfinite_inputs="pass".
    nonfinite_rows: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))

    def result(self, *, spin_s: float = 0.0) -> PyTree:
        """The answers in request order, once the device has them.

        ``spin_s``: seconds to wait by asking the outputs whether they are ready, in a loop,
        before blocking (see ``wait_for``); 0 blocks at once.
        """
        with TraceAnnotation("jaxmt.result"):  # waits for the device, then scatters
            if spin_s > 0:
                wait_for(self.outputs, spin_s)
            return self._scatter()

    def _scatter(self) -> PyTree:
        """Each step's real rows, read from its outputs (waiting for them), put in request order."""
        if len(self.plan.steps) == 1 and self.plan.steps[0].rows_in_order:  # answers in request order already
            rows = self.plan.rows
            if isinstance(self.empty_output, jax.ShapeDtypeStruct):  # one output array: no pytree to take apart
                return np.array(np.asarray(self.outputs[0])[:rows, 0])
            treedef = jax.tree_util.tree_structure(self.empty_output)
            answers = [np.array(np.asarray(leaf)[:rows, 0]) for leaf in jax.tree_util.tree_leaves(self.outputs[0])]
            return jax.tree_util.tree_unflatten(treedef, answers)
        flat_spec, treedef = jax.tree_util.tree_flatten(self.empty_output)
        answers = [np.empty((self.plan.rows, *s.shape), dtype=s.dtype) for s in flat_spec]
        for step, y_kb in zip(self.plan.steps, self.outputs):
            for answer, leaf in zip(answers, jax.tree_util.tree_leaves(y_kb)):
                host = np.asarray(leaf)
                flat = host.reshape(step.padded_rows, *host.shape[2:])
                answer[step.out_rows] = flat[step.out_positions]
        return jax.tree_util.tree_unflatten(treedef, answers)

    def block_until_ready(self) -> "PendingPrediction":
        """Waits for the device to finish every step; returns self, as JAX arrays do."""
        jax.block_until_ready(self.outputs)
        return self


_NO_ROWS = np.zeros(0, np.int64)


def wait_for(outputs: PyTree, spin_s: float) -> None:
    """Returns once every leaf of ``outputs`` is ready: asks ``is_ready()`` in a loop for up
    to ``spin_s`` seconds, then blocks.

    Blocking puts the thread to sleep until the runtime wakes it, which costs a wake-up after
    the device is done; asking in a loop spares it but holds a core and the GIL meanwhile.
    Whether that pays is for each host to show (``MultiTenantModel(predict_spin_us=...)``
    says what an H100 host showed). The spin counts from the call, over all the leaves
    together; then it blocks.
    """
    deadline = time.perf_counter() + spin_s
    for leaf in jax.tree_util.tree_leaves(outputs):
        is_ready = getattr(leaf, "is_ready", None)
        # A NumPy leaf is there already; a deleted one is not asked (is_ready() on it crashed
        # the process with jaxlib 0.10), and reading it afterwards raises as without a spin.
        if is_ready is None or leaf.is_deleted():
            continue
        while not is_ready():
            if time.perf_counter() >= deadline:
                leaf.block_until_ready()
                break


def host_output_sharding(device: jax.Device, outputs_to_host: bool | None = None) -> jax.sharding.Sharding | None:
    """Where a step program should write its outputs: pinned host memory, or None (device).

    With ``outputs_to_host`` the program itself copies its answer into page-locked host
    memory as its last operation, and reading it as NumPy then costs a memcpy. On an H200
    host a program copying 8 KiB took 78 us to a NumPy answer that way, against 285 us
    with the answer left on the device and copied when asked for (84 against 540 us at
    588 KiB), and ``predict`` of the overhead benchmark's tiny model took 682 against
    939 us (``benchmarks/overhead.py``, one run). ``None`` picks it where that was
    measured: on a GPU with pinned host memory. A CPU backend keeps outputs where they are
    (its "device" is host memory already). Raises ValueError if ``outputs_to_host=True``
    and the device has no pinned host memory.
    """
    if outputs_to_host is False:
        return None
    kinds = {memory.kind for memory in device.addressable_memories()}
    if outputs_to_host is None:
        outputs_to_host = device.platform == "gpu" and "pinned_host" in kinds
    if not outputs_to_host:
        return None
    if "pinned_host" not in kinds:
        raise ValueError(f"outputs_to_host=True, but device {device} has no pinned host memory (it has {sorted(kinds)})")
    return single_device_sharding(device, memory_kind="pinned_host")


def _start_copies_to_host(outputs: list[PyTree]) -> None:
    """Queues each output's device-to-host copy behind its step, so that ``result()`` finds
    the bytes on the host (or on their way) instead of asking for them after the step ends.
    Callers whose programs write their outputs to host memory skip it."""
    for leaf in jax.tree_util.tree_leaves(outputs):
        copy = getattr(leaf, "copy_to_host_async", None)
        if copy is not None:
            copy()


def _nonfinite_row_indices(x: "np.ndarray | RowParts") -> np.ndarray:
    """Indices of the rows of x holding NaN or Inf (none for integer inputs): one pass over x."""
    if isinstance(x, RowParts):
        found = [start + _nonfinite_row_indices(part) for start, part in zip(x.starts.tolist(), x.parts)]
        return np.concatenate(found) if any(f.size for f in found) else _NO_ROWS
    if x.shape[0] == 0 or not jnp.issubdtype(x.dtype, jnp.inexact):  # NumPy does not count bfloat16 as inexact
        return _NO_ROWS
    finite = np.isfinite(x.reshape(x.shape[0], -1)).all(axis=1)
    return _NO_ROWS if finite.all() else np.flatnonzero(~finite)


def _row_output_spec(apply_fn: Callable, template: PyTree, row_shape: Sequence[int], row_dtype: Any) -> PyTree:
    """ShapeDtypeStruct pytree of ONE output row for input rows of the given shape and dtype."""
    x1 = abstract_rows((1, *row_shape), row_dtype)
    out = jax.eval_shape(apply_fn, template, x1)
    check_output_rows(out, 1, tenant_axis=False)
    return jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape[1:], s.dtype), out)
