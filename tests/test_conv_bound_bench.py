"""benchmarks/conv_bound.py: from a per-layer results file, the filter-read limit of each of a
model's measured convs and the fastest measured form, weighted by the model's layer counts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import benchmark_script

SOURCE = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "pallas_conv_f32_depth32.json"


@pytest.fixture(scope="module")
def bench():
    with benchmark_script("conv_bound.py", "jaxmt_conv_bound_bench") as module:
        yield module


def test_every_measured_resnet18_conv_is_bounded_by_its_filter_reads(bench, results_dir):
    shutil.copy(SOURCE, results_dir / SOURCE.name)
    bench.main(["--results", SOURCE.stem, "--model", "resnet18", "--bandwidth-tbs", "2.0", "--no-readme"])
    data = json.loads((results_dir / "conv_bound_resnet18.json").read_text())
    source = {(r["tenants"], r["images"], r["layer"]): r for r in json.loads(SOURCE.read_text())["rows"]}
    assert data["rows"]
    for row in data["rows"]:
        measured = source[(row["tenants"], row["images"], row["layer"])]
        assert row["dense_us"] == measured["dense_us"]
        assert row["weights_us"] == pytest.approx(row["weights_mb"] * 1e6 / 2.0e12 * 1e6)
        assert row["bound"] == pytest.approx(row["dense_us"] / max(row["dense_us"], row["weights_us"]))
        fastest = min(f["us"] for f in measured["forms"].values() if f.get("us") is not None)
        assert row["best"] == pytest.approx(row["dense_us"] / fastest)
    deep = next(r for r in data["rows"] if (r["tenants"], r["images"], r["layer"]) == (32, 1, "7x7, 512 -> 512"))
    assert deep["count"] == 3 and deep["weights_mb"] == pytest.approx(32 * 9 * 512 * 512 * 4 / 1e6)
    for config, total in data["totals"].items():  # ResNet-18: 20 convs, 3 of them 1x1 (not in the run)
        assert total["layers"] == 17 and total["unmeasured_layers"] == 3, config
        assert 0 < total["bound"] <= 1
