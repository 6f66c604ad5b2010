"""Baselines: the executors jaxmt is measured against, behind the Scheduler's interface.

They exist so that every claim is a ratio measured in one run. Each takes the same
``MultiTenantModel`` (its ``apply_fn`` and its tenants' params) and the same
``SchedulerConfig`` options, and offers the same ``submit``/``submit_async``/``metrics``/
``close``, with the same validation, admission control and accounting (``jaxmt._server``):

- ``ExclusiveServer``: one model's params answer every request, all traffic batched into one
  program: what the device does with no tenant diversity at all (the upper bound).
- ``TimeOnlyServer``: time multiplexing. Each tenant has its own queue with dynamic
  batching as Triton's dynamic batcher does it (a batch goes when it reaches the largest
  preferred batch size or its oldest request has waited ``max_delay_ms``; it is padded up to
  the next preferred size); one dispatch thread launches one tenant's batch after another.
- ``SpaceOnlyServer``: space multiplexing. The same per-tenant batching, with batches
  launched and waited for from concurrent worker threads (one per tenant by default).

A tenant's "program" is ``jax.jit(apply_fn)`` called with that tenant's params: the same
kernels per tenant with different weights, which is what separate per-model executables
compute, without compiling the same code once per tenant. Its answers and host inputs go as
jaxmt's steps send theirs (``MultiTenantModel.output_sharding`` and ``host_inputs``), so
that the ratios measure batching, not a way of moving bytes.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from jaxmt._queue import _Batch, _Launched, _Request
from jaxmt._server import _claim, _ServerBase
from jaxmt.buckets import BucketPolicy
from jaxmt.errors import InputError
from jaxmt.host_inputs import HostInputBuffers, fits, with_token
from jaxmt.jax_compat import single_device_sharding
from jaxmt.rows import RowParts, as_row_array, take_rows
from jaxmt.scheduler import SchedulerConfig, make_config
from jaxmt.steps import _start_copies_to_host, wait_for

PyTree = Any
logger = logging.getLogger("jaxmt")


def _exclusive_sizes(mt: Any) -> tuple[int, ...]:
    """Default batch ladder of the exclusive server: 1, 2, 4, ... up to one full step of jaxmt."""
    return BucketPolicy.powers_of_two(1, mt.buckets.max_tenants * mt.buckets.max_rows).row_buckets


def _check_batch_sizes(sizes: Sequence[int]) -> tuple[int, ...]:
    sizes = tuple(int(s) for s in sizes)
    if not sizes or any(s < 1 for s in sizes) or list(sizes) != sorted(set(sizes)):
        raise ValueError(f"batch sizes must be increasing positive integers, got {sizes}")
    return sizes


class _Program:
    """``jax.jit(apply_fn)`` and the (params, input) signatures it has compiled (first calls
    are untimed). Shared by every model of that ``apply_fn``, whose params may differ in shape.

    With ``input_device``, host rows of up to ``MAX_BLOCK_BYTES`` go through pinned host
    buffers written in place, which the program copies to that device itself, as
    ``MultiTenantModel(host_inputs=True)`` sends a step's rows."""

    def __init__(self, apply_fn: Any, output_sharding: Any = None, input_device: Any = None,
                 compiler_options: Mapping[str, Any] | None = None):
        # Answers go where jaxmt's steps put theirs (MultiTenantModel.output_sharding), compiled
        # with the model's XLA options (MultiTenantModel.compiler_options).
        options = {"compiler_options": dict(compiler_options)} if compiler_options else {}
        self.fn = jax.jit(apply_fn, **({} if output_sharding is None else {"out_shardings": output_sharding}), **options)
        self.outputs_on_device = output_sharding is None
        self.host_input_buffers = None if input_device is None else HostInputBuffers(input_device)
        if input_device is not None:
            on_device = single_device_sharding(input_device)  # where the token stays
            out = {} if output_sharding is None else {"out_shardings": (output_sharding, on_device)}
            self.fn_from_host = jax.jit(with_token(apply_fn, on_device), **out, **options)
        self.compiled: set[tuple] = set()
        self.lock = threading.Lock()

    def takes_host_block(self, shape: Sequence[int], dtype: Any) -> bool:
        return self.host_input_buffers is not None and fits(math.prod(shape) * np.dtype(dtype).itemsize)

    def __call__(self, params: PyTree, x: "np.ndarray | jax.Array", params_key: Hashable) -> tuple[PyTree, bool]:
        """``params_key``: the params' signature (``_params_key``), which jit compiles for too."""
        if isinstance(x, np.ndarray) and self.takes_host_block(x.shape, x.dtype):
            return self.from_host(params, x.shape, x.dtype, lambda rows: np.copyto(rows, x), params_key)
        new = self._first_call(params_key, _input_key(x))
        return self._copied_out(self.fn(params, x)), new

    def from_host(self, params: PyTree, shape: Sequence[int], dtype: Any, write_rows: Any,
                  params_key: Hashable) -> tuple[PyTree, bool]:
        """Runs on a block of ``shape`` and ``dtype`` that ``write_rows(view)`` writes into a
        pinned host buffer (``takes_host_block`` must hold)."""
        buffers = self.host_input_buffers.acquire(HostInputBuffers.signature([(shape, dtype)]))
        token = None
        try:
            write_rows(buffers.views[0])
            new = self._first_call(params_key, (tuple(shape), np.dtype(dtype), None))
            y, token = self.fn_from_host(params, buffers.arrays[0])
            return self._copied_out(y), new
        finally:
            self.host_input_buffers.release(buffers, token)

    def _first_call(self, params_key: Hashable, input_key: tuple) -> bool:
        with self.lock:
            new = (params_key, input_key) not in self.compiled
            self.compiled.add((params_key, input_key))
        return new

    def _copied_out(self, y: PyTree) -> PyTree:
        if self.outputs_on_device:
            _start_copies_to_host([y])  # as jaxmt's steps do
        return y


