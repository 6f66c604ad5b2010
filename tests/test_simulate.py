"""scripts/simulate.py: the load generator's arithmetic and a smoke run of the command line."""

from __future__ import annotations

import gc
import json
import logging
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, load_script

import jaxmt

simulate = load_script(ROOT / "scripts" / "simulate.py", "jaxmt_simulate")


@pytest.mark.parametrize("arrival", ["poisson", "bursty"])
def test_arrivals_are_sorted_in_range_and_seeded(arrival):
    workload = simulate.Workload(rate=500.0, duration_s=2.0, tenants=5, zipf=1.2, arrival=arrival, seed=4)
    times, tenants = simulate.arrival_schedule(workload)
    assert np.all(np.diff(times) >= 0) and times.min() >= 0 and times.max() <= 2.0
    assert 700 <= times.shape[0] <= 1300 and tenants.min() >= 0 and tenants.max() < 5
    again, _ = simulate.arrival_schedule(workload)
    np.testing.assert_array_equal(times, again)
    counts = np.bincount(tenants, minlength=5)
    assert counts[0] > counts[4]  # Zipf: the first tenant is the most popular


def test_zipf_weights():
    weights = simulate.zipf_weights(4, 1.0)
    np.testing.assert_allclose(weights, np.array([1, 1 / 2, 1 / 3, 1 / 4]) / (25 / 12))
    np.testing.assert_allclose(simulate.zipf_weights(3, 0.0), [1 / 3] * 3)


@pytest.mark.parametrize("bad", [{"rate": 0.0}, {"arrival": "uniform"}, {"zipf": -1.0}, {"tenants": 0},
                                 {"zipf": float("nan")}, {"burst": float("nan")}, {"burst": float("inf")}, {"seed": -1}])
def test_workload_validation(bad):
    with pytest.raises(ValueError):
        simulate.Workload(**bad)


def test_help_and_bad_arguments(capsys):
    with pytest.raises(SystemExit) as info:
        simulate.parse_args(["--help"])
    assert info.value.code == 0 and "--scheduler" in capsys.readouterr().out
    assert simulate.main(["--rate", "-1", "--quiet"]) == 2


@pytest.mark.parametrize("argv, message", [
    (["--max-rows-bucket", "0"], "row_buckets"),
    (["--overload-factor", "-1"], "overload_factor"),
    (["--json", "/nonexistent-folder/x.json"], "--json /nonexistent-folder/x.json: its folder does not exist"),
    (["--rate", "1e9", "--duration", "1e9"], "at most 1e+07"),
    (["--seed", "-1"], "seed must be >= 0, got -1"),  # NumPy refused it only after the model was built and compiled
    (["--json", ""], "--json is empty"),  # "$OUT" of an unset variable: the run wrote no JSON, and exit code 0
    # Options the run would ignore are refused, as the train and batch commands do, saying why:
    (["--burst", "0.5"], "--burst applies to --arrival bursty only: poisson arrivals come one at a time"),  # was "burst ... >= 1"
    (["--burst", "4"], "--burst applies to --arrival bursty only"),  # was run as if not given
    (["--scheduler", "time", "--target-latency-ms", "30"], "--target-latency-ms paces jaxmt only: --scheduler time serves"),
], ids=["no rows", "negative overload factor", "no folder for the json", "too many requests", "negative seed", "empty json path",
        "tiny burst of poisson arrivals", "burst of poisson arrivals", "pacing a baseline alone"])
