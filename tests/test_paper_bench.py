"""The paper's reproduction (benchmarks/paper.py) on its --quick path: a CPU smoke test.

One quick run (tiny models, GEMM shapes / 16, the parts in this process) feeds every test;
the tests check what the run must produce whatever the timings: every part's results were
checked against their reference before timing, each figure has JSON and a PNG, the memory
wall ends in a clean ``CapacityError`` with the store unchanged and still serving, the
PyTorch parts skip cleanly without PyTorch/CUDA, and the README is left alone. No timed
assertions.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from benchmarks.paper import driver, report
from benchmarks.paper._shared import GEMM_TOLERANCE, check, geomean, time_steps

PARTS = "table1_jax,table1_torch,figure5_bfloat16,figure3_jax,figure3_torch"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    from benchmarks import common

    results = tmp_path_factory.mktemp("paper")
    readme_before = common.README.read_text() if common.README.exists() else None
    code = driver.main([
        "--quick", "--in-process", "--results-dir", str(results), "--parts", PARTS,
        "--table1-args", "--shapes rnn,square --dtypes float32,bfloat16",
        "--figure3-args", "--models mobilenetv2 --tenants 1,2",
    ])
    readme_after = common.README.read_text() if common.README.exists() else None
    return code, results, readme_before, readme_after


def _paper_sections(readme):
    """The README's "## Paper: ..." sections (other benchmarks may write theirs meanwhile)."""
    if readme is None:
        return []
    return [part for part in readme.split("\n## ") if part.startswith("Paper: ")]


def _load(results, name):
    return json.loads((results / f"paper_{name}.json").read_text())


def test_every_part_ran_and_the_readme_is_untouched(quick_run):
    code, results, readme_before, readme_after = quick_run
    assert code == 0
    run = _load(results, "run")
    assert {name: entry["status"] for name, entry in run["parts"].items()} == {name: "ok" for name in PARTS.split(",")}
    assert _paper_sections(readme_after) == _paper_sections(readme_before)  # --quick never writes them
    for figure in ("table1", "figure3", "figure5"):
        assert (results / f"paper_{figure}.json").exists()
    for png in ("table1", "figure3", "figure4", "figure5"):
        assert (results / f"paper_{png}.png").stat().st_size > 1000


def test_table1_rows_were_checked_and_timed(quick_run):
    _, results, _, _ = quick_run
    raw = _load(results, "table1_jax")
    methods = {"jaxmt", "jaxmt_predict", "time_only_predict", "dot", "gather_dot", "time_only"}
    seen = {(r["shape"], r["dtype"], r["tenants"], r["method"]) for r in raw["rows"]}
    assert seen == {(s, d, n, m) for s in ("rnn", "square") for d in ("float32", "bfloat16") for n in (2, 3) for m in methods}
    for row in raw["rows"]:
        assert row["rel_error"] <= GEMM_TOLERANCE[row["dtype"]]
        assert row["median_s"] > 0 and row["flops"] == 2 * row["M"] * row["N"] * row["K"] * row["tenants"]
    assert all(r["recompiles_while_timed"] == 0 for r in raw["rows"] if r["method"] == "jaxmt")
    summary = _load(results, "table1")
    for s in summary["summaries"]:
        assert set(s["speedup"]["time_only"]) == {"2", "3"}  # against the JAX time-only baseline
        assert s["target_bmm_met"] is None  # no torch.bmm without PyTorch


def test_torch_parts_skip_cleanly_without_torch(quick_run):
    pytest.importorskip("jax")
    try:
        import torch

        if torch.cuda.is_available():
            pytest.skip("PyTorch with CUDA is here: the parts measure instead of skipping")
    except ImportError:
        pass
    _, results, _, _ = quick_run
    for part in ("table1_torch", "figure3_torch"):
        assert "skipped" in _load(results, part)


