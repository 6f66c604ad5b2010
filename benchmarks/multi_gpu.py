"""Throughput of many ResNet-50s on one GPU against every GPU of the host (tenant axis sharded).

64 tenants of ResNet-50 (full size, bfloat16 weights, activations and inputs); each request
carries ``--rows`` images for every tenant, in shuffled order (one step of K=64 tenants).

  1 device   ``MultiTenantModel`` on the first device (all 64 tenants there)
  N devices  ``ShardedMultiTenantModel`` over all N local devices (64/N tenants each; every
             device computes its own tenants' rows, no weights cross devices)

Three throughputs per configuration (images/s, medians of repeats after warm-up):
  step       the compiled step alone, inputs already on the device(s)
  predict    ``predict``: plan, input gather and transfer, step, copy back, scatter
  pipelined  a stream of requests with one ``dispatch`` in flight while the previous result
             is collected (what a scheduler does)
Scaling efficiency = throughput(N devices) / (N * throughput(1 device)). Outputs are checked
against each tenant's own ``apply_fn`` for a few tenants on every device before timing.

    PYTHONPATH=. python benchmarks/multi_gpu.py            # GPU host, full ResNet-50, ~3-5 min
    PYTHONPATH=. python benchmarks/multi_gpu.py --quick    # CPU smoke run, 4 forced host devices
"""

from __future__ import annotations

import os
import sys

QUICK_DEVICES = 4
if "--quick" in sys.argv[1:]:  # must precede JAX's start: forced host devices are read once
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={QUICK_DEVICES}".strip()
    os.environ["JAX_PLATFORMS"] = "cpu"

import argparse
import collections
import time
from typing import Any

import common  # puts the repository on sys.path (after XLA_FLAGS is set)
import jax
import jax.numpy as jnp
import numpy as np
from common import markdown_table, time_call, update_readme_section, write_json
from tqdm.auto import tqdm

import models
from jaxmt import BucketPolicy, MultiTenantModel, ShardedMultiTenantModel, tenant_mesh


def log(message: str) -> None:
    print(f"[multi_gpu] {message}", flush=True)


def rel_error(got: np.ndarray, want: np.ndarray) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def build(kind: str, spec: models.ModelSpec, args: argparse.Namespace, devices: list[jax.Device]) -> MultiTenantModel:
    """A model of ``args.tenants`` tenants (tenant i = ``spec.init(seed + i)``), on one or all devices."""
    policy = BucketPolicy.powers_of_two(args.tenants, args.rows)
    common_kw = {"capacity": args.tenants, "buckets": policy, "row_shape": spec.input_shape, "row_dtype": args.dtype,
                 "lowering": args.lowering, "outputs_to_host": False}  # both kinds keep answers on the devices
    example = jax.eval_shape(lambda: spec.init(0, args.dtype))
    example = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), example)
    if kind == "single":
        mt = MultiTenantModel(spec.apply_fn, example, device=devices[0], **common_kw)
    else:
        mt = ShardedMultiTenantModel(spec.apply_fn, example, mesh=tenant_mesh(devices), **common_kw)
    for i in tqdm(range(args.tenants), desc=f"adding tenants ({kind})", unit="tenant", leave=False):
        mt.add_tenant(f"t{i}", spec.init(args.seed + i, args.dtype))
    return mt


def make_request(spec: models.ModelSpec, args: argparse.Namespace, rng: np.random.Generator) -> tuple[list[str], np.ndarray]:
    ids = [f"t{i}" for i in range(args.tenants) for _ in range(args.rows)]
    rng.shuffle(ids)
    return ids, spec.random_input(rng, len(ids), dtype=args.dtype)


def check(mt: MultiTenantModel, spec: models.ModelSpec, args: argparse.Namespace, ids: list[str], x: np.ndarray) -> float:
    """Worst relative error of ``predict`` against the per-tenant apply, one tenant per device at least."""
    got = mt.predict(ids, x)
    if isinstance(mt, ShardedMultiTenantModel):
        by_device = collections.defaultdict(list)
        for t in dict.fromkeys(ids):
            by_device[mt.device_of(t)].append(t)
        checked = [ts[0] for ts in by_device.values()] + [ids[0]]
    else:
        checked = [ids[0], ids[-1]]
    apply = jax.jit(spec.apply_fn)
    worst = 0.0
    for tenant in dict.fromkeys(checked):
        rows = np.array([i for i, t in enumerate(ids) if t == tenant])
        want = np.asarray(apply(spec.init(args.seed + int(tenant[1:]), args.dtype), x[rows]))
        worst = max(worst, rel_error(got[rows], want))
    if worst > args.tolerance:
        raise AssertionError(f"predict differs from the per-tenant reference by {worst:.3g} (relative), over {args.tolerance}")
    return worst


