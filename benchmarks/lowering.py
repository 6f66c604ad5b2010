"""Lowering of tenant-batched convs: per layer and end to end, against exclusive access.

Per layer: every conv shape of ResNet-50, MobileNetV2 and ResNet-18 at the given tenants x
images-per-tenant and dtype, each lowering of ``jaxmt.lowering_ops`` timed against the
dense conv of exclusive access (one tenant's filter on all K*B images). The fastest
applicable lowering is what the autotuner would pick; those picks are written to the
lowering cache (``--cache``), which the end-to-end "jaxmt" column then reads.

End to end (throughput, images/s; ratios side by side):
  exclusive   one model, all K*B images in one batch (the target)
  vmap        naive jax.vmap of apply_fn over the stacked tenants
  time_only   one program per tenant, run in turn (K dispatches of a B-image program)
  jaxmt       tenant_batched(apply_fn, "auto"): cached choices, else measured (--autotune)
              or the default rule
  jaxmt_store (with --store) the whole MultiTenantModel step program, which also gathers
              the K tenants' slots from the store
  exclusive_kernels  (where jaxmt lowered convs with the Pallas kernel) exclusive access
              with those same convs lowered by the kernel too: the kernel beat XLA's own
              dense conv on ResNet's stem, so the faster of the two exclusive forms is the
              target to hold jaxmt against
Each output is checked against the per-tenant reference (the time-only outputs) before
anything is timed; timings are medians of repeats after warm-up, on fresh random inputs, every
method timed once per round (``common.time_calls_interleaved``). A sample is as many
back-to-back calls as take about ``--min-sample-ms`` (20 ms by default, at most 200 calls; 0
times one call at a time, as runs before this option did), so that a step of about a
millisecond is timed as a stream the device runs, not as one launch and wait of the host.

    PYTHONPATH=. python benchmarks/lowering.py --quick            # CPU, tiny models, ~1 min
    PYTHONPATH=. python benchmarks/lowering.py                    # GPU, full models
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common
import jax
import jax.numpy as jnp
import numpy as np
from common import markdown_table, time_calls_interleaved, update_readme_section, write_json

import models
from jaxmt import MultiTenantModel, make_plan
from jaxmt.autotune import LoweringCache, cache_entry, cache_key, candidates, default_cache_path, measure, pick
from jaxmt.lowering import LoweringPolicy, describe_lowering, tenant_batched
from jaxmt.lowering_ops import CONV_LOWERINGS as LAYER_LOWERINGS
from jaxmt.lowering_ops import ConvParams, applicable, conv_one


class Deadline:
    def __init__(self, seconds: float | None):
        self.end = None if seconds is None else time.perf_counter() + seconds

    def passed(self) -> bool:
        return self.end is not None and time.perf_counter() > self.end


def log(*args: Any) -> None:
    print(*args, flush=True)


def stacked_variables(spec: models.ModelSpec, tenants: int, dtype: Any, seed: int) -> Any:
    """K tenants' variables [K, ...], drawn on the host: He-normal kernels, BN statistics
    as ``ModelSpec.init`` draws them. (``spec.init`` compiles its initialisers once per
    architecture and dtype, which took 20-100 s per model on a CPU: too slow for a sweep.)"""
    shapes = jax.eval_shape(spec.module.init, jax.random.key(0), jax.ShapeDtypeStruct((1, *spec.input_shape), spec.input_dtype))
    rng = np.random.default_rng(seed)

    def draw(path: Any, leaf: Any) -> Any:
        name = getattr(path[-1], "key", "")
        shape = (tenants, *leaf.shape)
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            return jnp.zeros(shape, leaf.dtype)
        if name == "var":
            value = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        elif name == "scale":
            value = 1.0 + 0.1 * rng.standard_normal(shape, np.float32)
        elif name in ("bias", "mean"):
            value = 0.1 * rng.standard_normal(shape, np.float32)
        else:  # kernels and embeddings
            fan_in = max(1, math.prod(leaf.shape[:-1]))
            value = rng.standard_normal(shape, np.float32) * np.float32(math.sqrt(2.0 / fan_in))
        return jnp.asarray(value).astype(dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def layer_signatures(name: str, size: str, tenants: int, images: int, dtype: Any) -> list[tuple[Any, int]]:
    """(signature, how many layers of the model have it), in order of first appearance."""
    spec = models.make(name, size, dtype=dtype)
    one = jax.eval_shape(spec.module.init, jax.random.key(0), jax.ShapeDtypeStruct((1, *spec.input_shape), spec.input_dtype))
    params = jax.tree.map(lambda s: jax.ShapeDtypeStruct((tenants, *s.shape), dtype), one)
    x = jax.ShapeDtypeStruct((tenants, images, *spec.input_shape), spec.input_dtype)
    counts: collections.Counter = collections.Counter()
    order = []
    for choice in describe_lowering(spec.apply_fn, params, x, "rule"):
        if choice.signature not in counts:
            order.append(choice.signature)
        counts[choice.signature] += 1
    return [(sig, counts[sig]) for sig in order]


def bench_layers(args: argparse.Namespace, deadline: Deadline, cache: LoweringCache | None) -> list[dict]:
    rows: list[dict] = []
    seen: set = set()
    for config in args.layer_configs:
        k, b, dtype = config
        for model in args.layer_models:
            for sig, count in layer_signatures(model, args.size, k, b, dtype):
                if deadline.passed():
                    return rows
                if sig in seen:
                    continue
                seen.add(sig)
                params = ConvParams.of(sig)
                # What the autotuner would time, or every applicable form (--all-lowerings), or
                # those named (--layer-lowerings) and the rule's choice, which pick() prefers
                # within the noise, so the pick is never worse than the rule.
                rule = candidates(sig)[0]
                todo = (tuple(n for n in LAYER_LOWERINGS if applicable(n, sig)) if args.all_lowerings else candidates(sig))
                if args.layer_lowerings:
                    todo = tuple(dict.fromkeys(n for n in (rule, *LAYER_LOWERINGS)
                                               if n == rule or (n in args.layer_lowerings and applicable(n, sig))))
                # The dense conv of exclusive access, timed in the same rounds as the lowerings.
                dense = lambda a, f, _p=params: conv_one(a.reshape(-1, *a.shape[2:]), f[0], _p)  # noqa: E731
                timings = measure(sig, params, todo, seed=len(rows), repeats=args.layer_repeats, baselines={"dense": dense})
                dense_row = timings.pop("dense")
                dense_us = dense_row["us"] or float("nan")  # a dense conv that failed to time: ratios NaN, the error kept
                choice = pick(sig, timings)
                # A pick the autotuner would not make goes only to a choices file named with
                # --cache, never to the default one that every "auto" model reads.
                if cache is not None and (choice in candidates(sig) or args.cache_given):
                    cache.put(cache_key(sig), cache_entry(sig, choice, timings, source="benchmarks/lowering.py"))
                us = {n: r["us"] for n, r in timings.items()}
                row = {
                    "model": model, "tenants": k, "images": b, "dtype": np.dtype(dtype).name, "kind": sig.kind,
                    "signature": sig.key, "count": count, "gflop": sig.flops / 1e9, "dense_us": dense_us, "us": us,
                    "errors": {n: r["error"] for n, r in {**timings, "dense": dense_row}.items() if "error" in r},
                    "choice": choice,
                    "choice_vs_dense": dense_us / us[choice] if us.get(choice) else None,
                    "vmap_vs_dense": dense_us / us["vmap"] if us.get("vmap") else None,
                }
                rows.append(row)
                ratios = " ".join(f"{n}={dense_us / v:.2f}" for n, v in us.items() if v)
                log(f"[layer] {model} {sig.key} x{count}: dense {dense_us:.1f}us | {ratios} -> {choice}")
    return rows


def rel_error(got: Any, want: Any) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def compiled(fn: Any, *args: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    program = jax.jit(fn).lower(*args).compile()
    return program, time.perf_counter() - start


def bench_end_to_end(model: str, tenants: int, images: int, dtype: Any, args: argparse.Namespace, store: bool = False) -> dict:
    spec = models.make(model, args.size, dtype=dtype)
    rng = np.random.default_rng([tenants, images, args.seed])
    stacked = stacked_variables(spec, tenants, dtype, args.seed)
    per_tenant = [jax.tree.map(lambda leaf, i=i: leaf[i], stacked) for i in range(tenants)]
    x_kb = jnp.asarray(spec.random_input(rng, tenants * images).reshape(tenants, images, *spec.input_shape))
    x_all = x_kb.reshape(tenants * images, *spec.input_shape)
    tol = 5e-2 if np.dtype(dtype) == jnp.bfloat16 else 1e-2
    row: dict[str, Any] = {"model": model, "tenants": tenants, "images": images, "dtype": np.dtype(dtype).name}
    compile_s: dict[str, float] = {}
    errors: dict[str, float] = {}
    policy = LoweringPolicy("auto", autotune=args.autotune, cache_path=args.cache)

    one, compile_s["time_only"] = compiled(spec.apply_fn, per_tenant[0], x_kb[0])
    reference = np.stack([np.asarray(one(per_tenant[i], x_kb[i])) for i in range(tenants)])
    exclusive, compile_s["exclusive"] = compiled(spec.apply_fn, per_tenant[0], x_all)
    errors["exclusive"] = rel_error(np.asarray(exclusive(per_tenant[0], x_all))[:images], reference[0])
    naive, compile_s["vmap"] = compiled(jax.vmap(spec.apply_fn), stacked, x_kb)
    errors["vmap"] = rel_error(naive(stacked, x_kb), reference)
    start = time.perf_counter()
    choices = describe_lowering(spec.apply_fn, stacked, x_kb, policy)
    plan_s = time.perf_counter() - start
    ours, compile_s["jaxmt"] = compiled(tenant_batched(spec.apply_fn, policy), stacked, x_kb)
    compile_s["jaxmt"] += plan_s
    errors["jaxmt"] = rel_error(ours(stacked, x_kb), reference)

    def another_policy(name: str, other: LoweringPolicy) -> Any:
        """jaxmt under ``other``, compiled and checked like the main column."""
        program, compile_s[name] = compiled(tenant_batched(spec.apply_fn, other), stacked, x_kb)
        errors[name] = rel_error(program(stacked, x_kb), reference)
        return program

    if args.autotuned_cache:  # the planner with autotuning on (the GPU default), timed beside the rule
        tuned = LoweringPolicy("auto", autotune=True, cache_path=args.autotuned_cache)
        start = time.perf_counter()
        tuned_choices = describe_lowering(spec.apply_fn, stacked, x_kb, tuned)
        tune_s = time.perf_counter() - start
        ours_tuned = another_policy("jaxmt_autotuned", tuned)
        compile_s["jaxmt_autotuned"] += tune_s
        row["choices_autotuned"] = dict(collections.Counter(f"{c.signature.kind}:{c.lowering}" for c in tuned_choices))
        row["choice_sources_autotuned"] = dict(collections.Counter(c.source for c in tuned_choices))
    if args.overrides:  # the same policy with some layers forced, timed beside it
        ours_forced = another_policy("jaxmt_overrides", LoweringPolicy(
            "auto", tuple(sorted(args.overrides.items())), autotune=args.autotune, cache_path=args.cache))
    # Exclusive access with the convs jaxmt gave to the Pallas kernel lowered by it as well
    # (one tenant: every other conv stays XLA's dense conv).
    kernel_convs = {f"conv:{c.index}": "implicit_gemm" for c in choices if c.lowering == "implicit_gemm"}
    if kernel_convs:
        one_tenant = jax.tree.map(lambda leaf: leaf[:1], stacked)
        exclusive_kernels, compile_s["exclusive_kernels"] = compiled(
            tenant_batched(spec.apply_fn, LoweringPolicy("vmap", tuple(sorted(kernel_convs.items())))), one_tenant, x_all[None])
        errors["exclusive_kernels"] = rel_error(np.asarray(exclusive_kernels(one_tenant, x_all[None]))[0, :images], reference[0])
    # Each tenant's rows sliced once here: a slice in the timed call is one more program
    # dispatched per tenant, work the time-only column would be charged and no other is.
    x_each = [x_kb[i] for i in range(tenants)]
    programs = {
        "exclusive": lambda: exclusive(per_tenant[0], x_all),
        "vmap": lambda: naive(stacked, x_kb),
        "time_only": lambda: [one(p, x) for p, x in zip(per_tenant, x_each)],
        "jaxmt": lambda: ours(stacked, x_kb),
    }
    if args.autotuned_cache:
        programs["jaxmt_autotuned"] = lambda: ours_tuned(stacked, x_kb)
    if args.overrides:
        programs["jaxmt_overrides"] = lambda: ours_forced(stacked, x_kb)
    if kernel_convs:
        programs["exclusive_kernels"] = lambda: exclusive_kernels(one_tenant, x_all[None])
    if store:
        # Answers stay on the device, as every other contender's here (device-resident timing).
        mt = MultiTenantModel(spec.apply_fn, per_tenant[0], capacity=tenants, lowering=policy,
                              row_shape=spec.input_shape, row_dtype=spec.input_dtype, outputs_to_host=False)
        for i in range(tenants):
            mt.add_tenant(i, per_tenant[i])
        # The step that K tenants with B rows each make, launched as predict launches it
        # (run_step: no weight gather when the step covers the whole store in slot order).
        (step,) = make_plan(np.repeat(np.arange(tenants), images), mt.buckets).steps
        start = time.perf_counter()
        with mt.store.lock:
            errors["jaxmt_store"] = rel_error(mt.run_step(step, x_kb), reference)
        compile_s["jaxmt_store"] = time.perf_counter() - start
        programs["jaxmt_store"] = lambda: mt.run_step(step, x_kb)
    bad = {k: v for k, v in errors.items() if not (v <= tol)}
    # A mismatch is reported in the row (and the table), not hidden: its timing is not a result.
    row["check"] = "ok" if not bad else f"FAILED (relative error over {tol}): {bad}"
    if bad:
        log(f"[e2e] {model} K={tenants} B={images} {row['dtype']}: outputs differ from the per-tenant reference: {bad}")
    # Every method timed in the same rounds: ratios to exclusive access come from one stretch
    # of the shared device's time.
    timings = time_calls_interleaved(programs, warmup=args.warmup, repeats=args.repeats, min_sample_s=args.min_sample_ms / 1e3)
    ips = {method: tenants * images / timing["median_s"] for method, timing in timings.items()}
    row.update({
        "images_per_s": ips,
        "vs_exclusive": {m: v / ips["exclusive"] for m, v in ips.items()},
        "jaxmt_vs_vmap": ips["jaxmt"] / ips["vmap"],
        "rel_error": errors,
        "compile_s": {k: round(v, 2) for k, v in compile_s.items()},
        "choices": dict(collections.Counter(f"{c.signature.kind}:{c.lowering}" for c in choices)),
        "choice_sources": dict(collections.Counter(c.source for c in choices)),
        "calls_per_sample": {m: t["calls_per_sample"] for m, t in timings.items()},
    })
    return row


def parse_configs(text: str) -> list[tuple[int, int, Any]]:
    out = []
    for item in text.split(","):
        kb, dtype = item.split(":")
        k, b = kb.split("x")
        out.append((int(k), int(b), jnp.dtype(dtype)))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: tiny models, 4 tenants, float32, ~1 minute")
    parser.add_argument("--models", default="resnet50,mobilenetv2,resnet18", help="comma-separated architectures")
    parser.add_argument("--size", default="full", choices=models.SIZES)
    parser.add_argument("--tenants", default="4,16,32", help="end-to-end tenant counts K")
    parser.add_argument("--images", default="1,8", help="end-to-end images per tenant B")
    parser.add_argument("--dtypes", default="bfloat16,float32", help="end-to-end compute dtypes")
    parser.add_argument("--configs", default=None,
                        help="explicit end-to-end configs 'model:KxB:dtype,...' (instead of the product of the three above)")
    parser.add_argument("--layer-configs", default="16x8:bfloat16", help="per-layer 'KxB:dtype,...'; 'none' to skip")
    parser.add_argument("--layer-models", default=None, help="architectures for the per-layer part (default: --models)")
    parser.add_argument("--layer-budget-s", type=float, default=None, help="stop the per-layer part after this many seconds")
    parser.add_argument("--all-lowerings", action="store_true",
                        help="per layer, time every applicable lowering, not only the autotuner's candidates")
    parser.add_argument("--layer-lowerings", default=None,
                        help="per layer, time these applicable lowerings (comma-separated; any of jaxmt.lowering_ops, "
                             "candidates of the autotuner or not) besides the rule's choice")
    parser.add_argument("--no-e2e", action="store_true", help="per-layer only")
    parser.add_argument("--store", type=int, default=0, metavar="N",
                        help="for the first N end-to-end configs, also time the MultiTenantModel step program (slot gather included)")
    parser.add_argument("--overrides", type=json.loads, default=None, metavar="JSON",
                        help='end to end, also time jaxmt with these layers forced, e.g. \'{"kxk": "implicit_gemm"}\' '
                             "(a column of its own, same rounds)")
    parser.add_argument("--autotuned-cache", default=None, metavar="PATH",
                        help="also time jaxmt with autotuning on (each layer measured, or the choice measured for it at "
                             "a size within $JAXMT_AUTOTUNE_SPREAD), its choices kept in this file (apart from --cache, "
                             "which the rule's column reads), in the same rounds")
    parser.add_argument("--autotune", type=int, default=0, choices=(0, 1),
                        help="1: measure uncached layers during the end-to-end jaxmt compile; 0: use the rule for them")
    parser.add_argument("--cache", default=None, help="lowering cache file (default: jaxmt's, ~/.cache/jaxmt/lowering.json)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--min-sample-ms", type=float, default=20.0,
                        help="end to end: each sample is a burst of back-to-back calls of about this long, "
                             "at most jaxmt.timing.MOST_CALLS of them (0: one call a sample)")
    parser.add_argument("--layer-repeats", type=int, default=7)
    parser.add_argument("--budget-s", type=float, default=None, help="stop starting new work after this many seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="lowering", help="results/<out>.json")
    parser.add_argument("--no-readme", action="store_true", help="do not update benchmarks/README.md")
    args = parser.parse_args(argv)
    if args.overrides is not None:  # refused here, not after the per-layer part has run
        try:
            if not isinstance(args.overrides, dict):
                raise ValueError(f"expected a JSON object of selector -> lowering, got {args.overrides!r}")
            LoweringPolicy("auto", tuple(sorted(args.overrides.items())))
        except (TypeError, ValueError) as exc:
            parser.error(f"--overrides: {exc}")
    args.cache_given = args.cache is not None
    if args.quick:
        args.size = "tiny"
        args.models = "resnet18,mobilenetv2,resnet50"
        args.tenants, args.images, args.dtypes = "4", "1,8", "float32"
        args.layer_configs = "4x2:float32"
        args.repeats, args.layer_repeats = 5, 3
        args.all_lowerings = True
        args.out = "lowering_quick"
        if args.cache is None:
            args.cache = os.path.join(tempfile.gettempdir(), "jaxmt_lowering_quick_cache.json")
    if args.autotuned_cache is not None:  # one file for both columns would hand the rule's column measured choices
        rule_cache = Path(args.cache).expanduser() if args.cache else default_cache_path()
        if Path(args.autotuned_cache).expanduser().resolve() == rule_cache.resolve():
            parser.error(f"--autotuned-cache must differ from the rule column's cache file {rule_cache}")
    args.models = [m for m in args.models.split(",") if m]
    args.layer_models = args.models if args.layer_models is None else [m for m in args.layer_models.split(",") if m]
    args.layer_configs = [] if args.layer_configs == "none" else parse_configs(args.layer_configs)
    args.layer_lowerings = None if not args.layer_lowerings else {n.strip() for n in args.layer_lowerings.split(",") if n.strip()}
    unknown = sorted((args.layer_lowerings or set()) - set(LAYER_LOWERINGS))
    if unknown:
        parser.error(f"--layer-lowerings: unknown lowerings {unknown}; choose from {list(LAYER_LOWERINGS)}")
    deadline = Deadline(args.budget_s)
    env = common.environment()
    log(f"device {env['device']}, jax {env['jax']}, commit {env['commit']}")
    cache = LoweringCache(args.cache)
    started = time.perf_counter()
    layer_deadline = deadline if args.layer_budget_s is None else Deadline(
        min(args.layer_budget_s, args.budget_s or float("inf")))
    layers = bench_layers(args, layer_deadline, cache)
    layers_s = time.perf_counter() - started

    if args.configs:
        configs = []
        for item in args.configs.split(","):
            model, kb, dtype = item.split(":")
            k, b = kb.split("x")
            configs.append((model, int(k), int(b), jnp.dtype(dtype)))
    else:
        configs = [(m, int(k), int(b), jnp.dtype(d)) for d in args.dtypes.split(",") for m in args.models
                   for k in args.tenants.split(",") for b in args.images.split(",")]
    e2e, skipped = [], []
    for model, k, b, dtype in ([] if args.no_e2e else configs):
        label = f"{model} K={k} B={b} {np.dtype(dtype).name}"
        if deadline.passed():
            skipped.append(label)
            continue
        start = time.perf_counter()
        try:
            row = bench_end_to_end(model, k, b, dtype, args, store=len(e2e) + len(skipped) < args.store)
        except Exception as exc:  # one failing configuration (say, out of memory) is reported, not fatal
            log(f"[e2e] {label}: FAILED {type(exc).__name__}: {str(exc)[:300]}")
            skipped.append(f"{label} (failed: {type(exc).__name__})")
            continue
        row["wall_s"] = round(time.perf_counter() - start, 1)
        e2e.append(row)
        r = row["vs_exclusive"]
        log(f"[e2e] {label}: exclusive {row['images_per_s']['exclusive']:.0f} img/s | "
            + " ".join(f"{m}={v:.2f}x" for m, v in r.items()) + f" | jaxmt/vmap={row['jaxmt_vs_vmap']:.2f} "
            f"| compile {row['compile_s']} | {row['wall_s']}s")
        # Partial results survive a time-out.
        write_json(args.out, {"args": _jsonable(vars(args)), "layers": layers, "end_to_end": e2e, "skipped": skipped})

    path = write_json(args.out, {"args": _jsonable(vars(args)), "layers": layers, "layers_s": round(layers_s, 1),
                                 "end_to_end": e2e, "skipped": skipped})
    layer_table = markdown_table(
        ["model", "K x B", "dtype", "layer", "x", "dense us", "vmap/dense", "choice", "choice/dense"],
        [[r["model"], f"{r['tenants']}x{r['images']}", r["dtype"], r["signature"].split(" ", 2)[2], r["count"], r["dense_us"],
          r["vmap_vs_dense"] or float("nan"), r["choice"], r["choice_vs_dense"] or float("nan")] for r in layers],
    )
    methods = ["exclusive", "vmap", "time_only", "jaxmt"]
    e2e_table = markdown_table(
        ["model", "K x B", "dtype", "exclusive img/s", *(f"{m} / excl" for m in methods[1:]), "jaxmt / vmap", "conv choices"],
        [[r["model"], f"{r['tenants']}x{r['images']}", r["dtype"], r["images_per_s"]["exclusive"],
          *(r["vs_exclusive"][m] for m in methods[1:]), r["jaxmt_vs_vmap"],
          ", ".join(f"{k} {v}" for k, v in sorted(r["choices"].items()))
          + (f"; MultiTenantModel step {r['vs_exclusive']['jaxmt_store']:.2f}x" if "jaxmt_store" in r["vs_exclusive"] else "")
          + (f"; with {json.dumps(args.overrides)} {r['vs_exclusive']['jaxmt_overrides']:.2f}x"
             if "jaxmt_overrides" in r["vs_exclusive"] else "")
          + (f"; autotuned {r['vs_exclusive']['jaxmt_autotuned']:.2f}x ("
             + ", ".join(f"{k} {v}" for k, v in sorted(r["choices_autotuned"].items())) + ")"
             if "jaxmt_autotuned" in r["vs_exclusive"] else "")
          + (f"; exclusive access with the same kernels {r['vs_exclusive']['exclusive_kernels']:.2f}x, jaxmt / the faster "
             f"exclusive form {r['vs_exclusive']['jaxmt'] / max(1.0, r['vs_exclusive']['exclusive_kernels']):.2f}"
             if "exclusive_kernels" in r["vs_exclusive"] else "")
          + ("" if r["check"] == "ok" else " CHECK FAILED")]
         for r in e2e],
    )
    print(layer_table)
    print()
    print(e2e_table)
    if skipped:
        print("skipped (budget):", ", ".join(skipped))
    print(f"wrote {path}")
    if not args.no_readme and not args.quick:
        update_readme_section("Lowering", readme_body(args, env, e2e_table, layers, skipped))


def readme_body(args: argparse.Namespace, env: dict, e2e_table: str, layers: list[dict], skipped: list[str]) -> str:
    cmd = "PYTHONPATH=. python " + " ".join(["benchmarks/lowering.py", *sys.argv[1:]])
    lines = [f"`{cmd}` on {env['device']} (jax {env['jax']}, commit {env['commit']}); "
             "throughput ratios vs exclusive access (one model, all K*B images in one batch).", "", e2e_table]
    if skipped:
        lines += ["", "Not run (time budget): " + ", ".join(skipped)]
    return "\n".join(lines)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


if __name__ == "__main__":
    main()
