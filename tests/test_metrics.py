"""Serving metrics: percentile math, SLO accounting, straggler flags, step EWMA, exporter."""

from __future__ import annotations

import logging
import re

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import given, settings

from jaxmt.errors import Overloaded, UnknownTenantError
from jaxmt.metrics import (
    LatencyRecorder,
    StepRecorder,
    percentiles,
    spread_by_chance,
    tenant_spread,
    to_prometheus,
)


def test_percentiles_match_numpy(rng):
    samples = rng.exponential(5.0, size=1001)
    got = percentiles(samples)
    for q in (50, 90, 99):
        assert got[f"p{q}_ms"] == pytest.approx(np.percentile(samples, q), abs=1e-4)
    assert got["max_ms"] == pytest.approx(samples.max(), abs=1e-4)
    assert got["mean_ms"] == pytest.approx(samples.mean(), abs=1e-4)
    assert percentiles([]) == {"p50_ms": None, "p90_ms": None, "p99_ms": None, "max_ms": None, "mean_ms": None}
    assert percentiles([3.0], qs=(25,)) == {"p25_ms": 3.0, "max_ms": 3.0, "mean_ms": 3.0}
    assert percentiles([1.0, 2.0, 3.0, 10.0], qs=(q for q in (50,))) == {"p50_ms": 2.5, "max_ms": 10.0, "mean_ms": 4.0}


def test_recorder_counts_outcomes_per_tenant_and_overall():
    recorder = LatencyRecorder(window=3)
    for latency in (10.0, 20.0, 30.0, 40.0):  # the window keeps the last 3 latencies
        recorder.record("a", latency, slo_ms=25.0)
    recorder.record("a", 1.0, 25.0, Overloaded("busy"))
    recorder.record("b", 5.0, 25.0, UnknownTenantError("b"))
    recorder.note_admitted_late("a")
    recorder.note_step(["a", "b"])
    snap = recorder.snapshot({"a": (2, 7), "c": (1, 1)})
    a, b, c = snap["tenants"]["a"], snap["tenants"]["b"], snap["tenants"]["c"]
    assert (a["count"], a["ok"], a["errors"], a["rejected"], a["slo_met"], a["admitted_late"], a["steps"]) == (5, 4, 1, 1, 2, 1, 1)
    assert a["slo_attainment"] == pytest.approx(0.4)
    assert (a["p50_ms"], a["max_ms"], a["queue_depth"], a["queued_rows"]) == (30.0, 40.0, 2, 7)
    assert (b["count"], b["errors"], b["rejected"], b["p50_ms"], b["slo_attainment"]) == (1, 1, 0, None, 0.0)
    assert (c["count"], c["slo_attainment"], c["queue_depth"]) == (0, None, 1)
    overall = snap["overall"]
    assert (overall["count"], overall["ok"], overall["errors"], overall["queue_depth"], overall["queued_rows"]) == (6, 4, 2, 3, 8)
    assert overall["slo_attainment"] == pytest.approx(2 / 6)
    np.testing.assert_array_equal(recorder.samples_ms("a"), [20.0, 30.0, 40.0])
    assert sorted(recorder.samples_ms()) == [20.0, 30.0, 40.0]
    assert recorder.samples_ms("nobody").size == 0


def test_straggler_is_flagged_once_and_recovers(caplog):
    recorder = LatencyRecorder(flag_window=4, flag_min_requests=4, flag_below_attainment=0.75, name="sched")
    with caplog.at_level(logging.INFO, logger="jaxmt"):
        for _ in range(3):
            recorder.record("slow", 90.0, 50.0)
        assert not recorder.snapshot()["tenants"]["slow"]["flagged"]  # too few requests to judge
        for _ in range(5):
            recorder.record("slow", 90.0, 50.0)
        assert recorder.snapshot()["flagged_tenants"] == ["slow"]
        for _ in range(3):
            recorder.record("slow", 10.0, 50.0)
    snap = recorder.snapshot()
    assert not snap["tenants"]["slow"]["flagged"] and snap["overall"]["flagged"] == 0
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "'slow'" in warnings[0].getMessage() and "sched" in warnings[0].getMessage()
    assert any(r.levelno == logging.INFO and "again" in r.getMessage() for r in caplog.records)


