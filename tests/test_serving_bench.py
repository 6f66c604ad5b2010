"""benchmarks/serving.py: a CPU smoke run, its summary, and rebuilding a report from its file.

The smoke run drives two real servers with a short Poisson load; nothing here checks speed,
only that the benchmark measures, writes a complete file and reports it faithfully.
"""

from __future__ import annotations

import gc
import json
from concurrent.futures import Future

import numpy as np
import pytest
from conftest import benchmark_script


@pytest.fixture(scope="module")
def serving():
    with benchmark_script("serving.py", "jaxmt_serving_bench") as module:
        yield module
    gc.unfreeze()  # its runs froze the heap of this test process


class _NullServer:
    """A server for trials whose results are scripted: it loads and serves nothing."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def warmup(self, **kwargs):
        return 0

    def submit(self, tenant, x, slo_ms=None):
        raise AssertionError("not used")


def _trial(counts_and_means):
    per_tenant = {f"t{i}": {"count": n, "ok": n, "p50_ms": mean, "p99_ms": 2 * mean, "mean_ms": mean, "slo_attainment": 1.0}
                  for i, (n, mean) in enumerate(counts_and_means)}
    return {"per_tenant": per_tenant}


def test_the_well_sampled_spread_leaves_out_rarely_seen_tenants(serving):
    trial = _trial([(500, 5.0), (150, 5.2), (12, 9.0)])
    sampled = serving.well_sampled_spread(trial, min_count=100)
    assert sampled["tenants_counted"] == 2 and sampled["mean_latency_gap"] == pytest.approx(0.04)
    assert serving.well_sampled_spread(trial, min_count=10)["mean_latency_gap"] == pytest.approx(0.8)
    assert serving.well_sampled_spread(None)["tenants_counted"] == 0


def test_the_ratio_is_bounded_by_each_searchs_passing_and_first_failing_rates(serving):
    """A capacity lies between the highest passing rate and the lowest failing one above it
    (a superseded trial's verdict does not count); the ratio's bounds follow from both."""
    def result(kind, verdicts):
        trials = [{"offered_rps": rate, "passed": ok, **({"superseded": True} if sup else {})} for rate, ok, sup in verdicts]
        best = max((t["offered_rps"] for t in trials if t["passed"] and not t.get("superseded")), default=None)
        return {"scheduler": kind, "max_rate_rps": best, "trials": trials}

    jaxmt = result("jaxmt", [(100, True, False), (400, True, False), (800, False, True), (800, False, False), (600, False, False)])
    time_only = result("time", [(100, True, False), (200, False, False), (141.4, True, False)])
    space = result("space", [(100, True, False)])  # never failed: unbounded above
    assert serving.first_failing_rate(jaxmt) == 600 and serving.first_failing_rate(space) is None
    summary = serving.summarize([jaxmt, time_only, space])
    assert summary["jaxmt_over_best_baseline"] == pytest.approx(400 / 141.4, abs=1e-3)
    assert summary["jaxmt_over_best_baseline_bounds"] == [pytest.approx(2.0), pytest.approx(600 / 141.4, abs=1e-3)]
    assert "between 2 and 4.243" in summary["targets"]["jaxmt >= 3x best baseline"]


def test_a_quick_run_writes_a_complete_file_that_reports_again(serving, results_dir, capsys):
    assert serving.main(["--quick", "--no-readme", "--quiet", "--servers", "jaxmt,time"]) == 0
    data = json.loads((results_dir / "serving_quick.json").read_text())
    assert data["partial"] is False and [r["scheduler"] for r in data["results"]] == ["jaxmt", "time"]
    for result in data["results"]:
        assert result["max_rel_error"] < 1e-4 and result["trials"]
        steps = result["trials"][0]["server"]["steps"]  # where the answered requests' latency went
        assert steps["queue_wait_ms"]["p50_ms"] >= 0 and steps["in_step_ms"]["p50_ms"] > 0
        chance = result["at_max_rate"]["spread_by_chance"]  # the spread equal treatment would give
        assert chance["tenants_counted"] >= 2 and chance["mean_latency_gap"]["median"] >= 0
        assert "spread_by_chance_well_sampled" in result["at_max_rate"]
        assert not any("_samples_by_tenant" in t for t in result["trials"])
    assert set(data["summary"]["max_rate_rps"]) == {"jaxmt", "time"}
    capsys.readouterr()
    path = str(results_dir / "serving_quick.json")
    assert serving.main(["--report-only", path, "--no-readme"]) == 0
    assert "| jaxmt |" in capsys.readouterr().out
    data["partial"] = True  # a run cut short is not reported as if it were whole
    (results_dir / "partial.json").write_text(json.dumps(data))
    assert serving.main(["--report-only", str(results_dir / "partial.json")]) == 1


def test_host_only_keeps_the_input_rows_and_answers_like_its_reference(serving, results_dir):
    """``--host-only``: the architecture's input rows through next to no device work, checked
    against the stand-in's own per-tenant reference like any run."""
    args = serving.parse_args(["--host-only", "--arch", "resnet18", "--size", "tiny", "--tenants", "3"])
    spec, mt = serving.build_host_only(args)
    assert spec.input_shape == mt.row_shape and len(mt) == 3 and serving.default_out(args) == "serving_host_resnet18"
    assert serving.main(["--quick", "--host-only", "--no-readme", "--quiet", "--servers", "jaxmt"]) == 0
    data = json.loads((results_dir / "serving_quick.json").read_text())
    assert data["args"]["host_only"] and data["results"][0]["max_rel_error"] < 1e-4


@pytest.mark.parametrize("argv, out, title", [
    ([], "serving", "Serving"),
    (["--pixels"], "serving_pixels", "Serving: uint8 pixels"),
    (["--arch", "mobilenetv2"], "serving_mobilenetv2", "Serving: mobilenetv2"),
    (["--arch", "mobilenetv2", "--pixels"], "serving_mobilenetv2_pixels", "Serving: mobilenetv2, uint8 pixels"),
    (["--host-only"], "serving_host_resnet18", "Serving: host path"),
    (["--host-only", "--pixels"], "serving_host_resnet18_pixels", "Serving: host path, uint8 pixels"),
    (["--dtype", "bfloat16", "--pixels"], "serving_bf16_pixels", "Serving: bfloat16, uint8 pixels"),
    (["--arch", "mobilenetv2", "--dtype", "bfloat16"], "serving_mobilenetv2_bf16", "Serving: mobilenetv2, bfloat16"),
    (["--pixels", "--target-latency-ms", "35"], "serving_pixels_paced", "Serving: jaxmt paced to 35 ms, uint8 pixels"),
    (["--dtype", "bfloat16", "--pixels", "--target-latency-ms", "35", "--search-spread", "jaxmt"], "serving_bf16_pixels_paced_search_spread",
     "Serving: jaxmt paced to 35 ms, spread targets in jaxmt's verdict, bfloat16, uint8 pixels"),
])
def test_each_kind_of_run_has_its_own_results_file_and_readme_section(serving, argv, out, title):
    args = serving.parse_args(argv)
    assert serving.default_out(args) == out and serving.section_title(args) == title


def test_pixel_runs_build_uint8_models_for_the_real_run_and_the_host_only_stand_in(serving):
    """``--pixels``: the model and the host-only stand-in both take uint8 rows (the servers
    share the model, so every kind is fed them)."""
    args = serving.parse_args(["--pixels", "--size", "tiny", "--tenants", "3"])
    spec, mt = serving.simulate.build_model(args.arch, args.size, args.tenants, max_rows=args.max_rows_bucket, pixels=args.pixels)
    assert spec.pixels and mt.row_dtype == np.uint8
    host_spec, host_mt = serving.build_host_only(serving.parse_args(["--pixels", "--host-only", "--size", "tiny", "--tenants", "3"]))
    assert host_mt.row_dtype == np.uint8 and host_spec.random_input(0, 2).dtype == np.uint8


def test_a_trial_spoiled_by_a_process_pause_is_run_once_more_and_both_are_kept(serving, monkeypatch):
    """A trial whose load generator itself fell behind (a pause of the whole process) is run
    once more, pass or fail, and the rerun's verdict stands (both kept); without a stall a
    trial's verdict is final."""
    args = serving.parse_args(["--no-readme", "--quiet", "--start-rate", "100", "--bisect", "0"])
    # rate -> the generator lag (ms; None: nothing was sent) and attainment its trials get, in order
    script = {100.0: [(None, 1.0)], 200.0: [(150.0, 0.9), (1.0, 1.0)], 400.0: [(150.0, 1.0), (1.0, 0.5)], 800.0: [(1.0, 0.5)]}

    def fake_run_trial(server, workload, inputs, tenants):
        lag, attainment = script[workload.rate].pop(0)
        return {"_latencies_ms": [], "slo_attainment": attainment, "unfinished": 0, "sent_s": 1.0, "schedule_s": 1.0,
                "generator_lag_ms": {"max_ms": lag}, "offered_rps": workload.rate}

    monkeypatch.setattr(serving.simulate, "run_trial", fake_run_trial)
    monkeypatch.setattr(serving.simulate, "make_server", lambda kind, mt, **options: _NullServer())
    monkeypatch.setattr(serving, "check_answers", lambda *a: 0.0)
    result = serving.find_capacity("jaxmt", None, type("Model", (), {"tenants": ["t0"]})(), None, args)
    assert [(t["offered_rps"], t["passed"], t["rerun"]) for t in result["trials"]] == [
        (100.0, True, False), (200.0, False, False), (200.0, True, True), (400.0, True, False), (400.0, False, True)]
    assert result["max_rate_rps"] == 200.0 and result["at_max_rate"] is result["trials"][2]
    assert serving._trial_count(result["trials"]) == "5 (2 reruns after a stall)"


def test_spread_trials_run_longer_at_fractions_of_the_rate_found_and_leave_the_search_alone(serving, monkeypatch):
    """--spread-s: after the search, one trial of that length at each --spread-loads fraction
    of the rate found, for --spread-servers only; their verdicts do not move the rate found,
    and the trial at the full rate gives the spread targets' verdicts at >= 100 and >= 1000
    requests per tenant."""
    args = serving.parse_args(["--no-readme", "--quiet", "--start-rate", "100", "--bisect", "0", "--spread-s", "12",
                               "--spread-loads", "0.5,1", "--spread-servers", "jaxmt", "--spread-target-latency-ms", "35"])
    rng = np.random.default_rng()
    calls, targets = [], []

    def fake_run_trial(server, workload, inputs, tenants):
        calls.append((workload.rate, workload.duration_s))
        long = workload.duration_s == 12
        # A busy tenant and a rare one: the rare one is counted at >= 100 requests only.
        samples = {"t0": rng.uniform(10, 14, 1500), "t1": rng.uniform(10, 18, 150)}
        per_tenant = {k: {"count": v.size, "ok": v.size, "p50_ms": float(np.median(v)), "p99_ms": float(np.percentile(v, 99)),
                          "mean_ms": float(v.mean())} for k, v in samples.items()}
        passed = workload.rate <= 200 and not (long and workload.rate == 200)  # the long trial at the rate found misses
        return {"_latencies_ms": [], "_samples_by_tenant": samples, "per_tenant": per_tenant, "requests": 1650,
                "slo_attainment": 1.0 if passed else 0.5, "unfinished": 0, "sent_s": 1.0, "schedule_s": 1.0,
                "generator_lag_ms": {"max_ms": 0.0}, "offered_rps": workload.rate, "latency_ms": {"p50_ms": 12.0, "p99_ms": 17.0}}

    monkeypatch.setattr(serving.simulate, "run_trial", fake_run_trial)
    def fake_server(kind, mt, **options):
        targets.append(options.get("target_latency_ms"))
        return _NullServer()

    monkeypatch.setattr(serving.simulate, "make_server", fake_server)
    monkeypatch.setattr(serving, "check_answers", lambda *a: 0.0)
    model = type("Model", (), {"tenants": ["t0", "t1"]})()
    jaxmt_result = serving.find_capacity("jaxmt", None, model, None, args)
    assert jaxmt_result["max_rate_rps"] == 200.0
    assert calls[-2:] == [(100.0, 12.0), (200.0, 12.0)]
    assert targets[-2:] == [35.0, 35.0] and set(targets[:-2]) == {None}  # the search unpaced, the spread trials paced
    trials = jaxmt_result["spread_trials"]
    assert [(t["load"], t["trial_s"], t["target_latency_ms"]) for t in trials] == [(0.5, 12.0, 35.0), (1.0, 12.0, 35.0)]
    assert [t["spread_min_100"]["tenants_counted"] for t in trials] == [2, 2]
    assert [t["spread_min_1000"]["tenants_counted"] for t in trials] == [1, 1]
    assert trials[1]["spread_by_chance_min_100"]["mean_latency_gap"]["median"] >= 0
    assert not any("_samples_by_tenant" in t for t in trials)

    calls.clear()
    time_result = serving.find_capacity("time", None, model, None, args)  # not a spread server
    assert time_result["spread_trials"] == [] and all(duration == args.trial_s for _, duration in calls)

    assert [t["passed"] for t in trials] == [True, False]  # the failed long trial left the rate found as it was
    summary = serving.summarize([jaxmt_result, time_result])
    marked = "12 s at the rate found, paced to 35 ms (a trial that missed the SLO target: 50.00% in SLO)"
    assert summary["targets"][f"mean latency gap <= 5%, {marked}, tenants with >= 1000 requests"] == "n/a"  # one tenant: no gap
    at_100 = trials[1]["spread_min_100"]["mean_latency_gap"]
    assert summary["targets"][f"mean latency gap <= 5%, {marked}, tenants with >= 100 requests"].endswith(f"({at_100:g})")
    table = serving.spread_table([jaxmt_result, time_result])
    assert table.count("| jaxmt paced to 35 ms |") == 2 and "| 0.5 (100) |" in table and "| time |" not in table


@pytest.mark.parametrize("argv", [["--spread-loads", "0"], ["--spread-loads", "a"], ["--spread-s", "-1"], ["--spread-servers", "jaxmtt"],
                                  ["--tenant-ladder", "4,2"], ["--tenant-ladder", "0,2"], ["--tenant-ladder", "x"],
                                  ["--target-latency-ms", "0"], ["--spread-s", "5", "--spread-target-latency-ms", "-3"],
                                  ["--spread-s", "5", "--spread-target-latency-ms", "inf"], ["--spread-target-latency-ms", "30"],
                                  ["--spread-s", "5", "--spread-servers", "time", "--spread-target-latency-ms", "30"],
                                  ["--search-spread", "jaxmtt"], ["--search-spread", "time"], ["--search-spread", "jaxmt,time"],
                                  ["--search-spread", "jaxmt", "--servers", "time"]])
def test_spread_and_ladder_options_out_of_range_are_refused(serving, argv):
    with pytest.raises(SystemExit):
        serving.parse_args(argv)


def test_a_tenant_ladder_sets_jaxmts_tenant_buckets(serving):
    args = serving.parse_args(["--tenant-ladder", "1,2,3,6"])
    spec, mt = serving.simulate.build_model("mlp", "tiny", 6, max_rows=2, tenant_ladder=args.tenant_ladder)
    assert mt.buckets.tenant_buckets == (1, 2, 3, 6) and mt.buckets.row_buckets == (1, 2)


def test_a_search_that_requires_the_spread_targets_stops_where_the_spread_breaks(serving, monkeypatch):
    """--search-spread jaxmt: jaxmt's trials pass only if they also hold worst per-tenant
    p99/p50 <= 1.5 and a mean gap <= 5% (tenants with >= 100 requests), so the rate found
    holds all three targets; other servers are searched by the SLO alone."""
    args = serving.parse_args(["--no-readme", "--quiet", "--start-rate", "100", "--bisect", "0", "--search-spread", "jaxmt",
                               "--spread-s", "12", "--spread-loads", "1"])
    rng = np.random.default_rng(7)

    def fake_run_trial(server, workload, inputs, tenants):
        # Every trial meets the SLO; from 400 req/s, and in the long trial, one tenant's tail stretches to 2x its median.
        # A rare tenant (fewer than 100 requests) is slow and spread out at every rate: it is not counted.
        tail = 2.0 if workload.rate >= 400 or workload.duration_s == 12 else 1.2
        per_tenant = {"rare": {"count": 99, "ok": 99, "p50_ms": 30.0, "p99_ms": 90.0, "mean_ms": 40.0, "slo_attainment": 1.0}}
        for i in range(3):
            p50 = 20.0 + rng.uniform(0, 0.5)
            per_tenant[f"t{i}"] = {"count": 500, "ok": 500, "p50_ms": p50, "p99_ms": p50 * (tail if i == 2 else 1.2),
                                   "mean_ms": p50, "slo_attainment": 1.0}
        return {"_latencies_ms": [], "per_tenant": per_tenant, "slo_attainment": 1.0, "unfinished": 0, "sent_s": 1.0,
                "schedule_s": 1.0, "generator_lag_ms": {"max_ms": 0.0}, "offered_rps": workload.rate}

    monkeypatch.setattr(serving.simulate, "run_trial", fake_run_trial)
    monkeypatch.setattr(serving.simulate, "make_server", lambda kind, mt, **options: _NullServer())
    monkeypatch.setattr(serving, "check_answers", lambda *a: 0.0)
    model = type("Model", (), {"tenants": ["t0", "t1", "t2"]})()
    jaxmt_result = serving.find_capacity("jaxmt", None, model, None, args)
    time_result = serving.find_capacity("time", None, model, None, args)
    assert [(t["offered_rps"], t["spread_targets_met"], t["passed"]) for t in jaxmt_result["trials"]] == [
        (100.0, True, True), (200.0, True, True), (400.0, False, False)]
    assert jaxmt_result["max_rate_rps"] == 200.0
    [long_trial] = jaxmt_result["spread_trials"]  # reports its spread; its verdict is the SLO's alone
    assert long_trial["passed"] and "spread_targets_met" not in long_trial
    assert long_trial["spread_min_100"]["max_p99_over_p50"] > 1.5
    assert time_result["max_rate_rps"] > 400.0  # the SLO alone: it never failed
    assert not any("spread_targets_met" in t for t in time_result["trials"])
    targets = serving.summarize([jaxmt_result, time_result])["targets"]
    assert targets["per-tenant p99/p50 <= 1.5, tenants with >= 100 requests (jaxmt's search required it)"].startswith("yes")

    plain = serving.find_capacity("jaxmt", None, model, None, serving.parse_args(["--no-readme", "--quiet", "--start-rate", "100",
                                                                                   "--bisect", "0", "--max-rate", "400"]))
    assert plain["max_rate_rps"] == 400.0 and not any("spread_targets_met" in t for t in plain["trials"])  # the SLO alone
    assert "per-tenant p99/p50 <= 1.5, tenants with >= 100 requests" in serving.summarize([plain, time_result])["targets"]


def test_a_search_for_the_spread_stops_going_down_where_too_few_requests_measure_it(serving, monkeypatch):
    """With fewer than two tenants of >= 100 requests the spread cannot be measured: that trial
    fails, and the search does not halve the rate further (fewer requests still)."""
    args = serving.parse_args(["--no-readme", "--quiet", "--start-rate", "100", "--bisect", "0", "--search-spread", "jaxmt"])
    rates = []

    def fake_run_trial(server, workload, inputs, tenants):
        rates.append(workload.rate)
        per_tenant = {"t0": {"count": 500, "ok": 500, "p50_ms": 10.0, "p99_ms": 11.0, "mean_ms": 10.0, "slo_attainment": 1.0},
                      "t1": {"count": 50, "ok": 50, "p50_ms": 10.0, "p99_ms": 11.0, "mean_ms": 10.0, "slo_attainment": 1.0}}
        return {"_latencies_ms": [], "per_tenant": per_tenant, "slo_attainment": 1.0, "unfinished": 0, "sent_s": 1.0,
                "schedule_s": 1.0, "generator_lag_ms": {"max_ms": 0.0}, "offered_rps": workload.rate}

    monkeypatch.setattr(serving.simulate, "run_trial", fake_run_trial)
    monkeypatch.setattr(serving.simulate, "make_server", lambda kind, mt, **options: _NullServer())
    monkeypatch.setattr(serving, "check_answers", lambda *a: 0.0)
    result = serving.find_capacity("jaxmt", None, type("Model", (), {"tenants": ["t0", "t1"]})(), None, args)
    assert rates == [100.0, 50.0] and result["max_rate_rps"] is None
    assert [t["spread_targets_met"] for t in result["trials"]] == [None, None]


@pytest.mark.parametrize("spread, met", [
    ({"max_p99_over_p50": 1.5, "mean_latency_gap": 0.05}, True),
    ({"max_p99_over_p50": 1.51, "mean_latency_gap": 0.01}, False),
    ({"max_p99_over_p50": 1.2, "mean_latency_gap": 0.051}, False),
    ({"max_p99_over_p50": 1.2, "mean_latency_gap": None}, False),  # one tenant counted: no gap to show
    ({"tenants_counted": 0, "max_p99_over_p50": None, "mean_latency_gap": None}, False),
])
def test_the_spread_targets_hold_only_where_both_were_measured_within_bounds(serving, spread, met):
    assert serving.meets_spread_targets(spread) is met


class _Tenants:
    """A model stand-in: three tenants whose params are their index."""

    tenants = ["t0", "t1", "t2"]

    def __len__(self):
        return len(self.tenants)

    def get_params(self, tenant):
        return float(self.tenants.index(tenant) + 1)


class _Spec:
    @staticmethod
    def apply_fn(w, x):
        return x * w

    @staticmethod
    def random_input(rng, n):
        return rng.standard_normal((n, 3)).astype(np.float32)


class _NaNForOneTenant:
    """A server whose answers are right for every tenant but t1, whose are NaN."""

    def submit(self, tenant, x, slo_ms=None):
        future = Future()
        w = _Tenants().get_params(tenant)
        future.set_result(np.full_like(x, np.nan) if tenant == "t1" else x * w)
        return future


def test_a_nan_answer_fails_the_serving_reference_check(serving):
    error = serving.check_answers("time", _NaNForOneTenant(), _Spec(), _Tenants(), np.random.default_rng(0), _Tenants().get_params)
    assert not error <= 1e-2  # NaN (or anything over the tolerance): find_capacity must refuse to time it


class _SwappedStore(_Tenants):
    """A store that holds t2's weights in t1's place: what it reads back agrees with its answers."""

    def get_params(self, tenant):
        return super().get_params({"t1": "t2", "t2": "t1"}.get(tenant, tenant))


class _ServesFromStore:
    def __init__(self, store):
        self.store = store

    def submit(self, tenant, x, slo_ms=None):
        future = Future()
        future.set_result(x * self.store.get_params(tenant))
        return future


def test_the_reference_weights_come_from_the_tenants_seeds_not_the_store_under_test(serving):
    """A store that mixed up two tenants' slots answers as its own read-back says: the check
    must build its reference from the tenants' own weights to catch it."""
    store = _SwappedStore()
    assert serving.check_answers("time", _ServesFromStore(store), _Spec(), store, np.random.default_rng(0), store.get_params) == 0.0
    assert serving.check_answers("time", _ServesFromStore(store), _Spec(), store, np.random.default_rng(0), _Tenants().get_params) > 0.1


@pytest.mark.parametrize("host_only", [False, True])
def test_own_params_rebuild_each_tenants_weights_from_its_documented_seed(serving, host_only):
    import jax

    args = serving.parse_args(["--arch", "mlp", "--size", "tiny", "--tenants", "3", "--seed", "5", "--dtype", "bfloat16"]
                              + (["--host-only"] if host_only else []))
    if host_only:
        spec, mt = serving.build_host_only(args)
    else:
        spec, mt = serving.simulate.build_model("mlp", "tiny", 3, max_rows=4, seed=5, dtype=jax.numpy.dtype("bfloat16"))
    own = serving.own_params(spec, args)
    for tenant in mt.tenants:
        for got, want in zip(jax.tree.leaves(own(tenant)), jax.tree.leaves(mt.get_params(tenant))):
            assert got.dtype == want.dtype
            np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
