"""Device time of one step by its shape (K tenants x B rows), beside one model's batches.

Serving runs small steps: a few tenants with one or two rows each. This measures what such a
step costs the device, with every input already there, against the two things it replaces:
one model on the same number of rows (exclusive access: the ceiling) and K one-tenant
programs of B rows in turn (time-only: what jaxmt must beat), all three timed alike (launched,
then one wait) in the same rounds. Each step's answers are checked against each tenant's own
forward before it is timed.

    PYTHONPATH=. python benchmarks/step_time.py                        # resnet18 full, float32
    PYTHONPATH=. python benchmarks/step_time.py --dtype bfloat16 --lowerings auto
    PYTHONPATH=. python benchmarks/step_time.py --quick                # CPU smoke run
"""

from __future__ import annotations

import argparse
import sys
import time

import common  # noqa: F401  (puts the repository on sys.path)
import jax
import jax.numpy as jnp
import numpy as np
from common import markdown_table, time_calls_interleaved, update_readme_section, write_json

import models
from jaxmt import BucketPolicy, LoweringPolicy, MultiTenantModel

DEFAULT_SHAPES = "1x1,1x2,4x1,8x1,8x2,16x1,16x2,32x1"


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """'KxB,...' -> [(K, B), ...]."""
    shapes = []
    for item in text.split(","):
        k, b = item.lower().split("x")
        shapes.append((int(k), int(b)))
    return shapes


def as_lowering(text: str) -> str | LoweringPolicy:
    """A --lowerings item: a lowering name, or "kind=choice+..." overrides on "auto"
    (e.g. "kxk=im2col": every kxk conv as im2col, the rest as "auto" picks them)."""
    if "=" not in text:
        return text
    pairs = [item.split("=", 1) for item in text.split("+")]
    return LoweringPolicy(default="auto", overrides=tuple(sorted((k.strip(), v.strip()) for k, v in pairs)))


def _ladder(values: set[int]) -> tuple[int, ...]:
    return tuple(sorted(values))


def measure(arch: str, size: str, dtype_name: str, tenants: int, shapes: list[tuple[int, int]], lowerings: list[str],
            repeats: int, seed: int, tolerance: float) -> dict:
    spec = models.make(arch, size, dtype=jnp.dtype(dtype_name))
    rng = np.random.default_rng(seed)
    params = [spec.init(seed + 1 + i, dtype_name) for i in range(tenants)]  # weights in the compute dtype
    apply = jax.jit(spec.apply_fn)
    result: dict = {"steps": []}

    for lowering in lowerings:
        mt = MultiTenantModel(spec.apply_fn, params[0], capacity=tenants,
                              buckets=BucketPolicy(tenant_buckets=_ladder({k for k, _ in shapes}), row_buckets=_ladder({b for _, b in shapes})),
                              row_shape=spec.input_shape, row_dtype=spec.input_dtype, lowering=as_lowering(lowering), outputs_to_host=False)
        for i, p in enumerate(params):
            mt.add_tenant(i, p)
        leaves = mt.store.stacked_leaves
        for k, b in shapes:
            start = time.perf_counter()
            program = mt.programs.get(mt._key(k, b))
            compile_s = time.perf_counter() - start
            slots = np.sort(rng.choice(tenants, size=k, replace=False)).astype(np.int32)
            x_kb = spec.random_input(rng, k * b).reshape(k, b, *spec.input_shape)
            slots_dev, x_dev = jax.device_put(slots), jax.device_put(x_kb)
            got = np.asarray(program(leaves, slots_dev, x_dev), np.float32)
            want = np.stack([np.asarray(apply(params[s], x_kb[e]), np.float32) for e, s in enumerate(slots)])
            err = float(np.linalg.norm(got - want) / np.linalg.norm(want))
            if not err < tolerance:
                raise AssertionError(f"{arch} {lowering} step {k}x{b}: relative error {err:.2e} over {tolerance}")
            # The baselines on the same rows, timed in the same rounds as the step and like it
            # (launched, then one wait): one model on all K*B rows (exclusive access), and the K
            # tenants' own one-tenant programs of B rows launched in turn (time-only), each
            # tenant's rows placed on the device beforehand.
            x_all = x_dev.reshape(k * b, *spec.input_shape)
            x_each = [x_dev[e] for e in range(k)]
            own = [params[s] for s in slots]
            timings = time_calls_interleaved({
                "step": lambda: program(leaves, slots_dev, x_dev),
                "exclusive": lambda: apply(params[0], x_all),
                "time_only": lambda: [apply(p, x) for p, x in zip(own, x_each)],
            }, warmup=3, repeats=repeats)
            step_s, exclusive_s, time_only_s = (timings[m]["median_s"] for m in ("step", "exclusive", "time_only"))
            result["steps"].append({
                "lowering": lowering, "tenants": k, "rows_per_tenant": b, "step_ms": step_s * 1e3, "rel_error": err,
                "compile_s": compile_s, "exclusive_ms": exclusive_s * 1e3, "time_only_ms": time_only_s * 1e3,
                "of_exclusive": exclusive_s / step_s, "over_time_only": time_only_s / step_s,
            })
            print(f"{lowering:>6} {k:>3}x{b:<2} step {step_s * 1e3:8.3f} ms  exclusive {exclusive_s * 1e3:8.3f} ms  "
                  f"time-only {time_only_s * 1e3:8.3f} ms  err {err:.1e}", flush=True)
        del mt
    return result


