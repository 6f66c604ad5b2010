"""benchmarks/pacing.py: its trial syntax and a CPU smoke run that writes a complete file.

Nothing here checks speed: only that each trial ran the server it names, that the paced one
held its requests, and that the file and the table report every trial."""

from __future__ import annotations

import argparse
import gc
import json

import pytest
from conftest import benchmark_script


@pytest.fixture(scope="module")
def pacing():
    with benchmark_script("pacing.py", "jaxmt_pacing_bench") as module:
        yield module
    gc.unfreeze()  # its trials froze the heap of this test process


def test_trials_name_jaxmt_rates_with_targets_and_baselines_with_an_at(pacing):
    assert pacing.parse_trials("4500:0,4500:40,time@1131") == [("jaxmt", 4500.0, None), ("jaxmt", 4500.0, 40.0),
                                                                ("time", 1131.0, None)]


@pytest.mark.parametrize("text", ["4500", "jaxmt@100", "nobody@100", "-5:40", "100:-1", "nan:30", "100:inf", "fast:30"])
def test_malformed_trials_are_refused(pacing, text):
    with pytest.raises(argparse.ArgumentTypeError, match="trial"):
        pacing.parse_trials(text)


def test_a_quick_run_writes_every_trial_and_its_spreads(pacing, results_dir, capsys):
    args = ["--quick", "--no-readme", "--trial-s", "0.5", "--slo-ms", "1000", "--trials", "200:0,200:200,time@200", "--out", "pq"]
    assert pacing.main(args) == 0
    data = json.loads((results_dir / "pq.json").read_text())
    assert data["partial"] is False and not data["skipped"] and data["max_rel_error"] < 1e-4
    assert set(data["rel_error_by_server"]) == {"jaxmt", "time"}  # the baseline's answers were checked too
    assert [(t["server"], t["target_latency_ms"]) for t in data["trials"]] == [("jaxmt", None), ("jaxmt", 200.0), ("time", None)]
    for trial in data["trials"]:
        assert trial["requests"] > 0 and trial["latency_ms"]["p50_ms"] > 0
        assert {"spread_min_100", "spread_min_1000"} <= set(trial) and trial["steps"]["steps"] > 0
    # Paced, a request waits for its launch time (target less about one step time of the tiny model):
    # held for most of 200 ms, whatever this machine's speed.
    assert data["trials"][1]["latency_ms"]["p50_ms"] > 100.0
    table = capsys.readouterr().out
    assert table.count("| jaxmt |") == 2 and table.count("| time |") == 1


def test_trials_that_would_overrun_the_budget_are_skipped_and_the_file_says_so(pacing, results_dir, capsys):
    assert pacing.main(["--quick", "--no-readme", "--trial-s", "0.5", "--budget-s", "0.1", "--trials", "200:0", "--out", "pb"]) == 0
    data = json.loads((results_dir / "pb.json").read_text())
    assert data["trials"] == [] and data["skipped"] == [["jaxmt", 200.0, None]] and data["partial"] is True
    capsys.readouterr()


def test_a_baseline_that_answers_wrong_stops_the_run_before_any_trial(pacing, results_dir, monkeypatch):
    monkeypatch.setattr(pacing, "check_answers", lambda kind, *a: 0.5 if kind == "time" else 0.0)
    monkeypatch.setattr(pacing.simulate, "run_trial", lambda *a: pytest.fail("a trial ran"))
    with pytest.raises(AssertionError, match="time: answers differ"):
        pacing.main(["--quick", "--no-readme", "--trial-s", "0.5", "--trials", "200:0,time@200", "--out", "pw"])
