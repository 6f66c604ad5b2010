"""Beyond one machine: a Ray Serve deployment whose replicas each hold a shard of the tenants.

Requests carry their tenant id as Ray Serve's multiplexed model id (the HTTP header
``serve_multiplexed_model_id``, or ``handle.options(multiplexed_model_id=...)``). Ray Serve
routes a tenant's requests to a replica that already holds it, and a tenant no replica
holds to the replica holding the fewest tenants, which loads it through ``load_params`` into
its ``MultiTenantModel``. A replica keeps at most ``max_tenants_per_replica`` tenants; beyond,
Ray Serve unloads its least recently used one (removed from the store, its slot reused). So
the tenant -> replica assignment is made by Ray Serve's router, not by a cluster layer here.

Inside a replica, a ``jaxmt.Scheduler`` merges the concurrent requests of different tenants
into shared steps (Ray Serve's own ``@serve.batch`` splits batches by model id, which is
exactly the merging jaxmt exists for).

HTTP (JSON in and out; the path's last segment picks the route):

  POST .../predict  header ``serve_multiplexed_model_id: <tenant>``, body
                    ``{"rows": [[...], ...]}`` (optionally ``"tenant"``, which must match the
                    header, and ``"slo_ms"``) -> ``{"tenant", "replica", "outputs"}``;
                    NaN and Inf outputs (JSON has neither) come as ``null``.
                    Errors: 400 bad input, 404 unknown tenant, 503 overloaded (also a
                    tenant unloaded under its request ``EVICTION_RETRIES`` times: more
                    tenants active than a replica holds), 500 otherwise, each as
                    ``{"error": <exception name>, "message": ...}``.
  GET  .../metrics  Prometheus text of this replica (``jaxmt.metrics.to_prometheus``).
  GET  .../tenants  ``{"replica", "tenants"}``: the tenants this replica holds.

Example (needs ``pip install 'jaxmt[ray]'``)::

    from ray import serve
    import jaxmt.serve
    app = jaxmt.serve.build_app(make_model, load_params, num_replicas=2)
    serve.run(app, route_prefix="/")
    requests.post("http://127.0.0.1:8000/predict", json={"rows": rows},
                  headers=jaxmt.serve.tenant_headers("alice"))
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import threading
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

try:
    from ray import serve
except ImportError as exc:  # pragma: no cover - exercised only without ray
    raise ImportError("jaxmt.serve needs Ray Serve: pip install 'jaxmt[ray]' (ray[serve])") from exc

from jaxmt.errors import (
    InputError,
    Overloaded,
    ParamMismatchError,
    SchedulerClosed,
    UnknownTenantError,
)
from jaxmt.metrics import to_prometheus
from jaxmt.model import MultiTenantModel
from jaxmt.scheduler import Scheduler

PyTree = Any

TENANT_HEADER = "serve_multiplexed_model_id"  # Ray Serve's multiplexed model id header

_HTTP_STATUS: tuple[tuple[type[BaseException], int], ...] = (
    (UnknownTenantError, 404),
    (ParamMismatchError, 500),  # load_params returned params of another architecture: a server fault
    (InputError, 400),
    (Overloaded, 503),
    (SchedulerClosed, 503),
    (ValueError, 400),  # the scheduler's check of slo_ms
)


# Loads of one request's tenant before it is answered 503: under more active tenants than a
# replica holds, each load may unload a tenant whose request is still queued.
EVICTION_RETRIES = 4


def tenant_headers(tenant_id: str) -> dict[str, str]:
    """The HTTP headers that route a request to a replica holding ``tenant_id``."""
    return {TENANT_HEADER: str(tenant_id)}


def _jsonable(outputs: PyTree) -> PyTree:
    """Outputs as JSON values: floats as float64, NaN and Inf (which JSON cannot hold) as null."""
    def leaf(a: Any) -> Any:
        a = np.asarray(a)
        if not jnp.issubdtype(a.dtype, jnp.floating):
            return a.tolist()
        a = a.astype(np.float64)
        finite = np.isfinite(a)
        if finite.all():
            return a.tolist()
        values = a.astype(object)
        values[~finite] = None
        return values.tolist()

    return jax.tree_util.tree_map(leaf, outputs)


def _decode_rows(values: Any, dtype: Any, tenant_id: str) -> np.ndarray:
    """JSON rows (or a handle's NumPy array) as an array of the model's dtype, exactly: a value
    the dtype would change (0.5 or 2.75 as an integer, 300 or -1 as uint8, 1e10 as float16) is
    the request's error, not a silent cast that answers other rows than the client sent.
    Floats may round to a float dtype; integers must come back from it as they were.

    The rows are converted from Python objects once (on a 2-core CPU, 23 ms for four
    224x224x3 images), then cast: the checks work on arrays.

    Raises:
      InputError: not a numeric array, or a value the dtype cannot hold as it is.
    """
    dtype = np.dtype(dtype)
    try:
        given = np.asarray(values)
        if given.dtype.kind not in "biuf":  # integers beyond 64 bits are Python objects; text is parsed
            given = np.asarray(values, dtype=np.float64)  # OverflowError: an integer beyond float64
        with np.errstate(over="ignore", invalid="ignore"):  # found below, not warned about
            rows = given.astype(dtype)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InputError(f"rows of tenant {tenant_id!r} are not a numeric array of {dtype}: {exc}") from None
    if rows.dtype.kind in "biu":
        with np.errstate(over="ignore", invalid="ignore"):
            changed = rows.astype(given.dtype) != given
        if changed.any():
            raise InputError(f"rows of tenant {tenant_id!r} hold {_first(given, changed)}, which {dtype.name} cannot hold as it is "
                             f"(a fraction, or a number beyond its range)")
    elif rows.dtype.kind == "f" and not np.array_equal(np.isfinite(rows), np.isfinite(given)):
        raise InputError(f"rows of tenant {tenant_id!r} hold {_first(given, np.isfinite(rows) != np.isfinite(given))}, "
                         f"beyond the range of {dtype.name}")
    return rows


def _first(given: np.ndarray, where: np.ndarray) -> str:
    """The first value of ``given`` where ``where`` holds, and its index, for a message."""
    index = tuple(int(i) for i in np.argwhere(where)[0])
    return f"{given[index].item()!r} at {list(index)}"


def _replica_name() -> str:
    context = serve.get_replica_context()
    tag = getattr(context, "replica_tag", None)
    return str(tag if tag is not None else context.replica_id.unique_id)


class _ResidentTenant:
    """One tenant loaded into a replica: what Ray Serve's multiplexed cache holds.

    Ray Serve calls ``__del__`` when it unloads the tenant (LRU); the garbage collector may
    call it again later, so release is keyed by a load generation and happens once. It only
    queues the release: the collector may run it on any thread, one that holds the replica's
    or the store's lock among them, so the replica frees the slot at its next load (or
    before it lists its tenants or metrics).
    """

    def __init__(self, owner: TenantReplica, tenant_id: str, generation: int):
        self.owner, self.tenant_id, self.generation = owner, tenant_id, generation

    def __del__(self) -> None:
        try:
            self.owner._releases.append((self.tenant_id, self.generation))  # atomic: no lock taken here
        except Exception:  # interpreter shutdown or a closed replica: nothing left to free
            pass


class TenantReplica:
    """One replica: a ``MultiTenantModel`` for its shard of tenants, served by a Scheduler.

    ``build_app`` deploys a subclass whose ``_tenant(tenant_id)`` is the ``@serve.multiplexed``
    loader with the application's per-replica limit (Ray Serve fixes the limit when the
    method is decorated, so each limit gets its class).

    Args:
      model_factory: ``() -> MultiTenantModel`` with no tenants, built on the replica; its
        row shape and dtype must be given (JSON rows are decoded into them).
      load_params: ``tenant_id -> params`` for one tenant; raising KeyError (or
        ``UnknownTenantError``) means the tenant does not exist (HTTP 404).
      max_tenants_per_replica: tenants held at once; the store is reserved to this size so
        that loading never recompiles.
      warmup: compile the model's bucket ladder at start (no compile on the request path).
      scheduler_options: keyword arguments of ``jaxmt.Scheduler`` (``default_slo_ms``, ...).
    """

    def __init__(
        self,
        model_factory: Callable[[], MultiTenantModel],
        load_params: Callable[[str], PyTree],
        max_tenants_per_replica: int = 64,
        warmup: bool = True,
        scheduler_options: Mapping[str, Any] | None = None,
    ):
        model = model_factory()
        if not isinstance(model, MultiTenantModel):
            raise TypeError(f"model_factory must return a jaxmt.MultiTenantModel, got {type(model).__name__}")
        if model.row_shape is None:
            raise ValueError("model_factory must give the model row_shape and row_dtype: JSON rows are decoded into them")
        if len(model):
            raise ValueError(f"model_factory must return a model without tenants, got {len(model)}")
        self.model = model
        self.model.store.reserve(max_tenants_per_replica)
        if warmup:
            self.model.warmup()
        self.scheduler = Scheduler(self.model, **dict(scheduler_options or {}))
        self.replica = _replica_name()
        self._load_params = load_params
        self._lock = threading.Lock()
        self._releases: collections.deque[tuple[str, int]] = collections.deque()  # queued by unloaded tenants
        self._generation_of: dict[str, int] = {}
        self._generations = itertools.count()

    # ------------------------------------------------------------ requests
    async def __call__(self, request: Any) -> Any:
        """The HTTP routes (see the module docstring)."""
        from starlette.responses import JSONResponse, PlainTextResponse

        route = request.url.path.rstrip("/").rsplit("/", 1)[-1]
        if request.method == "GET" and route == "metrics":
            return PlainTextResponse(self.metrics_text(), media_type="text/plain; version=0.0.4")
        if request.method == "GET" and route == "tenants":
            self._release_unloaded()
            return JSONResponse({"replica": self.replica, "tenants": [str(t) for t in self.model.tenants]})
        if request.method != "POST" or route != "predict":
            return JSONResponse({"error": "NotFound", "message": "routes: POST predict, GET metrics, GET tenants"}, 404)
        try:
            tenant_id, rows, slo_ms = await self._decode(request)
            outputs = await self._predict(tenant_id, rows, slo_ms)
        except Exception as exc:
            status = next((code for kind, code in _HTTP_STATUS if isinstance(exc, kind)), 500)
            return JSONResponse({"error": type(exc).__name__, "message": str(exc)}, status)
        return JSONResponse({"tenant": tenant_id, "replica": self.replica, "outputs": _jsonable(outputs)})

    async def predict(self, rows: Any, slo_ms: float | None = None) -> PyTree:
        """For deployment handles: ``handle.options(multiplexed_model_id=tenant).predict.remote(rows)``."""
        tenant_id = serve.get_multiplexed_model_id()
        if not tenant_id:
            raise InputError("no tenant: call through handle.options(multiplexed_model_id=<tenant>)")
        return await self._predict(tenant_id, _decode_rows(rows, self.model.row_dtype, tenant_id), slo_ms)

    def metrics_text(self) -> str:
        """This replica's scheduler metrics and model stats in Prometheus text format."""
        self._release_unloaded()  # the tenants counted are those the replica holds
        metrics = self.scheduler.metrics()
        model_stats = {k: v for k, v in self.model.stats().items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        metrics["steps"] = {**model_stats, **metrics.get("steps", {})}
        metrics["server"] = f"{metrics.get('server', 'jaxmt')}@{self.replica}"
        return to_prometheus(metrics)

    # ----------------------------------------------------------- internals
    async def _decode(self, request: Any) -> tuple[str, np.ndarray, float | None]:
        header_tenant = serve.get_multiplexed_model_id()
        try:
            body = json.loads(await request.body())
        except ValueError as exc:
            raise InputError(f"the request body is not JSON: {exc}") from None
        if not isinstance(body, dict) or "rows" not in body:
            raise InputError('the request body must be a JSON object {"rows": [[...], ...]}')
        body_tenant = body.get("tenant")
        if header_tenant and body_tenant is not None and str(body_tenant) != header_tenant:
            raise InputError(f"tenant {body_tenant!r} in the body differs from {header_tenant!r} in the {TENANT_HEADER} header")
        tenant_id = header_tenant or (None if body_tenant is None else str(body_tenant))
        if not tenant_id:
            raise InputError(f"no tenant: send the {TENANT_HEADER} header (it routes the request to the tenant's replica)")
        rows = _decode_rows(body["rows"], self.model.row_dtype, tenant_id)
        if rows.shape[1:] != tuple(self.model.row_shape):
            raise InputError(
                f"rows of tenant {tenant_id!r} have shape {list(rows.shape)}, expected [r, {', '.join(map(str, self.model.row_shape))}]"
            )
        slo_ms = body.get("slo_ms")
        if slo_ms is not None and (isinstance(slo_ms, bool) or not isinstance(slo_ms, (int, float))):
            raise InputError(f"slo_ms of tenant {tenant_id!r} must be a number of milliseconds, got {slo_ms!r}")
        return tenant_id, rows, slo_ms

    async def _predict(self, tenant_id: str, rows: np.ndarray, slo_ms: float | None) -> PyTree:
        for _ in range(EVICTION_RETRIES):
            # Loads it here on first use, unloading the LRU tenant if full; a tenant that
            # load_params does not know raises UnknownTenantError here (a 404).
            await self._tenant(tenant_id)
            try:
                return await self.scheduler.submit_async(tenant_id, rows, slo_ms)
            except UnknownTenantError:  # unloaded by concurrent loads between our load and the step
                continue
        raise Overloaded(
            f"tenant {tenant_id!r} was unloaded {EVICTION_RETRIES} times before its request ran: replica {self.replica} "
            f"has more tenants active than it holds at once (max_tenants_per_replica)"
        )

    async def _load(self, tenant_id: str) -> _ResidentTenant:
        def install() -> int:
            try:
                params = self._load_params(tenant_id)
            except UnknownTenantError:
                raise
            except KeyError:
                raise UnknownTenantError(tenant_id) from None
            except Exception as exc:  # a server fault (HTTP 500), even a ValueError: not the request's
                raise RuntimeError(f"load_params({tenant_id!r}) failed: {type(exc).__name__}: {exc}") from exc
            with self._lock:
                self._release_unloaded_locked()  # the slots of tenants Ray Serve unloaded to make room
                if tenant_id in self.model:
                    self.model.update_tenant(tenant_id, params)
                else:
                    self.model.add_tenant(tenant_id, params)
                generation = self._generation_of[tenant_id] = next(self._generations)
                return generation

        return _ResidentTenant(self, tenant_id, await asyncio.to_thread(install))

    def _release_unloaded(self) -> None:
        """Drains the queue unless a load holds the lock (and drains it itself): called on the
        event loop, which must not wait for a load's write, the first of which compiles."""
        if self._lock.acquire(blocking=False):
            try:
                self._release_unloaded_locked()
            finally:
                self._lock.release()

    def _release_unloaded_locked(self) -> None:
        """Removes the tenants whose unloads are queued, each once per load generation."""
        while self._releases:
            tenant_id, generation = self._releases.popleft()
            if self._generation_of.get(tenant_id) != generation:
                continue  # already released, or loaded again since
            del self._generation_of[tenant_id]
            if tenant_id in self.model:
                self.model.remove_tenant(tenant_id)

    def __del__(self) -> None:
        scheduler = getattr(self, "scheduler", None)
        if scheduler is not None:
            scheduler.close(drain=False, timeout=5.0)


def _replica_class(max_tenants_per_replica: int) -> type[TenantReplica]:
    class MultiplexedTenantReplica(TenantReplica):
        @serve.multiplexed(max_num_models_per_replica=max_tenants_per_replica)
        async def _tenant(self, tenant_id: str) -> _ResidentTenant:
            """The tenant, loaded on first use; Ray Serve unloads the least recently used beyond the limit."""
            return await self._load(tenant_id)

    return MultiplexedTenantReplica


def build_app(
    model_factory: Callable[[], MultiTenantModel],
    load_params: Callable[[str], PyTree],
    *,
    num_replicas: int = 2,
    max_tenants_per_replica: int = 64,
    warmup: bool = True,
    scheduler_options: Mapping[str, Any] | None = None,
    name: str = "jaxmt",
    ray_actor_options: Mapping[str, Any] | None = None,
) -> Any:
    """A Ray Serve application of ``num_replicas`` replicas, each holding a shard of tenants.

    ``model_factory`` and ``load_params`` are pickled to the replicas (see ``TenantReplica``
    for their contract). ``ray_actor_options`` reserves each replica's resources (e.g.
    ``{"num_gpus": 1}``: one accelerator per replica).

    Returns:
      A ``ray.serve.Application`` for ``serve.run(app, route_prefix=...)``.

    Raises:
      ValueError: ``num_replicas`` or ``max_tenants_per_replica`` is below 1.
    """
    if num_replicas < 1 or max_tenants_per_replica < 1:
        raise ValueError(f"num_replicas and max_tenants_per_replica must be >= 1, got {num_replicas} and {max_tenants_per_replica}")
    options: dict[str, Any] = {"name": name, "num_replicas": int(num_replicas)}
    if ray_actor_options is not None:
        options["ray_actor_options"] = dict(ray_actor_options)
    deployment = serve.deployment(_replica_class(int(max_tenants_per_replica)))
    return deployment.options(**options).bind(
        model_factory, load_params, int(max_tenants_per_replica), bool(warmup), dict(scheduler_options or {})
    )


__all__ = ["TENANT_HEADER", "TenantReplica", "build_app", "tenant_headers"]
