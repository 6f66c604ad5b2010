"""benchmarks/step_time.py: a CPU smoke run measures, checks and reports each step.

Nothing here checks speed: only that every step shape asked for is checked against the
per-tenant reference, timed beside its two baselines, and written out consistently.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import benchmark_script


@pytest.fixture(scope="module")
def step_time():
    with benchmark_script("step_time.py", "jaxmt_step_time_bench") as module:
        yield module


def test_shapes_parse_as_tenants_by_rows(step_time):
    assert step_time.parse_shapes("1x1,16X2") == [(1, 1), (16, 2)]
    with pytest.raises(ValueError):
        step_time.parse_shapes("16")


@pytest.mark.parametrize("arch", ["mlp", "resnet18"])
def test_a_quick_run_times_every_shape_and_lowering_against_both_baselines(step_time, arch, results_dir):
    argv = ["--quick", "--arch", arch, "--shapes", "1x1,4x2", "--lowerings", "auto,vmap", "--seed", "3"]
    assert step_time.main(argv) == 0
    data = json.loads((results_dir / "step_time_quick.json").read_text())
    steps = data["steps"]
    assert [(s["lowering"], s["tenants"], s["rows_per_tenant"]) for s in steps] == [
        ("auto", 1, 1), ("auto", 4, 2), ("vmap", 1, 1), ("vmap", 4, 2)]
    for s in steps:
        assert 0 <= s["rel_error"] < 1e-5  # float32 on the CPU
        assert s["exclusive_ms"] > 0 and s["time_only_ms"] > 0
        assert s["over_time_only"] == pytest.approx(s["time_only_ms"] / s["step_ms"])
        assert s["of_exclusive"] == pytest.approx(s["exclusive_ms"] / s["step_ms"])


def test_the_baselines_are_timed_in_the_steps_rounds_and_time_only_runs_each_tenants_own_program(step_time, monkeypatch):
    """Time-only is the K tenants' own programs launched in turn and waited for once, like the
    step, in the same rounds: not K times one tenant's call, each waited for, timed apart."""
    timed = []

    def fake_rounds(fns, **kwargs):
        timed.append(dict(fns))
        return {name: {"median_s": 1e-3} for name in fns}

    monkeypatch.setattr(step_time, "time_calls_interleaved", fake_rounds)
    step_time.measure("mlp", "tiny", "float32", 8, [(4, 2)], ["vmap"], 3, 0, 1e-4)
    (fns,) = timed
    assert set(fns) == {"step", "exclusive", "time_only"}
    outputs = fns["time_only"]()
    assert isinstance(outputs, list) and len(outputs) == 4  # K calls of B rows, waited for together
    # Each call is its tenant's own program on its own rows: together they answer as the step does
    # (one tenant's weights for all K would not).
    np.testing.assert_allclose(np.stack([np.asarray(y) for y in outputs]), np.asarray(fns["step"]()), rtol=1e-5, atol=1e-6)
    assert np.asarray(fns["exclusive"]()).shape[0] == 8  # one model on all K*B rows


def test_a_step_of_more_tenants_than_the_store_holds_is_refused(step_time, capsys):
    with pytest.raises(SystemExit) as exit_info:
        step_time.main(["--quick", "--shapes", "16x1"])  # --quick: 8 tenants
    assert exit_info.value.code == 2 and "at least as many in the store" in capsys.readouterr().err