def test_bad_options_are_one_error_line_before_anything_runs(argv, message, capsys):
    assert simulate.main(["--duration", "0.2", "--quiet", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("simulate.py: error:") and message in err and "Traceback" not in err


@pytest.mark.parametrize("argv, burst", [([], 8.0), (["--burst", "3"], 3.0)], ids=["default", "given"])
def test_burst_sizes_the_bursts_of_bursty_arrivals(argv, burst, monkeypatch):
    workloads = []
    monkeypatch.setattr(simulate, "simulate", lambda workload, *args, **kwargs: workloads.append(workload) or {"results": []})
    assert simulate.main(["--quiet", "--arrival", "bursty", *argv]) == 0
    assert workloads[0].burst == burst


@pytest.mark.parametrize("option", ["--json", "--plot"])
def test_an_output_path_that_is_a_folder_is_refused_before_anything_runs(option, tmp_path, monkeypatch, capsys):
    """Writing the report to a folder fails after the whole run (IsADirectoryError): refuse it up front."""
    monkeypatch.setattr(simulate, "simulate", lambda *args, **kwargs: pytest.fail("the run started"))
    assert simulate.main(["--quiet", option, str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("simulate.py: error:") and f"{option} {tmp_path}" in err


@pytest.mark.parametrize("name", ["cdf", "cdf.plot"])
def test_the_plot_is_a_png_at_the_path_given_whatever_its_suffix(name, tmp_path):
    """--plot is a PNG file: matplotlib, left to pick a format by suffix, wrote "cdf" to
    cdf.png and refused ".plot" with a traceback once every trial had run."""
    pytest.importorskip("matplotlib")
    simulate.plot_cdf([{"scheduler": "jaxmt", "requests": 3, "_latencies_ms": [1.0, 2.0, 4.0]}], tmp_path / name, 50.0)
    assert [p.name for p in tmp_path.iterdir()] == [name]
    assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_plot_without_matplotlib_is_refused_before_anything_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    monkeypatch.setattr(simulate, "simulate", lambda *args, **kwargs: pytest.fail("the run started"))
    assert simulate.main(["--quiet", "--plot", str(tmp_path / "cdf.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("simulate.py: error: --plot needs matplotlib") and "Traceback" not in err


@pytest.fixture
def unfreeze_after():
    gc.unfreeze()  # so that a frozen heap afterwards is this run's doing
    yield
    gc.unfreeze()  # the run froze the heap of this test process


def test_smoke_run_writes_json_and_plot(tmp_path, capsys, unfreeze_after):
    json_path, plot_path = tmp_path / "sim.json", tmp_path / "cdf.png"
    code = simulate.main(["--scheduler", "all", "--tenants", "3", "--rate", "150", "--duration", "0.3",
                          "--max-rows-bucket", "2", "--overload-policy", "serve_late", "--slo-ms", "1000",
                          "--target-latency-ms", "200", "--json", str(json_path), "--plot", str(plot_path), "--quiet"])
    assert code == 0
    out = capsys.readouterr().out
    assert "by chance" in out
    report = json.loads(json_path.read_text())
    assert "burst" not in report["workload"]  # poisson arrivals: only the settings the run used are recorded
    assert [r["scheduler"] for r in report["results"]] == ["jaxmt", "exclusive", "time", "space"]
    for result in report["results"]:
        assert result["scheduler"] in out
        assert result["ok"] + result["errors"] + result["unfinished"] == result["requests"] > 0
        assert result["unfinished"] == 0 and result["errors"] == 0
        assert set(result["latency_ms"]) == {"p50_ms", "p90_ms", "p99_ms", "max_ms", "mean_ms"}
        assert 0.0 <= result["slo_attainment"] <= 1.0 and "spread" in result and result["per_tenant"]
        assert result["spread_by_chance"]["tenants_counted"] == result["spread"]["tenants_counted"]
        assert len(result["gc"]["collections"]) == 3 and result["gc"]["max_ms"] >= 0.0
    # jaxmt alone is paced (the baselines refuse a target; the script gives it to jaxmt only):
    # its requests wait for most of the 200 ms target, whatever this machine's speed.
    assert report["results"][0]["latency_ms"]["p50_ms"] > 100.0
    assert gc.get_freeze_count() > 0  # settle_heap froze the heap before the trials
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_build_model_stores_weights_in_the_compute_dtype(dtype):
    tol = 2e-2 if dtype == "bfloat16" else 1e-5
    spec, mt = simulate.build_model("mlp", "tiny", 3, max_rows=4, seed=7, dtype=jnp.dtype(dtype))
    leaves = jax.tree_util.tree_leaves(mt.get_params("t1"))
    assert leaves and all(leaf.dtype == jnp.dtype(dtype) for leaf in leaves if jnp.issubdtype(leaf.dtype, jnp.floating))
    x = spec.random_input(np.random.default_rng(5), 4)
    # Tenant "t<i>" holds the weights of seed + 1 + i, built independently of the store here.
    own = spec.init(7 + 1 + 1, jnp.dtype(dtype))
    want = np.asarray(jax.jit(spec.apply_fn)(own, x), np.float32)
    got = np.asarray(mt.predict(["t1"] * 4, x), np.float32)
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


def test_a_trial_logs_each_straggler_once_the_servers_own_flag(caplog):
    """Only the server under test flags tenants that keep missing their SLO; the trial's own
    recorder keeps every latency and logs nothing (it once logged each flag a second time,
    and summed its whole history on every request)."""
    spec, mt = simulate.build_model("mlp", "tiny", 2, max_rows=2)
    workload = simulate.Workload(rate=400.0, duration_s=0.25, tenants=2, slo_ms=0.01, seed=3)
    inputs = spec.random_input(np.random.default_rng(0), 2 * 4).reshape(2, 4, 1, *spec.input_shape)
    with caplog.at_level(logging.WARNING, logger="jaxmt"):
        with simulate.make_server("time", mt, overload_policy="serve_late") as server:
            result = simulate.run_trial(server, workload, inputs, mt.tenants)
            flagged = server.metrics()["flagged_tenants"]
    assert result["requests"] > 40 and result["slo_attainment"] == 0.0  # every request misses 10 us
    assert sorted(flagged) == sorted(mt.tenants)
    logged = [r.getMessage() for r in caplog.records if "keeps missing" in r.getMessage()]
    assert sorted(logged) == sorted(set(logged)) and len(logged) == len(mt.tenants)


class _StubServer:
    """Answers request i per ``plan[i % len(plan)]``: "ok" at once, "fail" with an error, "refuse"
    at submit, "never" (left unfinished); completes futures on a thread of its own, as servers do."""

    kind = "stub"

    def __init__(self, plan):
        import concurrent.futures as cf
        import threading

        self.plan, self.calls, self.hanging = plan, 0, []
        self._pool = cf.ThreadPoolExecutor(1)
        self._lock = threading.Lock()

    def submit(self, tenant, x, slo_ms, copy=True):
        import concurrent.futures as cf

        with self._lock:
            what = self.plan[self.calls % len(self.plan)]
            self.calls += 1
        if what == "refuse":
            raise jaxmt.Overloaded("refused at submit")
        future = cf.Future()
        if what == "never":
            self.hanging.append(future)
        elif what == "fail":
            self._pool.submit(future.set_exception, ValueError("step failed"))
        else:
            self._pool.submit(future.set_result, np.asarray(x))
        return future

    def metrics(self):
        return {"steps": {}, "staging": {}}

    def close(self):
        self._pool.shutdown()


def test_a_trial_accounts_every_request_once_answered_failed_refused_or_unfinished():
    plan = ["ok", "ok", "fail", "refuse", "ok", "never"]
    server = _StubServer(plan)
    workload = simulate.Workload(rate=2000.0, duration_s=0.1, tenants=3, slo_ms=1000.0, seed=5)
    inputs = np.zeros((3, 2, 1, 4), np.float32)
    try:
        result = simulate.run_trial(server, workload, inputs, ["a", "b", "c"], timeout_s=1.0)
    finally:
        server.close()
    n = result["requests"]
    want = {what: sum(plan[i % len(plan)] == what for i in range(n)) for what in set(plan)}
    assert n == server.calls > 50
    assert result["unfinished"] == want["never"]
    assert result["ok"] == want["ok"] and result["rejected"] == want["refuse"]
    assert result["errors"] == want["fail"] + want["refuse"]
    assert result["ok"] + result["errors"] + result["unfinished"] == n
    assert sum(t["count"] for t in result["per_tenant"].values()) == n - want["never"]
    assert result["slo_attainment"] == pytest.approx(want["ok"] / n)  # answered well within 1 s
    assert 0.0 <= result["latency_ms"]["p50_ms"] <= result["latency_ms"]["max_ms"] < 1000.0
