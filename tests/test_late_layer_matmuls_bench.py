"""benchmarks/late_layer_matmuls.py: every matmul form and every patch build is checked before it
is timed; nothing here checks speed."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import benchmark_script


@pytest.fixture(scope="module")
def bench():
    with benchmark_script("late_layer_matmuls.py", "jaxmt_late_layer_matmuls_bench") as module:
        yield module


def test_the_patch_builds_match_patches_made_on_the_host(bench):
    x = np.random.default_rng(0).standard_normal((2, 1, 5, 5, 3)).astype(np.float32)
    want = bench.reference_patches(x)
    assert want.shape == (2, 1, 5, 5, 27)
    np.testing.assert_array_equal(np.asarray(bench.concat(x)), want)
    np.testing.assert_array_equal(np.asarray(bench.stack(x)), want)
    assert not np.allclose(np.asarray(bench.concat_after_bn_relu(x)), want)  # patches of another tensor: checked against its own


def test_a_run_records_each_forms_error_and_time(bench, results_dir):
    bench.main(["--tenants", "2", "--out", "late"])
    data = json.loads((results_dir / "late.json").read_text())
    assert data["environment"]["commit"] and len(data["matmul"]) == len(bench.LAYERS) and len(data["patches"]) == 3
    for row in data["patches"]:
        for form in ("concat", "stack", "concat_after_bn_relu"):
            assert row[form + "_err"] < 1e-6 and row[form] > 0
