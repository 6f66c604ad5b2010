#!/usr/bin/env python
"""Open-loop serving simulator: many tenants, random arrivals, any of the schedulers.

Requests arrive at pre-drawn times (Poisson, or bursts of Poisson-many requests), each for a
tenant drawn from a Zipf popularity law, and are submitted whether or not earlier ones have
finished (open loop: a slow server does not slow the load down). Latency is measured by the
client, from just before ``submit`` to the future's completion; rejected and failed requests
count as SLO misses. Prints a table, writes JSON (throughput, latency percentiles, SLO
attainment, per-tenant spread) and a latency-CDF plot.

    PYTHONPATH=. python scripts/simulate.py --arch mlp --tenants 8 --rate 500 --duration 2 \\
        --scheduler all --json /tmp/sim.json --plot /tmp/sim.png

``Workload``, ``build_model``, ``make_server``, ``settle_heap`` and ``run_trial`` are importable:
the serving and pacing benchmarks (``benchmarks/serving.py``, ``benchmarks/pacing.py``) run
their trials through them.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import gc
import json
import pathlib
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

import jax
import numpy as np

import jaxmt
import models
from jaxmt.metrics import LatencyRecorder, percentiles, spread_by_chance, tenant_spread
from jaxmt.staging import STAGE_CHOICES, STAGE_HELP

SERVERS: dict[str, type] = {
    "jaxmt": jaxmt.Scheduler,
    "exclusive": jaxmt.ExclusiveServer,
    "time": jaxmt.TimeOnlyServer,
    "space": jaxmt.SpaceOnlyServer,
}
ARRIVALS = ("poisson", "bursty")


MAX_REQUESTS = 1e7  # expected requests of one workload (rate x duration)


@dataclasses.dataclass(frozen=True)
class Workload:
    """What the load generator sends.

    Attributes:
      rate: mean requests per second over all tenants.
      duration_s: seconds of arrivals.
      tenants: number of tenants (the first ``tenants`` of the model).
      zipf: popularity exponent: tenant i is drawn with weight 1 / (i + 1) ** zipf (0: uniform).
      arrival: "poisson", or "bursty" (bursts arrive as a Poisson process; a burst holds a
        geometric number of requests of mean ``burst``, spread over one millisecond).
      rows: rows per request.
      slo_ms: latency objective of every request.
      seed: seed of arrival times, tenants and inputs.
    """

    rate: float = 200.0
    duration_s: float = 2.0
    tenants: int = 8
    zipf: float = 1.0
    arrival: str = "poisson"
    burst: float = 8.0
    rows: int = 1
    slo_ms: float = 50.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not (self.rate > 0 and self.duration_s > 0 and self.tenants >= 1 and self.rows >= 1 and self.slo_ms > 0):
            raise ValueError(f"rate, duration, tenants, rows and slo must be positive: {self}")
        if self.arrival not in ARRIVALS:
            raise ValueError(f"arrival must be one of {ARRIVALS}, got {self.arrival!r}")
        if not (self.zipf >= 0 and 1 <= self.burst < np.inf):  # so NaN fails too
            raise ValueError(f"zipf must be >= 0 and burst finite and >= 1: {self}")
        if self.seed < 0:  # NumPy's generators refuse it, but only once the model is built and compiled
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.rate * self.duration_s > MAX_REQUESTS:  # the arrival times are drawn up front
            raise ValueError(f"rate x duration asks for {self.rate * self.duration_s:.3g} requests; at most {MAX_REQUESTS:.0e}")


def zipf_weights(tenants: int, exponent: float) -> np.ndarray:
    """Popularity of each tenant (sums to 1): weight 1 / (rank ** exponent)."""
    weights = 1.0 / np.arange(1, tenants + 1, dtype=np.float64) ** exponent
    return weights / weights.sum()


def arrival_schedule(workload: Workload) -> tuple[np.ndarray, np.ndarray]:
    """(arrival times in seconds from the start [n], increasing; tenant index of each [n])."""
    rng = np.random.default_rng(workload.seed)
    if workload.arrival == "poisson":
        count = rng.poisson(workload.rate * workload.duration_s)
        times = np.sort(rng.uniform(0.0, workload.duration_s, count))
    else:
        bursts = rng.poisson(workload.rate * workload.duration_s / workload.burst)
        starts = rng.uniform(0.0, workload.duration_s, bursts)
        sizes = rng.geometric(1.0 / workload.burst, bursts)
        times = np.repeat(starts, sizes) + rng.uniform(0.0, 1e-3, int(sizes.sum()))
        times = np.sort(np.clip(times, 0.0, workload.duration_s))
    tenants = rng.choice(workload.tenants, size=times.shape[0], p=zipf_weights(workload.tenants, workload.zipf))
    return times, tenants


def largest_tenant_bucket(tenants: int, max_tenants: int = 0) -> int:
    """The top of the tenant bucket ladder: ``max_tenants``, or by default the tenant count
    rounded up to a power of two, at most 64."""
    return max_tenants or min(64, 1 << max(0, tenants - 1).bit_length())


def build_model(arch: str, size: str, tenants: int, *, max_tenants: int = 0, max_rows: int = 16, seed: int = 0,
                dtype: Any = np.float32, outputs_to_host: bool | None = None, pixels: bool = False,
                tenant_ladder: Sequence[int] | None = None) -> tuple[models.ModelSpec, jaxmt.MultiTenantModel]:
    """``tenants`` tenants ("t0", "t1", ...) of a zoo architecture in one MultiTenantModel
    (``pixels``: an image model taking uint8 pixel rows), their weights stored in the compute
    ``dtype`` (bfloat16 weights for a bfloat16 model, as a server would hold them).

    The tenant bucket ladder is ``tenant_ladder`` when given, else the powers of two up to
    ``max_tenants`` (default: tenants rounded up to a power of two, at most 64); the row
    ladder is the powers of two up to ``max_rows``.
    """
    spec = models.make(arch, size, dtype=dtype, pixels=pixels)
    buckets = jaxmt.BucketPolicy.powers_of_two(largest_tenant_bucket(tenants, max_tenants), max_rows)
    if tenant_ladder is not None:
        buckets = dataclasses.replace(buckets, tenant_buckets=tuple(tenant_ladder))
    mt = jaxmt.MultiTenantModel(
        spec.apply_fn, spec.init(seed, dtype), capacity=tenants, buckets=buckets,
        row_shape=spec.input_shape, row_dtype=spec.input_dtype, outputs_to_host=outputs_to_host,
    )
    for i in range(tenants):
        mt.add_tenant(f"t{i}", spec.init(seed + 1 + i, dtype))
    return spec, mt


def make_server(kind: str, mt: jaxmt.MultiTenantModel, **options: Any) -> Any:
    """A started server of the given kind ("jaxmt", "exclusive", "time", "space").

    ``target_latency_ms`` (the Scheduler's pacing) goes to jaxmt only: the baselines
    serve as soon as they can."""
    if kind not in SERVERS:
        raise ValueError(f"unknown scheduler {kind!r}; expected one of {sorted(SERVERS)}")
    if kind != "jaxmt":
        options.pop("target_latency_ms", None)
    return SERVERS[kind](mt, **options)


def settle_heap(freeze: bool = True) -> None:
    """Before a trial: the garbage of earlier ones collected and, with ``freeze``, every live
    object frozen out of the collections during the trial (``jaxmt.freeze_heap``), as a
    serving process would after its warm-up; every server's trial starts from the same heap."""
    gc.unfreeze()
    if freeze:
        jaxmt.freeze_heap()
    else:
        gc.collect()


# How a request that got an answer ended, and the error the trial's recorder counts for it
# (it tells only errors from successes, and ``Overloaded`` from other errors).
ANSWERED, FAILED, REFUSED, CANCELLED = range(4)
OUTCOMES = (None, RuntimeError("the request failed"), jaxmt.Overloaded("refused by the server"), concurrent.futures.CancelledError())


def run_trial(server: Any, workload: Workload, inputs: np.ndarray, tenant_ids: Sequence[Any],
              *, timeout_s: float = 120.0) -> dict[str, Any]:
    """Drives ``server`` with the workload's arrivals; returns the client-side measurements.

    Args:
      inputs: [tenants, pool, rows, *row_shape]: request i of tenant k sends ``inputs[k, i % pool]``,
        handed over without a copy (``submit(..., copy=False)``: the pool is read-only here).
      tenant_ids: the id of each tenant index.
    """
    inputs = inputs.view()
    inputs.flags.writeable = False
    times, tenant_index = arrival_schedule(workload)
    # Every latency kept; no straggler flags: the server under test flags (and logs) its own.
    recorder = LatencyRecorder(window=max(1, times.shape[0]), flag_below_attainment=0.0, name=server.kind)
    lag_s, pool = [], inputs.shape[1]
    # When each request was sent and answered (NaN: not answered), and how it ended:
    # a done-callback runs on the thread of the server that completes the future, so it only
    # notes the time there; the recorder reads them after the trial. NumPy slots, not a list
    # of tuples: objects made during the trial would lengthen the collector's pauses.
    submitted_at = np.zeros(times.shape[0])
    finished_at = np.full(times.shape[0], np.nan)
    outcome = np.zeros(times.shape[0], np.int8)  # an index into OUTCOMES (not the error: one object per request)
    # Futures not done yet; a done one is let go at once, so that the objects alive during a
    # trial (and what a garbage collection walks) stay bounded by those in flight.
    pending: set[concurrent.futures.Future] = set()
    pending_lock, all_done = threading.Lock(), threading.Event()
    sending = True

    def on_done(i: int, future: concurrent.futures.Future) -> None:
        finished, code = time.perf_counter(), FAILED
        try:
            if future.cancelled():
                code = CANCELLED
            else:
                error = future.exception()
                code = ANSWERED if error is None else REFUSED if isinstance(error, jaxmt.Overloaded) else FAILED
        finally:
            with pending_lock:  # with the discard: a request counts as answered or unfinished, never both
                finished_at[i] = finished
                outcome[i] = code
                pending.discard(future)
                if not sending and not pending:
                    all_done.set()

    with jaxmt.GcPauses() as pauses:  # the collector's pauses during the trial
        start = time.perf_counter()
        for i, (due, k) in enumerate(zip(times, tenant_index)):
            wait = start + due - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            submitted = time.perf_counter()
            lag_s.append(max(0.0, submitted - start - due))
            tenant = tenant_ids[k]
            try:
                future = server.submit(tenant, inputs[k, i % pool], workload.slo_ms, copy=False)
            except Exception as exc:  # noqa: BLE001 (a refused request is a miss, not a crash of the generator)
                recorder.record(tenant, 0.0, workload.slo_ms, exc)
                continue
            submitted_at[i] = submitted
            with pending_lock:
                pending.add(future)
            future.add_done_callback(lambda f, i=i: on_done(i, f))
        sent_s = time.perf_counter() - start
        with pending_lock:
            sending = False
            if not pending:
                all_done.set()
        all_done.wait(timeout_s)
        with pending_lock:
            unfinished = len(pending)
            finished, codes = finished_at.copy(), outcome.copy()
    answered = np.flatnonzero(~np.isnan(finished))
    sent, done, tenants, codes = submitted_at.tolist(), finished.tolist(), tenant_index.tolist(), codes.tolist()  # Python scalars
    for i in answered.tolist():
        recorder.record(tenant_ids[tenants[i]], 1e3 * (done[i] - sent[i]), workload.slo_ms, OUTCOMES[codes[i]])
    elapsed_s = (float(finished[answered].max()) if answered.size else time.perf_counter()) - start
    server_metrics = server.metrics()
    metrics = recorder.snapshot()
    samples = recorder.samples_by_tenant()
    overall = metrics["overall"]
    return {
        "scheduler": server.kind,
        "offered_rps": round(workload.rate, 3),
        "sent_rps": round(times.shape[0] / max(sent_s, 1e-9), 3),
        "schedule_s": round(float(times[-1]) if times.size else 0.0, 4),  # when the last request was due
        "sent_s": round(sent_s, 4),  # when it was sent: later means the generator fell behind
        "requests": int(times.shape[0]),
        "ok": overall["ok"],
        "errors": overall["errors"],
        "rejected": overall["rejected"],
        "unfinished": unfinished,
        "throughput_rps": round(overall["ok"] / max(elapsed_s, 1e-9), 3),
        "goodput_rps": round(overall["slo_met"] / max(elapsed_s, 1e-9), 3),
        "slo_ms": workload.slo_ms,
        "slo_attainment": overall["slo_met"] / max(1, times.shape[0]),
        "latency_ms": {k: overall[k] for k in ("p50_ms", "p90_ms", "p99_ms", "max_ms", "mean_ms")},
        "spread": tenant_spread(metrics),
        "per_tenant": {str(t): {k: m[k] for k in ("count", "ok", "p50_ms", "p99_ms", "mean_ms", "slo_attainment")}
                       for t, m in metrics["tenants"].items()},
        "gc": pauses.snapshot(),
        "generator_lag_ms": {k: v for k, v in percentiles(1e3 * np.asarray(lag_s)).items() if k in ("p50_ms", "p99_ms", "max_ms")},
        "elapsed_s": round(elapsed_s, 4),
        "server": {key: server_metrics[key] for key in ("steps", "staging")},
        "_latencies_ms": recorder.samples_ms(),  # for the CDF; left out of the JSON
        "_samples_by_tenant": samples,  # for spread_by_chance, of the trials reported; left out of the JSON
    }


def simulate(workload: Workload, schedulers: Sequence[str], *, arch: str = "mlp", size: str = "tiny",
             max_tenants: int = 0, max_rows: int = 16, pool: int = 16, progress: bool = False,
             gc_freeze: bool = True, **server_options: Any) -> dict[str, Any]:
    """Builds the model, then for each scheduler: a fresh server, warm-up, ``settle_heap``, one trial."""
    spec, mt = build_model(arch, size, workload.tenants, max_tenants=max_tenants, max_rows=max_rows, seed=workload.seed)
    rng = np.random.default_rng(workload.seed + 1)
    inputs = spec.random_input(rng, workload.tenants * pool * workload.rows)
    inputs = inputs.reshape(workload.tenants, pool, workload.rows, *spec.input_shape)
    results = []
    for kind in schedulers:
        with make_server(kind, mt, default_slo_ms=workload.slo_ms, **server_options) as server:
            if progress:
                print(f"[{kind}] compiling ...", file=sys.stderr, flush=True)
            server.warmup()
            if progress:
                print(f"[{kind}] {workload.rate:g} req/s for {workload.duration_s:g} s ...", file=sys.stderr, flush=True)
            settle_heap(gc_freeze)
            result = run_trial(server, workload, inputs, mt.tenants)
            result["spread_by_chance"] = spread_by_chance(result["_samples_by_tenant"])  # the same latencies dealt at random
            results.append(result)
    device = jax.devices()[0]
    return {
        # the settings the run used: a burst size only for bursty arrivals
        "workload": {k: v for k, v in dataclasses.asdict(workload).items() if k != "burst" or workload.arrival == "bursty"},
        "model": {"arch": arch, "size": size, "buckets": dataclasses.asdict(mt.buckets)},
        "device": getattr(device, "device_kind", str(device)),
        "jax": jax.__version__,
        "results": results,
    }


def format_table(results: Sequence[dict[str, Any]]) -> str:
    headers = ["scheduler", "offered/s", "served/s", "p50 ms", "p90 ms", "p99 ms", "max ms", "SLO met",
               "rejected", "p99/p50 max", "by chance", "mean gap", "by chance", "rows/step", "tenants/step"]
    rows = []
    for r in results:
        lat, steps, spread = r["latency_ms"], r["server"]["steps"], r["spread"]
        chance = {k: (v or {}).get("median") for k, v in r.get("spread_by_chance", {}).items() if k in ("max_p99_over_p50", "mean_latency_gap")}
        rows.append([r["scheduler"], r["offered_rps"], r["throughput_rps"], lat["p50_ms"], lat["p90_ms"], lat["p99_ms"],
                     lat["max_ms"], f"{100 * r['slo_attainment']:.2f}%", r["rejected"], spread["max_p99_over_p50"],
                     chance.get("max_p99_over_p50"), spread["mean_latency_gap"], chance.get("mean_latency_gap"),
                     steps["mean_rows_per_step"], steps["mean_tenants_per_step"]])

    def fmt(value: Any) -> str:
        if value is None:
            return "-"
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    cells = [headers] + [[fmt(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot_cdf(results: Sequence[dict[str, Any]], path: str | pathlib.Path, slo_ms: float) -> None:
    """Latency CDF (log x axis) of each scheduler's answered requests, with the SLO marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        samples = np.sort(np.asarray(r["_latencies_ms"]))
        if samples.size:
            ax.plot(np.maximum(samples, 1e-3), np.arange(1, samples.size + 1) / r["requests"], label=r["scheduler"])
    ax.axvline(slo_ms, color="k", linestyle="--", linewidth=1, label=f"SLO {slo_ms:g} ms")
    ax.set(xscale="log", xlabel="latency (ms)", ylabel="fraction of requests answered", ylim=(0, 1.01),
           title="Latency CDF (rejected and failed requests never reach 1)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")  # at the path given: matplotlib would add ".png" to a name without it, or refuse another suffix
    plt.close(fig)


def jsonable(report: dict[str, Any]) -> dict[str, Any]:
    """The report without the raw latency samples (the ``_``-prefixed keys of each result,
    for the plot and ``spread_by_chance``)."""
    out = dict(report)
    out["results"] = [{k: v for k, v in r.items() if not k.startswith("_")} for r in report["results"]]
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="simulate.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--scheduler", default="jaxmt", choices=[*SERVERS, "all"], help="which server(s) to run")
    parser.add_argument("--arch", default="mlp", choices=models.ARCHITECTURES, help="architecture from models/")
    parser.add_argument("--size", default="tiny", choices=models.SIZES, help="model size")
    parser.add_argument("--tenants", type=int, default=8, help="number of tenants")
    parser.add_argument("--rate", type=float, default=200.0, help="mean requests per second, all tenants together")
    parser.add_argument("--duration", type=float, default=2.0, help="seconds of arrivals")
    parser.add_argument("--arrival", default="poisson", choices=ARRIVALS, help="arrival process")
    parser.set_defaults(burst=None)  # None unless given, so that one given with poisson arrivals is told from the default
    parser.add_argument("--burst", type=float, default=argparse.SUPPRESS,
                        help=f"mean requests per burst, --arrival bursty only (default: {Workload.burst})")
    parser.add_argument("--zipf", type=float, default=1.0, help="tenant popularity exponent (0: uniform)")
    parser.add_argument("--rows", type=int, default=1, help="rows per request")
    parser.add_argument("--slo-ms", type=float, default=50.0, help="latency objective of every request")
    parser.add_argument("--max-delay-ms", type=float, default=2.0, help="longest wait for company (all servers)")
    parser.set_defaults(target_latency_ms=None)  # not the option's default, which the help would show as "(default: None)"
    parser.add_argument("--target-latency-ms", type=float, default=argparse.SUPPRESS,
                        help="jaxmt only: pace each request to be answered about this long after submit (default: as soon as possible)")
    parser.add_argument("--overload-policy", default="reject", choices=jaxmt.scheduler.OVERLOAD_POLICIES,
                        help="what a request predicted to miss its deadline gets: Overloaded, or served and counted late")
    parser.add_argument("--overload-factor", type=float, default=1.0, help="tolerated predicted lateness, in SLOs")
    parser.add_argument("--max-tenants-bucket", type=int, default=0, help="largest tenant bucket (0: tenants, pow2, <= 64)")
    parser.add_argument("--max-rows-bucket", type=int, default=16, help="largest row bucket")
    parser.add_argument("--seed", type=int, default=0, help="seeds the weights, arrival times, tenants and inputs")
    parser.add_argument("--stage", default="auto", choices=sorted(STAGE_CHOICES), help=STAGE_HELP)
    parser.set_defaults(gc_freeze=True)  # set here, not as the option's default, which the help would show as "(default: True)"
    parser.add_argument("--no-gc-freeze", dest="gc_freeze", action="store_false", default=argparse.SUPPRESS,
                        help="do not freeze the heap before each trial (see jaxmt.freeze_heap)")
    parser.add_argument("--json", metavar="PATH", help="write the report as JSON here")
    parser.add_argument("--plot", metavar="PATH", help="write the latency CDF as PNG here")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return parser.parse_args(argv)


def _ignored_option(args: argparse.Namespace) -> str | None:
    """Why an option given would have no effect on this run, if one would: refused rather than
    silently dropped, as the train and batch commands do."""
    if args.burst is not None and args.arrival != "bursty":
        return f"--burst applies to --arrival bursty only: {args.arrival} arrivals come one at a time"
    if args.target_latency_ms is not None and args.scheduler not in ("jaxmt", "all"):
        return f"--target-latency-ms paces jaxmt only: --scheduler {args.scheduler} serves as soon as it can"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    ignored = _ignored_option(args)
    if ignored:
        print(f"simulate.py: error: {ignored}", file=sys.stderr)
        return 2
    try:
        burst = {} if args.burst is None else {"burst": args.burst}
        workload = Workload(rate=args.rate, duration_s=args.duration, tenants=args.tenants, zipf=args.zipf,
                            arrival=args.arrival, rows=args.rows, slo_ms=args.slo_ms, seed=args.seed, **burst)
    except ValueError as exc:
        print(f"simulate.py: error: {exc}", file=sys.stderr)
        return 2
    for option, path in (("--json", args.json), ("--plot", args.plot)):  # refused now, not after the run
        if path == "":  # e.g. "$OUT" of an unset variable: nothing would be written, silently
            print(f"simulate.py: error: {option} is empty", file=sys.stderr)
            return 2
        if path and not pathlib.Path(path).absolute().parent.is_dir():
            print(f"simulate.py: error: {option} {path}: its folder does not exist", file=sys.stderr)
            return 2
        if path and pathlib.Path(path).is_dir():
            print(f"simulate.py: error: {option} {path} is a folder, not a file", file=sys.stderr)
            return 2
    if args.plot:
        try:
            import matplotlib  # noqa: F401 (missing: found now, not after the run)
        except ImportError:
            print("simulate.py: error: --plot needs matplotlib: pip install matplotlib", file=sys.stderr)
            return 2
    schedulers = list(SERVERS) if args.scheduler == "all" else [args.scheduler]
    try:
        report = simulate(workload, schedulers, arch=args.arch, size=args.size, max_tenants=args.max_tenants_bucket,
                          max_rows=args.max_rows_bucket, progress=not args.quiet, gc_freeze=args.gc_freeze,
                          max_delay_ms=args.max_delay_ms, stage_inputs=STAGE_CHOICES[args.stage],
                          target_latency_ms=args.target_latency_ms,
                          overload_policy=args.overload_policy, overload_factor=args.overload_factor)
    except ValueError as exc:  # a bucket or server option the model or its servers refuse
        print(f"simulate.py: error: {exc}", file=sys.stderr)
        return 2
    print(format_table(report["results"]))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(jsonable(report), indent=2, default=str) + "\n")
    if args.plot:
        plot_cdf(report["results"], args.plot, workload.slo_ms)
    return 0


if __name__ == "__main__":
    sys.exit(main())
