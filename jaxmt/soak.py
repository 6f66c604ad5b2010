"""``python -m jaxmt soak``: many threads, many tenants, tenants coming and going; nothing lost.

Threads submit single requests of random tenants to a ``Scheduler`` while a churn thread
removes tenants and adds new ones. Every accepted request's future must complete, every
answer must equal its tenant's own apply (a reference computed once per tenant on a pool of
input rows that requests draw from), and host RSS and device bytes must stay flat after
warm-up. Tenant ids are never reused, so an answer can only be right for one set of weights;
a request whose tenant left before it ran fails with ``UnknownTenantError`` (an error by
type, not a loss).

The summary line reports requests, answers, errors by type, wrong answers and lost requests
(accepted futures that never completed); the exit code is 0 only when wrong and lost are 0
and memory stayed flat.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import random
import sys
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from typing import Any

import jax
import numpy as np

from jaxmt.buckets import BucketPolicy
from jaxmt.model import MultiTenantModel
from jaxmt.scheduler import Scheduler
from jaxmt.staging import STAGE_CHOICES, STAGE_HELP

POOL_ROWS = 64  # input rows every request draws from; references are computed on all of them


@dataclasses.dataclass
class SoakReport:
    """What a soak run measured; ``ok`` says whether it passed."""

    requests: int  # submit calls made
    answered: int  # futures that completed with rows
    errors: dict[str, int]  # exception type name -> count (at submit or through the future)
    wrong: int  # answers that differ from their tenant's reference
    lost: int  # accepted futures not completed when the run ended
    tenants_added: int
    tenants_removed: int
    seconds: float
    host_rss_mb: dict[str, float]  # after warm-up, at the end, highest seen after warm-up
    device_mb: dict[str, float]
    steps: dict[str, Any]  # the scheduler's step counters
    config: dict[str, Any]
    max_rss_growth_mb: float
    max_device_growth_mb: float

    @property
    def rss_growth_mb(self) -> float:
        """Host RSS growth from warm-up to the end, in MiB."""
        return round(self.host_rss_mb["end"] - self.host_rss_mb["warm"], 2)

    @property
    def device_growth_mb(self) -> float:
        """Device memory growth from warm-up to the end, in MiB."""
        return round(self.device_mb["end"] - self.device_mb["warm"], 3)

    @property
    def memory_flat(self) -> bool:
        """Whether both growths stay within their limits: no leak on host or device."""
        return self.rss_growth_mb <= self.max_rss_growth_mb and self.device_growth_mb <= self.max_device_growth_mb

    @property
    def ok(self) -> bool:
        """Whether the soak passed: nothing wrong, nothing lost, memory flat."""
        return self.wrong == 0 and self.lost == 0 and self.memory_flat

    def summary_line(self) -> str:
        """One line of counts, growth and throughput ending in OK or FAILED, for the log."""
        errors = ", ".join(f"{name}={count}" for name, count in sorted(self.errors.items())) or "none"
        return (
            f"soak: requests={self.requests} answered={self.answered} errors={{{errors}}} wrong={self.wrong} "
            f"lost={self.lost} tenants +{self.tenants_added}/-{self.tenants_removed} "
            f"rss_growth={self.rss_growth_mb:+.1f}MB device_growth={self.device_growth_mb:+.3f}MB "
            f"{self.requests / max(self.seconds, 1e-9):,.0f} req/s in {self.seconds:.1f}s -> {'OK' if self.ok else 'FAILED'}"
        )

    def to_json(self) -> dict[str, Any]:
        """The report's fields and derived figures as a JSON-able dict (``--json``, ``--record``)."""
        out = dataclasses.asdict(self)
        out.update(rss_growth_mb=self.rss_growth_mb, device_growth_mb=self.device_growth_mb, memory_flat=self.memory_flat, ok=self.ok)
        return out


