"""MultiTenantModel: the synchronous core. ``predict`` = plan, gather, vmap, scatter back.

Per call the host does O(rows) NumPy work (group rows by tenant, build index arrays, gather
the input rows into a [K, B, ...] block) and one dispatch of a cached executable per step.
The executable gathers the K tenants' parameter slots from the store and runs the
tenant-batched model; rows are scattered back to request order on the host.
"""

from __future__ import annotations

import functools
import math
import threading
import types
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.profiler import TraceAnnotation

from jaxmt.buckets import BucketPolicy, Plan, Step, make_plan
from jaxmt.errors import InputError
from jaxmt.host_inputs import HostInputBuffers, fits, host_inputs_by_default, with_token
from jaxmt.jax_compat import single_device_sharding
from jaxmt.lowering import LoweringPolicy, lowering_key, tenant_batched
from jaxmt.programs import ProgramCache, ProgramKey
from jaxmt.rows import RowParts, as_row_array, take_rows
from jaxmt.steps import (
    _NO_ROWS,
    PendingPrediction,
    _nonfinite_row_indices,
    _row_output_spec,
    _start_copies_to_host,
    _step_program,
    _whole_store_program,
    host_output_sharding,
)
from jaxmt.store import TenantStore
from jaxmt.validation import device_dtype

PyTree = Any

NONFINITE_INPUT_POLICIES = ("ignore", "pass", "reject")