def report(args: argparse.Namespace, result: dict, environment: dict) -> str:
    headers = ["lowering", "K x B", "step ms", "exclusive ms (K*B rows, 1 model)", "time-only ms (K calls of B rows)",
               "of exclusive", "over time-only", "rel. error"]
    rows = [[s["lowering"], f"{s['tenants']}x{s['rows_per_tenant']}", s["step_ms"], s["exclusive_ms"], s["time_only_ms"],
             round(s["of_exclusive"], 2), round(s["over_time_only"], 2), f"{s['rel_error']:.1e}"] for s in result["steps"]]
    return (f"`PYTHONPATH=. python benchmarks/step_time.py {' '.join(args.argv)}` ({args.tenants} tenants of {args.arch} "
            f"({args.size}, {args.dtype}) on {environment['device']}, jax {environment['jax']}, commit {environment['commit']}). "
            "Median device time of one step with its inputs already on the device (slots of K distinct tenants, "
            f"drawn at random; median of {args.repeats} rounds), beside one model on the same K*B rows and the K "
            "tenants' one-tenant programs of B rows launched in turn, each timed like the step (launched, then one "
            "wait) in the same rounds. Each step was checked against each tenant's own forward first.\n\n"
            + markdown_table(headers, rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet18", choices=models.ARCHITECTURES)
    parser.add_argument("--size", default="full", choices=models.SIZES)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--tenants", type=int, default=64, help="tenants in the store")
    parser.add_argument("--shapes", default=None, help=f"steps to time, 'KxB,...' (default {DEFAULT_SHAPES}; --quick: 1x1,4x1,4x2)")
    parser.add_argument("--lowerings", default="auto,vmap", help="comma-separated MultiTenantModel lowering choices; "
                        "'kxk=im2col' (several joined by '+') overrides one layer kind on 'auto'")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--tolerance", type=float, default=2e-2, help="largest relative error of a step (TF32, bf16)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny model, 8 tenants, 3 repeats: a CPU smoke run")
    parser.add_argument("--no-readme", action="store_true")
    args = parser.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    if args.quick:
        args.size, args.tenants, args.repeats = "tiny", 8, 3
    shapes = parse_shapes(args.shapes or ("1x1,4x1,4x2" if args.quick else DEFAULT_SHAPES))
    if max(k for k, _ in shapes) > args.tenants:
        parser.error(f"a step of {max(k for k, _ in shapes)} tenants needs at least as many in the store (--tenants {args.tenants})")
    result = measure(args.arch, args.size, args.dtype, args.tenants, shapes, args.lowerings.split(","), args.repeats,
                     args.seed, args.tolerance)
    name = "step_time_quick" if args.quick else f"step_time_{args.arch}_{args.dtype}"
    path = write_json(name, {"args": dict(vars(args)), **result})
    environment = common.environment()
    text = report(args, result, environment)
    print(text)
    print(f"wrote {path}")
    if not args.quick and not args.no_readme:
        update_readme_section(f"Step time: {args.arch} {args.dtype}", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
