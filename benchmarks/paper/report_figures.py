"""Figures 3, 4 and 5 reports: slowdowns vs exclusive access, per-tenant spread, memory wall.

Every number in the markdown comes from the parts' JSON; the paper's from ``_shared``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.common import markdown_table
from benchmarks.paper._report_util import COMMAND, env_line, fmt, pyplot, skipped_parts
from benchmarks.paper._shared import PAPER_FIGURE3, PAPER_FIGURE4_SPREAD, PAPER_FIGURE5, geomean

# (framework, method) -> label; the exclusive entries are each framework's reference.
FIGURE3_METHODS = {
    ("jax", "exclusive"): "exclusive, JAX (1 model, batch n)",
    ("jax", "time_only"): "time-only, JAX (1 program/tenant)",
    ("jax", "jaxmt"): "jaxmt step",
    ("jax", "jaxmt_predict"): "jaxmt predict (host I/O)",
    ("jax", "time_only_predict"): "jaxmt.time_only_predict (host I/O)",
    ("torch", "exclusive"): "exclusive, PyTorch",
    ("torch", "exclusive_graph"): "exclusive, PyTorch CUDA graph",
    ("torch", "time_only"): "time-only, PyTorch",
    ("torch", "streams"): "space-only, 1 stream/model",
    ("torch", "streams_graph"): "space-only, streams + CUDA graphs",
}
# Each method's exclusive-access reference: JAX's device-resident exclusive (so the end-to-end
# methods' slowdowns include their host I/O); PyTorch's faster of eager and CUDA graph.
REFERENCE = {
    "jax:time_only": ("jax:exclusive",), "jax:jaxmt": ("jax:exclusive",),
    "jax:jaxmt_predict": ("jax:exclusive",), "jax:time_only_predict": ("jax:exclusive",),
    "torch:time_only": ("torch:exclusive", "torch:exclusive_graph"), "torch:streams": ("torch:exclusive", "torch:exclusive_graph"),
    "torch:streams_graph": ("torch:exclusive", "torch:exclusive_graph"),
}


def figure3(raws: dict[str, Any], results_dir: Path) -> tuple[dict, str]:
    frameworks = {"jax": raws.get("figure3_jax"), "torch": raws.get("figure3_torch")}
    names = list(dict.fromkeys(m for raw in frameworks.values() if raw and "models" in raw for m in raw["models"]))
    summary: dict[str, Any] = {"models": {}}
    for model in names:
        by_n: dict[int, dict[str, Any]] = {}
        for fw, raw in frameworks.items():
            for row in ((raw or {}).get("models", {}).get(model) or {}).get("rows", []):
                for method, entry in row.items():
                    if method != "tenants":
                        by_n.setdefault(row["tenants"], {})[f"{fw}:{method}"] = entry
        slowdown: dict[str, dict[str, float]] = {}
        for n, entries in sorted(by_n.items()):
            for key, refs in REFERENCE.items():
                ref_latency = [entries[r]["latency_s"] for r in refs if r in entries]
                if key in entries and ref_latency:
                    slowdown.setdefault(key, {})[str(n)] = entries[key]["latency_s"] / min(ref_latency)
        counts = sorted(by_n)
        near_10 = min(counts, key=lambda n: abs(n - 10)) if counts else None
        summary["models"][model] = {
            "tenant_counts": counts,
            "entries": {str(n): e for n, e in sorted(by_n.items())},
            "slowdown_vs_exclusive": slowdown,
            "geomean_slowdown_n_ge_2": {k: geomean([v for n, v in d.items() if int(n) >= 2]) for k, d in slowdown.items()},
            "spread_at": near_10,
            "spread": {k: e["spread"] for k, e in by_n.get(near_10, {}).items()},
            "max_spread": {k: max(by_n[n][k]["spread"] for n in counts if k in by_n[n]) for k in by_n.get(near_10, {})},
        }
    if names:
        _plot_figure3(summary, results_dir / "paper_figure3.png")
        _plot_figure4(summary, results_dir / "paper_figure4.png")
    return summary, _figure3_markdown(summary, raws)


def _figure3_markdown(summary: dict, raws: dict) -> str:
    lowering = (raws.get("figure3_jax") or {}).get("lowering", "?")
    head = (
        f"{COMMAND} ({env_line(raws)}). n tenants of one architecture (different weights), one image each, float32 "
        f"without TF32, inputs on the device; jaxmt lowering `{lowering}`. Latency = median of synchronous steps that "
        "answer all n requests; slowdown = latency over exclusive access of the same framework (one model, batch n; for "
        "PyTorch the faster of eager and CUDA graph; the end-to-end methods' slowdowns include their host I/O), geometric mean over n >= 2. PyTorch runs the same layer shapes "
        "(benchmarks/paper/torch_models.py). ![Figure 3](results/paper_figure3.png) ![Figure 4](results/paper_figure4.png)"
    )
    keys = [("jax:time_only", "time-only JAX"), ("torch:time_only", "time-only PyTorch"), ("torch:streams", "space-only streams"),
            ("torch:streams_graph", "space-only streams+graphs"), ("jax:jaxmt", "jaxmt step"),
            ("jax:time_only_predict", "time_only_predict (e2e)"), ("jax:jaxmt_predict", "jaxmt predict (e2e)")]
    rows = []
    for model, s in summary["models"].items():
        g = s["geomean_slowdown_n_ge_2"]
        rows.append([model, f"{PAPER_FIGURE3['time-only']}x", f"{PAPER_FIGURE3['space-only']}x", *[fmt(g.get(k), suffix="x") for k, _ in keys]])
    slow = markdown_table(["model", "paper time-only", "paper space-only", *[label for _, label in keys]], rows)
    lat_keys = ["jax:exclusive", "jax:time_only", "jax:jaxmt", "jax:time_only_predict", "jax:jaxmt_predict", "torch:exclusive", "torch:exclusive_graph",
                "torch:time_only", "torch:streams", "torch:streams_graph"]
    lat_rows = []
    for model, s in summary["models"].items():
        for n in s["tenant_counts"]:
            e = s["entries"][str(n)]
            lat_rows.append([model, n, *[fmt(e[k]["latency_s"] * 1e3, 2) if k in e else "n/a" for k in lat_keys],
                             fmt(e["jax:jaxmt"]["throughput_rps"], 0) if "jax:jaxmt" in e else "n/a"])
    latency = markdown_table(
        ["model", "n", *[FIGURE3_METHODS[tuple(k.split(":"))] + " ms" for k in lat_keys], "jaxmt req/s"], lat_rows)
    spread_keys = ["jax:time_only", "torch:time_only", "torch:streams", "torch:streams_graph", "jax:jaxmt"]
    sp_rows = []
    for model, s in summary["models"].items():
        sp_rows.append([model, s["spread_at"], f"{100 * PAPER_FIGURE4_SPREAD:.0f}% (MPS, 10 processes)",
                        *[fmt(100 * s["spread"][k], 0, "%") if k in s["spread"] else "n/a" for k in spread_keys]])
    spread = markdown_table(["model", "n", "paper", *[FIGURE3_METHODS[tuple(k.split(':'))] for k in spread_keys]], sp_rows)
    notes = _autotune_note(raws) + (
        "Figure 4 (slowest tenant's latency over the fastest's, minus 1): the paper measured MPS processes; MPS is a "
        "device setting this machine's GPU is not ours to change, so streams in one process stand in for it. In a jaxmt "
        "step every tenant's answer comes from the same program, so the spread is zero by construction; time-only's "
        "spread is its queue (the last tenant waits for all the others)."
    )
    return "\n\n".join(x for x in [head, "Geometric-mean slowdown vs exclusive access:", slow, "Latency per tenant count (ms):",
                                    latency, "Per-tenant latency spread:", spread, notes, skipped_parts(raws)] if x)


def _autotune_note(raws: dict) -> str:
    """Says when the JAX side was compiled without XLA's autotuning (and what that does)."""
    from benchmarks.paper.driver import PARTS

    env = (raws.get("figure3_jax") or {}).get("environment", {})
    flags = env.get("xla_flags")
    if flags is None:  # raw files written before the flags were recorded: the driver's setting
        flags = " ".join(v for p in PARTS if p.name == "figure3_jax" for k, v in p.env if k == "XLA_FLAGS")
    if "xla_gpu_autotune_level=0" not in flags:
        return ""
    return (
        "The JAX side was compiled with `XLA_FLAGS=--xla_gpu_autotune_level=0` (autotuned compiles of these ResNets did not "
        "fit the time budget on this machine): XLA then takes cuDNN's heuristic convolution algorithms, far slower than "
        "the autotuned ones PyTorch runs (compare the two exclusive columns), while jaxmt's `rule` lowering runs 1x1 convs "
        "as batched matmuls that do not depend on that choice. Compare JAX methods with each other and PyTorch methods "
        "with each other; across the frameworks these numbers say little. "
    )


