"""benchmarks/kernel_profile.py: device kernels of a trace summed per call and sorted into
categories by name; a CPU smoke run checks both programs against the reference first."""

from __future__ import annotations

import json

import pytest
from conftest import benchmark_script


@pytest.fixture(scope="module")
def bench():
    with benchmark_script("kernel_profile.py", "jaxmt_kernel_profile_bench") as module:
        yield module


def _trace(*spans):
    meta = [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
        {"ph": "M", "name": "thread_name", "pid": 1, "tid": 10, "args": {"name": "Stream #13(Compute)"}},
        {"ph": "M", "name": "thread_name", "pid": 1, "tid": 11, "args": {"name": "XLA Ops"}},
        {"ph": "M", "name": "thread_name", "pid": 2, "tid": 20, "args": {"name": "python"}},
    ]
    return meta + [{"ph": "X", "pid": pid, "tid": tid, "name": name, "dur": dur, "ts": 0, "args": {"hlo_op": op}}
                   for pid, tid, name, dur, op in spans]


def test_kernels_are_summed_per_call_and_sorted_into_categories(bench):
    events = _trace(
        (1, 10, "sm90_xmma_fprop_implicit_gemm_f32", 40.0, "cudnn-conv.1"),
        (1, 10, "sm90_xmma_fprop_implicit_gemm_f32", 44.0, "cudnn-conv.1"),
        (1, 10, "gemm_fusion_dot_1", 120.0, "command_buffer_3"),
        (1, 10, "loop_concatenate_fusion_6", 30.0, "command_buffer_3"),
        (1, 10, "loop_maximum_fusion", 6.0, "loop_maximum_fusion"),
        (1, 11, "gemm_fusion_dot_1", 999.0, "summary line, not a kernel"),
        (2, 20, "PjitFunction(apply)", 500.0, "host span"),
    )
    rows = bench.kernels_per_call(events, calls=2)
    assert [(r["kernel"], r["us"], r["launches"], r["category"]) for r in rows] == [
        ("gemm_fusion_dot_1", 60.0, 0.5, "matmul"),
        ("sm90_xmma_fprop_implicit_gemm_f32", 42.0, 1.0, "conv (cuDNN)"),
        ("loop_concatenate_fusion_6", 15.0, 0.5, "concatenate (im2col patches)"),
        ("loop_maximum_fusion", 3.0, 0.5, "elementwise and other"),
    ]
    assert bench.by_category(rows)["matmul"] == 60.0
    assert bench.category("tenant_conv_implicit_gemm") == "conv (Pallas kernel)"


def test_a_quick_run_checks_both_programs_and_writes_each_methods_profile(bench, results_dir):
    assert bench.main(["--models", "resnet18", "--size", "tiny", "--tenants", "2", "--calls", "2", "--no-readme"]) == 0
    (row,) = json.loads((results_dir / "kernel_profile.json").read_text())["rows"]
    assert max(row["rel_error"].values()) < 1e-2 and row["convs"]
    for method in ("exclusive", "jaxmt"):
        assert row[method]["wall_us"] > 0
        assert row[method]["kernel_us"] == pytest.approx(sum(k["us"] for k in row[method]["kernels"]))