@settings(max_examples=200, deadline=None)
@given(
    outcomes=st.lists(st.tuples(st.sampled_from(["a", "b"]), st.booleans()), max_size=120),
    flag_window=st.integers(1, 12),
    flag_min_requests=st.integers(1, 12),
    below=st.sampled_from([0.0, 0.3, 0.5, 0.9, 1.0]),
)
def test_flags_follow_the_attainment_of_each_tenants_last_flag_window_requests(outcomes, flag_window, flag_min_requests, below):
    """The recorder keeps the count of met SLOs in each tenant's window as it moves; flags
    equal the rule applied to the window itself after every request."""
    recorder = LatencyRecorder(flag_window=flag_window, flag_min_requests=flag_min_requests, flag_below_attainment=below)
    history: dict[str, list[bool]] = {}
    flagged = {"a": False, "b": False}
    for tenant, met in outcomes:
        recorder.record(tenant, 10.0 if met else 90.0, 50.0)
        window = (history.setdefault(tenant, []) + [met])[-flag_window:]
        history[tenant].append(met)
        if len(window) >= flag_min_requests:
            attainment = sum(window) / len(window)
            flagged[tenant] = attainment < below if not flagged[tenant] else not attainment >= below
        assert recorder.snapshot()["tenants"][tenant]["flagged"] == flagged[tenant]


def test_step_recorder_ewma_and_padding():
    steps = StepRecorder(ewma_alpha=0.5)
    assert steps.estimate_s is None and steps.snapshot()["est_step_ms"] is None
    steps.record(tenants=2, rows=6, padded_rows=8, service_s=0.010)
    steps.record(tenants=4, rows=10, padded_rows=16, service_s=0.020)
    steps.record(tenants=1, rows=1, padded_rows=1, service_s=None)  # compiled: not a sample
    steps.record_failure()
    assert steps.estimate_s == pytest.approx(0.015)
    snap = steps.snapshot()
    assert (snap["steps"], snap["failed_steps"], snap["est_step_ms"]) == (3, 1, 15.0)
    assert snap["mean_tenants_per_step"] == pytest.approx(7 / 3, abs=1e-4)
    assert snap["mean_rows_per_step"] == pytest.approx(17 / 3, abs=1e-4)
    assert snap["padding_waste"] == pytest.approx(1 - 17 / 25)
    with pytest.raises(ValueError):
        StepRecorder(ewma_alpha=0.0)


def test_tenant_spread():
    recorder = LatencyRecorder()
    for latency in [10.0] * 20:
        recorder.record("a", latency, 50.0)
    for latency in [10.0] * 10 + [12.0] * 10:
        recorder.record("b", latency, 50.0)
    recorder.record("rare", 100.0, 50.0)  # too few results to count
    spread = tenant_spread(recorder.snapshot())
    assert spread["tenants_counted"] == 2
    assert spread["mean_latency_gap"] == pytest.approx(0.1)
    assert spread["max_p99_over_p50"] == pytest.approx(np.percentile([10.0] * 10 + [12.0] * 10, 99) / 11.0, abs=1e-3)
    assert tenant_spread(LatencyRecorder().snapshot())["max_p99_over_p50"] is None


def test_prometheus_text_format():
    recorder = LatencyRecorder()
    recorder.record('we"ird\\', 12.5, 50.0)
    recorder.record(7, 70.0, 50.0)
    metrics = {"server": "jaxmt", **recorder.snapshot({7: (3, 4)}), "steps": {**StepRecorder().snapshot(), "in_flight": 1}}
    text = to_prometheus(metrics)
    assert text.endswith("\n")
    sample = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*\{([a-z_]+="([^"\\]|\\.)*",?)*\} -?[0-9.e+-]+$')
    for line in text.splitlines():
        assert line.startswith("# ") or sample.match(line), line
    assert 'jaxmt_requests_total{server="jaxmt"} 2' in text
    assert 'jaxmt_requests_total{tenant="we\\"ird\\\\",server="jaxmt"} 1' in text
    assert 'jaxmt_queue_depth{tenant="7",server="jaxmt"} 3' in text
    assert 'jaxmt_latency_ms{tenant="7",server="jaxmt",quantile="0.99"} 70' in text
    assert 'jaxmt_step_in_flight{server="jaxmt"} 1' in text
    assert "est_step_ms" not in text  # unknown yet (None): left out, never NaN