def _plot_figure3(summary: dict, path: Path) -> None:
    plt = pyplot()
    models = list(summary["models"])
    fig, axes = plt.subplots(len(models), 2, figsize=(11, 3.8 * len(models)), squeeze=False)
    for i, model in enumerate(models):
        s = summary["models"][model]
        for (fw, method), label in FIGURE3_METHODS.items():
            key = f"{fw}:{method}"
            pts = [(n, s["entries"][str(n)][key]) for n in s["tenant_counts"] if key in s["entries"][str(n)]]
            if not pts:
                continue
            style = "-o" if method.startswith("jaxmt") else ("-" if fw == "jax" else "--")
            axes[i][0].plot([n for n, _ in pts], [e["latency_s"] * 1e3 for _, e in pts], style, label=label, ms=3)
            axes[i][1].plot([n for n, _ in pts], [e["throughput_rps"] for _, e in pts], style, label=label, ms=3)
        for ax, ylabel in zip(axes[i], ("latency (ms)", "throughput (requests/s)")):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("co-located tenants n")
            ax.set_ylabel(ylabel)
            ax.set_title(model, fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_figure4(summary: dict, path: Path) -> None:
    plt = pyplot()
    models = list(summary["models"])
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 3.8), squeeze=False)
    for ax, model in zip(axes[0], models):
        s = summary["models"][model]
        entries = s["entries"].get(str(s["spread_at"]), {})
        for key in ("jax:time_only", "torch:time_only", "torch:streams", "torch:streams_graph", "jax:jaxmt"):
            if key in entries:
                per = sorted(entries[key]["per_tenant_s"])
                ax.plot(range(1, len(per) + 1), [v * 1e3 for v in per], "-o", ms=3, label=FIGURE3_METHODS[tuple(key.split(":"))])
        ax.set_title(f"{model}: per-tenant latency, n = {s['spread_at']}", fontsize=10)
        ax.set_xlabel("tenant (fastest to slowest)")
        ax.set_ylabel("latency (ms)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------ Figure 5
def figure5(raws: dict[str, Any], results_dir: Path) -> tuple[dict, str]:
    runs = {raw["dtype"]: raw for raw in raws.values() if raw and "resident_tenants" in raw}
    per_dtype = {}
    for dtype, raw in runs.items():
        limit = (raw.get("memory") or {}).get("bytes_limit")
        per_dtype[dtype] = {
            **{k: raw.get(k) for k in ("resident_tenants", "bytes_per_tenant", "resident_param_bytes", "growth_failure",
                                        "store_unchanged_after_failure", "check_passed", "sample_rel_error", "serve_all", "fill_seconds")},
            "memory_bytes_given": limit,
            "tenants_per_gb": raw["resident_tenants"] / (limit / 1e9) if limit else None,
            "weights_fraction_of_memory": raw["resident_param_bytes"] / limit if limit else None,
        }
    paper_gb = PAPER_FIGURE5["gpu_gb"]
    summary = {
        "paper": {**PAPER_FIGURE5, "per_gb": {k: PAPER_FIGURE5[k] / paper_gb for k in ("most_approaches", "streams_one_process")}},
        "ours": per_dtype,
        "target_bf16_1000": (per_dtype["bfloat16"]["resident_tenants"] >= 1000) if "bfloat16" in per_dtype and not _quick(raws) else None,
    }
    if per_dtype:
        _plot_figure5(summary, results_dir / "paper_figure5.png")
    return summary, _figure5_markdown(summary, raws)


def _quick(raws: dict) -> bool:
    return any(raw and raw.get("quick") for raw in raws.values())


def _figure5_markdown(summary: dict, raws: dict) -> str:
    paper = summary["paper"]
    head = (
        f"{COMMAND} ({env_line(raws)}). ResNet-50 tenants (distinct weights) resident in one TenantStore and served, the "
        "process given 95% of the GPU memory: the store is sized from the device's memory statistics and allocated at once "
        "as its capacity (growing by doubling copies the store, so it could reach only about half the memory), every slot "
        "is filled (tenants initialised in chunks and added with `store.add_stacked`), "
        "then one more `add_tenant` must fail with `CapacityError` and leave the store serving."
    ) + (" ![Figure 5](results/paper_figure5.png)" if summary["ours"] else "")
    rows = [
        [f"paper, most approaches (V100, {paper['gpu_gb']} GB)", paper["gpu_gb"], paper["most_approaches"], fmt(paper["per_gb"]["most_approaches"], 1), "", ""],
        [f"paper, CUDA streams in one process (V100, {paper['gpu_gb']} GB)", paper["gpu_gb"], f">= {paper['streams_one_process']}",
         fmt(paper["per_gb"]["streams_one_process"], 1), "", ""],
    ]
    for dtype, s in summary["ours"].items():
        gb = s["memory_bytes_given"] / 1e9 if s["memory_bytes_given"] else None
        rows.append([f"jaxmt, ResNet-50 {dtype}", fmt(gb, 1), s["resident_tenants"], fmt(s["tenants_per_gb"], 1),
                     f"{s['bytes_per_tenant'] / 1e6:.1f} MB", fmt(100 * s["weights_fraction_of_memory"], 0, "%") if s["weights_fraction_of_memory"] else "n/a"])
    table = markdown_table(["", "memory (GB)", "ResNet-50 models resident", "per GB", "weights per tenant", "memory that is weights"], rows)
    lines = []
    for dtype, s in summary["ours"].items():
        failure = s["growth_failure"]
        lines.append(
            f"- {dtype}: one tenant more raised "
            + (f"`{failure['error']}` (\"{failure['message'][:160]}...\")" if failure else "nothing (the store doubled)")
            + f"; store unchanged: {s['store_unchanged_after_failure']}; sample of tenants across the store matches each tenant's "
            f"own forward: {s['check_passed']} (relative error {fmt(s.get('sample_rel_error'), 4) if s.get('sample_rel_error') is not None else 'n/a'}); "
            f"then every resident tenant answered one request in {s['serve_all']['seconds']:.2f} s "
            f"({s['serve_all']['images_per_s']:.0f} images/s, all finite: {s['serve_all']['finite']})."
        )
    target = summary["target_bf16_1000"]
    if target is not None:
        lines.append(f"- Target >= 1000 bfloat16 ResNet-50 tenants: {'met' if target else '**missed**'}.")
    return "\n\n".join(x for x in [head, table, "\n".join(lines), skipped_parts(raws)] if x)


def _plot_figure5(summary: dict, path: Path) -> None:
    plt = pyplot()
    paper = summary["paper"]
    labels = ["paper: most\n(V100 16 GB)", "paper: streams\n(V100 16 GB)"]
    counts = [paper["most_approaches"], paper["streams_one_process"]]
    per_gb = [paper["per_gb"]["most_approaches"], paper["per_gb"]["streams_one_process"]]
    for dtype, s in summary["ours"].items():
        labels.append(f"jaxmt {dtype}")
        counts.append(s["resident_tenants"])
        per_gb.append(s["tenants_per_gb"] or 0.0)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    colors = ["#999999", "#bbbbbb"] + ["#1f77b4"] * (len(labels) - 2)
    for ax, values, title in ((axes[0], counts, "ResNet-50 models resident"), (axes[1], per_gb, "models per GB of GPU memory")):
        bars = ax.bar(labels, values, color=colors)
        ax.bar_label(bars, [f"{v:.0f}" if v >= 10 else f"{v:.1f}" for v in values], fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
