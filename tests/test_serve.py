"""The Ray Serve deployment: tenants routed by id to the replicas holding them, answers exact.

Starts a local Ray (2 CPUs) with two replicas on CPU and talks to them over HTTP. Skipped
when Ray Serve is not installed (``pip install 'jaxmt[ray]'``).
"""

from __future__ import annotations

import json
import re
import socket
import sys
import time
import types
import urllib.error
import urllib.request

import numpy as np
import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

import jax

import jaxmt.serve

# Ray starts its processes with fork+exec, which JAX's fork warning cannot tell from a bare fork.
pytestmark = pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")

MODEL = ("mlp", "tiny")
MAX_TENANTS = 2  # per replica: 6 tenants over 2 replicas must evict and reload
SEED_OF = {f"t{i}": 100 + i for i in range(6)}  # the tenants that exist; others are unknown (404)


def make_model():
    """A replica's empty model (runs on the replica; only importable names inside)."""
    import jaxmt
    import models

    spec = models.make(*MODEL)
    return jaxmt.MultiTenantModel(
        spec.apply_fn, spec.init(0), capacity=4, buckets=jaxmt.BucketPolicy.powers_of_two(4, 4),
        row_shape=spec.input_shape, row_dtype=spec.input_dtype,
    )


def load_params(tenant_id: str):
    import models

    return models.make(*MODEL).init(SEED_OF[tenant_id])  # KeyError: no such tenant


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: object, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json", **(headers or {})}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=60) as response:
        return response.read().decode()


@pytest.fixture(scope="module")
def server():
    # The factories above travel to the replicas by value (this test module is not importable there).
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = jaxmt.serve.build_app(
            make_model, load_params, num_replicas=2, max_tenants_per_replica=MAX_TENANTS,
            scheduler_options={"default_slo_ms": 30_000.0, "max_delay_ms": 1.0},
            ray_actor_options={"num_cpus": 1},
        )
        handle = serve.run(app, name="jaxmt_test", route_prefix="/", blocking=False)
        yield f"http://127.0.0.1:{port}", handle
    finally:
        serve.shutdown()
        ray.shutdown()


def _reference(tenant_id: str, rows: np.ndarray) -> np.ndarray:
    import models

    spec = models.make(*MODEL)
    return np.asarray(jax.jit(spec.apply_fn)(spec.init(SEED_OF[tenant_id]), rows))


def test_requests_are_answered_by_their_tenants_replica(server):
    url, _ = server
    spec_rows = make_model().row_shape
    rng = np.random.default_rng(0)
    replica_of = {}
    for tenant in ["t0", "t1", "t2", "t3"]:  # first contact: each lands on the replica with fewest tenants
        rows = rng.standard_normal((int(rng.integers(1, 6)), *spec_rows)).astype(np.float32)
        status, answer = _post(f"{url}/predict", {"rows": rows.tolist()}, jaxmt.serve.tenant_headers(tenant))
        assert status == 200, answer
        assert answer["tenant"] == tenant
        np.testing.assert_allclose(np.asarray(answer["outputs"]), _reference(tenant, rows), rtol=1e-5, atol=1e-5)
        replica_of[tenant] = answer["replica"]
        time.sleep(2.0)  # let the replica's tenant list reach the router (a generous bound: it took well under 0.5 s here)
    assert len(set(replica_of.values())) == 2, f"tenants were not spread over both replicas: {replica_of}"
    for _ in range(2):  # later requests go where the tenant already is
        for tenant, replica in replica_of.items():
            rows = rng.standard_normal((3, *spec_rows)).astype(np.float32)
            status, answer = _post(f"{url}/predict", {"tenant": tenant, "rows": rows.tolist()}, jaxmt.serve.tenant_headers(tenant))
            assert status == 200 and answer["replica"] == replica, (tenant, answer.get("replica"), replica)
            np.testing.assert_allclose(np.asarray(answer["outputs"]), _reference(tenant, rows), rtol=1e-5, atol=1e-5)