def test_figure3_every_method_per_tenant_count(quick_run):
    _, results, _, _ = quick_run
    model = _load(results, "figure3_jax")["models"]["mobilenetv2"]
    assert [row["tenants"] for row in model["rows"]] == [1, 2]
    for row in model["rows"]:
        for method in ("exclusive", "time_only", "jaxmt", "jaxmt_predict", "time_only_predict"):
            entry = row[method]
            assert entry["rel_error"] <= 2e-3 and entry["latency_s"] > 0
            assert len(entry["per_tenant_s"]) == row["tenants"]
        assert row["jaxmt"]["spread"] == 0.0  # one program answers every tenant at once
    summary = _load(results, "figure3")["models"]["mobilenetv2"]
    assert summary["spread_at"] == 2 and "jax:jaxmt" in summary["geomean_slowdown_n_ge_2"]


def test_figure5_growth_failure_is_clean_and_the_store_still_serves(quick_run):
    _, results, _, _ = quick_run
    raw = _load(results, "figure5_bfloat16")
    assert raw["resident_tenants"] == 6  # --quick caps the store at 6 slots
    assert raw["growth_failure"]["error"] == "CapacityError" and "max_capacity=6" in raw["growth_failure"]["message"]
    assert raw["store_unchanged_after_failure"] is True
    assert raw["check_passed"] is True
    assert raw["serve_all"]["tenants"] == 6 and raw["serve_all"]["finite"] is True


def test_report_only_rebuilds_the_same_summaries(quick_run):
    _, results, _, _ = quick_run
    before = {f: _load(results, f) for f in ("table1", "figure3", "figure5")}
    assert driver.main(["--report-only", "--results-dir", str(results), "--no-readme"]) == 0
    for figure, summary in before.items():
        after = _load(results, figure)
        assert after.keys() == summary.keys()
        assert json.dumps(after, sort_keys=True) == json.dumps(summary, sort_keys=True)


def test_a_failing_part_is_recorded_and_the_others_still_report(tmp_path):
    code = driver.main(["--quick", "--in-process", "--results-dir", str(tmp_path), "--parts", "table1_jax",
                        "--table1-args", "--shapes no_such_shape"])
    assert code == 1
    status = _load(tmp_path, "run")["parts"]["table1_jax"]["status"]
    assert status.startswith("failed")


@pytest.mark.parametrize("values, expected", [([2.0, 8.0], 4.0), ([3.0], 3.0), ([1.0, float("nan"), 4.0], 2.0)])
def test_geomean_ignores_missing_values(values, expected):
    assert math.isclose(geomean(values), expected)


def test_check_names_the_contender_and_rejects_nan():
    rng = np.random.default_rng(0)
    want = rng.standard_normal((4, 3))
    assert check("ok", want * (1 + 1e-9), want, 1e-6) < 1e-6
    with pytest.raises(AssertionError, match="bad contender"):
        check("bad contender", want + 1.0, want, 1e-3)
    with pytest.raises(AssertionError, match="nan"):
        check("nan", np.full_like(want, np.nan), want, 1e-3)


def test_time_steps_counts_launches_and_waits_once_per_repeat():
    launches, waits = [], []
    result = time_steps(lambda: launches.append(1), lambda _: waits.append(1), repeats=3, warmup=2, steps=5)
    assert result["steps"] == 5 and result["repeats"] == 3
    assert len(launches) == 2 + 3 * 5 and len(waits) == 2 + 3


def test_report_titles_are_the_readme_sections():
    assert report.TITLES == {"table1": "Paper: Table 1", "figure3": "Paper: Figure 3 and 4", "figure5": "Paper: Figure 5"}


def test_the_torch_parts_record_the_commit_and_date_as_the_jax_parts_do(monkeypatch):
    """The PyTorch parts run without JAX: their environment still names the tree and the time."""
    import sys
    import types

    from benchmarks import common
    from benchmarks.paper._shared import torch_environment

    fake = types.SimpleNamespace(__version__="0.0-test", version=types.SimpleNamespace(cuda=None),
                                 cuda=types.SimpleNamespace(is_available=lambda: False))
    monkeypatch.setitem(sys.modules, "torch", fake)
    env = torch_environment()
    assert env["torch"] == "0.0-test" and env["commit"] == common.environment()["commit"] and env["date"]