def _input_key(x: "np.ndarray | jax.Array") -> tuple:
    """What a jitted program compiles for: shape, dtype, and whether x is a device array
    (staged rows) or host rows: jit compiles each apart."""
    return (tuple(x.shape), np.dtype(x.dtype), x.sharding if isinstance(x, jax.Array) else None)


def _params_key(mt: Any) -> tuple:
    """What a jitted program compiles for besides the rows: the structure, shapes and dtypes of
    the params (every tenant's alike: the store's template), read once per model."""
    store = mt.store
    specs = tuple((tuple(spec.shape), np.dtype(spec.dtype)) for spec in store.leaf_specs)
    return (jax.tree_util.tree_structure(store.template), specs, store.device, store.sharding)


def _program_for_model(mt: Any) -> _Program:
    """The one-model program for ``mt``'s baselines: answers, inputs and XLA options as its steps have them."""
    input_device = None if mt.host_input_buffers is None else mt.store.device
    options = tuple(sorted(getattr(mt, "compiler_options", {}).items()))
    return _program_for(mt.apply_fn, mt.output_sharding, input_device, options)


@functools.lru_cache(maxsize=64)
def _program_for(apply_fn: Any, output_sharding: Any = None, input_device: Any = None,
                 compiler_options: tuple[tuple[str, Any], ...] = ()) -> _Program:
    return _Program(apply_fn, output_sharding, input_device, dict(compiler_options))


def _chunk(x: "np.ndarray | RowParts", start: int, n: int, index: np.ndarray) -> Any:
    """Rows ``index`` of x (``start:start + n`` padded up): a view where no padding is needed."""
    if index.shape[0] != n:
        return take_rows(x, index)
    return x.rows(start, start + n) if isinstance(x, RowParts) else x[start : start + n]


class _HostPending:
    """Launched chunks of one batch; ``result()`` copies the real rows back, in order."""

    def __init__(self, chunks: list[tuple[PyTree, int]], padded_rows: int, compiled: bool):
        self.chunks, self.padded_rows, self.compiled = chunks, padded_rows, compiled

    def result(self, *, spin_s: float = 0.0) -> PyTree:
        """``spin_s``: as ``jaxmt.steps.PendingPrediction.result``'s."""
        if spin_s > 0:
            wait_for(self.chunks, spin_s)  # (its row counts are ints, which it skips)
        parts = [jax.tree_util.tree_map(lambda a, n=n: np.asarray(a)[:n], y) for y, n in self.chunks]
        if len(parts) == 1:
            return parts[0]
        return jax.tree_util.tree_map(lambda *leaves: np.concatenate(leaves), *parts)


