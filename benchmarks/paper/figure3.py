"""Figures 3 and 4 of the paper: latency as the number of co-located models grows.

n tenants of one architecture (ResNet-50, MobileNetV2; different weights) each have one
request (one image). Contenders, inputs and weights already on the device, float32 without
TF32 (as the paper's V100):

  JAX (this module, ``--backend jax``):
    exclusive      ONE model on a batch of n images (the paper's "exclusive access": the
                   bound that batching one model gives);
    time_only      one compiled program per tenant, called in turn on one stream;
    jaxmt          one step of MultiTenantModel's cached program over the n tenants
                   (``run_step``, device-resident rows), waited for;
    jaxmt_predict  one synchronous ``predict`` (host images in, host logits out);
    time_only_predict  the library's time-only baseline (``jaxmt.baselines``), end to
                   end like ``predict``; the device-resident time-only above runs the same
                   per-tenant program on inputs already on the device.
  PyTorch (``figure3_torch``, ``--backend torch``): exclusive, time-only, and space-only
  (one CUDA stream per model, eagerly or replaying one CUDA graph per model).

Latency is the median over repeats of one synchronous step (all n requests answered);
throughput is n / latency. Per-tenant latency (Figure 4) is when each tenant's answer is
ready, measured from the step's start: for time-only by waiting on each output in turn, for
streams with CUDA events; exclusive and jaxmt answer every tenant at once.

    PYTHONPATH=. python -m benchmarks.paper.figure3 --backend jax --out /tmp/f3_jax.json
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks.paper._shared import check, jax_environment, time_steps, write_raw

TENANT_COUNTS = (1, 4, 10)
QUICK_TENANT_COUNTS = (1, 2, 3)
MODELS = ("resnet50", "mobilenetv2")
# Relative error allowed between two float32 (no TF32) computations of a deep network that
# differ only in kernel choice (grouped vs dense convs, batch 1 vs batch n).
TOLERANCE = 2e-3


def latency_timing(quick: bool) -> dict[str, Any]:
    return {"repeats": 2, "warmup": 1} if quick else {"repeats": 5, "warmup": 2}


def spread(latencies: list[float]) -> float:
    """Slowest tenant's latency over the fastest's, minus 1 (the paper's Figure 4 gap)."""
    return max(latencies) / min(latencies) - 1.0


def measure_jax(model_names: list[str], counts: list[int], seed: int, quick: bool, lowering: str, on_partial: Callable[[dict], Any] = lambda _: None) -> dict:
    """Every JAX contender for every model and count; ``on_partial`` gets the models so far."""
    import jax

    result: dict[str, Any] = {"environment": jax_environment(), "lowering": lowering, "models": {}}
    for name in model_names:
        clock = time.perf_counter()
        with jax.default_matmul_precision("highest"):
            result["models"][name] = _measure_model(name, counts, seed, quick, lowering)
        result.setdefault("seconds", {})[name] = time.perf_counter() - clock
        on_partial(result)
    return result


def _measure_model(name: str, counts: list[int], seed: int, quick: bool, lowering: str) -> dict:
    import jax

    import models
    from jaxmt import BucketPolicy, MultiTenantModel, time_only_predict

    spec = models.make(name, "tiny" if quick else "full")
    n_max, timing = max(counts), latency_timing(quick)
    start = time.perf_counter()
    params = [spec.init(seed + i) for i in range(n_max)]
    x = spec.random_input(seed, n_max)
    x_dev = jax.device_put(x)
    x_rows = [x_dev[i : i + 1] for i in range(n_max)]
    apply = jax.jit(spec.apply_fn)
    want = np.concatenate([np.asarray(apply(params[i], x_rows[i])) for i in range(n_max)])  # tenant i, image i
    want_0 = np.concatenate([np.asarray(apply(params[0], x_rows[i])) for i in range(n_max)])  # tenant 0, image i

    mt = MultiTenantModel(
        spec.apply_fn, params[0], capacity=n_max,
        buckets=BucketPolicy(tenant_buckets=tuple(sorted(set(counts))), row_buckets=(1,)),
        row_shape=spec.input_shape, row_dtype=spec.input_dtype, lowering=lowering,
        outputs_to_host=False,  # device-resident steps, as the other contenders' (predict then copies back)
    )
    for i in range(n_max):
        mt.add_tenant(i, params[i])
    rows = []
    setup_s, seconds_per_count = time.perf_counter() - start, {}
    for n in counts:
        clock = time.perf_counter()
        entry: dict[str, Any] = {"tenants": n}
        # Exclusive access: one model, all n images as one batch.
        xs = x_dev[:n]
        err = check(f"{name} exclusive", apply(params[0], xs), want_0[:n], TOLERANCE)
        t = time_steps(lambda: apply(params[0], xs), jax.block_until_ready, steps=1, **timing)
        entry["exclusive"] = _entry(t["median_s"], [t["median_s"]] * n, err)

        # Time-only: each tenant's program in turn; a tenant's latency is when its output is ready.
        def time_only() -> list:
            return [apply(params[i], x_rows[i]) for i in range(n)]

        err = check(f"{name} time_only", np.concatenate([np.asarray(y) for y in time_only()]), want[:n], TOLERANCE)
        per_tenant = _per_output_latency(time_only, timing)
        entry["time_only"] = _entry(per_tenant[-1], per_tenant, err)

        # End to end (host images in, host logits out): jaxmt's predict and the library's baselines.
        ids = list(range(n))
        for method, call, reference in (
            ("jaxmt_predict", lambda: mt.predict(ids, x[:n]), want),
            ("time_only_predict", lambda: time_only_predict(mt, ids, x[:n]), want),
        ):
            err = check(f"{name} {method}", call(), reference[:n], TOLERANCE)
            t = time_steps(call, lambda y: y, steps=1, **timing)
            entry[method] = _entry(t["median_s"], [t["median_s"]] * n, err)
        (step,) = mt.dispatch(ids, x[:n]).plan.steps
        step = dataclasses.replace(step, slots=jax.device_put(step.slots))
        x_kb = jax.device_put(x[:n][step.row_index])
        with mt.store.lock:
            flat = np.asarray(mt.run_step(step, x_kb)).reshape(-1, spec.num_classes)
            got = np.empty((n, spec.num_classes), flat.dtype)
            got[step.out_rows] = flat[step.out_positions]
            err = check(f"{name} jaxmt step", got, want[:n], TOLERANCE)
            t = time_steps(lambda: mt.run_step(step, x_kb), jax.block_until_ready, steps=1, **timing)
        entry["jaxmt"] = _entry(t["median_s"], [t["median_s"]] * n, err)
        rows.append(entry)
        seconds_per_count[str(n)] = time.perf_counter() - clock
    stats = mt.stats()
    return {
        "size": spec.size, "image": list(spec.input_shape), "rows": rows,
        "jaxmt_compiles": stats["compiles"], "jaxmt_compile_seconds": stats["compile_seconds"],
        "setup_seconds": setup_s, "seconds_per_count": seconds_per_count,
        "param_bytes_per_tenant": stats["bytes_per_tenant"],
    }


def _entry(latency_s: float, per_tenant_s: list[float], error: float) -> dict[str, Any]:
    n = len(per_tenant_s)
    return {
        "latency_s": float(latency_s), "throughput_rps": n / float(latency_s),
        "per_tenant_s": [float(v) for v in per_tenant_s], "spread": spread(per_tenant_s), "rel_error": error,
    }


def _per_output_latency(launch: Any, timing: dict[str, Any]) -> list[float]:
    """Median over repeats of when each output of ``launch()`` is ready, from the launch."""
    samples = []
    for repeat in range(timing["warmup"] + timing["repeats"]):
        start = time.perf_counter()
        ready = []
        for y in launch():
            y.block_until_ready()
            ready.append(time.perf_counter() - start)
        if repeat >= timing["warmup"]:
            samples.append(ready)
    return [statistics.median(column) for column in zip(*samples)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=("jax", "torch"), required=True)
    parser.add_argument("--out", required=True, help="where the raw JSON goes")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated, of " + ", ".join(MODELS))
    parser.add_argument("--tenants", default=None, help="comma-separated tenant counts (default %s)" % (TENANT_COUNTS,))
    parser.add_argument("--lowering", default="rule", help="jaxmt lowering policy (default 'rule': no autotuning)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny models, counts (1, 2, 3), few repeats")
    args = parser.parse_args(argv)
    counts = [int(v) for v in args.tenants.split(",")] if args.tenants else list(QUICK_TENANT_COUNTS if args.quick else TENANT_COUNTS)
    names = args.models.split(",")
    header = {"part": f"figure3_{args.backend}", "quick": args.quick, "tenant_counts": counts}
    # Written after every model, so that a part stopped by its time limit keeps what it measured.
    on_partial = lambda partial: write_raw(args.out, {**header, "partial": True, **partial})  # noqa: E731
    if args.backend == "jax":
        result = measure_jax(names, counts, args.seed, args.quick, args.lowering, on_partial)
    else:
        from benchmarks.paper.figure3_torch import measure_torch

        result = measure_torch(names, counts, args.seed, args.quick, on_partial)
    write_raw(args.out, {**header, **result})
    print(f"figure3 ({args.backend}) -> {args.out}" + (f" (skipped: {result['skipped']})" if "skipped" in result else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