def test_deployment_handle_routes_by_multiplexed_id(server):
    _, handle = server
    rows = np.random.default_rng(1).standard_normal((2, *make_model().row_shape)).astype(np.float32)
    got = handle.options(multiplexed_model_id="t4", method_name="predict").remote(rows.tolist()).result(timeout_s=60)
    np.testing.assert_allclose(np.asarray(got), _reference("t4", rows), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "body, headers, status, error",
    [
        ({"rows": [[0.5] * 3]}, {"serve_multiplexed_model_id": "t0"}, 400, "InputError"),  # wrong row width
        ({"rows": "not rows"}, {"serve_multiplexed_model_id": "t0"}, 400, "InputError"),
        ({"values": []}, {"serve_multiplexed_model_id": "t0"}, 400, "InputError"),
        ({"rows": [[0.5] * 8]}, {}, 400, "InputError"),  # no tenant
        ({"tenant": "t1", "rows": [[0.5] * 8]}, {"serve_multiplexed_model_id": "t0"}, 400, "InputError"),
        ({"rows": [[0.5] * 8]}, {"serve_multiplexed_model_id": "nobody"}, 404, "UnknownTenantError"),
        ({"rows": [[0.5] * 8], "slo_ms": "soon"}, {"serve_multiplexed_model_id": "t0"}, 400, "InputError"),
        ({"rows": [[0.5] * 8], "slo_ms": -5}, {"serve_multiplexed_model_id": "t0"}, 400, "ValueError"),
    ],
)
def test_bad_requests_get_a_status_and_the_error_name(server, body, headers, status, error):
    url, _ = server
    if body.get("rows") == [[0.5] * 8]:
        body = {**body, "rows": [[0.5] * make_model().row_shape[0]]}
    got_status, answer = _post(f"{url}/predict", body, headers)
    assert (got_status, answer["error"]) == (status, error), answer
    assert answer["message"]
    assert "nobody" not in json.loads(_get(f"{url}/tenants"))["tenants"]  # a failed load leaves no tenant behind


def test_more_tenants_than_slots_are_evicted_and_reloaded(server):
    url, _ = server
    rng = np.random.default_rng(2)
    shape = make_model().row_shape
    for _ in range(2):
        for tenant in SEED_OF:
            rows = rng.standard_normal((2, *shape)).astype(np.float32)
            status, answer = _post(f"{url}/predict", {"rows": rows.tolist()}, jaxmt.serve.tenant_headers(tenant))
            assert status == 200, answer
            np.testing.assert_allclose(np.asarray(answer["outputs"]), _reference(tenant, rows), rtol=1e-5, atol=1e-5)
    for _ in range(6):
        listing = json.loads(_get(f"{url}/tenants"))
        assert len(listing["tenants"]) <= MAX_TENANTS, listing


def test_metrics_and_tenants_routes(server):
    url, _ = server
    text = _get(f"{url}/metrics")
    assert "# TYPE jaxmt_requests_total counter" in text
    assert "jaxmt_step_resident_tenants" in text and 'server="jaxmt@' in text
    listing = json.loads(_get(f"{url}/tenants"))
    assert set(listing) == {"replica", "tenants"} and set(listing["tenants"]) <= set(SEED_OF)


def test_build_app_validates():
    with pytest.raises(ValueError, match="num_replicas"):
        jaxmt.serve.build_app(make_model, load_params, num_replicas=0)


@pytest.mark.parametrize("rows", [[[1, 2, 300]], [[1, 2, -1]], [[1, 2, {"a": 1}]], "not rows"])
def test_rows_a_pixel_model_cannot_hold_are_input_errors_not_server_errors(monkeypatch, rows):
    """uint8 rows out of range (300, -1) raise OverflowError in NumPy: a 400, not a 500."""
    import asyncio
    import types

    monkeypatch.setattr(jaxmt.serve.serve, "get_multiplexed_model_id", lambda: "t0")
    replica = types.SimpleNamespace(model=types.SimpleNamespace(row_dtype=np.dtype(np.uint8), row_shape=(3,)))

    class Request:
        async def body(self):
            return json.dumps({"rows": rows}).encode()

    with pytest.raises(jaxmt.InputError, match="rows of tenant 't0'"):
        asyncio.run(jaxmt.serve.TenantReplica._decode(replica, Request()))


