"""What reading the tenants' filters allows, beside what the measured conv forms reached.

At one image per tenant a model's late layers read far more filter bytes than activations:
K tenants' 3x3 filters of 512 -> 512 channels are 302 MB in float32 at K = 32, which an
H100 reads in no less than 90 us at its data-sheet bandwidth, while exclusive access (one
filter for all K images) ran that layer in 56 us. This script asks, from a per-layer run of
``benchmarks/pallas_conv.py`` (its results JSON; no device needed), how far each of a
model's convs could get by that limit and how far the fastest measured form got:

- dense_us: exclusive access's dense conv of the layer (K * B images, one filter);
- weights_us: the K filters' bytes over ``--bandwidth-tbs`` (the time to read them once);
- bound: dense_us / max(dense_us, weights_us), the ratio to exclusive access that a
  tenant-batched conv as fast as the dense one at everything but its filter reads reaches;
- best: dense_us over the fastest form the run measured (vmap's grouped conv, the NCHW
  grouped conv, im2col or a kernel tile), and which one.

Layers are matched to the model's convs at the run's K x B by signature and weighted by how
many of them the model has; the model's convs that the run did not measure (1x1 convs,
ResNet-50's own downsampling 3x3s) are counted and left out of the totals.

    PYTHONPATH=. python benchmarks/conv_bound.py --results pallas_conv_f32_depth32 --model resnet18
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

import common  # puts the repository on sys.path; RESULTS_DIR read at call time
import numpy as np
from common import markdown_table, update_readme_section, write_json
from lowering import layer_signatures

# NVIDIA H100 SXM's data-sheet HBM3 bandwidth, TB/s (the GPU the per-layer runs used).
H100_BANDWIDTH_TBS = 3.35
SECTION = "Conv layers: what reading the filters allows"


def weight_bytes(sig: Any) -> int:
    """Bytes of the K tenants' filters of conv ``sig`` (all tenants, once)."""
    return int(math.prod(sig.rhs_shape)) * sig.tenants * np.dtype(sig.rhs_dtype).itemsize


def _geometry(key: str) -> str:
    """A signature key without its precision: the run's and the model's convs match whatever
    ``jax_default_matmul_precision`` each was traced under."""
    return key.split(" prec=")[0]


def layer_rows(results: dict, model: str, bandwidth_tbs: float) -> tuple[list[dict], dict]:
    """One row per measured layer of ``model`` at each K x B the results hold, and totals per K x B."""
    measured = {_geometry(row["signature"]): row for row in results["rows"] if "dense_us" in row}
    dtype = results["args"]["dtype"]
    configs = sorted({(row["tenants"], row["images"]) for row in results["rows"]}, reverse=True)
    rows, totals = [], {}
    for tenants, images in configs:
        total = {"dense_us": 0.0, "bound_us": 0.0, "best_us": 0.0, "layers": 0, "unmeasured_layers": 0}
        for sig, count in layer_signatures(model, "full", tenants, images, dtype):
            row = measured.get(_geometry(sig.key))
            if row is None:
                total["unmeasured_layers"] += count
                continue
            times = {name: form["us"] for name, form in row["forms"].items() if form.get("us") is not None}
            best = min(times, key=times.get)
            weights_us = weight_bytes(sig) / (bandwidth_tbs * 1e12) * 1e6
            dense = row["dense_us"]
            rows.append({
                "tenants": tenants, "images": images, "layer": row["layer"], "count": count,
                "dense_us": dense, "weights_mb": weight_bytes(sig) / 1e6, "weights_us": weights_us,
                "bound": dense / max(dense, weights_us), "best_form": best, "best": dense / times[best],
            })
            total["dense_us"] += count * dense
            total["bound_us"] += count * max(dense, weights_us)
            total["best_us"] += count * times[best]
            total["layers"] += count
        if total["layers"]:
            total["bound"] = total["dense_us"] / total["bound_us"]
            total["best"] = total["dense_us"] / total["best_us"]
        totals[f"{tenants}x{images}"] = total
    return rows, totals


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default="pallas_conv_f32_depth32", help="results/<name>.json of benchmarks/pallas_conv.py")
    parser.add_argument("--model", default="resnet18", help="a models/ architecture whose full-size convs to match")
    parser.add_argument("--bandwidth-tbs", type=float, default=H100_BANDWIDTH_TBS, help="memory bandwidth, TB/s")
    parser.add_argument("--out", default=None, help="results/<out>.json (default conv_bound_<model>)")
    parser.add_argument("--no-readme", action="store_true")
    args = parser.parse_args(argv)
    results = json.loads((common.RESULTS_DIR / f"{args.results}.json").read_text())
    rows, totals = layer_rows(results, args.model, args.bandwidth_tbs)
    path = write_json(args.out or f"conv_bound_{args.model}", {
        "args": vars(args), "source_environment": results.get("environment"), "rows": rows, "totals": totals})
    table = markdown_table(
        ["K x B", "layer", "in model", "dense us", "filters MB", "filter read us", "bound", "best measured (form)"],
        [[f"{r['tenants']}x{r['images']}", r["layer"], r["count"], r["dense_us"], r["weights_mb"], r["weights_us"],
          f"{r['bound']:.2f}", f"{r['best']:.2f} ({r['best_form']})"] for r in rows])
    summary = markdown_table(
        ["K x B", "convs matched", "not measured", "bound, over the matched convs", "best measured forms, over them"],
        [[config, t["layers"], t["unmeasured_layers"], f"{t['bound']:.2f}" if t["layers"] else "-",
          f"{t['best']:.2f}" if t["layers"] else "-"] for config, t in totals.items()])
    print(table, "\n", summary, f"\n-> {path}", sep="")
    if not args.no_readme:
        command = f"    PYTHONPATH=. python benchmarks/conv_bound.py --results {args.results} --model {args.model}"
        update_readme_section(SECTION, f"{command}\n\n{table}\n\n{summary}\n")


if __name__ == "__main__":
    main()
