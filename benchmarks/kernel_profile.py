"""Where a whole step's device time goes, kernel by kernel: exclusive access against jaxmt.

For each model at K tenants x B images: exclusive access (one tenant's model on all K*B
images) and jaxmt's tenant-batched program under the default rule (``LoweringPolicy("rule")``,
nothing measured), each checked against the per-tenant reference (``jax.vmap``) first, then
run ``--calls`` times under the JAX profiler. Each kernel the device ran is summed over the
calls and divided by their number (us and launches a call), and sorted into a category by its
name (``category``): the whole-step tables of "Lowering" say how far apart the two are, this
says in which layers.

    PYTHONPATH=. python benchmarks/kernel_profile.py --models resnet18 --tenants 32 --images 1
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import tempfile
import time
from typing import Any

import common  # noqa: F401  (puts the repository on sys.path)
import jax
import jax.numpy as jnp
import numpy as np
from common import markdown_table, update_readme_section, write_json
from lowering import rel_error, stacked_variables

import models
from jaxmt.lowering import LoweringPolicy, describe_lowering, tenant_batched

# Lines of a device in a trace that are not kernels (the profiler's collector, summaries).
NOT_KERNELS = ("CUPTI", "XLA Modules", "XLA Ops", "Steps", "Framework")
# (category, substrings of a kernel's name), first match wins; the rest are "elementwise and other".
CATEGORIES = (
    ("conv (cuDNN)", ("fprop_implicit_gemm", "cudnn")),
    ("conv (Pallas kernel)", ("tenant_conv_implicit_gemm",)),
    ("matmul", ("gemm",)),
    ("concatenate (im2col patches)", ("concatenate",)),
    ("transpose, pad, slice", ("transpose", "pad_fusion", "slice")),
)


def category(kernel: str) -> str:
    for name, marks in CATEGORIES:
        if any(mark in kernel for mark in marks):
            return name
    return "elementwise and other"


def kernels_per_call(events: list[dict], calls: int) -> list[dict]:
    """A perfetto trace's device kernels, summed by (name, HLO op) and divided by ``calls``,
    largest first: [{"us", "launches", "kernel", "hlo_op", "category"}]."""
    process = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    thread = {(e["pid"], e.get("tid")): e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "thread_name"}
    totals: dict[tuple[str, str], list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for e in events:
        if e.get("ph") != "X" or not process.get(e["pid"], "").startswith("/device:"):
            continue
        if thread.get((e["pid"], e.get("tid")), "").startswith(NOT_KERNELS):
            continue
        key = (e["name"], str(e.get("args", {}).get("hlo_op", "")))
        totals[key][0] += e["dur"]
        totals[key][1] += 1
    rows = [{"us": us / calls, "launches": n / calls, "kernel": name, "hlo_op": op, "category": category(name)}
            for (name, op), (us, n) in totals.items()]
    return sorted(rows, key=lambda r: -r["us"])


def by_category(kernels: list[dict]) -> dict[str, float]:
    sums: dict[str, float] = collections.defaultdict(float)
    for k in kernels:
        sums[k["category"]] += k["us"]
    return dict(sums)


def profile(fn: Any, calls: int) -> tuple[float, list[dict]]:
    """Wall time a call (us, after a warm-up) and the kernels of ``calls`` traced calls."""
    jax.block_until_ready(fn())
    start = time.perf_counter()
    for _ in range(calls):
        out = fn()
    jax.block_until_ready(out)
    wall_us = (time.perf_counter() - start) / calls * 1e6
    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0
    with tempfile.TemporaryDirectory() as log_dir:
        with jax.profiler.trace(log_dir, create_perfetto_trace=True, profiler_options=options):
            for _ in range(calls):
                jax.block_until_ready(fn())
        (path,) = glob.glob(f"{log_dir}/**/perfetto_trace.json.gz", recursive=True)
        with gzip.open(path) as f:
            events = json.load(f)["traceEvents"]
    return wall_us, kernels_per_call(events, calls)


def measure(model: str, size: str, tenants: int, images: int, dtype: Any, calls: int) -> dict:
    spec = models.make(model, size, dtype=dtype)
    stacked = stacked_variables(spec, tenants, dtype, 0)
    one = jax.tree.map(lambda leaf: leaf[0], stacked)
    x_kb = jnp.asarray(spec.random_input(np.random.default_rng(0), tenants * images).reshape(tenants, images, *spec.input_shape))
    x_all = x_kb.reshape(tenants * images, *spec.input_shape)
    policy = LoweringPolicy("rule")
    ours, exclusive = jax.jit(tenant_batched(spec.apply_fn, policy)), jax.jit(spec.apply_fn)
    reference = jax.jit(jax.vmap(spec.apply_fn))(stacked, x_kb)
    tol = 5e-2 if np.dtype(dtype) == jnp.bfloat16 else 1e-2
    errors = {"jaxmt": rel_error(ours(stacked, x_kb), reference),
              "exclusive": rel_error(np.asarray(exclusive(one, x_all))[:images], np.asarray(reference)[0])}
    assert all(e < tol for e in errors.values()), f"{model}: outputs differ from the per-tenant reference: {errors}"
    row: dict[str, Any] = {"model": model, "size": size, "tenants": tenants, "images": images, "dtype": np.dtype(dtype).name,
                           "rel_error": errors, "convs": [f"conv:{c.index} {c.signature.key} -> {c.lowering}"
                                                          for c in describe_lowering(spec.apply_fn, stacked, x_kb, policy)]}
    for method, fn in (("exclusive", lambda: exclusive(one, x_all)), ("jaxmt", lambda: ours(stacked, x_kb))):
        wall_us, kernels = profile(fn, calls)
        row[method] = {"wall_us": wall_us, "kernel_us": sum(k["us"] for k in kernels), "by_category_us": by_category(kernels),
                       "kernels": kernels}
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="resnet18")
    parser.add_argument("--size", default="full")
    parser.add_argument("--tenants", type=int, default=32)
    parser.add_argument("--images", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--top", type=int, default=12, help="kernels listed per method in the README table")
    parser.add_argument("--out", default="kernel_profile")
    parser.add_argument("--no-readme", action="store_true")
    args = parser.parse_args(argv)
    rows = [measure(m, args.size, args.tenants, args.images, jnp.dtype(args.dtype), args.calls) for m in args.models.split(",")]
    path = write_json(args.out, {"args": vars(args), "rows": rows})
    tables = []
    for row in rows:
        names = sorted({c for m in ("exclusive", "jaxmt") for c in row[m]["by_category_us"]})
        summary = markdown_table(["category", "exclusive us", "jaxmt us"],
                                 [[c, row["exclusive"]["by_category_us"].get(c, 0.0), row["jaxmt"]["by_category_us"].get(c, 0.0)]
                                  for c in names] + [["all kernels", row["exclusive"]["kernel_us"], row["jaxmt"]["kernel_us"]],
                                                     ["wall time a call", row["exclusive"]["wall_us"], row["jaxmt"]["wall_us"]]])
        top = markdown_table(["method", "us a call", "launches", "kernel", "category"],
                             [[m, k["us"], k["launches"], k["kernel"][:60], k["category"]]
                              for m in ("exclusive", "jaxmt") for k in row[m]["kernels"][: args.top]])
        tables.append(f"{row['model']} ({row['size']}), {row['tenants']}x{row['images']}, {row['dtype']}:\n\n{summary}\n\n{top}")
        print(tables[-1], flush=True)
    print(f"-> {path}")
    if not args.no_readme:
        update_readme_section("Kernel profile", "\n\n".join(tables))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
