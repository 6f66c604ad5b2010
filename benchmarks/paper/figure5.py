"""Figure 5 of the paper: the memory wall. How many ResNet-50 tenants one GPU holds and serves.

The paper stopped at 18 ResNet-50 replicas on a 16 GB V100 for most approaches (a process or
framework context per model) and reached 60 with CUDA streams in one process. jaxmt keeps one
copy of each tenant's weights in the stacked store and nothing else per tenant, so the limit
is the weights themselves.

Procedure (one dtype per process; the driver gives the process 95% of the GPU memory):

1. Size the store from the device's memory statistics before anything else is on the
   device: the slots that fit beside the working set of a serving step (the K gathered
   tenants, activations, a chunk of new tenants and a margin), allocated at once as the
   store's ``capacity`` (growing by doubling copies the store, so it could reach only half
   the memory, and a pool with other buffers in it fragments). A failed allocation raises
   ``CapacityError`` and is retried 5% smaller.
2. Fill every slot with a distinct tenant: ``spec.init(seed + i)``, vmapped over chunks of
   seeds and added with ``store.add_stacked`` (one validation and one scatter per chunk).
3. Add one tenant more: the store must grow, the allocation fails, and ``add_tenant`` must
   raise ``CapacityError`` with the store unchanged (same tenants, same capacity).
4. Serve: K tenants spread over the whole store are checked against a reference (their
   params drawn again from their seeds, run through plain ``jax.vmap`` of the one-tenant
   forward); then one request for every resident tenant is answered (steps of K).

On a CPU (no memory statistics; ``--quick``) the store is capped with ``max_capacity``
instead, which exercises the same error path.

    PYTHONPATH=. python -m benchmarks.paper.figure5 --dtype bfloat16 --out /tmp/f5.json
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks.paper._shared import check, jax_environment, write_raw

# Relative error allowed between the tenant-batched program and one tenant's forward
# (float32 without TF32; bfloat16 through 50 layers with different conv algorithms).
TOLERANCE = {"float32": 2e-3, "bfloat16": 5e-2}
GIB = 1 << 30


def measure(dtype_name: str, seed: int, quick: bool, serve_tenants: int, margin_bytes: int, lowering: str, quick_capacity: int,
            on_partial: Callable[[dict], Any] = lambda _: None) -> dict:
    """Allocate, fill, overfill and serve (see the module docstring); ``on_partial`` gets the result so far."""
    import jax

    precision = jax.default_matmul_precision("highest") if dtype_name == "float32" else contextlib.nullcontext()
    with precision:
        return _measure(dtype_name, seed, quick, serve_tenants, margin_bytes, lowering, quick_capacity, on_partial)


def _measure(dtype_name: str, seed: int, quick: bool, k: int, margin_bytes: int, lowering: str, quick_capacity: int,
             on_partial: Callable[[dict], Any]) -> dict:
    import jax
    import jax.numpy as jnp
    from tqdm.auto import tqdm

    import models
    from jaxmt import BucketPolicy, CapacityError, MultiTenantModel

    dtype = jnp.dtype(dtype_name)
    spec = models.make("resnet50", "tiny" if quick else "full", dtype=dtype)
    device = jax.devices()[0]
    example = jax.eval_shape(lambda: spec.init(seed, dtype))  # shapes only: nothing on the device yet
    per_tenant = int(sum(np.prod(leaf.shape) * leaf.dtype.itemsize for leaf in jax.tree_util.tree_leaves(example)))
    chunk = 2 if quick else 16  # tenants initialised and added per add_stacked call
    result: dict[str, Any] = {"dtype": dtype_name, "model": f"resnet50 ({spec.size})", "bytes_per_tenant": per_tenant,
                              "serve_tenants_per_step": k, "seconds": {}}
    clock = time.perf_counter()

    # 1. Size the store to what fits beside the serving working set, allocated once, first.
    stats = device.memory_stats()
    if stats is None:
        target = quick_capacity
        result["memory"] = {"note": "no device memory statistics (CPU): store capped by max_capacity"}
    else:
        working_set = (k + chunk + 4) * per_tenant + margin_bytes
        target = int((stats["bytes_limit"] - stats["bytes_in_use"] - working_set) // per_tenant)
        result["memory"] = {"bytes_limit": stats["bytes_limit"], "bytes_in_use_before": stats["bytes_in_use"], "working_set_reserved": working_set}
    template = jax.tree_util.tree_map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), example)
    reserve_errors, mt = [], None
    for _ in range(6):
        try:
            mt = MultiTenantModel(
                spec.apply_fn, template, capacity=target, buckets=BucketPolicy(tenant_buckets=(k,), row_buckets=(1,)),
                row_shape=spec.input_shape, row_dtype=spec.input_dtype, lowering=lowering,
                max_capacity=target if stats is None else None,
            )
            break
        except CapacityError as exc:
            reserve_errors.append(str(exc)[:300])
            target = int(target * 0.95)
    if mt is None:
        raise CapacityError(f"no store of ResNet-50 {dtype_name} tenants could be allocated: {reserve_errors}")
    result["reserve_failures"] = reserve_errors
    capacity = mt.store.capacity
    result["seconds"]["allocate"] = time.perf_counter() - clock
    result["store_capacity"] = capacity
    on_partial(result)

    # Compile the serving step and the reference while the slots are still empty (programs
    # are specific to the capacity, which is final), then initialise tenants in chunks.
    clock = time.perf_counter()
    init_chunk = jax.jit(jax.vmap(lambda s: spec.init(s, dtype)))  # seeds [chunk] -> stacked params
    first_rows = jax.jit(lambda tree, n: jax.tree_util.tree_map(lambda leaf: leaf[:n], tree), static_argnums=1)
    mt.warmup([k], [1], execute=False)  # the compile alone is timed here
    result["seconds"]["compile"] = time.perf_counter() - clock
    on_partial(result)

    # 2. Fill every slot with a distinct tenant (seed + i): chunks of stacked params, device to device.
    clock = time.perf_counter()
    for first in tqdm(range(0, capacity, chunk), desc=f"resnet50 {dtype_name} tenants", unit="chunk", mininterval=5):
        count = min(chunk, capacity - first)
        stacked = init_chunk(jnp.arange(seed + first, seed + first + chunk))
        if count < chunk:
            stacked = first_rows(stacked, count)
        mt.store.add_stacked(list(range(first, first + count)), stacked)
        del stacked
        if (first // chunk) % 20 == 19:
            on_partial({**result, "filled_so_far": len(mt), "seconds_filling_so_far": time.perf_counter() - clock})
    result["seconds"]["fill"] = time.perf_counter() - clock
    result["resident_tenants"] = len(mt)
    result["resident_param_bytes"] = len(mt) * per_tenant
    if stats is not None:
        after = device.memory_stats()
        result["memory"].update(bytes_in_use_after_fill=after["bytes_in_use"], peak_bytes_in_use=after.get("peak_bytes_in_use"))

    # 3. One tenant more: the store cannot double, so add_tenant must fail cleanly.
    clock = time.perf_counter()
    extra = jax.tree_util.tree_map(lambda leaf: leaf[0], first_rows(init_chunk(jnp.arange(seed + capacity, seed + capacity + chunk)), 1))
    try:
        mt.add_tenant("one-too-many", extra)
        result["growth_failure"] = None  # the store doubled: more memory than estimated
    except CapacityError as exc:
        result["growth_failure"] = {"error": type(exc).__name__, "message": str(exc)[:400]}
    del extra
    result["store_unchanged_after_failure"] = len(mt) == capacity and mt.store.capacity == capacity and "one-too-many" not in mt
    result["seconds"]["failed_growth"] = time.perf_counter() - clock
    on_partial(result)

    # 4. Serve: K tenants spread over the store, checked; then every tenant once.
    rng = np.random.default_rng(seed)
    sample = [int(i) for i in np.linspace(0, len(mt) - 1, k).round()]
    x = spec.random_input(rng, k)
    got = mt.predict(sample, x)
    # Reference: the sampled tenants' params drawn again from their seeds (not read from the
    # store) and run through plain jax.vmap of the one-tenant forward (no store, no gather).
    seeds = np.resize(np.asarray(sample) + seed, max(chunk, k))
    ref_params = first_rows(init_chunk(jnp.asarray(seeds[:chunk])), k) if k <= chunk else None
    if ref_params is None:
        raise ValueError(f"--serve-tenants {k} must not exceed the init chunk {chunk}")
    want = np.asarray(jax.jit(jax.vmap(spec.apply_fn))(ref_params, x[:, None]), np.float32).reshape(k, -1)
    try:
        result["sample_rel_error"] = check(f"resnet50 {dtype_name} served", np.asarray(got, np.float32), want, TOLERANCE[dtype_name])
        result["check_passed"] = True
    except AssertionError as exc:
        result["check_passed"], result["check_error"] = False, str(exc)
    ids = mt.tenants
    x_all = spec.random_input(rng, len(ids))
    start = time.perf_counter()
    y_all = mt.predict(ids, x_all)
    seconds = time.perf_counter() - start
    result["serve_all"] = {
        "tenants": len(ids), "seconds": seconds, "images_per_s": len(ids) / seconds,
        "finite": bool(np.isfinite(np.asarray(y_all, np.float32)).all()),
    }
    result["jaxmt_stats"] = {key: v for key, v in mt.stats().items() if key in ("compiles", "compile_seconds", "capacity", "param_bytes")}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), required=True)
    parser.add_argument("--out", required=True, help="where the raw JSON goes")
    parser.add_argument("--serve-tenants", type=int, default=16, help="tenants per serving step K (default 16)")
    parser.add_argument("--margin-gib", type=float, default=3.0, help="memory kept free beyond the serving working set")
    parser.add_argument("--lowering", default="rule", help="jaxmt lowering policy (default 'rule')")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny ResNet-50, store capped at --quick-capacity")
    parser.add_argument("--quick-capacity", type=int, default=6, help="store cap without memory statistics (CPU)")
    args = parser.parse_args(argv)
    k = min(args.serve_tenants, 2) if args.quick else args.serve_tenants
    header = {"part": f"figure5_{args.dtype}", "quick": args.quick, "environment": jax_environment()}
    # Written after every phase, so that a part stopped by its time limit keeps what it did.
    result = measure(args.dtype, args.seed, args.quick, k, int(args.margin_gib * GIB), args.lowering, args.quick_capacity,
                     on_partial=lambda partial: write_raw(args.out, {**header, "partial": True, **partial}))
    write_raw(args.out, {**header, **result})
    print(f"figure5 ({args.dtype}): {result['resident_tenants']} tenants resident -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