class MultiTenantModel:
    """Many models of one architecture, served as one XLA program per step.

    Args:
      apply_fn: ``apply_fn(params, x) -> y`` for ONE tenant on a batch ``x`` of shape
        ``[b, *row_shape]``; pure and jit-able. Rows must not interact (row i of y
        depends only on row i of x), as in any inference-mode model, and every output
        leaf holds the b rows on its leading axis (else the first request, or the first
        step of more rows, raises naming the leaf).
      example_params: a params pytree of the architecture: the template every tenant's
        params must match in structure, leaf shapes and dtypes.
      capacity: initial store slots (grows by doubling; a fixed size avoids recompiles).
      buckets: the K and B ladders (default powers of two up to 64 and 64).
      row_shape, row_dtype: what one input row is; when omitted, the first ``predict``
        fixes them and later calls must match.
      max_capacity: limit on store slots; adding past it raises CapacityError.
      max_programs: bound of the compiled-program LRU cache.
      lowering: how the model is batched over tenants (see ``jaxmt.lowering``): "auto"
        (default: per-conv choice, cached on disk, measured on a GPU, else a rule), "vmap"
        (plain jax.vmap),
        "rule", a conv lowering forced everywhere (e.g. "einsum", "loop"), a mapping of
        per-layer overrides, or a ``jaxmt.lowering.LoweringPolicy``.
      device: where the store and programs live (default: the first JAX device).
      nonfinite_inputs: what a floating input row holding NaN or Inf gets: "ignore" (the
        default: computed as given and not looked for, so the host does no pass over the
        input bytes; a tenant's NaN rows still affect only that tenant's answers), "pass"
        (computed as given, counted in ``stats()["nonfinite_rows"]`` and listed in
        ``PendingPrediction.nonfinite_rows``) or "reject" (``InputError`` naming the first
        such row and its tenant; nothing is computed).
      outputs_to_host: whether step programs write their answers into pinned host memory
        (the program copies its answer out as its last operation, cheaper on a GPU than a
        copy asked for afterwards; ``jaxmt.steps.host_output_sharding`` says what was
        measured). None (the default): on a GPU that has pinned host memory, else not.
        ``run_step`` then returns host arrays.
      whole_store_steps: whether a step holding every slot once, in slot order, runs a
        program of its own that reads the stacked weights as they are instead of gathering
        a copy (on an H100, ResNet-50 at 16 tenants x 8 images in bf16 ran at 0.80x of
        exclusive access with the gather, 0.85x without: benchmarks/README.md, Lowering).
        Such steps exist only when the capacity is on the K ladder, and add at most one
        program per row bucket: a random workload compiles at most len(K ladder) x
        len(B ladder) programs with False, and len(B ladder) more with True (the default).
      host_inputs: whether steps of host (NumPy) rows take their slots and rows from pinned
        host buffers that the host writes in place and the program copies to the device
        itself, instead of NumPy arguments that the runtime transfers (``jaxmt.host_inputs``
        says what each cost). None (the default): on a GPU that has pinned host memory, else
        not. Blocks over ``jaxmt.host_inputs.MAX_BLOCK_BYTES`` always go as arguments. The
        pinned buffers are ``host_input_buffers`` (``stats()["host_input_bytes"]``).
        Each step shape runs one program either way; device-resident blocks (rows a server
        stages on the device) run programs of their own, which ``warmup(device_inputs=True)``
        compiles, so a staging server may hold twice the programs counted above.
      compiler_options: XLA options for every step program (``jax.stages.Lowered.compile``'s
        ``compiler_options``), e.g. ``{"xla_gpu_graph_min_graph_size": 1}``, which lets XLA
        launch even a small step's few kernels and copies as one CUDA graph (on H100s, in
        runs of 30 calls, ``predict`` of the overhead benchmark's tiny MLP took 269-492 us
        with it against 300-509 us without over three leases, a gain within the A/A spread
        of its rotation: benchmarks/README.md, Host overhead).
        Checked when the model is built: an option XLA does not know raises ``ValueError``
        naming it. The baselines (``jaxmt.baselines``) compile with them too; the lowering
        autotuner times its candidate layers with XLA's defaults.
      predict_spin_us: how long (microseconds) ``predict`` waits for the device by asking
        whether its answer is ready, in a loop, before it blocks (``jaxmt.steps.wait_for``):
        that can spare a short step the sleeping thread's wake-up, at the cost of a busy core
        (and the GIL) meanwhile. 0 (the default) blocks at once: on an H100 host the gain
        it showed in calls alternating with blocking ones (``predict`` of the overhead
        benchmark 451 against 484 us with 300 us of spin) is about the size of what a call's
        place in such a rotation did alone on a CPU, and in runs of 30 calls of each polling
        was slower on that lease (487 against 461 and 523 against 509 us) and 5% faster on a
        later one (264 against 278 us), the size of run-order effects seen on a CPU
        (benchmarks/README.md, Host overhead). It can pay only where answers are written to
        host memory (an answer left on the device is copied back after it is ready, and that
        copy is waited for anyway); leave it at 0 where many threads call ``predict`` at
        once. Kept in seconds as ``predict_spin_s``; the baselines (``jaxmt.baselines``) wait the same way.
        ``dispatch(...).result()`` blocks at once unless given ``spin_s``.

    Example:
      >>> import jax, jax.numpy as jnp, numpy as np, jaxmt
      >>> def apply_fn(params, x):
      ...     return x @ params["w"] + params["b"]
      >>> def params_of(seed):
      ...     k1, k2 = jax.random.split(jax.random.key(seed))
      ...     return {"w": jax.random.normal(k1, (3, 2)), "b": jax.random.normal(k2, (2,))}
      >>> mt = jaxmt.MultiTenantModel(apply_fn, params_of(0), capacity=4)
      >>> for name, seed in [("a", 1), ("b", 2)]:
      ...     mt.add_tenant(name, params_of(seed))
      >>> x = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
      >>> y = mt.predict(["a", "b", "a", "a", "b"], x)
      >>> y.shape
      (5, 2)
      >>> bool(np.allclose(y[1], apply_fn(params_of(2), x[1:2])[0], rtol=1e-5, atol=1e-5))
      True
    """

    def __init__(
        self,
        apply_fn: Callable[[PyTree, Any], Any],
        example_params: PyTree,
        capacity: int | None = None,
        buckets: BucketPolicy | None = None,
        *,
        row_shape: Sequence[int] | None = None,
        row_dtype: Any = None,
        max_capacity: int | None = None,
        max_programs: int = 256,
        lowering: "str | LoweringPolicy | Mapping[str, str]" = "auto",
        device: jax.Device | None = None,
        nonfinite_inputs: str = "ignore",
        outputs_to_host: bool | None = None,
        whole_store_steps: bool = True,
        host_inputs: bool | None = None,
        compiler_options: Mapping[str, str | bool | int | float] | None = None,
        predict_spin_us: float = 0.0,
    ):
        if not callable(apply_fn):
            raise TypeError(f"apply_fn must be callable, got {type(apply_fn).__name__}")
        if buckets is not None and not isinstance(buckets, BucketPolicy):
            raise TypeError(f"buckets must be a jaxmt.BucketPolicy, got {type(buckets).__name__}")
        if nonfinite_inputs not in NONFINITE_INPUT_POLICIES:
            raise ValueError(f"nonfinite_inputs must be one of {NONFINITE_INPUT_POLICIES}, got {nonfinite_inputs!r}")
        self.nonfinite_inputs = nonfinite_inputs
        self.predict_spin_s = _spin_seconds(predict_spin_us)  # checked before any device memory is taken
        self.apply_fn = apply_fn
        self.buckets = buckets if buckets is not None else BucketPolicy()
        options = _typed_compiler_options(compiler_options)  # before any device memory is taken
        self.store = self._make_store(example_params, capacity, max_capacity, device)
        self.output_sharding = self._output_sharding(outputs_to_host)
        self._whole_store_steps = bool(whole_store_steps) and type(self)._whole_store_steps
        self.host_input_buffers = self._host_input_buffers(host_inputs)
        self.lowering = lowering
        self._lowering_key = lowering_key(lowering)  # validates; distinct programs per policy
        self._apply_kb = tenant_batched(apply_fn, lowering)
        # Read-only: the options are not part of a program's key, so they may not change under the cache.
        self.compiler_options = types.MappingProxyType(_checked_by_xla(options, self._program_device()))
        self.programs = ProgramCache(self._build_program, max_programs=max_programs, lower=self._lower_program,
                                     compile_lowered=self._compile_lowered)
        self._program_keys: dict[tuple, ProgramKey] = {}  # see _key
        self._host_steps: dict[tuple, bool] = {}  # see _takes_host_inputs
        self._signatures: dict[ProgramKey, tuple] = {}  # pinned input buffers of each host-input program
        self._keys_capacity: int | None = None  # the store capacity those keys are of
        self._row_shape: tuple[int, ...] | None = None if row_shape is None else tuple(int(d) for d in row_shape)
        self._row_dtype: np.dtype | None = None if row_dtype is None else np.dtype(row_dtype)
        if (self._row_shape is None) != (self._row_dtype is None):
            raise ValueError(f"give row_shape and row_dtype together, or neither; got row_shape={row_shape!r} and row_dtype={row_dtype!r}")
        self._row_output: PyTree | None = None
        self._probed_rows: tuple[tuple[int, ...], np.dtype, PyTree] | None = None  # the last rows traced while unfixed
        self._counter_lock = threading.Lock()
        self._steps = 0
        self._rows = 0
        self._padded_rows = 0
        self._nonfinite_rows = 0

    # ------------------------------------------------------------- adapters
    @classmethod
    def from_flax(
        cls,
        module: Any,
        variables_by_tenant: Mapping[Hashable, PyTree] | Iterable[tuple[Hashable, PyTree]],
        method: str | Callable | None = None,
        *,
        apply_kwargs: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> "MultiTenantModel":
        """A model from a Flax module (linen or nnx) and one variables pytree per tenant.

        For linen, each value is the ``variables`` dict that ``module.apply`` takes
        (``{"params": ..., "batch_stats": ...}``); for nnx, an ``nnx.Module`` of the same
        graph as ``module`` or its ``nnx.State``; given as a mapping of tenant id to that
        value or an iterable of ``(id, value)`` pairs. ``method`` and ``apply_kwargs`` are passed
        to the call (e.g. ``apply_kwargs={"train": False}``). Other keyword arguments go
        to the constructor; the capacity defaults to the number of tenants.
        """
        from jaxmt.adapters import flax_apply_and_params

        apply_fn, params_by_tenant, example = flax_apply_and_params(module, variables_by_tenant, method, apply_kwargs)
        kwargs.setdefault("capacity", max(1, len(params_by_tenant)))
        model = cls(apply_fn, example, **kwargs)
        for tenant_id, params in params_by_tenant.items():
            model.add_tenant(tenant_id, params)
        return model

    # --------------------------------------------------------------- tenants
    def add_tenant(self, tenant_id: Hashable, params: PyTree) -> None:
        """Adds a tenant (validated against the template; written in place). Ids are looked up
        as dict keys: ids that compare equal (``1``, ``1.0``, ``True``, ``np.int64(1)``) name
        one tenant."""
        self.store.add(tenant_id, params)

    def update_tenant(self, tenant_id: Hashable, params: PyTree) -> None:
        """Replaces a resident tenant's weights in place."""
        self.store.update(tenant_id, params)

    def remove_tenant(self, tenant_id: Hashable) -> None:
        """Removes a tenant; its slot is free for later adds."""
        self.store.remove(tenant_id)

    def get_params(self, tenant_id: Hashable) -> PyTree:
        """A resident tenant's params, as stored."""
        return self.store.get(tenant_id)

    @property
    def tenants(self) -> list[Hashable]:
        """Resident tenant ids in insertion order."""
        return self.store.tenants

    def __len__(self) -> int:
        return len(self.store)

    def __contains__(self, tenant_id: object) -> bool:
        return tenant_id in self.store

    @property
    def row_shape(self) -> tuple[int, ...] | None:
        """The shape of one input row; None until given or fixed by the first ``predict``."""
        return self._row_shape

    @property
    def row_dtype(self) -> np.dtype | None:
        """The dtype of input rows; None until given or fixed by the first ``predict``."""
        return self._row_dtype

    # ------------------------------------------------------------ inference
    @property
    def max_step_entries(self) -> int:
        """The most tenant entries (a tenant's rows up to the largest row bucket) one step
        holds: the largest tenant bucket. A scheduler fills steps up to this."""
        return self.buckets.max_tenants

    @property
    def input_device(self) -> jax.Device | None:
        """The device a step's input block lives on, for rows staged there ahead of a step
        (``jaxmt.staging``); None where the model places each step's rows itself."""
        return self.store.device

    def predict(self, tenant_ids: Sequence[Hashable], x: Any) -> PyTree:
        """Runs each row of ``x`` through the model of its tenant.

        Args:
          tenant_ids: n ids, one per row; any order, repeats allowed.
          x: array [n, *row_shape] of the model's input dtype.

        Returns:
          NumPy array(s) [n, ...]: row i equals ``apply_fn(params[tenant_ids[i]], x[i:i+1])[0]``.

        Raises:
          UnknownTenantError: an id is not resident (nothing is computed).
          InputError: lengths differ, x's row shape or dtype is not the model's, (rows not
            fixed yet) the model cannot be traced on them, a row holds NaN or Inf under
            ``nonfinite_inputs="reject"``, or 64-bit integer rows hold a value that JAX, without
            64-bit mode, would wrap; nothing is compiled then.
        """
        return self.dispatch(tenant_ids, x).result(spin_s=self.predict_spin_s)

    def dispatch(self, tenant_ids: Sequence[Hashable], x: "np.ndarray | RowParts") -> PendingPrediction:
        """Validates, plans and launches the steps without waiting for the device.

        ``x`` may also be a ``jaxmt.rows.RowParts`` (several requests' rows, read as their
        concatenation): each step's input block is then copied from the parts directly.

        Raises what ``predict`` raises, and leaves the model as it was: in particular a
        first request that fails does not fix the input row shape, and a zero-row request
        never does.
        """
        with TraceAnnotation("jaxmt.check"):
            x = self.check_input(tenant_ids, x)
            nonfinite_rows = _nonfinite_row_indices(x) if self.nonfinite_inputs == "pass" else _NO_ROWS
        with self.store.lock:
            with TraceAnnotation("jaxmt.plan"):  # a span costs about 0.3 us when no trace is taken
                slots = self.store.slots_of(tenant_ids)
                if slots.size == 0:
                    return PendingPrediction(make_plan(slots, self.buckets), [], self._output_spec_for(x.shape[1:], x.dtype))
                plan = self._plan(slots)
            fixes_rows = self._row_shape is None  # the first valid request fixes the input rows
            if fixes_rows:
                self._fix_rows_locked(x.shape[1:], x.dtype)
            else:  # checked again here: another thread's first request may have fixed them meanwhile
                self._check_rows(x)
            try:
                with TraceAnnotation("jaxmt.launch"):
                    outputs = [self._launch(step, x) for step in plan.steps]
                if self.output_sharding is None:  # else the programs wrote them to the host
                    _start_copies_to_host(outputs)
                empty_output = self._row_output
                if empty_output is None:  # rows given to the constructor: traced at the first step
                    empty_output = self._output_spec_for(self._row_shape, self._row_dtype)
            except BaseException:
                if fixes_rows:
                    self._row_shape = self._row_dtype = self._row_output = None
                raise
        with self._counter_lock:
            self._steps += len(plan.steps)
            self._rows += plan.rows
            self._padded_rows += plan.padded_rows
            self._nonfinite_rows += len(nonfinite_rows)
        return PendingPrediction(plan, outputs, empty_output, nonfinite_rows)

    def run_step(self, step: Step, x_kb: Any) -> PyTree:
        """Launches one planned step on already-gathered input [K, B, *row_shape], a NumPy or
        device array (caller holds ``store.lock``)."""
        if isinstance(x_kb, np.ndarray) and self._takes_host_inputs(step.tenant_bucket, step.row_bucket):
            block = (step.tenant_bucket, step.row_bucket, *self._row_shape)
            if x_kb.shape != block or x_kb.dtype != self._row_dtype:
                raise InputError(f"x_kb is {x_kb.dtype.name}{list(x_kb.shape)}, expected {self._row_dtype.name}{list(block)} for this step")
            return self._launch_from_host(step, lambda rows: np.copyto(rows, x_kb))
        return self._launch_with_arguments(step, x_kb)

    def _launch(self, step: Step, x: "np.ndarray | RowParts") -> PyTree:
        if (not isinstance(x, RowParts) or x.staged is None) and self._takes_host_inputs(step.tenant_bucket, step.row_bucket):
            if step.rows_in_order and isinstance(x, np.ndarray):
                return self._launch_from_host(step, lambda rows: _copy_rows_in_order(x, rows))
            return self._launch_from_host(step, lambda rows: take_rows(x, step.row_index, out=rows))
        return self.run_step(step, take_rows(x, step.row_index))

    def _whole_store(self, step: Step) -> bool:
        return self._whole_store_steps and step.slots_in_order and step.tenant_bucket == self.store.capacity

    def _takes_host_inputs(self, k: int, b: int) -> bool:
        """Whether a K=k, B=b step of host rows takes its inputs from pinned buffers (decided
        once per shape and rows: ``predict`` asks every step)."""
        if self.host_input_buffers is None or self._row_shape is None:
            return False
        memo = (k, b, self._row_shape, self._row_dtype)
        takes = self._host_steps.get(memo)
        if takes is None:
            takes = self._host_steps[memo] = fits(k * b * self._row_dtype.itemsize * math.prod(self._row_shape))
        return takes

    def _launch_with_arguments(self, step: Step, x_kb: Any) -> PyTree:
        whole_store = self._whole_store(step)
        program = self.programs.get(self._key(step.tenant_bucket, step.row_bucket, whole_store))
        # NumPy inputs go to the executable as they are: an explicit device_put of (slots,
        # rows) first measured slower on an H200 host (1256 vs 1009 us a predict,
        # benchmarks/results/overhead_device_put.json).
        if whole_store:
            return program(self.store.stacked_leaves, x_kb)
        return program(self.store.stacked_leaves, step.slots, x_kb)

    def _launch_from_host(self, step: Step, write_rows: Callable[[np.ndarray], Any]) -> PyTree:
        """Writes the step's slots and rows into pinned host buffers (``write_rows(view)``
        fills the [K, B, *row_shape] block) and launches the program that reads them there."""
        whole_store = self._whole_store(step)
        key = self._key(step.tenant_bucket, step.row_bucket, whole_store, host_inputs=True)
        program = self.programs.get(key)
        signature = self._signatures.get(key)
        if signature is None:
            signature = self._signatures[key] = self.host_input_buffers.signature(self._input_signature(key))
        buffers = self.host_input_buffers.acquire(signature)
        token = None
        try:
            *slots, rows = buffers.views  # in the order of _input_signature
            write_rows(rows)
            if slots:
                slots[0][...] = step.slots
            outputs, token = program(self.store.stacked_leaves, *buffers.arrays)
            return outputs
        finally:
            self.host_input_buffers.release(buffers, token)

    def _input_signature(self, key: ProgramKey) -> list[tuple[tuple[int, ...], Any]]:
        """(shape, dtype) of the program's inputs after the stacked leaves: slots (unless the
        step reads the whole store) and the row block."""
        rows = ((key.tenant_bucket, key.row_bucket, *key.row_shape), jnp.dtype(key.row_dtype))
        return [rows] if key.whole_store else [((key.tenant_bucket,), jnp.dtype(jnp.int32)), rows]

    def warmup(
        self,
        tenant_buckets: Iterable[int] | None = None,
        row_buckets: Iterable[int] | None = None,
        *,
        progress: bool = False,
        workers: int = 1,
        execute: bool = True,
        device_inputs: bool = False,
    ) -> int:
        """Compiles the programs of the bucket ladder now and runs each once; returns how many were built.

        Where steps take host inputs through pinned buffers (``host_inputs``), these are the
        programs compiled; ``device_inputs`` compiles, as well, the programs of blocks already
        on the device (rows a server stages there). Elsewhere the one program of a shape
        takes both.

        With ``execute`` (the default) each program then runs once on zeros, waited for, so
        that what a program's first run costs on the device (loading its kernels, growing
        the runtime's buffers) is paid here and not by the first requests that need it; the
        baselines' warm-up runs its programs too.

        Needs the row shape and dtype (given to the constructor or fixed by a first
        ``predict``). Programs are specific to the store capacity: grow it first
        (``store.reserve``) if tenants are still to come.

        ``workers > 1`` compiles that many programs at once on threads (tracing stays on
        this one). That pays where compiles are CPU-bound (a 2-core CPU compiled the tiny
        ResNet-18's 12-program ladder in 10 s with 3 workers, 14 s with one); on a GPU it did not: XLA's
        autotuner times kernels on the device while it compiles, and on an H200 the 32
        programs of a ResNet-18 ladder took 151 s with 8 workers against 104 s with one
        (benchmarks/serving.py, ``--compile-workers``). Hence the default of 1.
        """
        if self._row_shape is None:
            raise InputError("warmup needs the input row shape: pass row_shape/row_dtype to the constructor or call predict first")
        ks = _rungs("tenant bucket", tenant_buckets, self.buckets.tenant_buckets)
        bs = _rungs("row bucket", row_buckets, self.buckets.row_buckets)
        wholes = (False, True) if self._whole_store_steps else (False,)
        keys = []
        with self.store.lock:  # keys of one capacity, taken as steps take theirs
            for k in ks:
                for b in bs:
                    host = self._takes_host_inputs(k, b)
                    for whole in wholes:
                        if not whole or k == self.store.capacity:
                            keys += [self._key(k, b, whole, host_inputs=host)] + ([self._key(k, b, whole)] if host and device_inputs else [])
        if not progress:
            built = self.programs.ensure_many(keys, workers=workers)
        else:
            from tqdm.auto import tqdm

            with tqdm(total=sum(key not in self.programs for key in keys), desc="compiling", unit="program") as bar:
                built = self.programs.ensure_many(keys, workers=workers, on_built=lambda key: bar.update())
        with self.store.lock:
            capacity = self.store.capacity
            if keys and keys[0].capacity != capacity:  # the store grew while they compiled: they can never run
                self.programs.discard(lambda key: key.capacity != capacity)
        if execute:
            self._run_once(keys)
        return built

    def _run_once(self, keys: list[ProgramKey]) -> None:
        """Runs each cached program of ``keys`` once on zero inputs, one at a time (so that only
        one program's output is alive at once)."""
        with self.store.lock:
            leaves = self.store.stacked_leaves
            for key in keys:
                program = self.programs.peek(key)
                if program is not None and key.capacity == self.store.capacity:
                    jax.block_until_ready(program(leaves, *self._zero_step_inputs(key)))

    def _zero_step_inputs(self, key: ProgramKey) -> tuple:
        """Valid inputs of the program of ``key`` after the stacked leaves: (slots, rows), or
        rows alone for a whole-store program, in pinned host memory for a program taking
        host inputs (a hook: ``jaxmt.sharding`` places them per device)."""
        zeros = tuple(np.zeros(shape, dtype) for shape, dtype in self._input_signature(key))
        return jax.device_put(zeros, self.host_input_buffers.sharding) if key.host_inputs else zeros

    def _host_input_buffers(self, host_inputs: bool | None) -> HostInputBuffers | None:
        """The pinned buffers that steps write their inputs into, or None where steps take
        their inputs as arguments (a hook: ``jaxmt.sharding`` has none)."""
        device = self.store.device
        if host_inputs is None:
            host_inputs = host_inputs_by_default(device)
        return HostInputBuffers(device) if host_inputs else None

    def stats(self) -> dict[str, Any]:
        """Counters: compiles, cache hits and misses, compile seconds, padding, tenants, bytes."""
        with self._counter_lock:
            steps, rows, padded = self._steps, self._rows, self._padded_rows
            nonfinite_rows = self._nonfinite_rows
        return {
            **self.programs.stats(),
            "steps": steps,
            "rows": rows,
            "padded_rows": padded,
            "padding_waste": 0.0 if padded == 0 else round(1.0 - rows / padded, 6),
            "nonfinite_rows": nonfinite_rows,
            "host_input_bytes": 0 if self.host_input_buffers is None else self.host_input_buffers.nbytes,
            **self.store.stats(),
        }

    # ------------------------------------------------------------- internals
    def _make_store(self, example_params: PyTree, capacity: int | None, max_capacity: int | None, device: Any) -> TenantStore:
        """The store (a hook: ``jaxmt.sharding`` lays it over a device mesh)."""
        return TenantStore(example_params, capacity, max_capacity=max_capacity, device=device)

    # Whether a step covering the whole store in slot order runs its own gather-free
    # program (``jaxmt.sharding`` has none).
    _whole_store_steps = True

    def _output_sharding(self, outputs_to_host: bool | None) -> jax.sharding.Sharding | None:
        """Where step programs put their outputs (a hook: ``jaxmt.sharding`` keeps them on the mesh)."""
        return host_output_sharding(self.store.device, outputs_to_host)

    def _plan(self, slots: np.ndarray) -> Plan:
        """The steps answering rows with these slots (a hook: ``jaxmt.sharding`` plans per device)."""
        return make_plan(slots, self.buckets)

    def _key(self, k: int, b: int, whole_store: bool = False, host_inputs: bool = False) -> ProgramKey:
        """The key of the program for a K=k, B=b step on the current store and rows.

        Every step looks its program up, so each key is built once and then found by a
        dictionary look-up: building one anew reads the dtype's name (a NumPy property
        written in Python) and runs the frozen dataclass's construction; on a 2-core CPU
        building the key and getting the program took 4-7 us, with the key kept 1 us. The
        combinations are few: the ladder's shapes, for each capacity and row shape the
        model has had. Each input is read once, so a key always matches its memo entry.
        The capacity only grows: when it has, the programs (and keys) of the old one are
        dropped, as no step can run them again.
        """
        capacity, row_shape, row_dtype = self.store.capacity, self._row_shape, self._row_dtype
        memo = (k, b, whole_store, capacity, row_shape, row_dtype, host_inputs)
        key = self._program_keys.get(memo)
        if key is None:
            if capacity != self._keys_capacity:  # the store grew: programs of a smaller one never run again
                self.programs.discard(lambda old: old.capacity != capacity)
                self._program_keys = {m: old for m, old in self._program_keys.items() if m[3] == capacity}
                self._signatures = {old: sig for old, sig in self._signatures.items() if old.capacity == capacity}
                self._keys_capacity = capacity
            key = ProgramKey(k, b, capacity, row_shape, row_dtype.name, self._lowering_key, whole_store, host_inputs)
            self._program_keys[memo] = key
        return key

    def _build_program(self, key: ProgramKey) -> Any:
        return self._compile_lowered(self._lower_program(key))

    def _program_device(self) -> jax.Device:
        """A device the step programs run on (where ``compiler_options`` are checked)."""
        return self.store.device

    def _compile_lowered(self, lowered: Any) -> Any:
        return lowered.compile(compiler_options=dict(self.compiler_options)) if self.compiler_options else lowered.compile()

    def _lower_program(self, key: ProgramKey) -> Any:
        # Compiled for the store's device: with the default placement a model built with
        # device=<not the first device> would get programs that reject its own store.
        on_device = single_device_sharding(self.store.device)
        leaves = [jax.ShapeDtypeStruct((key.capacity, *s.shape), s.dtype, sharding=on_device) for s in self.store.leaf_specs]
        slots = jax.ShapeDtypeStruct((key.tenant_bucket,), jnp.int32, sharding=on_device)
        x_kb = jax.ShapeDtypeStruct((key.tenant_bucket, key.row_bucket, *key.row_shape), device_dtype(key.row_dtype), sharding=on_device)
        out = {} if self.output_sharding is None else {"out_shardings": self.output_sharding}
        if key.whole_store:
            step_program, inputs = functools.partial(_whole_store_program, self._apply_kb, self.store.treedef), [x_kb]
        else:
            step_program, inputs = functools.partial(_step_program, self._apply_kb, self.store.treedef), [slots, x_kb]
        if key.host_inputs:  # answers placed as the others are; the token stays on the device
            step_program = with_token(step_program, on_device)
            inputs = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=self.host_input_buffers.sharding) for a in inputs]
            out = {} if self.output_sharding is None else {"out_shardings": (self.output_sharding, on_device)}
        return jax.jit(step_program, **out).lower(leaves, *inputs)

    def check_input(self, tenant_ids: Sequence[Hashable], x: Any) -> "np.ndarray | RowParts":
        """``x`` as an array (a ``RowParts`` stays one), checked as ``predict`` checks it: one row
        per id, rows of the model's shape and dtype (rows not fixed yet: rows the model can be
        traced on), and no NaN or Inf rows under ``nonfinite_inputs="reject"``. Servers call it
        at submit, so that a bad request is refused alone instead of failing a step it shares.

        Raises:
          InputError: naming what differs (and, for a non-finite row, its tenant).
        """
        if (isinstance(tenant_ids, (str, bytes)) or not hasattr(tenant_ids, "__len__")
                or (isinstance(tenant_ids, np.ndarray) and tenant_ids.ndim != 1)):
            kind = f"a {tenant_ids.ndim}-d array" if isinstance(tenant_ids, np.ndarray) else type(tenant_ids).__name__
            raise InputError(f"tenant_ids must be a sequence of ids (one per row), got {kind}")
        if isinstance(x, (list, tuple)) and not x and self._row_shape is not None:
            x = np.zeros((0, *self._row_shape), self._row_dtype)  # ``[]``: no rows, so none of a wrong shape or dtype
        elif not isinstance(x, RowParts):
            x = as_row_array(x)
        if x.ndim == 0:
            raise InputError("x must have a leading row axis, got a scalar")
        if len(tenant_ids) != x.shape[0]:
            raise InputError(f"len(tenant_ids) is {len(tenant_ids)} but x has {x.shape[0]} rows")
        if x.shape == (0,) and self._row_shape not in (None, ()) and not isinstance(x, RowParts):
            # ``[]``: no rows and no row shape to be wrong (an empty x of another row shape is).
            return np.zeros((0, *self._row_shape), self._row_dtype)
        if self._row_shape is None:
            self._output_spec_for(x.shape[1:], x.dtype)  # rows the model cannot take fail here
        else:
            self._check_rows(x)
        _check_integers_fit(tenant_ids, x)
        self.check_finite(tenant_ids, x)
        return x

    def fix_rows(self, row_shape: Sequence[int], row_dtype: Any) -> None:
        """Fixes the input rows, as a first ``predict`` does: a server fixes them from its first
        request, so that requests queued together share one row shape. A no-op if these are
        the model's rows already.

        Raises:
          InputError: other rows are fixed already, or the model cannot be traced on these.
        """
        row_shape, row_dtype = tuple(int(d) for d in row_shape), np.dtype(row_dtype)
        with self.store.lock:
            if self._row_shape is None:
                self._fix_rows_locked(row_shape, row_dtype)
            elif (row_shape, row_dtype) != (self._row_shape, self._row_dtype):
                raise InputError(f"rows {row_dtype.name}{list(row_shape)} asked for, but the model's are "
                                 f"{self._row_dtype.name}{list(self._row_shape)}")

    def _fix_rows_locked(self, row_shape: tuple[int, ...], row_dtype: np.dtype) -> None:
        self._row_output = self._output_spec_for(row_shape, row_dtype)
        self._row_shape, self._row_dtype = tuple(row_shape), row_dtype

    def _check_rows(self, x: "np.ndarray | RowParts") -> None:
        if x.shape[1:] != self._row_shape:
            raise InputError(f"x rows have shape {list(x.shape[1:])}, expected {list(self._row_shape)} (x is {list(x.shape)})")
        if x.dtype != self._row_dtype:
            raise InputError(f"x has dtype {x.dtype.name}, expected {self._row_dtype.name}")

    def check_finite(self, tenant_ids: Sequence[Hashable], x: "np.ndarray | RowParts") -> None:
        """Under ``nonfinite_inputs="reject"``, raises InputError naming the first row of ``x``
        holding NaN or Inf and its tenant; a no-op under "ignore" and "pass". Servers call it
        at submit, so that one bad request is refused alone instead of failing a step it shares."""
        if self.nonfinite_inputs != "reject":
            return
        bad = _nonfinite_row_indices(x)
        if bad.size:
            row = int(bad[0])
            raise InputError(
                f"row {row} (tenant {tenant_ids[row]!r}) holds NaN or Inf values; "
                f"{bad.size} of {x.shape[0]} rows do (nonfinite_inputs='reject')"
            )

    def _output_spec_for(self, row_shape: Sequence[int], row_dtype: Any) -> PyTree:
        """ShapeDtypeStruct pytree of one output row for input rows of this shape and dtype
        (the fixed rows' spec is kept; other rows are traced once each time they change).

        Raises:
          InputError: the model cannot be traced on such rows (wrong shape or dtype).
        """
        row_shape, row_dtype = tuple(row_shape), np.dtype(row_dtype)
        fixed = row_shape == self._row_shape and row_dtype == self._row_dtype
        if fixed and self._row_output is not None:
            return self._row_output
        probed = self._probed_rows
        if not fixed and probed is not None and probed[:2] == (row_shape, row_dtype):
            return probed[2]
        try:
            spec = _row_output_spec(self.apply_fn, self.store.template, row_shape, row_dtype)
        except Exception as exc:
            raise InputError(f"x rows of shape {list(row_shape)} and dtype {row_dtype.name} do not fit the model: {exc}") from exc
        if fixed:
            self._row_output = spec
        else:
            self._probed_rows = (row_shape, row_dtype, spec)
        return spec


