"""Host overhead of ``predict``: its time minus the bare compiled program's for the same step.

Tiny MLP, 16 tenants, 64 rows spread over them at random. The bare programs of the plan's
steps are called with
device-resident, pre-gathered inputs; ``predict`` adds validation, planning, the input
gather and transfer, the dispatch, the copy back and the scatter to request order. Bare
program and ``predict`` are timed in alternating rounds, with, where steps take their
inputs from pinned host buffers (the default on a GPU), the same model handing them over as
NumPy arguments instead (``host_inputs=False``).

    PYTHONPATH=. python benchmarks/overhead.py [--tenants 16] [--rows 64] [--repeats 500]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Any

import common  # noqa: F401  (puts the repository on sys.path)
import jax
import numpy as np
from common import markdown_table, time_call, time_calls_interleaved, update_readme_section, write_json

import models
from jaxmt import BucketPolicy, MultiTenantModel
from jaxmt.jax_compat import single_device_sharding
from jaxmt.steps import host_output_sharding, wait_for


# Compared with the default in every run (``with_compiler_options``): XLA captures even a
# small step's few kernels and copies as one CUDA graph (its default minimum is larger).
COMPARED_OPTIONS = {"xla_gpu_graph_min_graph_size": 1}
# The spin compared with blocking (``by_way_of_waiting``, ``waits_in_runs``): longer than the
# tiny step's launch-to-answer time on the H100 hosts measured (120-210 us).
SPIN_S = 300e-6
SPIN_NAME = f"predict_spin_{SPIN_S * 1e6:.0f}us"


def _model(spec, params: dict, outputs_to_host: bool | None, host_inputs: bool | None = None,
           compiler_options: dict | None = None) -> MultiTenantModel:
    mt = MultiTenantModel(spec.apply_fn, next(iter(params.values())), capacity=len(params), buckets=BucketPolicy(),
                          row_shape=spec.input_shape, row_dtype=spec.input_dtype, outputs_to_host=outputs_to_host,
                          host_inputs=host_inputs, compiler_options=compiler_options)
    for tenant, p in params.items():
        mt.add_tenant(tenant, p)
    return mt


def measure(tenants: int, rows: int, repeats: int, seed: int) -> dict:
    spec = models.make("mlp", "tiny")
    rng = np.random.default_rng(seed)
    params = {f"t{i}": spec.init(seed + i) for i in range(tenants)}
    mt = _model(spec, params, None)  # the default placement of answers (pinned host memory on a GPU)
    in_host = mt.output_sharding is not None
    other = _model(spec, params, not in_host)  # the same model with its answers placed the other way
    # Where steps take pinned host buffers, the same model with NumPy arguments, side by side.
    as_arguments = None if mt.host_input_buffers is None else _model(spec, params, None, host_inputs=False)
    # A fixed request (fresh random content), so the step shape is the same every call.
    ids = list(rng.choice(list(params), size=rows))
    ids[:tenants] = list(params)  # every tenant present: K = tenants
    x = spec.random_input(rng, rows)
    y = mt.predict(ids, x)
    apply = jax.jit(spec.apply_fn)
    want = np.concatenate([np.asarray(apply(params[t], x[i : i + 1])) for i, t in enumerate(ids)])
    err = float(np.linalg.norm(y - want) / np.linalg.norm(want))
    assert err < 1e-2, f"predict differs from the reference by {err} (relative; TF32 allows ~1e-3)"

    plan = mt.dispatch(ids, x).plan
    # The bare programs of the same steps, with inputs already gathered and on the device.
    calls = [
        (mt.programs.get(mt._key(step.tenant_bucket, step.row_bucket)), jax.device_put(step.slots), jax.device_put(x[step.row_index]))
        for step in plan.steps
    ]
    leaves = mt.store.stacked_leaves
    compiles_before = mt.stats()["compiles"]
    timed = {
        "bare": lambda: [program(leaves, slots, x_kb) for program, slots, x_kb in calls],
        "predict": lambda: mt.predict(ids, x),
    }
    if as_arguments is not None:
        np.testing.assert_allclose(as_arguments.predict(ids, x), y, rtol=1e-6, atol=1e-6)
        timed["predict_argument_inputs"] = lambda: as_arguments.predict(ids, x)
    timings = time_calls_interleaved(timed, warmup=20, repeats=repeats)
    bare, full = timings["bare"], timings["predict"]
    np.testing.assert_allclose(other.predict(ids, x), y, rtol=1e-6, atol=1e-6)
    other_program = other.programs.get(other._key(plan.steps[0].tenant_bucket, plan.steps[0].row_bucket))
    other_calls = [(other_program, slots, x_kb) for _, slots, x_kb in calls]
    other_leaves = other.store.stacked_leaves
    bare_other = time_call(lambda: [program(other_leaves, slots, x_kb) for program, slots, x_kb in other_calls], warmup=20, repeats=repeats)
    full_other = time_call(lambda: other.predict(ids, x), warmup=20, repeats=repeats)
    # dispatch and the wait for its outputs (time_call waits), without reading the answers back
    # or scattering them: the JSON's "dispatch_only_us", labelled as such in the table.
    launch = time_call(lambda: mt.dispatch(ids, x).outputs, warmup=20, repeats=repeats)
    phases = breakdown(mt, ids, x, calls, repeats)
    transfers = packed_transfer(mt, plan.steps[0], x, repeats)
    launches = launch_by_input_place(mt, plan.steps[0], x, repeats)
    waits = by_way_of_waiting(mt, ids, x, calls, repeats)
    waits_runs = waits_in_runs(mt, ids, x, rounds=max(2, repeats // 30))
    options = with_compiler_options(mt, spec, params, ids, x, plan, COMPARED_OPTIONS, repeats)
    in_flow = traced_phases(mt, ids, x, min(repeats, 200))  # last: a profiler session touches nothing timed
    recompiles = mt.stats()["compiles"] - compiles_before
    return {
        "phases_us": phases,
        "traced_phases_us": in_flow,
        "one_step_with_host_inputs_us": transfers,
        "launch_by_input_place_us": launches,
        "by_way_of_waiting_us": waits,
        "by_way_of_waiting_in_runs_us": waits_runs,
        "predict_spin_us": mt.predict_spin_s * 1e6,  # how the model's predict waits (predict_us)
        "with_compiler_options": options,
        "tenants": tenants,
        "rows": rows,
        "steps": [[step.tenant_bucket, step.row_bucket] for step in plan.steps],
        "outputs_to_host": in_host,
        "host_inputs": mt.host_input_buffers is not None,
        "argument_inputs": None if as_arguments is None else {  # host_inputs=False, timed in the same rounds
            "predict_us": timings["predict_argument_inputs"]["median_s"] * 1e6,
            "overhead_us": (timings["predict_argument_inputs"]["median_s"] - bare["median_s"]) * 1e6,
        },
        "other_placement": {  # the same model, answers placed the other way, same run
            "outputs_to_host": not in_host,
            "bare_program_us": bare_other["median_s"] * 1e6,
            "predict_us": full_other["median_s"] * 1e6,
            "overhead_us": (full_other["median_s"] - bare_other["median_s"]) * 1e6,
        },
        "bare_program_us": bare["median_s"] * 1e6,
        "predict_us": full["median_s"] * 1e6,
        "dispatch_only_us": launch["median_s"] * 1e6,
        "overhead_us": (full["median_s"] - bare["median_s"]) * 1e6,
        "recompiles_in_steady_state": recompiles,
        "relative_error": err,
        "repeats": repeats,
    }


def _median_us(fn, repeats: int) -> float:
    samples = []
    for i in range(repeats + 10):
        start = time.perf_counter()
        fn()
        if i >= 10:
            samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e6


def breakdown(mt: MultiTenantModel, ids: list, x: np.ndarray, calls: list, repeats: int) -> dict[str, float]:
    """Where ``predict``'s time goes, each phase timed alone (medians, us).

    host_plan: validation, slot lookup, the plan and the input gather (NumPy only);
    to_device: the step inputs (slots, rows) copied to the device by one ``device_put``,
    waited for (``predict`` hands the NumPy arrays to the executable, which copies them
    itself: the same bytes, a measure of what moving them costs);
    launch: one step program dispatched on device-resident inputs, not waited for;
    program: the same, waited for;
    to_host: a finished output read as a NumPy array: a memcpy when the program wrote it to
    pinned host memory (the default on a GPU; ``program`` then includes that write), else a
    copy from the device asked for only then (``predict`` starts that copy when it
    dispatches the step, so part of it can overlap);
    host_only: a whole ``predict`` whose step programs are stand-ins that return a finished
    answer of the same step at once: everything ``predict`` does on the host but the call of
    the program with its NumPy inputs. With ``one_step_with_host_inputs_us["two_inputs"]``
    (that call, waited for, and its answer read) it tells whether ``predict``'s time is the
    sum of the two or something more.
    """
    def host_plan():
        checked = mt.check_input(ids, x)
        plan = mt._plan(mt.store.slots_of(ids))
        return [checked[step.row_index] for step in plan.steps]

    leaves = mt.store.stacked_leaves
    program, slots, x_kb = calls[0]
    host_inputs = (np.asarray(slots), np.asarray(x_kb))
    ready = [program(leaves, slots, x_kb) for _ in range(repeats + 10)]
    jax.block_until_ready(ready)
    fresh = iter(ready)
    return {
        "host_plan": _median_us(host_plan, repeats),
        "to_device": _median_us(lambda: jax.block_until_ready(jax.device_put(host_inputs, mt.store.device)), repeats),
        "launch": _median_us(lambda: program(leaves, slots, x_kb), repeats),
        "program": _median_us(lambda: jax.block_until_ready(program(leaves, slots, x_kb)), repeats),
        "to_host": _median_us(lambda: np.asarray(next(fresh)), repeats),
        "host_only": _host_only_predict_us(mt, ids, x, repeats),
    }


TRACED_PHASES = ("jaxmt.check", "jaxmt.plan", "jaxmt.launch", "jaxmt.result")
CALL_SPAN = "overhead.predict"
# Lines of a device in a trace that are not the device's own work (the profiler's collector,
# summaries of the stream lines).
NOT_DEVICE_WORK = ("CUPTI", "XLA Modules", "XLA Ops", "Steps", "Framework")
# Host threads that run a CPU backend's programs, by the names jax gives them in a trace
# (jax 0.10: the PjRt CPU client's pool; jax 0.12: its execute threads).
CPU_RUNTIME_THREADS = ("XLAPjRtCpuClient", "XLAExecute")


def traced_phases(mt: MultiTenantModel, ids: list, x: np.ndarray, calls: int) -> dict[str, float]:
    """Where ``predict``'s time goes in the flow: ``phases_from_trace`` of a JAX profiler
    trace of ``calls`` back-to-back calls. Python functions are not traced, but the
    runtime's own events are, so a traced call is slower than an untraced one (compare
    ``predict`` here with ``predict_us``)."""
    import glob
    import gzip
    import json
    import tempfile

    for _ in range(20):
        mt.predict(ids, x)
    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0
    with tempfile.TemporaryDirectory() as log_dir:
        with jax.profiler.trace(log_dir, create_perfetto_trace=True, profiler_options=options):
            for _ in range(calls):
                with jax.profiler.TraceAnnotation(CALL_SPAN):
                    mt.predict(ids, x)
        (path,) = glob.glob(f"{log_dir}/**/perfetto_trace.json.gz", recursive=True)
        with gzip.open(path) as f:
            events = json.load(f)["traceEvents"]
    return phases_from_trace(events)


def phases_from_trace(events: list[dict]) -> dict[str, float]:
    """Medians over the calls (spans named ``CALL_SPAN``) of a perfetto trace's events, us.

    predict: the whole call; ``jaxmt.*``: its named host phases; between_phases: the call's
    time outside them; program_call: the program calls (outermost ``PjitFunction`` spans of
    the calling thread, summed over the call's steps), which ``jaxmt.launch`` holds;
    device_busy: the time covered by the call's device work (a GPU's stream lines; on a CPU
    backend the runtime's threads that run the program); launch_to_device_end: from the
    first program call's start to the end of the call's last device event;
    device_end_to_return: from there until the call returns (the waiting thread's wake-up,
    the answer read and its scatter). calls, calls_with_device_work: how many calls the
    medians are over (the device keys: over the second).
    """
    process = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    thread = {(e["pid"], e.get("tid")): e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "thread_name"}

    def device_work(e: dict) -> bool:
        line = thread.get((e["pid"], e.get("tid")), "")
        if process.get(e["pid"], "").startswith("/device:"):
            return not line.startswith(NOT_DEVICE_WORK)
        return any(name in line for name in CPU_RUNTIME_THREADS)

    spans = sorted((e for e in events if e.get("ph") == "X"), key=lambda e: e["ts"])
    device_events = [e for e in spans if device_work(e)]
    rows: dict[str, list[float]] = {}
    calls = [e for e in spans if e["name"] == CALL_SPAN]
    with_device = 0
    for call in calls:
        start, end = call["ts"], call["ts"] + call["dur"]
        caller = (call["pid"], call.get("tid"))
        inside = [e for e in spans if start <= e["ts"] <= end and (e["pid"], e.get("tid")) == caller]
        row = {"predict": call["dur"]}
        for name in TRACED_PHASES:
            row[name] = sum(e["dur"] for e in inside if e["name"] == name)
        row["between_phases"] = call["dur"] - sum(row[name] for name in TRACED_PHASES)
        outermost, reach = [], None
        for e in (e for e in inside if e["name"].startswith("PjitFunction")):  # in start order
            if reach is None or e["ts"] >= reach:
                outermost.append(e)
                reach = e["ts"] + e["dur"]
        row["program_call"] = sum(e["dur"] for e in outermost)
        device = [e for e in device_events if start <= e["ts"] <= end]
        if outermost and device:
            with_device += 1
            covered, last_end = 0.0, None
            for e in device:  # the union of the device's intervals
                finish = e["ts"] + e["dur"]
                if last_end is None or e["ts"] > last_end:
                    covered, last_end = covered + e["dur"], finish
                elif finish > last_end:
                    covered, last_end = covered + finish - last_end, finish
            row["device_busy"] = covered
            row["launch_to_device_end"] = last_end - outermost[0]["ts"]
            row["device_end_to_return"] = end - last_end
        for name, value in row.items():
            rows.setdefault(name, []).append(value)
    medians = {name: round(statistics.median(values), 1) for name, values in rows.items()}
    return {**medians, "calls": len(calls), "calls_with_device_work": with_device}


def _host_only_predict_us(mt: MultiTenantModel, ids: list, x: np.ndarray, repeats: int) -> float:
    """``predict`` with each step program replaced by a stand-in returning that step's
    finished answer (see ``breakdown``); the model's program cache is restored after."""
    import itertools

    pending = mt.dispatch(ids, x)
    finished = jax.block_until_ready(pending.outputs)
    answers = itertools.cycle(finished)  # predict launches its steps in plan order, every call alike
    # Shadows the method until deleted; a program of pinned host inputs also returns a token.
    mt.programs.get = lambda key: (lambda *args: (next(answers), None) if key.host_inputs else next(answers))
    try:
        np.testing.assert_array_equal(mt.predict(ids, x), pending.result())
        return _median_us(lambda: mt.predict(ids, x), repeats)
    finally:
        del mt.programs.get


def _poll(outputs: Any) -> None:
    """Returns once every leaf of ``outputs`` is ready, asking in a loop and never sleeping."""
    wait_for(outputs, math.inf)


def by_way_of_waiting(mt: MultiTenantModel, ids: list, x: np.ndarray, calls: list, repeats: int) -> dict[str, float]:
    """The bare programs and ``predict`` by how the caller waits for the device, in
    alternating rounds (medians, us): blocking (``block_until_ready``, what the bare
    programs of the rest of the script do, and ``dispatch(...).result()``) against polling
    ``is_ready()`` in a loop, which spares the waiting thread a sleep and a wake-up but holds
    a core (and the GIL) meanwhile, and polling for up to ``SPIN_S`` before blocking (what
    ``MultiTenantModel(predict_spin_us=...)`` does). Tells how much of a call is that
    wake-up; answers are checked equal first. ``waits_in_runs`` times ``predict`` blocking
    and with the spin in runs of consecutive calls, as a client calling it over and over
    makes them."""
    leaves = mt.store.stacked_leaves

    def bare() -> list:
        return [program(leaves, slots, x_kb) for program, slots, x_kb in calls]

    def predict_polled() -> Any:
        return mt.dispatch(ids, x).result(spin_s=math.inf)

    np.testing.assert_array_equal(predict_polled(), mt.predict(ids, x))
    timed = {
        "predict_blocking": lambda: mt.dispatch(ids, x).result(),
        "bare_blocking": lambda: jax.block_until_ready(bare()),
        "bare_polling": lambda: _poll(bare()),
        "predict_polling": predict_polled,
        SPIN_NAME: lambda: mt.dispatch(ids, x).result(spin_s=SPIN_S),
        # The first call of the rounds again, in the last place: an A/A control of what a call's
        # place in the rotation alone does (17-26 us on the 2-core CPU).
        "predict_blocking_again": lambda: mt.dispatch(ids, x).result(),
    }
    timings = time_calls_interleaved(timed, warmup=20, repeats=repeats)
    return {name: round(t["median_s"] * 1e6, 1) for name, t in timings.items()}


def in_runs(fns: dict[str, Any], run_length: int = 30, rounds: int = 20) -> dict[str, float]:
    """Medians (us) of ``fns`` timed in runs: each round makes ``run_length`` consecutive calls
    of each in turn (the first round is a warm-up). Alternating single calls
    (``time_calls_interleaved``) leaves each call in the state the other kind left; a run
    measures a kind in its own steady state."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(rounds + 1):
        for name, fn in fns.items():
            for _ in range(run_length):
                start = time.perf_counter()
                jax.block_until_ready(fn())
                if round_:
                    samples[name].append(time.perf_counter() - start)
    return {name: round(statistics.median(values) * 1e6, 1) for name, values in samples.items()}


def waits_in_runs(mt: MultiTenantModel, ids: list, x: np.ndarray, rounds: int) -> dict[str, float]:
    """``predict`` blocking against polling up to ``SPIN_S`` first, in runs (``in_runs``)."""
    return in_runs({"predict_blocking": lambda: mt.dispatch(ids, x).result(),
                    SPIN_NAME: lambda: mt.dispatch(ids, x).result(spin_s=SPIN_S)}, rounds=rounds)


def with_compiler_options(mt: MultiTenantModel, spec, params: dict, ids: list, x: np.ndarray, plan, options: dict,
                          repeats: int) -> dict[str, Any]:
    """``predict`` and the bare program of its step for ``mt`` and for the same model built with
    ``compiler_options=options``, all four in alternating rounds (medians, us); answers are
    checked equal first."""
    tuned = _model(spec, params, None, compiler_options=options)
    np.testing.assert_allclose(tuned.predict(ids, x), mt.predict(ids, x), rtol=1e-6, atol=1e-6)
    inputs = [(step, *jax.device_put((step.slots, x[step.row_index]))) for step in plan.steps]

    def bare(model: MultiTenantModel):
        calls = [(model.programs.get(model._key(step.tenant_bucket, step.row_bucket)), slots, x_kb) for step, slots, x_kb in inputs]
        leaves = model.store.stacked_leaves
        return lambda: jax.block_until_ready([program(leaves, slots, x_kb) for program, slots, x_kb in calls])

    predicts = {"predict_default": lambda: mt.predict(ids, x), "predict_with_options": lambda: tuned.predict(ids, x)}
    timings = time_calls_interleaved({**predicts, "bare_default": bare(mt), "bare_with_options": bare(tuned),
                                      "predict_default_again": predicts["predict_default"]},  # A/A control, as above
                                     warmup=20, repeats=repeats)
    return {"options": options, **{name: round(t["median_s"] * 1e6, 1) for name, t in timings.items()},
            "in_runs": in_runs(predicts, rounds=max(2, repeats // 30))}


def launch_by_input_place(mt: MultiTenantModel, step, x: np.ndarray, repeats: int) -> dict[str, dict[str, float]]:
    """One step's program by where its inputs are: on the device (the bare program), in
    pinned host memory (as ``host_inputs`` sends them: two buffers, a token output), and as
    NumPy arguments. Per call, in alternating rounds: the launch (until the call returns)
    and the whole (waited for), medians in us. Tells what a program whose inputs are in host
    memory costs to launch against the bare one. Answers are checked equal first."""
    from jaxmt.host_inputs import has_pinned_host

    device = mt.store.device
    if not has_pinned_host(device):
        return {}
    leaves = mt.store.stacked_leaves
    program = mt.programs.get(mt._key(step.tenant_bucket, step.row_bucket))
    from_host = None
    if mt.host_input_buffers is not None:  # the model's own program of pinned host inputs
        from_host = mt.programs.get(mt._key(step.tenant_bucket, step.row_bucket, host_inputs=True))
    x_kb = x[step.row_index]
    pinned = single_device_sharding(device, memory_kind="pinned_host")
    on_device = jax.device_put((step.slots, x_kb), device)
    in_host = jax.device_put((step.slots, x_kb), pinned)
    calls = {"device": lambda: program(leaves, *on_device), "numpy_arguments": lambda: program(leaves, step.slots, x_kb)}
    if from_host is not None:
        calls["pinned_host"] = lambda: from_host(leaves, *in_host)[0]
    want = np.asarray(calls["device"]())
    for call in calls.values():
        np.testing.assert_allclose(np.asarray(call()), want, rtol=1e-6, atol=1e-6)
    launch: dict[str, list[float]] = {name: [] for name in calls}
    whole: dict[str, list[float]] = {name: [] for name in calls}
    for i in range(repeats + 20):
        for name, call in calls.items():
            start = time.perf_counter()
            out = call()
            launched = time.perf_counter()
            jax.block_until_ready(out)
            if i >= 20:
                launch[name].append((launched - start) * 1e6)
                whole[name].append((time.perf_counter() - start) * 1e6)
    return {name: {"launch": round(statistics.median(launch[name]), 1), "whole": round(statistics.median(whole[name]), 1)} for name in calls}


def packed_transfer(mt: MultiTenantModel, step, x: np.ndarray, repeats: int) -> dict[str, float]:
    """One step from host inputs to a host answer, with the inputs sent as they are (two
    arrays: slots and rows, as ``predict`` sends them), packed into one byte buffer that
    the program splits again (one copy to the device instead of two), and, where the device
    has pinned host memory, placed there and moved to the device inside the program. The
    last two are not what jaxmt does: they measure what another way of handing over a
    step's inputs would save. Every answer is checked equal before timing (medians, us)."""
    import functools

    import jax.numpy as jnp
    from jaxmt.steps import _step_program

    leaves = mt.store.stacked_leaves
    slots, x_kb = step.slots, x[step.row_index]
    step_fn = functools.partial(_step_program, mt._apply_kb, mt.store.treedef)
    slot_bytes = slots.nbytes

    def unpack_and_run(leaves, buf):
        slots_d = jax.lax.bitcast_convert_type(buf[:slot_bytes].reshape(-1, slots.itemsize), jnp.int32)
        rows_d = jax.lax.bitcast_convert_type(buf[slot_bytes:].reshape(-1, x_kb.itemsize), x_kb.dtype).reshape(x_kb.shape)
        return step_fn(leaves, slots_d, rows_d)

    # Answers placed as the model's own programs place them, so that only the packing differs.
    packed_program = jax.jit(unpack_and_run, **({} if mt.output_sharding is None else {"out_shardings": mt.output_sharding}))
    program = mt.programs.get(mt._key(step.tenant_bucket, step.row_bucket))

    def pack():
        return np.concatenate([slots.view(np.uint8), np.ascontiguousarray(x_kb).reshape(-1).view(np.uint8)])

    two = lambda: np.asarray(program(leaves, slots, x_kb))  # noqa: E731
    one = lambda: np.asarray(packed_program(leaves, pack()))  # noqa: E731
    np.testing.assert_allclose(one(), two(), rtol=1e-6, atol=1e-6)
    timings = {"two_inputs": _median_us(two, repeats), "one_packed_input": _median_us(one, repeats)}
    device = mt.store.device
    if "pinned_host" in {memory.kind for memory in device.addressable_memories()}:
        # The two inputs placed in pinned host memory by the program's input shardings (the
        # NumPy arrays are copied there) and moved to the device by the program itself.
        on_device = single_device_sharding(device)
        in_host = single_device_sharding(device, memory_kind="pinned_host")

        def move_and_run(leaves, slots_h, rows_h):
            return step_fn(leaves, jax.device_put(slots_h, on_device), jax.device_put(rows_h, on_device))

        moved_program = jax.jit(move_and_run, in_shardings=(on_device, in_host, in_host),
                                **({} if mt.output_sharding is None else {"out_shardings": mt.output_sharding}))
        # Placed there explicitly: a jitted call puts NumPy arguments on the device whatever
        # its input shardings say (jax 0.11.2 on an H100 refused them: "unexpected memory space").
        moved = lambda: np.asarray(moved_program(leaves, *jax.device_put((slots, x_kb), in_host)))  # noqa: E731
        np.testing.assert_allclose(moved(), two(), rtol=1e-6, atol=1e-6)
        timings["two_inputs_in_pinned_host"] = _median_us(moved, repeats)
    return timings


TRANSFER_SIZES = {"8 KiB": 8 << 10, "588 KiB (one 224x224x3 float32 image)": 224 * 224 * 3 * 4, "4.6 MiB (8 such)": 8 * 224 * 224 * 3 * 4}


def transfer_paths(repeats: int, seed: int) -> dict[str, dict[str, float]]:
    """Each way of moving a step's bytes, at a few sizes, as a whole call (medians, us).

    into_program_*: a jitted sum of a float32 vector, waited for, given as a NumPy array (the
    executable copies it in) or already on the device; answer_*: a jitted copy of a
    device-resident vector, read as NumPy, written by the program to the device (then copied
    out when asked) or into pinned host memory (``outputs_to_host``). Inputs are random and
    rotate among four buffers; every answer is checked before timing.
    """
    import jax.numpy as jnp

    device = jax.devices()[0]
    on_device = single_device_sharding(device)
    kinds = {m.kind for m in device.addressable_memories()}
    rng = np.random.default_rng(seed)
    out = {}
    for label, nbytes in TRANSFER_SIZES.items():
        xs = [rng.standard_normal(nbytes // 4).astype(np.float32) for _ in range(4)]
        held = [jax.device_put(x, on_device) for x in xs]
        turn = iter(range(1 << 62))
        pick = lambda arrays: arrays[next(turn) % 4]  # noqa: E731
        total = jax.jit(lambda v: jnp.sum(v, dtype=jnp.float32))
        np.testing.assert_allclose(float(total(xs[0])), float(np.sum(xs[0], dtype=np.float64)), rtol=1e-3, atol=1e-2)
        row = {
            "into_program_numpy": _median_us(lambda: total(pick(xs)).block_until_ready(), repeats),
            "into_program_on_device": _median_us(lambda: total(pick(held)).block_until_ready(), repeats),
        }
        copies = {"answer_on_device": jax.jit(lambda v: v * 1.0)}
        if "pinned_host" in kinds:
            copies["answer_in_pinned_host"] = jax.jit(lambda v: v * 1.0, out_shardings=host_output_sharding(device, True))
        for name, copy in copies.items():
            np.testing.assert_array_equal(np.asarray(copy(held[1])), xs[1])
            row[name] = _median_us(lambda copy=copy: np.asarray(copy(pick(held))), repeats)
        out[label] = {k: round(v, 1) for k, v in row.items()}
    return out


def profile_predict(tenants: int, rows: int, calls: int, seed: int) -> None:
    """Where the host's time in ``predict`` goes, function by function (the same model and
    request as ``measure``; profiling slows Python, so read shares, not microseconds)."""
    import cProfile
    import pstats

    spec = models.make("mlp", "tiny")
    rng = np.random.default_rng(seed)
    params = {f"t{i}": spec.init(seed + i) for i in range(tenants)}
    mt = _model(spec, params, None)
    ids = list(rng.choice(list(params), size=rows))
    ids[:tenants] = list(params)
    x = spec.random_input(rng, rows)
    for _ in range(20):
        mt.predict(ids, x)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        mt.predict(ids, x)
    profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(30)


def _us(timings: dict[str, float]) -> str:
    return ", ".join(f"{name} {us:.0f}" for name, us in timings.items())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tenants", type=int, default=16)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-readme", action="store_true", help="do not update benchmarks/README.md")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="only profile N predict calls (cProfile, the 30 costliest functions by own time) and exit")
    args = parser.parse_args(argv)
    if args.profile:
        profile_predict(args.tenants, args.rows, args.profile, args.seed)
        return
    result = measure(args.tenants, args.rows, args.repeats, args.seed)
    result["transfers_us"] = transfer_paths(min(args.repeats, 100), args.seed)
    path = write_json("overhead", {"result": result})
    env = common.environment()
    table = markdown_table(
        ["device", "tenants x rows", "steps (K x B)", "bare programs (us)", "predict (us)", "overhead (us)", "dispatch + device wait, no answer read (us)", "recompiles"],
        [[env["device"], f"{args.tenants} x {args.rows}", ", ".join(f"{k}x{b}" for k, b in result["steps"]), result["bare_program_us"], result["predict_us"],
          result["overhead_us"], result["dispatch_only_us"], result["recompiles_in_steady_state"]]],
    )
    phases = markdown_table(list(result["phases_us"]), [[round(v, 1) for v in result["phases_us"].values()]])
    transfers = result["one_step_with_host_inputs_us"]
    other = result["other_placement"]
    where = {True: "written into pinned host memory", False: "left on the device"}
    print(f"answers {where[other['outputs_to_host']]} (outputs_to_host={other['outputs_to_host']}): predict {other['predict_us']:.1f} us, "
          f"bare program {other['bare_program_us']:.1f} us, overhead {other['overhead_us']:.1f} us")
    as_arguments = result["argument_inputs"]
    inputs_note = "" if as_arguments is None else (
        f"Steps took their inputs from pinned host buffers written in place (`host_inputs`, the default here); the same model "
        f"handing them over as NumPy arguments (`host_inputs=False`), timed in the same rounds: predict "
        f"{as_arguments['predict_us']:.0f} us, overhead {as_arguments['overhead_us']:.0f} us.\n\n")
    if inputs_note:
        print(inputs_note.strip())
    moves = markdown_table(["bytes", *next(iter(result["transfers_us"].values()))],
                           [[label, *row.values()] for label, row in result["transfers_us"].items()])
    print(moves)
    print(table)
    print(phases)
    print("one step, host inputs to host answer: " + ", ".join(f"{name} {us:.1f} us" for name, us in transfers.items()))
    print("in the flow, from a profiled run (medians, us): " + _us(result["traced_phases_us"]))
    print("by way of waiting (us): " + _us(result["by_way_of_waiting_us"]))
    print("by way of waiting, in runs of 30 calls (us): " + _us(result["by_way_of_waiting_in_runs_us"]))
    tuned = dict(result["with_compiler_options"])
    tuned_runs = tuned.pop("in_runs")
    print(f"with compiler options {tuned.pop('options')} against the default (us): " + _us(tuned) + "; in runs: " + _us(tuned_runs))
    print("one step by where its inputs are (launch / whole, us): "
          + ", ".join(f"{name} {t['launch']:.1f} / {t['whole']:.1f}" for name, t in result["launch_by_input_place_us"].items()))
    print(f"wrote {path}")
    if not args.no_readme:
        update_readme_section(
            "Host overhead",
            "`PYTHONPATH=. python benchmarks/overhead.py` (medians of "
            f"{args.repeats} calls, bare program and predict in alternating rounds; jax {env['jax']}, commit {env['commit']}). "
            "Target: overhead under 100 us, no recompiles in steady state.\n\n" + table + "\n\n" + inputs_note + "Where the time of one step goes, each phase timed alone "
            "(us; `breakdown` in the script says what each holds):\n\n" + phases
            + f"\n\nAnswers {where[result['outputs_to_host']]} (the default here). The same model with answers "
            f"{where[other['outputs_to_host']]} (`outputs_to_host={other['outputs_to_host']}`), in the same run: "
            f"predict {other['predict_us']:.0f} us, bare program {other['bare_program_us']:.0f} us, overhead {other['overhead_us']:.0f} us."
            + "\n\nOne call in the flow, from a JAX profiler trace of back-to-back calls (medians, us; `phases_from_trace` in the script "
            "says what each holds; tracing slows a call): " + _us(result["traced_phases_us"]) + "."
            + "\n\nBy way of waiting for the device, in alternating rounds (us; `by_way_of_waiting` in the script says what each holds): "
            + _us(result["by_way_of_waiting_us"]) + "; in runs of 30 calls of each (`in_runs`): "
            + _us(result["by_way_of_waiting_in_runs_us"]) + "."
            + f"\n\nThe same model built with `compiler_options={result['with_compiler_options']['options']}` against the default, "
            "in alternating rounds (us): " + _us(tuned) + "; in runs of 30 calls of each: " + _us(tuned_runs) + "."
            + "\n\nOne step from host inputs to a host answer, the inputs handed over each way (us; `packed_transfer` in the script "
            "says what each holds): " + _us(transfers) + "."
            "\n\nMoving a step's bytes, each way as a whole call (us; `transfer_paths` in the script says what each holds):\n\n" + moves,
        )


if __name__ == "__main__":
    main()