def measure(kind: str, spec: models.ModelSpec, args: argparse.Namespace, devices: list[jax.Device]) -> dict[str, Any]:
    started = time.perf_counter()
    mt = build(kind, spec, args, devices)
    rng = np.random.default_rng(args.seed)
    requests = [make_request(spec, args, rng) for _ in range(2)]
    ids, x = requests[0]
    error = check(mt, spec, args, ids, x)
    images = len(ids)
    log(f"{kind}: {len(devices)} device(s) ready after {time.perf_counter() - started:.0f}s, "
        f"compile {mt.stats()['compile_seconds']:.0f}s, max relative error {error:.2g}")

    # The bare step: its input already placed as run_step would place it.
    (step,) = mt.dispatch(ids, x).plan.steps
    x_kb = x[step.row_index]
    placed = jax.device_put(x_kb, mt.entry_sharding if kind == "sharded" else devices[0])
    compiles = mt.stats()["compiles"]
    bare = time_call(lambda: mt.run_step(step, placed), warmup=args.warmup, repeats=args.repeats)
    sync = time_call(lambda: mt.predict(*requests[1]), warmup=args.warmup, repeats=args.repeats)

    def stream() -> None:
        pending: collections.deque = collections.deque()
        for i in range(args.stream):
            pending.append(mt.dispatch(*requests[i % 2]))
            if len(pending) > 1:
                pending.popleft().result()
        while pending:
            pending.popleft().result()

    piped = time_call(stream, warmup=1, repeats=max(3, args.repeats // 4))
    stats = mt.stats()
    if stats["compiles"] != compiles:
        raise AssertionError(f"{kind}: {stats['compiles'] - compiles} recompiles while timing")
    return {
        "config": kind,
        "devices": len(devices),
        "device_kinds": sorted({getattr(d, "device_kind", d.platform) for d in devices}),
        "images_per_request": images,
        "step": [step.tenant_bucket, step.row_bucket],
        "step_images_per_s": images / bare["median_s"],
        "predict_images_per_s": images / sync["median_s"],
        "pipelined_images_per_s": images * args.stream / piped["median_s"],
        "step_ms": bare["median_s"] * 1e3,
        "predict_ms": sync["median_s"] * 1e3,
        "compile_s": round(stats["compile_seconds"], 1),
        "relative_error": error,
        "tenants_per_device": stats.get("max_device_tenants", args.tenants),
        "param_bytes": stats["param_bytes"],
        "wall_s": round(time.perf_counter() - started, 1),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help=f"CPU smoke run: {QUICK_DEVICES} forced host devices, tiny ResNet-50, 8 tenants, ~1 minute")
    parser.add_argument("--model", default="resnet50", choices=models.ARCHITECTURES)
    parser.add_argument("--size", default="full", choices=("tiny", "full"))
    parser.add_argument("--dtype", default="bfloat16", help="weights, activations and inputs")
    parser.add_argument("--tenants", type=int, default=64)
    parser.add_argument("--rows", type=int, default=8, help="images per tenant per request")
    parser.add_argument("--lowering", default="vmap", help="how tenants are batched (see jaxmt.lowering)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--stream", type=int, default=6, help="requests per pipelined stream")
    parser.add_argument("--tolerance", type=float, default=None, help="relative error allowed (default by dtype)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-readme", action="store_true", help="do not update benchmarks/README.md")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.tenants, args.rows, args.repeats, args.stream = "tiny", 8, 4, 5, 4
    args.dtype = np.dtype(jnp.dtype(args.dtype))
    if args.tolerance is None:
        args.tolerance = 3e-2 if args.dtype.itemsize < 4 else 1e-4
    devices = jax.local_devices()
    if len(devices) < 2:
        log(f"only {len(devices)} device: the sharded configuration equals the single one")
    if args.tenants % len(devices):
        parser.error(f"--tenants {args.tenants} is not a multiple of the {len(devices)} devices")
    spec = models.make(args.model, args.size, dtype=args.dtype)
    env = common.environment()
    log(f"{len(devices)} x {env['device']}, jax {env['jax']}, {args.tenants} x {args.model} ({args.size}, "
        f"{args.dtype.name}), {args.rows} images per tenant")

    out = "multi_gpu_quick" if args.quick else "multi_gpu"
    jsonable_args = {k: (v.name if isinstance(v, np.dtype) else v) for k, v in vars(args).items()}
    single = measure("single", spec, args, devices[:1])
    write_json(out, {"args": jsonable_args, "results": [single], "partial": True})  # survives a time-out
    sharded = measure("sharded", spec, args, devices)
    rows = [single, sharded]
    n = sharded["devices"]
    efficiency = {m: sharded[f"{m}_images_per_s"] / (n * single[f"{m}_images_per_s"]) for m in ("step", "predict", "pipelined")}
    path = write_json(out, {"args": jsonable_args, "results": rows, "scaling_efficiency": efficiency})
    table = markdown_table(
        ["config", "devices", "tenants/device", "step img/s", "predict img/s", "pipelined img/s", "compile s"],
        [[r["config"], r["devices"], r["tenants_per_device"], r["step_images_per_s"], r["predict_images_per_s"],
          r["pipelined_images_per_s"], r["compile_s"]] for r in rows]
        + [["scaling efficiency", n, "", efficiency["step"], efficiency["predict"], efficiency["pipelined"], ""]],
    )
    print(table)
    print(f"wrote {path}")
    if not args.no_readme and not args.quick:
        cmd = "PYTHONPATH=. python " + " ".join(["benchmarks/multi_gpu.py", *sys.argv[1:]])
        body = (
            f"`{cmd}` on {n} x {env['device']} (jax {env['jax']}, commit {env['commit']}): {args.tenants} tenants of "
            f"{args.model} ({args.size}, {args.dtype.name}), {args.rows} images per tenant per request "
            f"({single['images_per_request']} images, one step). *step*: the compiled step with inputs on the "
            "device(s); *predict*: end to end from host arrays to host answers; *pipelined*: a stream of requests "
            "with one dispatched ahead. Scaling efficiency = N-device throughput / (N x 1-device throughput).\n\n"
            + table
        )
        update_readme_section("Multi-GPU", body)


if __name__ == "__main__":
    main()