@pytest.mark.parametrize("dtype, rows, named", [
    (np.uint8, [[0.5, 1.0, 2.0]], "0.5 at [0, 0]"),  # normalised pixels sent to a uint8 model: all would be 0
    (np.int32, [[1, 2, 2.75]], "2.75 at [0, 2]"),
    (np.float16, [[1e10, 0.0, 0.0]], "10000000000.0 at [0, 0]"),  # beyond float16: would be inf
    (np.float32, [[1e300, 0.0, 0.0]], "1e+300 at [0, 0]"),
])
def test_rows_the_models_dtype_would_change_are_input_errors_not_other_rows(monkeypatch, dtype, rows, named):
    """JSON numbers that the model's dtype cannot hold as they are (0.5 as uint8 is 0, 1e10
    as float16 is inf) are a 400: casting them silently answered other rows than the client's."""
    import asyncio
    import types

    monkeypatch.setattr(jaxmt.serve.serve, "get_multiplexed_model_id", lambda: "t0")
    replica = types.SimpleNamespace(model=types.SimpleNamespace(row_dtype=np.dtype(dtype), row_shape=(3,)))

    class Request:
        async def body(self):
            return json.dumps({"rows": rows}).encode()

    with pytest.raises(jaxmt.InputError, match="rows of tenant 't0' hold " + re.escape(named)):
        asyncio.run(jaxmt.serve.TenantReplica._decode(replica, Request()))


@pytest.mark.parametrize("dtype, rows", [(np.uint8, [[0, 1.0, 255]]), (np.float32, [[0.1, -2.5, 3]]), (np.int64, [[2**62, -1, 0]])])
def test_rows_the_models_dtype_holds_are_decoded_exactly(monkeypatch, dtype, rows):
    import asyncio
    import types

    monkeypatch.setattr(jaxmt.serve.serve, "get_multiplexed_model_id", lambda: "t0")
    replica = types.SimpleNamespace(model=types.SimpleNamespace(row_dtype=np.dtype(dtype), row_shape=(3,)))

    class Request:
        async def body(self):
            return json.dumps({"rows": rows}).encode()

    tenant, got, slo_ms = asyncio.run(jaxmt.serve.TenantReplica._decode(replica, Request()))
    assert (tenant, got.dtype, slo_ms) == ("t0", np.dtype(dtype), None)
    np.testing.assert_array_equal(got, np.asarray(rows, dtype=dtype))


@pytest.mark.parametrize("dtype, rows", [
    (np.uint8, np.array([[-1, 300, 2]])),  # a handle's NumPy ints: would wrap to 255 and 44
    (np.int32, np.array([[2**40, 1, 2]])),  # would wrap to 0
    (np.float16, [[10**20, 0, 0]]),  # a JSON integer beyond int64: would be inf
    (np.uint8, [[True, 2, 3.5]]),
])
def test_handle_rows_the_models_dtype_would_change_are_input_errors(monkeypatch, dtype, rows):
    """``handle.predict.remote(rows)`` takes NumPy arrays too, whose integers NumPy casts
    silently (modulo the dtype's range), and JSON integers beyond int64 decode as Python
    objects: both are held to the dtype as JSON numbers are, not answered as other rows."""
    import asyncio
    import types

    monkeypatch.setattr(jaxmt.serve.serve, "get_multiplexed_model_id", lambda: "t0")
    served = []

    async def predict(tenant_id, x, slo_ms):
        served.append(x)

    replica = types.SimpleNamespace(model=types.SimpleNamespace(row_dtype=np.dtype(dtype), row_shape=(3,)), _predict=predict)
    with pytest.raises(jaxmt.InputError, match="rows of tenant 't0'"):
        asyncio.run(jaxmt.serve.TenantReplica.predict(replica, rows))
    assert served == []


@pytest.mark.parametrize("dtype, rows", [(np.uint8, np.array([[0, 7, 255]])), (np.float32, np.array([[0.1, -2.5, 3.0]])),
                                         (np.int8, [[True, False, -128]]), (np.float64, [[2**70, 1, 0]])])
