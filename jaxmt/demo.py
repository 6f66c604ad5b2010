"""``python -m jaxmt demo``: a few dozen small ResNets served as one program, side by side.

Builds tenants of a small ResNet-18, serves random mixed-tenant batches through
``MultiTenantModel.predict``, and compares images/s against exclusive access (one model,
the same total batch: the upper bound) and time-only multiplexing (one program per tenant,
in turn). Before anything is timed, jaxmt's answers to the first batch are checked row by row
against each tenant's own model.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import numpy as np

from jaxmt.baselines import exclusive_predict, time_only_predict
from jaxmt.buckets import BucketPolicy, make_plan
from jaxmt.model import MultiTenantModel


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds ``python -m jaxmt demo``'s arguments (the CLI's contract, see ``jaxmt.cli``)."""
    parser.add_argument("--arch", default="resnet18", help="architecture from models/ (default resnet18)")
    parser.add_argument("--size", default="tiny", choices=("tiny", "full"), help="model size (default tiny)")
    parser.add_argument("--tenants", type=int, default=32, help="number of tenants (default 32)")
    parser.add_argument("--rows", type=int, default=128, help="rows per mixed-tenant batch (default 128)")
    parser.add_argument("--batches", type=int, default=10, help="timed batches per method (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the tenants' weights and the batches (default 0)")


def _bench(fn, batches) -> float:
    """Median seconds of ``fn(batch)`` over the batches, after one untimed pass."""
    for batch in batches[:2]:
        jax.block_until_ready(fn(batch))
    samples = []
    for batch in batches:
        start = time.perf_counter()
        jax.block_until_ready(fn(batch))
        samples.append(time.perf_counter() - start)
    return float(np.median(samples))


def _reference(spec, params: dict, ids: list, x: np.ndarray) -> np.ndarray:
    """Row i computed alone by its tenant's own model, from the weights it was built with
    (not read back from the store, which is what is checked)."""
    apply = jax.jit(spec.apply_fn)
    return np.concatenate([np.asarray(apply(params[t], x[i : i + 1])) for i, t in enumerate(ids)])


def run(args: argparse.Namespace) -> int:
    """Runs ``python -m jaxmt demo``; returns 0 if jaxmt's answers matched each tenant's own model,
    1 if not, 2 for bad arguments."""
    import models
    from tqdm.auto import tqdm

    for name in ("tenants", "rows", "batches"):
        if getattr(args, name) < 1:
            print(f"error: --{name} must be >= 1, got {getattr(args, name)}", file=sys.stderr)
            return 2
    if args.seed < 0:  # NumPy's generators refuse it with a traceback
        print(f"error: --seed must be >= 0, got {args.seed}", file=sys.stderr)
        return 2
    try:
        spec = models.make(args.arch, args.size)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rng = np.random.default_rng(args.seed)
    names = [f"tenant-{i:03d}" for i in range(args.tenants)]
    params = {name: spec.init(args.seed + i) for i, name in enumerate(tqdm(names, desc="initialising tenants"))}
    max_rows = int(2 ** np.ceil(np.log2(args.rows)))
    mt = MultiTenantModel(
        spec.apply_fn,
        params[names[0]],
        capacity=args.tenants,
        buckets=BucketPolicy.powers_of_two(args.tenants, max_rows),
        row_shape=spec.input_shape,
        row_dtype=spec.input_dtype,
    )
    for name in names:
        mt.add_tenant(name, params[name])
    batches = [(list(rng.choice(names, size=args.rows)), spec.random_input(rng, args.rows)) for _ in range(args.batches)]

    # Compile what the batches need, with progress, before anything is timed.
    needed = sorted(
        {(step.tenant_bucket, step.row_bucket) for ids, _ in batches for step in make_plan(mt.store.slots_of(ids), mt.buckets).steps}
    )
    for k, b in tqdm(needed, desc="compiling jaxmt programs by bucket shape", unit="shape"):  # a shape may take two (one for whole-store steps)
        mt.warmup([k], [b])

    ids, x = batches[0]
    got, want = mt.predict(ids, x), _reference(spec, params, ids, x)
    error = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    ok = error < 5e-3  # float32; GPUs run float32 matmuls in TF32 (~1e-3)
    for ids_, x_ in tqdm(batches, desc="compiling baselines"):
        exclusive_predict(mt, x_)
        time_only_predict(mt, ids_, x_)

    seconds = {
        "jaxmt (space-time)": _bench(lambda b: mt.predict(*b), batches),
        "exclusive access (1 model)": _bench(lambda b: exclusive_predict(mt, b[1]), batches),
        "time-only (1 program/tenant)": _bench(lambda b: time_only_predict(mt, *b), batches),
    }
    stats = mt.stats()
    device = jax.devices()[0]
    print(f"\n{args.tenants} tenants of {args.arch} ({args.size}) on {getattr(device, 'device_kind', device.platform)}, "
          f"batches of {args.rows} rows over random tenants")
    print(f"{'method':<32}{'images/s':>12}{'vs exclusive':>14}")
    base = args.rows / seconds["exclusive access (1 model)"]
    for method, sec in seconds.items():
        rate = args.rows / sec
        print(f"{method:<32}{rate:>12,.0f}{rate / base:>13.2f}x")
    print(f"\njaxmt compiled {stats['compiles']} programs in {stats['compile_seconds']:.1f} s; "
          f"cache hits {stats['cache_hits']}, padding waste {stats['padding_waste']:.0%}")
    print(f"correctness: relative error vs each tenant's own model, row by row {error:.1e} -> {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1