def host_rss_mb() -> float:
    """Resident set size of this process now (Linux /proc; peak RSS elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def device_mb() -> float:
    """Device memory in use (the allocator's count where the backend reports one, as GPUs do;
    else the bytes of live JAX arrays), in MiB."""
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_in_use" in stats:
        return stats["bytes_in_use"] / 2**20
    return sum(a.nbytes for a in jax.live_arrays()) / 2**20


class _Tenants:
    """Resident tenant ids and every tenant's reference answers, shared by the threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.live: list[Hashable] = []
        self.reference: dict[Hashable, np.ndarray] = {}  # tenant -> apply on the pool [POOL_ROWS, ...]

    def pick(self, rng: random.Random) -> Hashable:
        with self.lock:
            return rng.choice(self.live)


class _Counts:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.submitted = 0
        self.finished = 0
        self.answered = 0
        self.wrong = 0
        self.lost = 0
        self.errors: collections.Counter[str] = collections.Counter()

    def take(self) -> int:
        """Counts one submitted request; returns its number (0, 1, ...) over all threads."""
        with self.lock:
            self.submitted += 1
            return self.submitted - 1

    def add(self, **deltas: int) -> None:
        with self.lock:
            for name, value in deltas.items():
                setattr(self, name, getattr(self, name) + value)

    def error(self, exc: BaseException) -> None:
        with self.lock:
            self.errors[type(exc).__name__] += 1
            self.finished += 1