class _TenantPrograms:
    """One model launched for one tenant at a time: batches padded up ``batch_sizes``, split
    at the largest; each tenant's params sliced from the store once (again after it changes)."""

    def __init__(self, mt: Any, batch_sizes: Sequence[int]):
        self.mt = mt
        self.batch_sizes = _check_batch_sizes(batch_sizes)
        self.program = _program_for_model(mt)
        self.params_key = _params_key(mt)
        self._params: dict[Hashable, PyTree] = {}
        self._version = None
        self._lock = threading.Lock()

    def params(self, tenant_id: Hashable) -> PyTree:
        """Raises UnknownTenantError for a tenant that is not resident.

        Takes the store's lock before its own, in the order of a launch (which asks for params
        under the store's lock): a reader taking them the other way round, such as ``warmup``
        beside a launch, would wait for the launch while the launch waits for it."""
        with self.mt.store.lock, self._lock:
            if self.mt.store.version != self._version:
                self._params.clear()
                self._version = self.mt.store.version
            if tenant_id not in self._params:
                self._params[tenant_id] = self.mt.get_params(tenant_id)
            return self._params[tenant_id]

    def preload(self, tenant_ids: Sequence[Hashable]) -> None:
        """Slices these tenants' params now, as separately deployed models are loaded before
        traffic. Each is a copy beside the store (separate models hold their own weights),
        so a baseline over N tenants holds twice their weights on the device. The caller
        holds ``store.lock``: adds and updates replace (donate) the store's buffers."""
        for tenant_id in tenant_ids:
            jax.block_until_ready(self.params(tenant_id))

    def launch(self, params: PyTree, x: "np.ndarray | RowParts") -> _HostPending:
        """Dispatches x [n, ...] without waiting for the device (a ``RowParts``: the requests'
        rows, copied once into each padded batch, as jaxmt's steps copy theirs)."""
        largest, chunks, padded, compiled = self.batch_sizes[-1], [], 0, False
        for start in range(0, x.shape[0], largest):
            n = min(largest, x.shape[0] - start)
            size = self.batch_sizes[int(np.searchsorted(self.batch_sizes, n))]
            index = start + np.arange(size) % n  # padding repeats real rows: padded positions compute real values
            shape = (size, *x.shape[1:])
            if (not isinstance(x, RowParts) or x.staged is None) and self.program.takes_host_block(shape, x.dtype):
                write = functools.partial(take_rows, x, index)  # write(view): the rows taken into the view
                y, new = self.program.from_host(params, shape, x.dtype, write, self.params_key)
            else:
                y, new = self.program(params, _chunk(x, start, n, index), self.params_key)
            chunks.append((y, n))
            padded, compiled = padded + size, compiled or new
        return _HostPending(chunks, padded, compiled)

    def warmup(self, params: PyTree, row_shape: Sequence[int], row_dtype: Any, execute: bool = True,
               device: jax.Device | None = None) -> int:
        """Compiles every batch size now, running each once (with ``execute=False``, only
        those not compiled yet); with ``device`` (rows are staged there), for device inputs
        as well as host ones. Returns how many were new."""
        new_count = 0
        for size in self.batch_sizes:
            x = np.zeros((size, *row_shape), row_dtype)
            for x in [x] if device is None else [x, jax.device_put(x, device)]:
                if not execute and (self.params_key, _input_key(x)) in self.program.compiled:
                    continue
                y, new = self.program(params, x, self.params_key)
                jax.block_until_ready(y)
                new_count += new
        return new_count


