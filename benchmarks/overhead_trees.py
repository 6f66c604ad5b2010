"""Host overhead of ``predict`` from two source trees, alternated in one run: a before/after check.

Each sample is a fresh process run from one tree (its own ``jaxmt`` and ``models``) that times
``predict`` and the bare program of the same step in rounds, as ``overhead.py`` does (tiny
MLP, 16 tenants, 64 rows); the trees take turns, so a shared host's drift over the run moves
both alike. Every process checks ``predict`` against each tenant's own model first.

    PYTHONPATH=. python benchmarks/overhead_trees.py --trees /path/to/before,. --labels before,after --pairs 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve()


def measure_here(repeats: int, seed: int) -> dict[str, float]:
    """predict and the bare program of its step, from the tree this process imports (us)."""
    import jax
    import numpy as np

    import models
    from jaxmt import BucketPolicy, MultiTenantModel
    from jaxmt.timing import time_in_rounds

    spec = models.make("mlp", "tiny")
    rng = np.random.default_rng(seed)
    params = {f"t{i}": spec.init(seed + i) for i in range(16)}
    mt = MultiTenantModel(spec.apply_fn, params["t0"], capacity=16, buckets=BucketPolicy(),
                          row_shape=spec.input_shape, row_dtype=spec.input_dtype)
    for tenant, p in params.items():
        mt.add_tenant(tenant, p)
    ids = list(rng.choice(list(params), size=64))
    ids[:16] = list(params)  # every tenant present
    x = spec.random_input(rng, 64)
    apply = jax.jit(spec.apply_fn)
    want = np.concatenate([np.asarray(apply(params[t], x[i : i + 1])) for i, t in enumerate(ids)])
    err = float(np.linalg.norm(mt.predict(ids, x) - want) / np.linalg.norm(want))
    assert err < 1e-2, f"predict differs from each tenant's own model by {err} (relative; TF32 allows ~1e-3)"
    (step,) = mt.dispatch(ids, x).plan.steps
    program = mt.programs.get(mt._key(step.tenant_bucket, step.row_bucket))
    leaves = mt.store.stacked_leaves
    slots, rows = jax.device_put((step.slots, x[step.row_index]))
    timings = time_in_rounds({"bare": lambda: program(leaves, slots, rows), "predict": lambda: mt.predict(ids, x)},
                             warmup=100, repeats=repeats)
    bare, predict = timings["bare"]["median_s"] * 1e6, timings["predict"]["median_s"] * 1e6
    import jaxmt

    return {"bare_us": bare, "predict_us": predict, "overhead_us": predict - bare, "relative_error": err,
            "jaxmt": str(Path(jaxmt.__file__).parent)}


def _run_in(tree: Path, repeats: int, seed: int) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run([sys.executable, str(HERE), "--one", "--repeats", str(repeats), "--seed", str(seed)],
                          cwd=tree, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the run in {tree} failed:\n{done.stderr[-2000:]}")
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "commit": _commit_of(tree)}


def _commit_of(tree: Path) -> str:
    """The commit a tree holds (the environment record names only the driver's own tree);
    "unknown" where the tree is no checkout's top, such as one unpacked into a folder of
    another checkout, whose HEAD it need not hold. Uncommitted changes are not seen."""
    try:
        top, commit = subprocess.run(["git", "rev-parse", "--show-toplevel", "--short", "HEAD"], cwd=tree, capture_output=True,
                                     text=True, check=True).stdout.splitlines()
    except (OSError, ValueError, subprocess.CalledProcessError):
        return "unknown"
    return commit if Path(top).resolve() == Path(tree).resolve() else "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trees", default=".", help="comma-separated source trees (each holds jaxmt/ and models/)")
    parser.add_argument("--labels", default=None, help="comma-separated names of the trees (default: their paths)")
    parser.add_argument("--pairs", type=int, default=3, help="rounds of one process per tree")
    parser.add_argument("--repeats", type=int, default=1500, help="rounds of bare program and predict in each process")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="overhead_trees", help="results/<out>.json")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child process: measure and print
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure_here(args.repeats, args.seed)))
        return 0
    trees = [Path(t).resolve() for t in args.trees.split(",")]
    labels = args.labels.split(",") if args.labels else [str(t) for t in trees]
    if len(labels) != len(trees):
        parser.error(f"{len(labels)} labels for {len(trees)} trees")
    for tree in trees:
        if not (tree / "jaxmt").is_dir() or not (tree / "models").is_dir():
            parser.error(f"{tree} holds no jaxmt/ and models/")
    runs = []
    for round_index in range(args.pairs):
        for label, tree in zip(labels, trees):
            row = {"round": round_index, "tree": label, **_run_in(tree, args.repeats, args.seed)}
            if Path(row["jaxmt"]) != tree / "jaxmt":  # e.g. an editable install that shadows PYTHONPATH
                raise RuntimeError(f"the run in {tree} imported jaxmt from {row['jaxmt']}")
            runs.append(row)
            print(f"round {round_index} {label}: bare {row['bare_us']:.1f} us, predict {row['predict_us']:.1f} us, "
                  f"overhead {row['overhead_us']:.1f} us", flush=True)
    summary = {label: statistics.median(r["overhead_us"] for r in runs if r["tree"] == label) for label in labels}
    print("median overhead (us): " + ", ".join(f"{label} {us:.1f}" for label, us in summary.items()))
    sys.path.insert(0, str(HERE.parent))
    from common import write_json

    path = write_json(args.out, {"args": vars(args), "runs": runs, "median_overhead_us": summary})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
