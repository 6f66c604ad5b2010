"""``predict``'s host phases appear by name in a JAX profiler trace, so that a user's
profile shows where a request's time went around the program (checks, plan, launch and
the wait for the answer with its scatter back to request order)."""

from __future__ import annotations

import glob
import gzip
import json

import jax
from conftest import reference_predict, rel_error, tiny_spec

from jaxmt import BucketPolicy, MultiTenantModel

PHASES = ("jaxmt.check", "jaxmt.plan", "jaxmt.launch", "jaxmt.result")


def test_predict_phases_are_named_in_a_profiler_trace(tmp_path, rng):
    spec = tiny_spec("mlp")
    params = {f"t{i}": spec.init(i) for i in range(3)}
    mt = MultiTenantModel(spec.apply_fn, params["t0"], buckets=BucketPolicy.powers_of_two(4, 4),
                          row_shape=spec.input_shape, row_dtype=spec.input_dtype)
    for tenant, p in params.items():
        mt.add_tenant(tenant, p)
    ids = list(rng.choice(list(params), size=5))
    x = spec.random_input(rng, 5)
    mt.predict(ids, x)  # compiled outside the trace
    with jax.profiler.trace(str(tmp_path), create_perfetto_trace=True):
        y = mt.predict(ids, x)
    assert rel_error(y, reference_predict(spec.apply_fn, params, ids, x)) < 1e-5
    (path,) = glob.glob(f"{tmp_path}/**/perfetto_trace.json.gz", recursive=True)
    events = [e for e in json.load(gzip.open(path))["traceEvents"] if e.get("ph") == "X"]
    spans = {name: [e for e in events if e["name"] == name] for name in PHASES}
    assert all(len(found) == 1 for found in spans.values()), {name: len(found) for name, found in spans.items()}
    starts = [spans[name][0]["ts"] for name in PHASES]
    assert starts == sorted(starts), "phases out of order"
    plan, launch = spans["jaxmt.plan"][0], spans["jaxmt.launch"][0]
    assert plan["ts"] + plan["dur"] <= launch["ts"] + 1e-3  # the plan ends before the launch begins
    calls = [e for e in events if e["name"].startswith("PjitFunction") and e["tid"] == launch["tid"]]
    assert calls and all(launch["ts"] <= e["ts"] and e["ts"] + e["dur"] <= launch["ts"] + launch["dur"] + 1e-3 for e in calls)
