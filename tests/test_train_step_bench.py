"""benchmarks/train_step.py: a CPU smoke run checks both backward forms, probes the summed
pass with a NaN and times both.

Nothing here checks speed: only that each configuration is checked, probed and written out.
"""

from __future__ import annotations

import json

import pytest
from conftest import benchmark_script


@pytest.fixture(scope="module")
def train_step():
    with benchmark_script("train_step.py", "jaxmt_train_step_bench") as module:
        yield module


def test_configurations_parse_as_arch_size_tenants_batch(train_step):
    assert train_step.parse_configs("mlp:tiny:4:2, resnet18:full:8:16") == [("mlp", "tiny", 4, 2), ("resnet18", "full", 8, 16)]
    with pytest.raises(ValueError, match="arch:size:tenants:batch"):
        train_step.parse_configs("mlp:tiny:4")


def test_a_quick_run_checks_probes_and_times_both_forms(train_step, results_dir):
    assert train_step.main(["--quick", "--configs", "mlp:tiny:3:2", "--seed", "5"]) == 0
    data = json.loads((results_dir / "train_step_quick.json").read_text())
    (row,) = data["configs"]
    assert (row["arch"], row["tenants"], row["batch"]) == ("mlp", 3, 2)
    assert set(row["ms_per_step"]) == {"summed", "per_tenant"} and all(ms > 0 for ms in row["ms_per_step"].values())
    assert row["forms_rel_diff"] < data["tolerance"] and row["others_rel_diff_after_nan_step"] < data["tolerance"]
    assert 0 <= row["others_flagged_by_summed_pass"] <= 2
    assert row["auto"] == "per_tenant"  # a CPU under plain vmap