def test_handle_rows_the_models_dtype_holds_are_served_as_given(monkeypatch, dtype, rows):
    import asyncio
    import types

    monkeypatch.setattr(jaxmt.serve.serve, "get_multiplexed_model_id", lambda: "t0")
    served = []

    async def predict(tenant_id, x, slo_ms):
        served.append(x)

    replica = types.SimpleNamespace(model=types.SimpleNamespace(row_dtype=np.dtype(dtype), row_shape=(3,)), _predict=predict)
    asyncio.run(jaxmt.serve.TenantReplica.predict(replica, rows))
    assert served[0].dtype == np.dtype(dtype)
    np.testing.assert_array_equal(served[0], np.asarray(rows, dtype=dtype))


def test_nonfinite_outputs_are_json_nulls():
    """JSON has no NaN or Inf: such outputs go out as null, the rest as float64 values."""
    out = jaxmt.serve._jsonable({"logits": np.array([[1.5, np.nan], [-np.inf, 2.0]], np.float32), "ids": np.array([1, 2])})
    assert out == {"logits": [[1.5, None], [None, 2.0]], "ids": [1, 2]}
    json.dumps(out, allow_nan=False)  # what the response's encoder demands


def _evicting_replica(unloads: int, known: bool = True):
    """A replica stand-in whose tenant is unloaded ``unloads`` times between its load and its
    request's step (more active tenants than the replica holds), for ``TenantReplica._predict``."""
    import types

    loads = []

    async def tenant(tenant_id):
        if not known:
            raise jaxmt.UnknownTenantError(tenant_id, 0)
        loads.append(tenant_id)

    async def submit_async(tenant_id, rows, slo_ms):
        if len(loads) <= unloads:
            raise jaxmt.UnknownTenantError(tenant_id, 1)
        return rows * 2

    replica = types.SimpleNamespace(_tenant=tenant, scheduler=types.SimpleNamespace(submit_async=submit_async), replica="r0")
    return replica, loads


@pytest.mark.parametrize("unloads", [0, 1, jaxmt.serve.EVICTION_RETRIES - 1])
def test_a_tenant_unloaded_before_its_step_is_loaded_again(unloads):
    import asyncio

    replica, loads = _evicting_replica(unloads)
    got = asyncio.run(jaxmt.serve.TenantReplica._predict(replica, "t0", np.ones(2), None))
    np.testing.assert_array_equal(got, [2, 2])
    assert loads == ["t0"] * (unloads + 1)


def test_a_tenant_unloaded_every_time_is_overloaded_and_an_unknown_one_is_unknown():
    import asyncio

    replica, loads = _evicting_replica(unloads=10**6)
    with pytest.raises(jaxmt.Overloaded, match=f"unloaded {jaxmt.serve.EVICTION_RETRIES} times"):  # a 503, not a 404
        asyncio.run(jaxmt.serve.TenantReplica._predict(replica, "t0", np.ones(2), None))
    assert len(loads) == jaxmt.serve.EVICTION_RETRIES
    replica, _ = _evicting_replica(unloads=0, known=False)
    with pytest.raises(jaxmt.UnknownTenantError):
        asyncio.run(jaxmt.serve.TenantReplica._predict(replica, "nobody", np.ones(2), None))


def test_a_load_params_failure_is_a_server_error_not_a_bad_request(monkeypatch):
    """load_params raising ValueError (a corrupt weights file, a CheckpointError) is the
    server's fault: 500, as documented ("500 otherwise"), not 400 "bad input"."""
    import asyncio
    import types

    monkeypatch.setattr(jaxmt.serve, "_replica_name", lambda: "r0")
    monkeypatch.setattr(jaxmt.serve.serve, "get_multiplexed_model_id", lambda: "t0")

    def broken_load(tenant_id):
        raise ValueError("the weights file is corrupt")

    replica = jaxmt.serve.TenantReplica(make_model, broken_load, max_tenants_per_replica=2, warmup=False)
    replica._tenant = replica._load  # what the @serve.multiplexed subclass calls, without Ray's cache

    class Request:
        method = "POST"
        url = types.SimpleNamespace(path="/predict")

        async def body(self):
            return json.dumps({"rows": [[0.5] * replica.model.row_shape[0]]}).encode()

    try:
        response = asyncio.run(replica(Request()))
    finally:
        replica.scheduler.close(drain=False)
    answer = json.loads(response.body)
    assert response.status_code == 500, answer
    assert "corrupt" in answer["message"]


