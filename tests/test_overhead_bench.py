"""benchmarks/overhead.py: a CPU smoke run checks predict against the per-tenant reference and
writes every phase of a step; nothing here checks speed."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import benchmark_script


@pytest.fixture(scope="module")
def overhead():
    with benchmark_script("overhead.py", "jaxmt_overhead_bench") as module:
        yield module


def test_a_short_run_writes_the_overhead_and_every_phase(overhead, results_dir):
    overhead.main(["--tenants", "4", "--rows", "8", "--repeats", "5", "--no-readme"])
    result = json.loads((results_dir / "overhead.json").read_text())["result"]
    assert result["relative_error"] < 1e-5 and result["recompiles_in_steady_state"] == 0
    assert result["overhead_us"] == pytest.approx(result["predict_us"] - result["bare_program_us"])
    assert set(result["phases_us"]) == {"host_plan", "to_device", "launch", "program", "to_host", "host_only"}
    assert all(us > 0 for us in result["phases_us"].values())
    traced = result["traced_phases_us"]
    assert {"predict", "jaxmt.check", "jaxmt.plan", "jaxmt.launch", "jaxmt.result", "program_call", "device_busy"} <= set(traced)
    assert traced["program_call"] <= traced["jaxmt.launch"] <= traced["predict"]
    assert all(traced[name] <= traced["predict"] for name in overhead.TRACED_PHASES)  # each call's phases lie inside it


def test_the_host_only_predict_answers_as_predict_does_and_leaves_the_programs_alone(overhead):
    import models

    spec = models.make("mlp", "tiny")
    params = {f"t{i}": spec.init(i) for i in range(3)}
    mt = overhead._model(spec, params, None)
    ids, x = ["t0", "t2", "t0", "t1"], spec.random_input(np.random.default_rng(0), 4)
    before = mt.stats()["compiles"]
    assert overhead._host_only_predict_us(mt, ids, x, repeats=3) > 0  # checks its answer equals predict's first
    assert "get" not in vars(mt.programs) and mt.stats()["compiles"] == before + 1  # the one program of this step
