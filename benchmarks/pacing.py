"""Per-tenant latency spread with and without the Scheduler's pacing (``target_latency_ms``).

One model, one warm-up, then fixed-rate trials of jaxmt's Scheduler at the given rates, each
unpaced (as soon as possible) or paced to a latency target; the trials run in the order given,
so that paced and unpaced trials at one rate alternate on the same host. Baseline trials
(``time@RATE``) in the same run bound jaxmt's ratio to that baseline: a rate that jaxmt passes
over one that the baseline fails (>= 99% of requests within the SLO passes). Each trial reports
SLO attainment, latency percentiles and the per-tenant spread (worst p99/p50 and the gap
between tenants' mean latencies, over tenants with >= 100 and >= 1,000 answers), the figures
that issue 4's spread targets name. Every server a trial runs (jaxmt and each baseline) has its
answers checked against each tenant's own forward, on weights built from the tenant's seed,
before the trials.

    PYTHONPATH=. JAXMT_AUTOTUNE=0 python benchmarks/pacing.py --pixels --dtype bfloat16 \\
        --trials 4500:0,4500:40,3000:40,time@1131 [--trial-s 10] [--budget-s 600]

Trials: ``RATE:TARGET`` for jaxmt (TARGET in ms, 0 for unpaced), ``SERVER@RATE`` for a baseline. ``--quick``: tiny MLP on 8 tenants (CPU).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import common  # noqa: F401  (puts the repository on sys.path)
import jax
import numpy as np
from common import markdown_table, update_readme_section, write_json
from serving import SPREAD_COUNTS, check_answers, own_params, simulate

from jaxmt.metrics import tenant_spread


def parse_trials(text: str) -> list[tuple[str, float, float | None]]:
    """``"4500:0,4500:40,time@1131"`` -> [("jaxmt", 4500.0, None), ("jaxmt", 4500.0, 40.0),
    ("time", 1131.0, None)]: jaxmt at RATE:TARGET_MS (0: unpaced), a baseline as SERVER@RATE."""
    trials = []
    for item in text.split(","):
        if "@" in item:
            server, _, rate = item.partition("@")
            if server not in simulate.SERVERS or server == "jaxmt":
                raise argparse.ArgumentTypeError(f"trial {item!r}: expected a baseline in {sorted(set(simulate.SERVERS) - {'jaxmt'})}")
            target = "0"
        else:
            server, (rate, _, target) = "jaxmt", item.partition(":")
            if not target:
                raise argparse.ArgumentTypeError(f"trial {item!r}: expected RATE:TARGET_MS (0 for unpaced) or SERVER@RATE")
        try:
            rate_v, target_v = float(rate), float(target)
        except ValueError:
            raise argparse.ArgumentTypeError(f"trial {item!r}: the rate and the target must be numbers") from None
        if not (math.isfinite(rate_v) and math.isfinite(target_v)) or rate_v <= 0 or target_v < 0:
            raise argparse.ArgumentTypeError(f"trial {item!r}: the rate must be finite and > 0, the target finite and >= 0")
        trials.append((server, rate_v, target_v or None))
    return trials


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: tiny MLP, 8 tenants")
    parser.add_argument("--trials", type=parse_trials, default=parse_trials("4500:0,4500:40,3000:0,3000:40"),
                        help="jaxmt RATE:TARGET_MS (0: unpaced) or baseline SERVER@RATE, run in this order")
    parser.add_argument("--trial-s", type=float, default=10.0)
    parser.add_argument("--budget-s", type=float, default=1e9, help="skip the trials that would end after this many seconds")
    parser.add_argument("--tenants", type=int, default=64)
    parser.add_argument("--slo-ms", type=float, default=50.0)
    parser.add_argument("--max-delay-ms", type=float, default=2.0)
    parser.add_argument("--max-rows-bucket", type=int, default=8)
    parser.add_argument("--tenant-ladder", type=lambda text: [int(v) for v in text.split(",")], default=None,
                        help="tenant buckets, comma-separated (default: powers of two up to the tenants, <= 64)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--pixels", action="store_true", help="uint8 pixel rows (the model scales them)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="pacing")
    parser.add_argument("--no-readme", action="store_true")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    arch, size, tenants = ("mlp", "tiny", 8) if args.quick else ("resnet18", "full", args.tenants)
    spec, mt = simulate.build_model(arch, size, tenants, max_rows=args.max_rows_bucket, seed=args.seed, tenant_ladder=args.tenant_ladder,
                                    dtype=jax.numpy.dtype(args.dtype), pixels=args.pixels and not args.quick)
    inputs = spec.random_input(np.random.default_rng(args.seed + 1), tenants * 4).reshape(tenants, 4, 1, *spec.input_shape)
    options = dict(default_slo_ms=args.slo_ms, max_delay_ms=args.max_delay_ms, overload_policy="reject")
    errors = {}
    for kind in dict.fromkeys(["jaxmt", *(kind for kind, _, _ in args.trials)]):  # every server a trial runs, baselines too
        with simulate.make_server(kind, mt, **options) as server:
            server.warmup()
            errors[kind] = check_answers(kind, server, spec, mt, np.random.default_rng(args.seed), own_params(spec, args))
        if not errors[kind] <= 1e-2:  # NaN fails too
            raise AssertionError(f"{kind}: answers differ from the reference by {errors[kind]:.2e} (relative)")
    error = max(errors.values())
    trials, skipped = [], []
    for kind, rate, target in args.trials:
        # A baseline's trial also compiles and runs its programs first (about as long again, allowed for).
        needs_s = args.trial_s + 8.0 + (0.0 if kind == "jaxmt" else args.trial_s)
        if time.perf_counter() - start + needs_s > args.budget_s:
            print(f"  [{kind}] {rate:g} req/s, target {target}: skipped (budget)", file=sys.stderr, flush=True)
            skipped.append([kind, rate, target])
            continue
        workload = simulate.Workload(rate=rate, duration_s=args.trial_s, tenants=tenants, zipf=1.0, slo_ms=args.slo_ms,
                                     seed=args.seed + int(round(rate * 1000)))
        with simulate.make_server(kind, mt, target_latency_ms=target, **options) as server:
            server.warmup(execute=False) if kind == "jaxmt" else server.warmup()
            simulate.settle_heap(True)
            result = simulate.run_trial(server, workload, inputs, mt.tenants)
        per_tenant = {"tenants": result["per_tenant"]}
        trial = {
            "server": kind, "rate_rps": rate, "target_latency_ms": target, "requests": result["requests"],
            "slo_attainment": round(result["slo_attainment"], 5), "rejected": result["rejected"],
            "throughput_rps": result["throughput_rps"], "latency_ms": result["latency_ms"],
            **{f"spread_min_{count}": tenant_spread(per_tenant, min_count=count) for count in SPREAD_COUNTS},
            "steps": result["server"]["steps"], "generator_lag_max_ms": result["generator_lag_ms"]["max_ms"],
        }
        trials.append(trial)
        print(f"  [{kind}] {rate:g} req/s, target {target}: {100 * trial['slo_attainment']:.2f}% in SLO, p50 "
              f"{trial['latency_ms']['p50_ms']} ms, p99 {trial['latency_ms']['p99_ms']} ms, worst tenant p99/p50 "
              f"{trial['spread_min_100']['max_p99_over_p50']}, mean gap {trial['spread_min_100']['mean_latency_gap']}",
              file=sys.stderr, flush=True)
        write_json(args.out, {"args": _jsonable(args), "max_rel_error": error, "rel_error_by_server": errors, "trials": trials,
                              "skipped": skipped, "partial": True})
    payload = {"args": _jsonable(args), "max_rel_error": error, "rel_error_by_server": errors, "trials": trials, "skipped": skipped,
               "partial": bool(skipped)}
    path = write_json(args.out, payload)
    return {**payload, "environment": json.loads(path.read_text())["environment"]}


def _jsonable(args: argparse.Namespace) -> dict:
    return {**vars(args), "trials": [list(trial) for trial in args.trials]}


def table(trials: list[dict]) -> str:
    rows = []
    for t in trials:
        s100, s1000 = t["spread_min_100"], t["spread_min_1000"]
        rows.append([t["server"], f"{t['rate_rps']:,.0f}", "-" if t["target_latency_ms"] is None else f"{t['target_latency_ms']:g}",
                     f"{100 * t['slo_attainment']:.2f}%", t["latency_ms"]["p50_ms"], t["latency_ms"]["p99_ms"],
                     s100["tenants_counted"], s100["max_p99_over_p50"], s100["mean_latency_gap"],
                     s1000["tenants_counted"], s1000["max_p99_over_p50"], s1000["mean_latency_gap"],
                     t["steps"]["mean_rows_per_step"]])
    return markdown_table(["server", "req/s", "target ms", "in SLO", "p50 ms", "p99 ms", "tenants >= 100 req", "worst p99/p50",
                           "mean gap", "tenants >= 1000 req", "worst p99/p50", "mean gap", "rows/step"], rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    text = table(report["trials"])
    print(text)
    if not args.no_readme and not args.quick:  # a CPU smoke run does not replace the GPU's figures
        env = report["environment"]
        skipped = f" Skipped for time: {report['skipped']}." if report["skipped"] else ""
        update_readme_section("Serving: pacing", f"{env['device']}, jax {env['jax']}, commit {env['commit']}, {env['date']}; "
                              f"{args.trial_s:g} s trials at fixed rates, in the order listed.{skipped} "
                              f"[results/{args.out}.json](results/{args.out}.json)\n\n"
                              "    PYTHONPATH=. python benchmarks/pacing.py " + " ".join(argv or sys.argv[1:]) + "\n\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