class _LaneServer(_ServerBase):
    """Dynamic batching per lane (a tenant, or everything for the exclusive server)."""

    def __init__(self, mt: Any, config: SchedulerConfig, batch_sizes: Sequence[int]):
        from jaxmt.model import MultiTenantModel

        if not isinstance(mt, MultiTenantModel):
            raise TypeError(f"mt must be a jaxmt.MultiTenantModel, got {type(mt).__name__}")
        if config.target_latency_ms is not None:
            raise ValueError(f"{self.kind}: target_latency_ms paces the Scheduler only; a baseline serves as soon as it "
                             f"can (got {config.target_latency_ms!r})")
        super().__init__(mt, config)
        self._programs = _TenantPrograms(mt, batch_sizes)
        self._max_batch = self._programs.batch_sizes[-1]
        self._entry_rows = self._max_batch
        self._busy: set[Hashable] = set()  # lanes a worker is serving (space-only)
        self._lanes_version: int | None = None  # store version when lanes of absent tenants were last dropped

    def warmup(self, execute: bool = True) -> int:
        """Compiles the program for every batch size and loads every lane's params now (a
        deployment of separate models has them in place before traffic); returns how many
        programs were new. Each program runs once unless ``execute`` is False, which runs
        only those not compiled yet (as ``MultiTenantModel.warmup``)."""
        shape, dtype = self.mt.row_shape, self.mt.row_dtype
        if shape is None or not len(self.mt):
            raise InputError("warmup needs a resident tenant and the input row shape (from the model or a first request)")
        with self.mt.store.lock:
            tenants = self._tenants_to_preload()
            self._programs.preload(tenants)
        device = self._warm_staging([(size,) for size in self._programs.batch_sizes])
        return self._programs.warmup(self._params_for(self.mt.tenants[0]), shape, dtype, execute=execute, device=device)

    def _tenants_to_preload(self) -> list[Hashable]:
        """The tenants whose own params serve requests (all resident ones; none for exclusive)."""
        return self.mt.tenants

    def _params_for(self, lane: Hashable) -> PyTree:
        return self._programs.params(lane)

    def _wakes_locked(self, lane: Any, req: _Request) -> bool:
        return len(lane) == 1 or lane.rows >= self._max_batch

    def _has_work_locked(self) -> bool:
        return any(len(lane) for key, lane in self._lanes.items() if key not in self._busy)

    def _lane_tenant_gone(self, key: Hashable) -> bool:
        """Whether the tenant a lane queues for is no longer resident."""
        return key not in self.mt

    def _drop_lane_if_gone_locked(self, key: Hashable) -> None:
        """Drops a lane that is empty and idle and whose tenant left: a lane kept per tenant id
        ever seen would make every scan for the next batch grow with tenant churn."""
        lane = self._lanes.get(key)
        if lane is not None and not len(lane) and key not in self._busy and self._lane_tenant_gone(key):
            del self._lanes[key]

    def _drop_gone_lanes_locked(self) -> None:
        """Once the store changed (tenants may have left), drops the lanes of absent tenants."""
        version = self.mt.store.version
        if version != self._lanes_version:
            self._lanes_version = version
            for key in list(self._lanes):
                self._drop_lane_if_gone_locked(key)

    def _next_batch_locked(self, now: float) -> tuple[_Batch | None, float | None]:
        self._drop_gone_lanes_locked()
        delay_s = self.config.max_delay_ms / 1e3
        found, best, best_deadline, next_due = False, None, math.inf, None
        for key, lane in self._lanes.items():
            if not len(lane) or key in self._busy:
                continue
            due_s = lane.oldest_submitted() + delay_s
            if self._closed or lane.rows >= self._max_batch or now >= due_s:
                if lane.earliest_deadline() < best_deadline:
                    found, best, best_deadline = True, key, lane.earliest_deadline()
            else:
                next_due = due_s if next_due is None else min(next_due, due_s)
        if not found:
            return None, None if next_due is None else next_due - now
        lane, batch, rows = self._lanes[best], _Batch(requests=[], lane=best), 0
        est = self._steps.estimate_s
        while (req := self._take_locked(lane, now, est, batch.dropped)) is not None:
            if batch.requests and rows + req.rows > self._max_batch:
                self._put_back_locked(lane, req, batch.dropped)
                break
            batch.requests.append(req)
            rows += req.rows
        self._drop_lane_if_gone_locked(best)  # emptied of a removed tenant's requests
        return batch, None

    def _launch(self, batch: _Batch, started_s: float) -> _Launched | None:
        with self.mt.store.lock:
            live, gone = self._split_resident(batch.requests)
            params = self._params_for(batch.lane) if live else None
        self._fail_unknown(gone)
        if not live:
            return None
        pending = self._programs.launch(params, self._rows_of(live))
        tenants = len({r.tenant_id for r in live})
        # A batch over the largest size runs as one program call per chunk (as a Scheduler
        # step counts its calls)
        return _Launched(live, pending, started_s, tenants, pending.padded_rows, not pending.compiled, len(pending.chunks))

    def _lane_steps_locked(self, key: Hashable, req: _Request) -> int:
        lane = self._lanes.get(key)
        rows = (lane.rows if lane is not None else 0) + (req.rows if key == self._lane_key(req.tenant_id) else 0)
        return math.ceil(rows / self._max_batch)


