"""Table 1 of the paper: R same-size GEMMs, one per tenant, queued on one GPU.

Each tenant's model is one dense layer y [N, M] = x [N, K] @ w [K, M] (the paper's SGEMM
C = A B with A = w^T), so a step of R tenants is R GEMMs. Contenders, all with weights and
inputs already on the device:

  JAX (``--backend jax``):
    jaxmt        MultiTenantModel of that dense model: one step of the cached program
                 (gather the R tenants' slots, one batched dot_general), launched with
                 ``run_step`` back-to-back as a busy server does;
    jaxmt_predict  one synchronous ``predict`` (host rows in, host rows out: planning, the
                 input copy to the device, the copy back and the scatter included);
    time_only_predict  ``jaxmt.time_only_predict``, the library's time-only baseline, timed
                 the same way as ``predict`` (end to end);
    dot          the bare batched ``einsum`` over stacked weights (the kernel's ceiling);
    gather_dot   the same after a ``take`` of R slots (what jaxmt's step adds to it);
    time_only    one compiled program per tenant, called in turn (time multiplexing): the
                 program ``time_only_predict`` runs, on device-resident rows as the paper's
                 preallocated data (the library helper always copies through the host).
  PyTorch (``--backend torch``):
    torch_time_only     ``torch.mm`` per tenant, in turn, on one stream;
    streams             ``torch.mm`` per tenant, each on its own CUDA stream (space-only);
    streams_graph       the same R launches captured once in a CUDA graph and replayed;
    bmm                 ``torch.bmm`` (cuBLAS batched GEMM): the library's ceiling.

Every contender's result is checked against the float64 reference before it is timed;
float32 runs with TF32 off (the check's 1e-4 tolerance would catch it), as on the V100.

    PYTHONPATH=. python -m benchmarks.paper.table1 --backend jax --out /tmp/t1_jax.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks.paper._shared import (
    GEMM_SHAPES,
    GEMM_TOLERANCE,
    check,
    gemm_data,
    jax_environment,
    time_steps,
    torch_cuda_or_reason,
    torch_environment,
    torch_fp32_exact,
    write_raw,
)

TENANT_COUNTS = (2, 10, 20, 32, 120)
QUICK_TENANT_COUNTS = (2, 3)
DTYPES = ("float32", "bfloat16")


def shapes_for(quick: bool) -> dict[str, dict[str, Any]]:
    """The paper's shapes, or each divided by 16 (at least 1) for a quick CPU run."""
    if not quick:
        return GEMM_SHAPES
    return {name: {**s, **{d: max(1, s[d] // 16) for d in "MNK"}} for name, s in GEMM_SHAPES.items()}


def _timing_args(quick: bool) -> dict[str, Any]:
    return {"repeats": 2, "warmup": 1, "min_repeat_s": 0.0, "max_steps": 2} if quick else {"repeats": 5, "min_repeat_s": 0.01}


def _record(shape_name: str, shape: dict, dtype_name: str, tenants: int, method: str, timing: dict, error: float) -> dict:
    m, n, k = shape["M"], shape["N"], shape["K"]
    itemsize = 4 if dtype_name == "float32" else 2
    return {
        "shape": shape_name, "M": m, "N": n, "K": k, "dtype": dtype_name, "tenants": tenants, "method": method,
        "flops": 2 * m * n * k * tenants, "bytes": (m * k + n * k + n * m) * itemsize * tenants,
        "rel_error": error, **timing,
    }


# ------------------------------------------------------------------------------------ JAX
def measure_jax(shape_names: list[str], dtypes: list[str], counts: list[int], seed: int, quick: bool, on_partial: Callable[[dict], Any] = lambda _: None) -> dict:
    """Every JAX contender for every (shape, dtype, R); ``on_partial`` gets the rows so far."""
    import jax

    shapes = shapes_for(quick)
    result: dict[str, Any] = {"environment": jax_environment(), "peaks": _jax_peaks(dtypes, quick), "rows": []}
    for shape_name in shape_names:
        for dtype_name in dtypes:
            # Without TF32 for float32, as the paper (and the torch side) run.
            precision = jax.default_matmul_precision("highest") if dtype_name == "float32" else contextlib.nullcontext()
            clock = time.perf_counter()
            with precision:
                result["rows"] += _measure_jax_shape(shape_name, shapes[shape_name], dtype_name, counts, seed, quick)
            result.setdefault("seconds", {})[f"{shape_name}/{dtype_name}"] = time.perf_counter() - clock
            on_partial(result)
    return result


def _measure_jax_shape(shape_name: str, shape: dict, dtype_name: str, counts: list[int], seed: int, quick: bool) -> list[dict]:
    import jax
    import jax.numpy as jnp

    from jaxmt import BucketPolicy, MultiTenantModel, time_only_predict

    m, n, k = shape["M"], shape["N"], shape["K"]
    dtype = jnp.dtype(dtype_name)
    tol, timing = GEMM_TOLERANCE[dtype_name], _timing_args(quick)
    r_max = max(counts)
    w_all, x_all, y_ref = gemm_data(shape, r_max, seed, dtype_name)
    w_dev, x_dev = jax.device_put(w_all.astype(dtype)), jax.device_put(x_all.astype(dtype))
    w_list = [w_dev[r] for r in range(r_max)]  # time-only: each tenant's weights on their own
    x_list = [x_dev[r] for r in range(r_max)]

    def apply_fn(params: dict, x: jax.Array) -> jax.Array:  # one tenant: [b, K] -> [b, M]
        return x @ params["w"]

    mt = MultiTenantModel(
        apply_fn, {"w": np.zeros((k, m), dtype)}, capacity=r_max,
        buckets=BucketPolicy(tenant_buckets=tuple(sorted(set(counts))), row_buckets=(n,)),
        row_shape=(k,), row_dtype=dtype,
        outputs_to_host=False,  # device-resident steps, as the other contenders' (predict then copies back)
    )
    for r in range(r_max):
        mt.add_tenant(r, {"w": w_list[r]})
    one_tenant = jax.jit(apply_fn)
    dot = jax.jit(lambda w, x: jnp.einsum("rnk,rkm->rnm", x, w))
    gather_dot = jax.jit(lambda w, slots, x: jnp.einsum("rnk,rkm->rnm", x, jnp.take(w, slots, axis=0)))

    rows = []
    for tenants in counts:
        ids = np.repeat(np.arange(tenants), n).tolist()
        x_rows = x_all[:tenants].reshape(tenants * n, k).astype(dtype)
        want = y_ref[:tenants]
        record = lambda method, t, e: rows.append(_record(shape_name, shape, dtype_name, tenants, method, t, e))  # noqa: E731

        # jaxmt: the public predict first (checked), then its one step as a server runs it.
        err = check("jaxmt predict", mt.predict(ids, x_rows).reshape(want.shape), want, tol)
        (step,) = mt.dispatch(ids, x_rows).plan.steps
        step = dataclasses.replace(step, slots=jax.device_put(step.slots))  # slots on the device too
        x_kb = jax.device_put(x_rows[step.row_index])
        with mt.store.lock:
            flat = np.asarray(mt.run_step(step, x_kb), np.float32).reshape(-1, m)
            got = np.empty((tenants * n, m), np.float32)
            got[step.out_rows] = flat[step.out_positions]
            step_err = check("jaxmt step", got.reshape(want.shape), want, tol)
            compiles = mt.stats()["compiles"]
            record("jaxmt", time_steps(lambda: mt.run_step(step, x_kb), jax.block_until_ready, **timing), step_err)
            rows[-1]["recompiles_while_timed"] = mt.stats()["compiles"] - compiles
        sync_timing = {**timing, "warmup": 1, "repeats": 3 if not quick else 1}
        record("jaxmt_predict", time_steps(lambda: mt.predict(ids, x_rows), lambda y: y, steps=1, **sync_timing), err)
        # The library's time-only baseline, end to end like predict (host rows in and out).
        err = check("time_only_predict", time_only_predict(mt, ids, x_rows).reshape(want.shape), want, tol)
        record("time_only_predict", time_steps(lambda: time_only_predict(mt, ids, x_rows), lambda y: y, steps=1, **sync_timing), err)

        w_r, x_r = w_dev[:tenants], x_dev[:tenants]
        err = check("dot", dot(w_r, x_r), want, tol)
        record("dot", time_steps(lambda: dot(w_r, x_r), jax.block_until_ready, **timing), err)
        if tenants >= 32 or quick:  # where jaxmt is compared with torch.bmm: what the gather costs
            slots = jax.device_put(np.arange(tenants, dtype=np.int32))
            err = check("gather_dot", gather_dot(w_dev, slots, x_r), want, tol)
            record("gather_dot", time_steps(lambda: gather_dot(w_dev, slots, x_r), jax.block_until_ready, **timing), err)

        def time_only() -> list:
            return [one_tenant({"w": w_list[r]}, x_list[r]) for r in range(tenants)]

        err = check("time_only", np.stack([np.asarray(y, np.float32) for y in time_only()]), want, tol)
        record("time_only", time_steps(time_only, jax.block_until_ready, **timing), err)
    return rows


def _jax_peaks(dtypes: list[str], quick: bool) -> dict[str, Any]:
    """Measured ceilings: a large square matmul (FLOP/s) and a large copy (bytes/s)."""
    import jax
    import jax.numpy as jnp

    size, timing = (128, _timing_args(True)) if quick else (8192, {"repeats": 5, "min_repeat_s": 0.05})
    peaks: dict[str, Any] = {}
    rng = np.random.default_rng(0)
    for dtype_name in dtypes:
        a = jax.device_put(rng.standard_normal((size, size), dtype=np.float32).astype(jnp.dtype(dtype_name)))
        precision = jax.default_matmul_precision("highest") if dtype_name == "float32" else contextlib.nullcontext()
        with precision:
            mm = jax.jit(lambda p, q: p @ q)
            t = time_steps(lambda: mm(a, a), jax.block_until_ready, **timing)
        peaks[f"flops_{dtype_name}"] = 2 * size**3 / t["median_s"]
    words = 1 << (12 if quick else 28)
    buf = jax.device_put(rng.standard_normal(words, dtype=np.float32))
    scale = jax.jit(lambda v: v * 2.0)
    t = time_steps(lambda: scale(buf), jax.block_until_ready, **timing)
    peaks["bytes_per_s"] = 2 * 4 * words / t["median_s"]
    return peaks


# -------------------------------------------------------------------------------- PyTorch
def measure_torch(shape_names: list[str], dtypes: list[str], counts: list[int], seed: int, quick: bool, on_partial: Callable[[dict], Any] = lambda _: None) -> dict:
    """Every PyTorch contender for every (shape, dtype, R); ``on_partial`` gets the rows so far."""
    reason = torch_cuda_or_reason()
    if reason is not None:
        return {"skipped": reason}
    import torch

    torch_fp32_exact()
    shapes, timing = shapes_for(quick), _timing_args(quick)
    device = torch.device("cuda")
    streams = [torch.cuda.Stream() for _ in range(max(counts))]
    sync = lambda _=None: torch.cuda.synchronize()  # noqa: E731
    result: dict[str, Any] = {"environment": torch_environment(), "peaks": _torch_peaks(torch, dtypes, quick), "rows": []}
    rows = result["rows"]
    for shape_name in shape_names:
        shape = shapes[shape_name]
        m, n = shape["M"], shape["N"]
        for dtype_name in dtypes:
            tdtype = getattr(torch, dtype_name)
            w_all, x_all, y_ref = gemm_data(shape, max(counts), seed, dtype_name)
            w_dev = torch.from_numpy(w_all).to(device).to(tdtype)
            x_dev = torch.from_numpy(x_all).to(device).to(tdtype)
            tol = GEMM_TOLERANCE[dtype_name]
            for tenants in counts:
                y_dev = torch.empty((tenants, n, m), device=device, dtype=tdtype)
                ws, xs, ys = list(w_dev[:tenants]), list(x_dev[:tenants]), list(y_dev)
                w_r, x_r = w_dev[:tenants], x_dev[:tenants]

                def time_only() -> None:
                    for r in range(tenants):
                        torch.mm(xs[r], ws[r], out=ys[r])

                def on_streams() -> None:
                    for r in range(tenants):
                        with torch.cuda.stream(streams[r]):
                            torch.mm(xs[r], ws[r], out=ys[r])

                def bmm() -> None:
                    torch.bmm(x_r, w_r, out=y_dev)

                methods = {"torch_time_only": time_only, "streams": on_streams, "bmm": bmm}
                methods["streams_graph"] = _capture_streams_graph(torch, tenants, streams, xs, ws, ys, on_streams).replay
                for method, launch in methods.items():
                    y_dev.fill_(float("nan"))
                    sync()
                    launch()
                    sync()
                    err = check(method, y_dev.float().cpu().numpy(), y_ref[:tenants], tol)
                    rows.append(_record(shape_name, shape, dtype_name, tenants, method, time_steps(launch, sync, **timing), err))
            on_partial(result)
    return result


def _capture_streams_graph(torch: Any, tenants: int, streams: list, xs: list, ws: list, ys: list, warm: Any) -> Any:
    """One CUDA graph of the R per-stream launches, forked from and joined to its stream."""
    warm()  # cuBLAS workspaces for every stream exist before capture
    torch.cuda.synchronize()
    graph, capture = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    with torch.cuda.graph(graph, stream=capture):
        for r in range(tenants):
            streams[r].wait_stream(capture)
            with torch.cuda.stream(streams[r]):
                torch.mm(xs[r], ws[r], out=ys[r])
            capture.wait_stream(streams[r])
    return graph


def _torch_peaks(torch: Any, dtypes: list[str], quick: bool) -> dict[str, Any]:
    size, timing = (128, _timing_args(True)) if quick else (8192, {"repeats": 5, "min_repeat_s": 0.05})
    sync = lambda _=None: torch.cuda.synchronize()  # noqa: E731
    peaks: dict[str, Any] = {}
    for dtype_name in dtypes:
        a = torch.randn((size, size), device="cuda").to(getattr(torch, dtype_name))
        out = torch.empty_like(a)
        t = time_steps(lambda: torch.mm(a, a, out=out), sync, **timing)
        peaks[f"flops_{dtype_name}"] = 2 * size**3 / t["median_s"]
    words = 1 << (12 if quick else 28)
    src = torch.randn(words, device="cuda")
    dst = torch.empty_like(src)
    t = time_steps(lambda: dst.copy_(src), sync, **timing)
    peaks["bytes_per_s"] = 2 * 4 * words / t["median_s"]
    return peaks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=("jax", "torch"), required=True)
    parser.add_argument("--out", required=True, help="where the raw JSON goes")
    parser.add_argument("--shapes", default=",".join(GEMM_SHAPES), help="comma-separated, of " + ", ".join(GEMM_SHAPES))
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--tenants", default=None, help="comma-separated tenant counts R (default %s)" % (TENANT_COUNTS,))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="shapes / 16, R in (2, 3), one repeat: a CPU smoke test")
    args = parser.parse_args(argv)
    counts = [int(v) for v in args.tenants.split(",")] if args.tenants else list(QUICK_TENANT_COUNTS if args.quick else TENANT_COUNTS)
    measure = measure_jax if args.backend == "jax" else measure_torch
    header = {"part": f"table1_{args.backend}", "quick": args.quick, "tenant_counts": counts}
    # Written after every (shape, dtype), so that a part stopped by its time limit keeps what it measured.
    result = measure(args.shapes.split(","), args.dtypes.split(","), counts, args.seed, args.quick,
                     on_partial=lambda partial: write_raw(args.out, {**header, "partial": True, **partial}))
    write_raw(args.out, {**header, **result})
    print(f"table1 ({args.backend}): {len(result.get('rows', []))} figures -> {args.out}" + (f" (skipped: {result['skipped']})" if "skipped" in result else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
