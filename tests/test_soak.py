"""Soak: threads submit many requests while tenants come and go; none is lost, none is wrong.

The short run here is the CI version of ``python -m jaxmt soak`` (100k requests, 16 threads,
64 tenants), which is marked slow.
"""

from __future__ import annotations

import json

import pytest

from jaxmt import cli
from jaxmt.soak import run_soak

EXPECTED_ERRORS = {"UnknownTenantError", "Overloaded"}  # tenant removed while queued; load shed


def _assert_passed(report, requests: int, churn: int) -> None:
    assert report.lost == 0, report.summary_line()
    assert report.wrong == 0, report.summary_line()
    assert report.requests == requests
    assert report.answered + sum(report.errors.values()) == requests  # every request accounted for
    assert set(report.errors) <= EXPECTED_ERRORS, report.errors
    assert report.answered > 0.9 * requests
    assert report.tenants_removed == churn and report.tenants_added == report.config["tenants"] + churn
    assert report.steps["failed_steps"] == 0 and report.steps["steps"] > 0
    assert report.memory_flat, (report.host_rss_mb, report.device_mb)
    assert report.ok
    assert f"requests={requests} " in report.summary_line() and " lost=0 " in report.summary_line()


@pytest.mark.parametrize("stage_inputs", [False, True])
def test_short_soak_loses_nothing_and_answers_right(stage_inputs):
    report = run_soak(requests=4000, threads=8, tenants=16, churn=12, window=16, seed=1, stage_inputs=stage_inputs)
    _assert_passed(report, 4000, 12)
    assert report.steps["staging"]["enabled"] == stage_inputs


def test_soak_command_line_prints_the_summary_and_json(capsys):
    code = cli.main(["soak", "--requests", "400", "--threads", "4", "--tenants", "6", "--churn", "3", "--json", "--seed", "2"])
    out = capsys.readouterr().out
    assert code == 0, out
    summary, payload = out.split("\n", 1)
    assert summary.startswith("soak: requests=400 ") and " lost=0 " in summary and summary.endswith("OK")
    report = json.loads(payload)
    assert report["lost"] == 0 and report["wrong"] == 0 and report["ok"] is True


@pytest.mark.slow
def test_full_soak():
    report = run_soak()  # 100k requests, 16 threads, 64 tenants, 100 replaced
    _assert_passed(report, 100_000, 100)


def test_a_recorded_soak_names_every_option_that_shapes_it():
    """The command line written with --record reruns the same soak: parsed again, it gives
    the same options, the staging choice included."""
    import shlex

    from jaxmt.soak import _RECORDED_OPTIONS, _command_line

    argv = ["soak", "--requests", "500", "--max-rows", "2", "--window", "8", "--slo-ms", "250", "--max-delay-ms", "1.5",
            "--seed", "3", "--stage", "on", "--record"]
    args = cli.build_parser("soak").parse_args(argv)
    again = cli.build_parser("soak").parse_args(shlex.split(_command_line(args))[3:])
    assert {name: getattr(again, name) for name in _RECORDED_OPTIONS} == {name: getattr(args, name) for name in _RECORDED_OPTIONS}
    assert _command_line(args).startswith("python -m jaxmt soak ")


@pytest.mark.parametrize("option", [["--threads", "0"], ["--max-rows", "0"], ["--arch", "nope"], ["--latency-window", "0"]],
                         ids=["no threads", "no rows", "unknown arch", "no latency window"])
def test_bad_soak_options_are_one_error_line(option, capsys):
    code = cli.main(["soak", "--requests", "20", "--threads", "2", "--tenants", "2", "--churn", "1", *option])
    err = capsys.readouterr().err
    assert code == 2 and "error: " in err and "Traceback" not in err


@pytest.mark.parametrize(("option", "named"), [(["--window", "0"], "window >= 1, got 0"), (["--seed", "-1"], "seed must be >= 0, got -1"),
                                              (["--threads", "0"], "threads >= 1, got 0"), (["--requests", "1"], "requests >= threads, got 1 < 2")],
                         ids=["no window", "negative seed", "no threads", "fewer requests than threads"])
def test_soak_options_refused_before_the_run_are_named(option, named, capsys):
    """A window of 0 would run as 1 and a negative seed fail in NumPy: both refused, by name
    and value, as is any other count out of range, and only the one out of range."""
    code = cli.main(["soak", "--requests", "20", "--threads", "2", "--tenants", "2", "--churn", "1", *option])
    err = capsys.readouterr().err
    assert code == 2 and named in err and "Traceback" not in err
    assert err.count(">=") == 1, err


def test_a_recorded_soak_says_how_many_tenants_were_replaced_not_how_many_were_asked_for(monkeypatch):
    """With --churn at or above --requests the replacement points collide: fewer are replaced."""
    import types

    import jaxmt.soak as soak
    from benchmarks import common

    written = {}
    fake = types.SimpleNamespace(markdown_table=common.markdown_table, write_json=lambda name, payload: None,
                                 update_readme_section=lambda title, body: written.update({title: body}))
    monkeypatch.setattr(soak, "_benchmarks_common", lambda: fake)
    report = run_soak(requests=20, threads=2, tenants=2, churn=100, arch="mlp", max_rows=2, seed=0)
    assert report.tenants_removed < 100
    args = cli.build_parser("soak").parse_args(["soak", "--requests", "20", "--threads", "2", "--tenants", "2", "--record"])
    soak._record(report, args)
    (body,) = written.values()
    assert f"{report.tenants_removed} replaced during the run" in body


def test_threads_replacing_every_tenant_at_once_still_leave_one_to_pick():
    """More threads than tenants and frequent churn: while some threads replace tenants, the
    others must still find a resident tenant to pick (a crashed worker thread would report
    requests of a correct server as lost)."""
    report = run_soak(requests=400, threads=8, tenants=2, churn=200, window=4, seed=3)
    assert report.requests == 400, report.summary_line()
    assert report.lost == 0 and report.wrong == 0, report.summary_line()
    assert report.answered + sum(report.errors.values()) == 400