class TimeOnlyServer(_LaneServer):
    """Time multiplexing: per-tenant dynamic batching, one tenant's program at a time.

    Args:
      mt: the model whose tenants are served (its ``apply_fn`` and params).
      max_delay_ms: Triton's max queue delay: the longest a request waits for its batch.
      batch_sizes: preferred batch sizes (the padded shapes; default the model's row buckets).
      **options: other ``SchedulerConfig`` fields (SLO, overload policy, pipeline depth...).
    """

    kind = "time"

    def __init__(self, mt: Any, max_delay_ms: float | None = None, default_slo_ms: float | None = None, *,
                 batch_sizes: Sequence[int] | None = None, config: SchedulerConfig | None = None, **options: Any):
        config = make_config(config, max_delay_ms=max_delay_ms, default_slo_ms=default_slo_ms, **options)
        super().__init__(mt, config, batch_sizes or mt.buckets.row_buckets)
        self._start_pipeline()

    def _lane_key(self, tenant_id: Hashable) -> Hashable:
        return tenant_id

    def _steps_ahead_locked(self, req: _Request) -> float:
        # Every lane's batches, the request's lane with the request in it (O(1): the lanes
        # keep the sum up to date).
        lane = self._lanes.get(req.tenant_id)
        rows = lane.rows if lane is not None else 0
        batches = lambda n: -(-n // self._max_batch)  # noqa: E731
        return self._in_flight + self._totals.lane_batches - batches(rows) + batches(rows + req.rows)


class SpaceOnlyServer(_LaneServer):
    """Space multiplexing: per-tenant dynamic batching, batches run from concurrent threads.

    Args:
      mt: the model whose tenants are served.
      max_delay_ms, batch_sizes, **options: as for ``TimeOnlyServer``, except
        ``pipeline_depth``, which is accepted (one set of options serves every server) and
        has no effect: each worker launches a batch and waits for it, so ``workers``
        batches are in flight at most.
      workers: threads that launch and wait for batches (default: one per resident tenant);
        a tenant is served by one worker at a time. ValueError unless a positive integer.
    """

    kind = "space"

    def __init__(self, mt: Any, max_delay_ms: float | None = None, default_slo_ms: float | None = None, *,
                 batch_sizes: Sequence[int] | None = None, workers: int | None = None,
                 config: SchedulerConfig | None = None, **options: Any):
        config = make_config(config, max_delay_ms=max_delay_ms, default_slo_ms=default_slo_ms, **options)
        super().__init__(mt, config, batch_sizes or mt.buckets.row_buckets)
        workers = max(1, len(mt)) if workers is None else workers
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be a positive integer, got {workers!r}")
        self.workers = workers
        self._start_threads([(f"worker{i}", self._worker_loop) for i in range(workers)])

    def _lane_key(self, tenant_id: Hashable) -> Hashable:
        return tenant_id

    def _steps_ahead_locked(self, req: _Request) -> float:
        return self._lane_steps_locked(req.tenant_id, req) + (req.tenant_id in self._busy)

    def _next_batch_locked(self, now: float) -> tuple[_Batch | None, float | None]:
        batch, wait_s = super()._next_batch_locked(now)
        if batch is not None:
            self._busy.add(batch.lane)
        return batch, wait_s

    def _worker_loop(self) -> None:
        batch = None
        try:
            while (batch := self._wait_for_batch()) is not None:
                try:
                    self._finish_dropped(batch)
                    launched = self._launch_guarded(batch) if batch.requests else None
                    if launched is not None:
                        self._complete(launched, pipelined=False)
                finally:
                    with self._cond:
                        self._busy.discard(batch.lane)
                        self._drop_lane_if_gone_locked(batch.lane)
                        self._cond.notify_all()
        except BaseException as exc:  # a bug here must not strand requests
            logger.exception("%s: a worker failed; failing its batch and every request not started", self.kind)
            for req in batch.requests if batch is not None else []:
                if not req.future.done():
                    self._finish(req, error=exc)
            self._shut(drain=False)
            self._fail_not_started(exc)

    def _fail_not_started(self, error: BaseException) -> None:
        """Fails the accepted requests that no step has started: a request the failed worker
        took off its lane is in no lane and no batch, and would never complete otherwise
        (steps other workers started complete as usual)."""
        with self._cond:  # claimed here, so that a worker that takes one meanwhile drops it instead of running it
            waiting = [r for r in list(self._outstanding.values()) if not (r.future.running() or r.future.done()) and _claim(r.future)]
        for req in waiting:
            self._finish(req, error=error)


class ExclusiveServer(_LaneServer):
    """Exclusive access: one tenant's params answer every request, all in one program.

    Requests of any resident tenant are accepted and batched together; all are computed with
    the params ``tenant_id`` has at each step (default: the first resident tenant, chosen at construction).
    """

    kind = "exclusive"

    def __init__(self, mt: Any, max_delay_ms: float | None = None, default_slo_ms: float | None = None, *,
                 tenant_id: Hashable | None = None, batch_sizes: Sequence[int] | None = None,
                 config: SchedulerConfig | None = None, **options: Any):
        config = make_config(config, max_delay_ms=max_delay_ms, default_slo_ms=default_slo_ms, **options)
        super().__init__(mt, config, batch_sizes or _exclusive_sizes(mt))
        self.tenant_id = mt.tenants[0] if tenant_id is None and len(mt) else tenant_id
        self._params = self._programs.params(self.tenant_id)  # UnknownTenantError when absent
        self._start_pipeline()

    def _params_for(self, lane: Hashable) -> PyTree:
        """Its tenant's current params (read again after ``update_tenant``, as
        ``exclusive_predict`` reads them); the last ones read once the tenant has left."""
        if self.tenant_id in self.mt:
            self._params = self._programs.params(self.tenant_id)
        return self._params

    def _lane_tenant_gone(self, key: Hashable) -> bool:
        return False  # its one lane queues for every tenant

    def _tenants_to_preload(self) -> list[Hashable]:
        return []

    def _steps_ahead_locked(self, req: _Request) -> float:
        return self._in_flight + self._lane_steps_locked(None, req)


# ------------------------------------------------------------------ synchronous helpers
def _sync_programs(mt: Any, batch_sizes: Sequence[int]) -> _TenantPrograms:
    # Kept on the model, so that it dies with it (a dict keyed by the model, weakly, would be
    # kept alive by its values, which hold the model).
    per_model = mt.__dict__.setdefault("_baseline_sync_programs", {})
    key = _check_batch_sizes(batch_sizes)
    if key not in per_model:
        per_model[key] = _TenantPrograms(mt, key)
    return per_model[key]


def time_only_predict(mt: Any, tenant_ids: Sequence[Hashable], x: Any, batch_sizes: Sequence[int] | None = None) -> PyTree:
    """``mt.predict`` computed the time-multiplexed way: each tenant's rows through its own
    program call, tenants one after another (launched asynchronously, then copied back).

    Raises:
      UnknownTenantError: an id is not resident (nothing is computed).
      InputError: lengths differ, or x's rows are not the model's.
    """
    x = mt.check_input(tenant_ids, x)
    if x.shape[0] == 0:
        return mt.predict(tenant_ids, x)
    programs = _sync_programs(mt, batch_sizes or mt.buckets.row_buckets)
    with mt.store.lock:
        slots = mt.store.slots_of(tenant_ids)
        _, first, inverse = np.unique(slots, return_index=True, return_inverse=True)
        launched = []
        for group, first_row in enumerate(first):
            rows = np.flatnonzero(inverse == group)
            launched.append((rows, programs.launch(programs.params(tenant_ids[first_row]), take_rows(x, rows))))
    spin_s = getattr(mt, "predict_spin_s", 0.0)
    if spin_s > 0:  # one spin over every tenant's programs, as the model's predict waits over its steps
        wait_for([pending.chunks for _, pending in launched], spin_s)
    results = [pending.result() for _, pending in launched]

    def scatter(*leaves: np.ndarray) -> np.ndarray:
        out = np.empty((x.shape[0], *leaves[0].shape[1:]), leaves[0].dtype)
        for (rows, _), leaf in zip(launched, leaves):
            out[rows] = leaf
        return out

    return jax.tree_util.tree_map(scatter, *results)


def exclusive_predict(mt: Any, x: Any, tenant_id: Hashable | None = None, batch_sizes: Sequence[int] | None = None) -> PyTree:
    """Every row of ``x`` through one tenant's model (default the first resident) as one
    batched program: the exclusive-access upper bound."""
    tenant_id = mt.tenants[0] if tenant_id is None and len(mt) else tenant_id
    x = as_row_array(x)
    x = mt.check_input([tenant_id] * (len(x) if x.ndim else 0), x)  # (a scalar x is refused for its rank)
    if x.shape[0] == 0:
        return mt.predict([], x)
    programs = _sync_programs(mt, batch_sizes or _exclusive_sizes(mt))
    with mt.store.lock:  # a consistent store version (as time_only_predict reads it)
        params = programs.params(tenant_id)
    return programs.launch(params, x).result(spin_s=getattr(mt, "predict_spin_s", 0.0))


__all__ = ["ExclusiveServer", "SpaceOnlyServer", "TimeOnlyServer", "exclusive_predict", "time_only_predict"]