def run_soak(
    *,
    requests: int = 100_000,
    threads: int = 16,
    tenants: int = 64,
    churn: int = 100,
    arch: str = "mlp",
    max_rows: int = 4,
    window: int = 32,
    slo_ms: float = 1_000.0,
    max_delay_ms: float = 2.0,
    seed: int = 0,
    rtol: float = 1e-5,
    warm_fraction: float = 0.1,
    max_rss_growth_mb: float = 64.0,
    max_device_growth_mb: float = 1.0,
    future_timeout_s: float = 120.0,
    latency_window: int = 64,
    stage_inputs: bool | None = None,
    progress: Callable[[int], None] | None = None,
) -> SoakReport:
    """Runs one soak and returns its report (see the module docstring).

    Args:
      requests: submit calls in all, split evenly over ``threads``.
      tenants: resident tenants at any time; ``churn`` of them are replaced (one removal and
        one new tenant each) at even intervals during the run.
      arch: a ``models`` architecture, at its tiny size.
      max_rows: each request has 1..max_rows rows.
      window: requests a thread keeps in flight before it waits for its oldest.
      rtol: relative (and absolute) tolerance of an answer against its reference.
      warm_fraction: memory is measured from when this fraction of requests was submitted.
      max_rss_growth_mb, max_device_growth_mb: what "flat" allows from warm-up to the end.
      future_timeout_s: how long a thread waits for one future before counting it lost.
      latency_window: latency samples the scheduler keeps per tenant. Bounded, but its
        bound is reached only after that many requests of every tenant: a small window
        fills during warm-up, so that host memory growing after it is a leak, not the window.
      stage_inputs: ``SchedulerConfig.stage_inputs`` (True: every request's rows staged on
        the device at submit, the path large rows take on a GPU).
      progress: called with the number of finished requests, from a monitor thread.
    """
    import models

    _check_counts(requests=requests, threads=threads, tenants=tenants, churn=churn, max_rows=max_rows, window=window)
    if seed < 0:  # NumPy's generators refuse it without naming it
        raise ValueError(f"seed must be >= 0, got {seed}")
    spec = models.make(arch, "tiny")
    apply = jax.jit(spec.apply_fn)
    pool = spec.random_input(np.random.default_rng(seed), POOL_ROWS)
    max_tenants = 1 << (tenants - 1).bit_length()
    mt = MultiTenantModel(
        spec.apply_fn,
        spec.init(seed),
        capacity=tenants + 1,  # removals free a slot before each add: the store never grows
        buckets=BucketPolicy.powers_of_two(min(max_tenants, 64), 1 << (max_rows - 1).bit_length()),
        row_shape=spec.input_shape,
        row_dtype=spec.input_dtype,
    )
    registry, counts = _Tenants(), _Counts()
    next_seed = iter(range(seed + 1, seed + 1 + tenants + churn))

    def add_new() -> None:
        with registry.lock:
            tenant_seed = next(next_seed)
        tenant_id = f"tenant-{tenant_seed}"
        params = spec.init(tenant_seed)
        reference = np.array(apply(params, pool), copy=True)  # a host copy: no device buffer kept alive
        with registry.lock:
            registry.reference[tenant_id] = reference
        mt.add_tenant(tenant_id, params)
        with registry.lock:
            registry.live.append(tenant_id)

    for _ in range(tenants):
        add_new()

    per_thread = [requests // threads + (i < requests % threads) for i in range(threads)]
    # The thread that submits request number n (of all threads) replaces a tenant first.
    churn_at = {int(requests * (i + 1) / (churn + 1)) for i in range(churn)}
    removed: list[Hashable] = []
    samples: dict[str, list[float]] = {"rss": [], "device": []}
    warm: dict[str, float] = {}
    done = threading.Event()

    def check(tenant_id: Hashable, rows: np.ndarray, future: Future) -> None:
        try:
            got = future.result(timeout=future_timeout_s)
        except TimeoutError:
            counts.add(lost=1)
            return
        except Exception as exc:  # noqa: BLE001 - every error is counted by type
            counts.error(exc)
            return
        want = registry.reference[tenant_id][rows]
        right = got.shape == want.shape and np.allclose(got, want, rtol=rtol, atol=rtol)
        counts.add(finished=1, answered=1, wrong=0 if right else 1)

    def worker(index: int) -> None:
        rng = random.Random(seed * 1_000_003 + index)
        in_flight: collections.deque = collections.deque()
        for _ in range(per_thread[index]):
            if counts.take() in churn_at:
                replace_one(rng)
            tenant_id = registry.pick(rng)
            rows = np.array([rng.randrange(POOL_ROWS) for _ in range(rng.randint(1, max_rows))])
            try:
                future = sched.submit(tenant_id, pool[rows])
            except Exception as exc:  # noqa: BLE001 - rejected at submit: an error by type
                counts.error(exc)
                continue
            in_flight.append((tenant_id, rows, future))
            if len(in_flight) >= window:
                check(*in_flight.popleft())
        while in_flight:
            check(*in_flight.popleft())

    # One replacement at a time: threads replacing at once could otherwise take every resident
    # tenant out of ``live`` (with tenants <= threads), and a thread picking then would crash.
    churn_lock = threading.Lock()

    def replace_one(rng: random.Random) -> None:
        with churn_lock:
            with registry.lock:
                victim = registry.live.pop(rng.randrange(len(registry.live)))
                removed.append(victim)
            mt.remove_tenant(victim)  # its queued requests fail with UnknownTenantError
            add_new()

    def monitor() -> None:
        while not done.wait(0.25):
            sample()
            if progress is not None:
                progress(counts.finished + counts.lost)

    def sample() -> None:
        rss, dev = host_rss_mb(), device_mb()
        if not warm and counts.submitted >= warm_fraction * requests:
            warm.update(rss=rss, device=dev)
        if warm:
            samples["rss"].append(rss)
            samples["device"].append(dev)

    with Scheduler(mt, max_delay_ms=max_delay_ms, default_slo_ms=slo_ms, latency_window=latency_window,
                   stage_inputs=stage_inputs) as sched:
        sched.warmup()  # the model's programs, and the joins of staged rows
        start = time.perf_counter()
        watcher = threading.Thread(target=monitor, name="soak-monitor")
        workers = [threading.Thread(target=worker, args=(i,), name=f"soak-worker-{i}") for i in range(threads)]
        for thread in [watcher, *workers]:
            thread.start()
        for thread in workers:
            thread.join()
        done.set()
        watcher.join()
        steps = {**sched.metrics()["steps"], "staging": sched.metrics()["staging"]}
    seconds = time.perf_counter() - start
    end_rss, end_device = host_rss_mb(), device_mb()
    if not warm:  # a run too short to sample after warm-up
        warm.update(rss=end_rss, device=end_device)
    if progress is not None:
        progress(counts.finished + counts.lost)
    accepted_unfinished = counts.submitted - counts.finished - counts.lost
    return SoakReport(
        requests=counts.submitted,
        answered=counts.answered,
        errors=dict(counts.errors),
        wrong=counts.wrong,
        lost=counts.lost + accepted_unfinished,
        tenants_added=tenants + len(removed),
        tenants_removed=len(removed),
        seconds=round(seconds, 3),
        host_rss_mb={"warm": round(warm["rss"], 2), "end": round(end_rss, 2), "max": round(max(samples["rss"] + [end_rss]), 2)},
        device_mb={"warm": round(warm["device"], 3), "end": round(end_device, 3), "max": round(max(samples["device"] + [end_device]), 3)},
        steps=steps,
        config={
            "arch": arch, "threads": threads, "tenants": tenants, "churn": churn, "max_rows": max_rows, "window": window,
            "slo_ms": slo_ms, "max_delay_ms": max_delay_ms, "seed": seed, "latency_window": latency_window,
            "warm_fraction": warm_fraction, "device": str(jax.devices()[0]), "stage_inputs": stage_inputs,
        },
        max_rss_growth_mb=max_rss_growth_mb,
        max_device_growth_mb=max_device_growth_mb,
    )


def _check_counts(*, requests: int, threads: int, tenants: int, churn: int, max_rows: int, window: int) -> None:
    """ValueError naming each count out of range with its value: the command line shows this
    message alone, as the answer to the option given."""
    limits = [(threads >= 1, f"threads >= 1, got {threads}"), (requests >= threads, f"requests >= threads, got {requests} < {threads}"),
              (tenants >= 2, f"tenants >= 2, got {tenants}"), (churn >= 0, f"churn >= 0, got {churn}"),
              (max_rows >= 1, f"max_rows >= 1, got {max_rows}"), (window >= 1, f"window >= 1, got {window}")]
    refused = [text for ok, text in limits if not ok]
    if refused:
        raise ValueError("need " + "; ".join(refused))


# ------------------------------------------------------------------------------ command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds ``python -m jaxmt soak``'s arguments (the CLI's contract, see ``jaxmt.cli``)."""
    parser.description = (
        "Soak test: THREADS threads submit REQUESTS single requests over TENANTS tenants to a "
        "Scheduler while CHURN tenants are replaced; checks that every future completes, every "
        "answer equals its tenant's reference, and memory stays flat. Exit codes: 0 all of that held, 1 it did not, "
        "2 bad arguments."
    )
    parser.add_argument("--requests", type=int, default=100_000, help="submit calls in all (default 100000)")
    parser.add_argument("--threads", type=int, default=16, help="submitting threads (default 16)")
    parser.add_argument("--tenants", type=int, default=64, help="resident tenants (default 64)")
    parser.add_argument("--churn", type=int, default=100, help="tenants removed and replaced during the run (default 100)")
    parser.add_argument("--arch", default="mlp", help="architecture from models/, tiny size (default mlp)")
    parser.add_argument("--max-rows", type=int, default=4, help="rows per request: 1..MAX_ROWS (default 4)")
    parser.add_argument("--window", type=int, default=32, help="requests in flight per thread (default 32)")
    parser.add_argument("--slo-ms", type=float, default=1000.0, help="latency objective of every request (default 1000)")
    parser.add_argument("--max-delay-ms", type=float, default=2.0, help="scheduler's batching delay (default 2)")
    parser.add_argument(
        "--latency-window", type=int, default=64,
        help="latency samples the scheduler keeps per tenant (default 64: full after warm-up, so later growth is a leak)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seeds the tenants' weights, the rows and each thread's picks (default 0)")
    parser.add_argument("--stage", default="auto", choices=sorted(STAGE_CHOICES), help=STAGE_HELP)
    parser.add_argument("--json", action="store_true", help="print the report as JSON after the summary line")
    parser.add_argument(
        "--record", action="store_true",
        help="write benchmarks/results/soak.json and the '## Soak' section of benchmarks/README.md "
             "(with --stage on: soak_stage_on.json and '## Soak: --stage on'; with --stage off, the same with off)"
    )


# The options that make a soak what it is, in the order a recorded command line gives them.
_RECORDED_OPTIONS = ("requests", "threads", "tenants", "churn", "arch", "max_rows", "window", "slo_ms", "max_delay_ms",
                     "latency_window", "seed", "stage")


def _command_line(args: argparse.Namespace) -> str:
    """The command that reruns this soak, every option spelled out."""
    return "python -m jaxmt soak " + " ".join(f"--{name.replace('_', '-')} {getattr(args, name)}" for name in _RECORDED_OPTIONS)


def _benchmarks_common() -> Any:
    """``benchmarks.common`` of the checkout this package runs from (``--record`` writes
    into its benchmarks/ folder); raises SystemExit if there is none, before any soak runs."""
    import importlib
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    if not (root / "benchmarks" / "common.py").exists():
        raise SystemExit(f"--record writes into benchmarks/ of a jaxmt checkout; there is none at {root}")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return importlib.import_module("benchmarks.common")


def _record(report: SoakReport, args: argparse.Namespace) -> None:
    """Writes results/soak*.json and the README section of this soak: "Soak" for the
    default staging, "Soak: --stage on" (or off) otherwise, so that one does not replace the other."""
    common = _benchmarks_common()
    markdown_table, update_readme_section, write_json = common.markdown_table, common.update_readme_section, common.write_json
    argv_line = _command_line(args)
    suffix = "" if args.stage == "auto" else f"_stage_{args.stage}"
    write_json(f"soak{suffix}", report.to_json())
    errors = ", ".join(f"{k} {v}" for k, v in sorted(report.errors.items())) or "none"
    cfg = report.config
    table = markdown_table(
        ["requests", "answered", "errors by type", "wrong", "lost", "tenants +/-", "req/s", "RSS growth (MB)", "device growth (MB)"],
        [[report.requests, report.answered, errors, report.wrong, report.lost,
          f"+{report.tenants_added} / -{report.tenants_removed}", round(report.requests / report.seconds),
          report.rss_growth_mb, report.device_growth_mb]],
    )  # fmt: skip
    body = (
        f"`{argv_line}` on {cfg['device']} ({cfg['threads']} threads, {cfg['tenants']} resident tenants of "
        f"{cfg['arch']} (tiny), {report.tenants_removed} replaced during the run, 1-{cfg['max_rows']} rows per request, "
        f"{report.seconds:.0f} s). Memory growth is from the sample after {cfg['warm_fraction']:.0%} of the requests "
        f"to the end; the scheduler keeps {cfg['latency_window']} latency samples per tenant.\n\n"
        f"{table}\n\nResult: **{'OK' if report.ok else 'FAILED'}** ({report.summary_line()})"
    )
    update_readme_section("Soak" if args.stage == "auto" else f"Soak: --stage {args.stage}", body)


def run(args: argparse.Namespace) -> int:
    """Runs ``python -m jaxmt soak``; returns 0 if the soak held, 1 if not, 2 for bad arguments."""
    from tqdm.auto import tqdm

    if args.record:
        _benchmarks_common()  # fails now, not after the soak, when there is nowhere to record

    jax.config.update("jax_default_matmul_precision", "highest")  # answers are compared at float32 precision
    bar = tqdm(total=args.requests, desc="soak", unit="req", smoothing=0.1)

    def progress(finished: int) -> None:
        bar.update(finished - bar.n)

    try:
        report = run_soak(
            requests=args.requests, threads=args.threads, tenants=args.tenants, churn=args.churn, arch=args.arch,
            max_rows=args.max_rows, window=args.window, slo_ms=args.slo_ms, max_delay_ms=args.max_delay_ms, seed=args.seed,
            latency_window=args.latency_window, stage_inputs=STAGE_CHOICES[args.stage],
            progress=progress,
        )  # fmt: skip
    except ValueError as exc:  # an option run_soak refuses (its message names it)
        bar.close()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    bar.close()
    print(report.summary_line())
    if args.json:
        print(json.dumps(report.to_json(), indent=2, default=str))
    if args.record:
        _record(report, args)
    return 0 if report.ok else 1
