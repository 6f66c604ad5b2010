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


def test_a_short_run_writes_the_overhead_and_every_phase(overhead, results_dir, capsys):
    overhead.main(["--tenants", "4", "--rows", "8", "--repeats", "5", "--no-readme"])
    # "dispatch_only_us" is timed with a wait for the step's outputs: its column says so.
    assert "dispatch + device wait, no answer read (us)" in capsys.readouterr().out
    result = json.loads((results_dir / "overhead.json").read_text())["result"]
    assert result["relative_error"] < 1e-5 and result["recompiles_in_steady_state"] == 0
    assert result["overhead_us"] == pytest.approx(result["predict_us"] - result["bare_program_us"])
    assert set(result["phases_us"]) == {"host_plan", "to_device", "launch", "program", "to_host", "host_only"}
    assert all(us > 0 for us in result["phases_us"].values())
    assert set(result["by_way_of_waiting_us"]) == {"bare_blocking", "bare_polling", "predict_blocking", "predict_polling",
                                                     overhead.SPIN_NAME, "predict_blocking_again"}
    assert all(us > 0 for us in result["by_way_of_waiting_us"].values())
    runs = result["by_way_of_waiting_in_runs_us"]
    assert set(runs) == {"predict_blocking", overhead.SPIN_NAME} and all(us > 0 for us in runs.values())
    tuned = result["with_compiler_options"]  # answers checked equal before timing
    assert tuned.pop("options") == overhead.COMPARED_OPTIONS
    tuned_runs = tuned.pop("in_runs")
    assert set(tuned) == {"predict_default", "predict_with_options", "bare_default", "bare_with_options", "predict_default_again"}
    assert set(tuned_runs) == {"predict_default", "predict_with_options"}
    assert all(us > 0 for us in [*tuned.values(), *tuned_runs.values()])
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


def _span(name, ts, dur, pid=1, tid=10):
    return {"ph": "X", "name": name, "ts": ts, "dur": dur, "pid": pid, "tid": tid}


def test_phases_from_a_trace_sum_steps_and_unite_device_work_of_the_call(overhead):
    """A hand-made trace of two calls: the first runs two steps (one program call with a
    nested span of its own) and three overlapping kernels; the second has no device work."""
    meta = [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
        {"ph": "M", "name": "thread_name", "pid": 1, "tid": 10, "args": {"name": "python"}},
        {"ph": "M", "name": "thread_name", "pid": 1, "tid": 11, "args": {"name": "another host thread"}},
        {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "name": "thread_name", "pid": 2, "tid": 20, "args": {"name": "Stream #7(Compute)"}},
        {"ph": "M", "name": "thread_name", "pid": 2, "tid": 21, "args": {"name": "CUPTI overhead"}},
    ]
    events = list(meta)
    for offset, device in ((0, True), (1000, False)):
        events += [
            _span(overhead.CALL_SPAN, offset, 100),
            _span("jaxmt.check", offset + 1, 5), _span("jaxmt.plan", offset + 6, 10),
            _span("jaxmt.launch", offset + 16, 40), _span("jaxmt.result", offset + 60, 38),
            _span("PjitFunction(step)", offset + 20, 15), _span("PjitFunction(step)", offset + 21, 13),  # nested
            _span("PjitFunction(step)", offset + 40, 10),  # the second step
            _span("PjitFunction(other)", offset + 25, 60, tid=11),  # another thread: not this call's
        ]
        if device:
            events += [_span("fusion", 30, 10, pid=2, tid=20), _span("dot", 35, 10, pid=2, tid=20),
                       _span("fusion.1", 50, 20, pid=2, tid=20), _span("collector", 80, 15, pid=2, tid=21)]
    got = overhead.phases_from_trace(events + [{}])
    assert got == {
        "predict": 100, "jaxmt.check": 5, "jaxmt.plan": 10, "jaxmt.launch": 40, "jaxmt.result": 38,
        "between_phases": 7, "program_call": 25,
        "device_busy": 35, "launch_to_device_end": 50, "device_end_to_return": 30,  # the first call's alone
        "calls": 2, "calls_with_device_work": 1,
    }


@pytest.mark.parametrize("thread_name", ["tf_XLAPjRtCpuClient/-6507080806527236748", "tf_XLAExecute/140159479707328"])
def test_a_cpu_backend_s_runtime_threads_are_its_device_work(overhead, thread_name):
    """On a CPU backend the program runs on the runtime's host threads, named by jax version;
    its intra-op pool and other host threads are not counted."""
    events = [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
        {"ph": "M", "name": "thread_name", "pid": 1, "tid": 10, "args": {"name": "python"}},
        {"ph": "M", "name": "thread_name", "pid": 1, "tid": 12, "args": {"name": thread_name}},
        {"ph": "M", "name": "thread_name", "pid": 1, "tid": 13, "args": {"name": "tf_XLAEigen/140159446136512"}},
        _span(overhead.CALL_SPAN, 0, 100), _span("PjitFunction(step)", 10, 20),
        _span("ThunkExecutor::Execute", 25, 30, tid=12), _span("eigen task", 30, 50, tid=13),
    ]
    got = overhead.phases_from_trace(events)
    assert got["device_busy"] == 30 and got["launch_to_device_end"] == 45 and got["calls_with_device_work"] == 1