def _rungs(what: str, chosen: Iterable[int] | None, ladder: tuple[int, ...]) -> tuple[int, ...]:
    """The rungs of ``ladder`` that ``warmup`` is asked for (all of them for None), as the
    ladder's Python ints: a value off the ladder raises ValueError naming it. ``2.0``,
    ``True`` and ``"2"`` are off it, though the first two compare equal to a rung: a
    program of a float or bool shape would fail to build or to run."""
    if chosen is None:
        return ladder
    rungs = []
    for value in chosen:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value not in ladder:
            raise ValueError(f"{what} {value!r} is not on the ladder {ladder}")
        rungs.append(int(value))
    return tuple(rungs)


def _check_integers_fit(tenant_ids: Sequence[Hashable], x: "np.ndarray | RowParts") -> None:
    """InputError naming the first row of 64-bit integers that JAX, without 64-bit mode, runs
    as 32-bit ones (int64 as int32, uint64 as uint32) and that holds a value they cannot:
    the conversion would wrap it silently (2**32 + 1 would be looked up as id 1)."""
    dtype = x.dtype
    if dtype.kind not in "iu" or x.shape[0] == 0:
        return
    kept = np.dtype(jax.dtypes.canonicalize_dtype(dtype))
    if kept == dtype:
        return
    info = np.iinfo(kept)
    parts = zip(x.starts.tolist(), x.parts) if isinstance(x, RowParts) else [(0, x)]
    for start, part in parts:
        flat = part.reshape(part.shape[0], -1)
        unfit = ((flat < info.min) | (flat > info.max)).any(axis=1)
        if unfit.any():
            row = int(np.argmax(unfit))
            value = flat[row][(flat[row] < info.min) | (flat[row] > info.max)][0]
            raise InputError(f"row {start + row} (tenant {tenant_ids[start + row]!r}) holds {value}, which {kept.name} "
                             f"cannot hold: without 64-bit mode JAX runs {dtype.name} rows as {kept.name}, wrapping it")


