"""benchmarks/kernel_ptx.py: where the ``triton`` package is installed, one small layer's
kernel compiles for sm_90 on the CPU and its PTX is counted; float32 [C, O] filter tiles are
the ones copied 4 bytes at a time (the transpose Hopper's TF32 wgmma needs), and every layout
keeps one group of MMAs in flight across loop iterations, as XLA's Triton passes compile it."""

from __future__ import annotations

import json

import pytest
from conftest import benchmark_script


@pytest.fixture(scope="module")
def bench():
    pytest.importorskip("triton")
    with benchmark_script("kernel_ptx.py", "jaxmt_kernel_ptx_bench") as module:
        yield module


def test_only_float32_filters_laid_out_c_by_o_are_copied_four_bytes_at_a_time(bench, results_dir):
    assert bench.main(["--quick", "--out", "kernel_ptx_quick"]) == 0
    rows = json.loads((results_dir / "kernel_ptx_quick.json").read_text())["rows"]
    assert len(rows) == 4  # two dtypes, two layouts
    for row in rows:
        transposing = row["dtype"] == "float32" and row["filter"] == "[C, O]"
        assert ("4" in row["copies_by_bytes"]) == transposing and row["copies_by_bytes"]["16"] > 0
        assert any(name.startswith("wgmma") for name in row["mma"])
        # The loop waits with one group pending; only the epilogue drains them all.
        assert row["mma_waits_by_pending"].get("1", 0) >= 1 and row["mma_waits_by_pending"].get("0", 0) <= 1