def test_tenants_whose_ids_print_alike_get_distinct_series():
    """Tenant 1 and tenant "1" are two tenants (ids are dict keys): their series must differ,
    or Prometheus keeps one of two samples of one series."""
    recorder = LatencyRecorder(name="s")
    recorder.record(1, 5.0, 10.0)
    recorder.record("1", 50.0, 10.0)
    recorder.record("only", 5.0, 10.0)
    text = to_prometheus({"server": "s", **recorder.snapshot()})
    series = [line.rsplit(" ", 1)[0] for line in text.splitlines() if line.startswith("jaxmt_requests_total{")]
    assert len(series) == len(set(series)) == 4  # overall and three tenants
    assert 'jaxmt_requests_total{tenant="1",server="s"} 1' in text
    assert "jaxmt_requests_total{tenant=\"'1'\",server=\"s\"} 1" in text
    assert 'jaxmt_requests_total{tenant="only",server="s"} 1' in text


def test_tenant_labels_stay_distinct_when_a_repr_equals_another_tenants_str():
    """1 and "1" print alike, so they are told apart by repr; repr("1") is "'1'", which is
    what a third tenant "'1'" prints as: still three series, not two of one."""
    recorder = LatencyRecorder(name="s")
    for tenant in (1, "1", "'1'"):
        recorder.record(tenant, 5.0, 10.0)
    text = to_prometheus({"server": "s", **recorder.snapshot()})
    series = [line.rsplit(" ", 1)[0] for line in text.splitlines() if line.startswith("jaxmt_requests_total{")]
    assert len(series) == len(set(series)) == 4  # overall and three tenants


def test_a_recorder_without_a_flag_window_records_without_flagging():
    recorder = LatencyRecorder(flag_window=0, flag_min_requests=0)
    recorder.record("a", 1.0, 2.0)  # ZeroDivisionError: an attainment of 0 of 0 requests
    assert recorder.snapshot()["tenants"]["a"]["count"] == 1 and recorder.snapshot()["flagged_tenants"] == []


def test_prometheus_counts_are_written_in_full():
    """A counter rounded to six digits would stand still under rate() between scrapes."""
    metrics = {"server": "jaxmt", "overall": {"count": 1_234_567, "slo_met": 1_234_561, "slo_attainment": 0.9999951},
               "tenants": {}, "steps": {"steps": 9_876_543}}
    text = to_prometheus(metrics)
    assert 'jaxmt_requests_total{server="jaxmt"} 1234567\n' in text
    assert 'jaxmt_requests_slo_met_total{server="jaxmt"} 1234561\n' in text
    assert 'jaxmt_step_steps{server="jaxmt"} 9876543\n' in text
    assert 'jaxmt_slo_attainment{server="jaxmt"} 0.9999951\n' in text


def test_recorder_forgets_removed_tenants():
    from jaxmt.metrics import LatencyRecorder

    recorder = LatencyRecorder(window=8)
    for tenant in ("stay", "gone"):
        for latency in (1.0, 2.0, 3.0):
            recorder.record(tenant, latency, slo_ms=10.0)
    assert recorder.forget_absent(lambda tenant: tenant == "stay") == 1
    assert recorder.samples_ms("stay").size == 3 and recorder.samples_ms("gone").size == 0


def test_a_forgotten_tenants_counts_stay_in_the_overall_totals():
    """Overall counts are exported as counters: forgetting a removed tenant's stats must not
    make them go down; its requests stay in the overall window of recent latencies too."""
    recorder = LatencyRecorder(window=8)
    recorder.record("stay", 1.0, slo_ms=10.0)
    recorder.record("gone", 2.0, slo_ms=10.0)
    recorder.record("gone", 30.0, slo_ms=10.0, error=Overloaded("full"))
    recorder.note_admitted_late("gone")
    before = recorder.snapshot()["overall"]
    assert recorder.forget_absent(lambda tenant: tenant == "stay") == 1
    after = recorder.snapshot()
    assert list(after["tenants"]) == ["stay"]
    counters = ["count", "ok", "errors", "rejected", "slo_met", "admitted_late", "slo_attainment"]
    assert {k: after["overall"][k] for k in counters} == {k: before[k] for k in counters}
    assert (before["count"], before["errors"], before["admitted_late"]) == (3, 1, 1)
    assert after["overall"]["p50_ms"] == before["p50_ms"] == 1.5
    recorder.record("stay", 1.0, slo_ms=10.0)
    assert recorder.snapshot()["overall"]["count"] == 4