def test_an_unloaded_tenant_is_released_once_without_taking_a_lock_in_its_finaliser(monkeypatch):
    """The garbage collector may finalise an unloaded tenant on a thread that holds the
    replica's lock (a load in progress): the finaliser must not wait for that lock. Its slot
    is freed at the replica's next load, once per load generation."""
    import asyncio
    import threading

    monkeypatch.setattr(jaxmt.serve, "_replica_name", lambda: "r0")
    replica = jaxmt.serve.TenantReplica(make_model, load_params, max_tenants_per_replica=2, warmup=False)
    first = asyncio.run(replica._load("t0"))
    stale = jaxmt.serve._ResidentTenant(replica, "t0", first.generation - 1)  # an earlier load's

    def finalise_while_locked():
        with replica._lock:
            first.__del__()
            stale.__del__()

    finaliser = threading.Thread(target=finalise_while_locked, daemon=True)
    finaliser.start()
    finaliser.join(timeout=10)
    assert not finaliser.is_alive(), "the finaliser waited for the replica's lock"
    held = [asyncio.run(replica._load("t1"))]  # as Ray Serve's cache holds what it loaded
    assert replica.model.tenants == ["t1"]
    first.__del__()  # the collector again, after Ray Serve's explicit call: nothing left to free
    held += [asyncio.run(replica._load("t0")), asyncio.run(replica._load("t2"))]
    assert sorted(replica.model.tenants) == ["t0", "t1", "t2"] and held[1].generation != first.generation


def test_a_late_finaliser_of_an_earlier_load_leaves_the_tenant_loaded_since(monkeypatch):
    """The collector may finalise a load's object after Ray Serve unloaded it and the tenant
    was loaded again: that queued release belongs to the old load and frees nothing."""
    import asyncio

    monkeypatch.setattr(jaxmt.serve, "_replica_name", lambda: "r0")
    replica = jaxmt.serve.TenantReplica(make_model, load_params, max_tenants_per_replica=2, warmup=False)
    first = asyncio.run(replica._load("t0"))
    first.__del__()  # Ray Serve's unload
    held = [asyncio.run(replica._load("t0"))]  # loaded again: the queued release is drained first
    first.__del__()  # the collector, later
    held.append(asyncio.run(replica._load("t1")))  # drains the late release
    assert sorted(replica.model.tenants) == ["t0", "t1"]


def test_the_metrics_count_no_tenant_whose_unload_is_queued(monkeypatch):
    """GET metrics, like GET tenants, reports what the replica holds after the unloads queued so far."""
    import asyncio

    monkeypatch.setattr(jaxmt.serve, "_replica_name", lambda: "r0")
    replica = jaxmt.serve.TenantReplica(make_model, load_params, max_tenants_per_replica=2, warmup=False)
    asyncio.run(replica._load("t0")).__del__()  # loaded, then unloaded by Ray Serve
    assert 'jaxmt_step_resident_tenants{server="jaxmt@r0"} 0' in replica.metrics_text().splitlines()


@pytest.mark.parametrize("route", ["metrics", "tenants"])
def test_listing_tenants_or_metrics_never_waits_for_a_load_in_progress(monkeypatch, route):
    """Both routes run on the replica's event loop: waiting there for the lock a load holds
    (its first write compiles) would stall every request. The load drains the queue itself."""
    import asyncio
    import threading

    monkeypatch.setattr(jaxmt.serve, "_replica_name", lambda: "r0")
    replica = jaxmt.serve.TenantReplica(make_model, load_params, max_tenants_per_replica=2, warmup=False)
    request = types.SimpleNamespace(method="GET", url=types.SimpleNamespace(path=f"/{route}"))
    answered = []
    with replica._lock:  # as install() holds it
        listing = threading.Thread(target=lambda: answered.append(asyncio.run(replica(request))), daemon=True)
        listing.start()
        listing.join(timeout=10)
        assert answered and answered[0].status_code == 200, f"GET {route} waited for the load's lock"