def _copy_rows_in_order(x: np.ndarray, rows: np.ndarray) -> None:
    """Writes the n rows of ``x`` into a [K, 1, ...] block as entries 0..n-1 and row 0 into
    the padding entries (a ``Step.rows_in_order`` step's input: copies, no gather)."""
    n = x.shape[0]
    rows[:n, 0] = x
    if n < rows.shape[0]:  # a step of as many rows as entries has no padding to write
        rows[n:, 0] = x[0]


def _spin_seconds(spin_us: float) -> float:
    """``predict_spin_us`` in seconds: TypeError unless it is a real number, ValueError
    unless it is finite and >= 0."""
    if isinstance(spin_us, bool) or not isinstance(spin_us, (int, float, np.integer, np.floating)):
        raise TypeError(f"predict_spin_us must be a number of microseconds, got {type(spin_us).__name__} {spin_us!r}")
    if not math.isfinite(spin_us) or spin_us < 0:
        raise ValueError(f"predict_spin_us must be finite and >= 0, got {spin_us!r}")
    return float(spin_us) * 1e-6


def _typed_compiler_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """``options`` as a dict of str names to Python scalars (NumPy scalars converted), or
    ``TypeError`` naming the first entry that is not one."""
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise TypeError(f"compiler_options must be a mapping of XLA option names to values, got {type(options).__name__}")
    typed = {}
    for name, value in options.items():
        if isinstance(value, np.generic):
            value = value.item()
        if not isinstance(name, str):
            raise TypeError(f"compiler_options: option name {name!r} is a {type(name).__name__}, expected a str")
        if not isinstance(value, (str, bool, int, float)):
            raise TypeError(f"compiler_options[{name!r}]: value of type {type(value).__name__}, expected str, bool, int or float")
        typed[name] = value
    return typed


def _checked_by_xla(checked: dict[str, Any], device: jax.Device) -> dict[str, Any]:
    """``checked``, once a trivial program compiled with them for ``device``: a mistyped or
    unknown option fails here (XLA's message names it) instead of at the first step."""
    if checked:
        probe = jax.ShapeDtypeStruct((1,), jnp.float32, sharding=single_device_sharding(device))
        try:
            jax.jit(lambda v: v + 1).lower(probe).compile(compiler_options=checked)
        except Exception as exc:
            raise ValueError(f"compiler_options {checked} were refused by XLA: {type(exc).__name__}: {exc}") from exc
    return checked