def _recorded(samples_by_tenant: dict) -> LatencyRecorder:
    recorder = LatencyRecorder()
    for tenant, samples in samples_by_tenant.items():
        for latency in samples:
            recorder.record(tenant, float(latency), slo_ms=1e9)
    return recorder


def test_a_fair_server_has_the_spread_of_chance_and_an_unfair_one_does_not(rng):
    """Every tenant's latencies from one distribution: the measured mean-latency gap lies
    within what dealing the same latencies out at random gives. One tenant served 50% slower:
    the measured gap is far above it."""
    counts = [800, 400, 300, 250, 200, 200]
    fair = {f"t{i}": rng.gamma(4.0, 4.0, size=n) for i, n in enumerate(counts)}
    unfair = {**fair, "t5": fair["t5"] * 1.5}
    for samples, fair_server in ((fair, True), (unfair, False)):
        recorder = _recorded(samples)
        assert recorder.samples_by_tenant().keys() == samples.keys()
        measured = tenant_spread(recorder.snapshot(), min_count=100)["mean_latency_gap"]
        chance = spread_by_chance(recorder.samples_by_tenant(), min_count=100, draws=300, seed=int(rng.integers(1 << 30)))
        assert chance["tenants_counted"] == len(counts) and chance["draws"] == 300
        gap = chance["mean_latency_gap"]
        assert 0 < gap["median"] <= gap["p95"]
        # A mean of 200 gamma(4, 4) samples has a standard error of 0.57 (3.5% of the mean 16):
        # by chance 6 such means span ~8% (95th percentile ~13%); a 50% slower tenant's gap
        # is 50% +- 10%.
        if fair_server:
            assert measured < 2 * gap["p95"]
        else:
            assert measured > 2 * gap["p95"]


def test_spread_by_chance_deals_only_among_the_tenants_tenant_spread_counts(rng):
    """Tenants under min_count are left out of the pool as tenant_spread leaves them out: one
    rare tenant a thousand times slower changes nothing. Identical latencies give no spread;
    fewer than two counted tenants give None."""
    samples = {"a": rng.gamma(4.0, 4.0, 300), "b": rng.gamma(4.0, 4.0, 200), "rare": np.full(5, 16_000.0)}
    recorder = _recorded(samples)
    counted = tenant_spread(recorder.snapshot(), min_count=100)["tenants_counted"]
    chance = spread_by_chance(recorder.samples_by_tenant(), min_count=100, draws=50)
    assert chance["tenants_counted"] == counted == 2
    assert chance["mean_latency_gap"]["p95"] < 0.5  # the rare tenant's latencies were not dealt out
    same = spread_by_chance({"a": [5.0] * 50, "b": [5.0] * 30, "c": [5.0] * 3}, min_count=10, draws=5)
    assert same["max_p99_over_p50"] == {"median": 1.0, "p95": 1.0}
    assert same["mean_latency_gap"] == {"median": 0.0, "p95": 0.0}
    assert spread_by_chance(samples, min_count=250)["mean_latency_gap"] is None
    assert spread_by_chance({}, min_count=1)["tenants_counted"] == 0


def test_overall_percentiles_describe_recent_traffic_of_every_tenant_alike():
    """A busy tenant's old samples leave the overall window as a quiet tenant's do: the
    overall figures are of the last ``window`` requests, not of pooled per-tenant windows."""
    recorder = LatencyRecorder(window=100)
    for _ in range(1_000):
        recorder.record("busy", 1.0, slo_ms=50.0)
    for _ in range(20):
        recorder.record("quiet", 100.0, slo_ms=50.0)
    for _ in range(80):
        recorder.record("busy", 1.0, slo_ms=50.0)
    overall = recorder.snapshot()["overall"]
    assert overall["count"] == 1_100 and overall["p50_ms"] == 1.0 and overall["p90_ms"] == 100.0
    assert len(recorder.samples_ms()) == 100 and sorted(recorder.samples_ms())[79] == 1.0
