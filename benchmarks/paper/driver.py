"""Runs every part of the paper's reproduction, then writes JSON, PNGs and README tables.

Each part measures in its own subprocess (JAX and PyTorch never share one, and Figure 5 gets
95% of the GPU memory to itself), under a shared time budget: a part that fails or runs out of
time is recorded as such and the others still run. The report is built from the raw JSON of
the parts (``paper_<part>.json``), so ``--report-only`` redraws figures and tables without
measuring anything.

    PYTHONPATH=. python benchmarks/paper.py                 # everything the 570 s budget allows
    PYTHONPATH=. python benchmarks/paper.py --only table1   # one figure
    PYTHONPATH=. python benchmarks/paper.py --report-only   # rebuild from benchmarks/results
    PYTHONPATH=. python benchmarks/paper.py --quick         # CPU smoke test, to a temp folder
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.paper._shared import REPO, read_raw, write_raw


@dataclasses.dataclass(frozen=True)
class Part:
    """One measuring subprocess: ``python -m module *args --out <raw json>``."""

    name: str
    figure: str
    module: str
    args: tuple[str, ...]
    timeout_s: int
    env: tuple[tuple[str, str], ...] = ()


# In the order they run: the headline Table 1 and the bfloat16 memory wall first. Timeouts
# are caps; the shared budget may give a part less. The parts
# that compile whole ResNets compile them with XLA's autotuning off (every JAX contender
# alike): on the H100 machine's host, autotuned compiles of a dozen ResNet programs alone
# took longer than the whole budget.
NO_AUTOTUNE = (("XLA_FLAGS", "--xla_gpu_autotune_level=0"),)
PARTS: tuple[Part, ...] = (
    Part("table1_jax", "table1", "benchmarks.paper.table1", ("--backend", "jax"), 180),
    Part("table1_torch", "table1", "benchmarks.paper.table1", ("--backend", "torch"), 60, (("CUDA_DEVICE_MAX_CONNECTIONS", "32"),)),
    Part("figure5_bfloat16", "figure5", "benchmarks.paper.figure5", ("--dtype", "bfloat16"), 200, (("XLA_PYTHON_CLIENT_MEM_FRACTION", ".95"), *NO_AUTOTUNE)),
    Part("figure3_torch", "figure3", "benchmarks.paper.figure3", ("--backend", "torch"), 60, (("CUDA_DEVICE_MAX_CONNECTIONS", "32"),)),
    Part("figure3_jax", "figure3", "benchmarks.paper.figure3", ("--backend", "jax"), 210, NO_AUTOTUNE),
    Part("figure5_float32", "figure5", "benchmarks.paper.figure5", ("--dtype", "float32"), 180, (("XLA_PYTHON_CLIENT_MEM_FRACTION", ".95"), *NO_AUTOTUNE)),
)
FIGURES = ("table1", "figure3", "figure5")


def raw_path(results_dir: Path, part: str) -> Path:
    return results_dir / f"paper_{part}.json"


def run_parts(parts: list[Part], results_dir: Path, quick: bool, budget_s: float, extra_args: dict[str, list[str]], in_process: bool) -> dict:
    """Runs the parts in order; returns {part: {"status", "seconds", ...}}."""
    deadline = time.monotonic() + budget_s
    log = {}
    for part in parts:
        out = raw_path(results_dir, part.name)
        args = [*part.args, "--out", str(out), *(["--quick"] if quick else []), *extra_args.get(part.figure, [])]
        remaining = deadline - time.monotonic()
        if remaining < 20:
            log[part.name] = {"status": "not run: time budget spent", "seconds": 0.0}
            continue
        timeout = min(part.timeout_s * (3 if quick else 1), remaining)
        print(f"[paper] {part.name}: python -m {part.module} {' '.join(args)} (up to {timeout:.0f} s)", flush=True)
        start = time.monotonic()
        out.unlink(missing_ok=True)
        status = _run_one(part, args, timeout, in_process)
        seconds = time.monotonic() - start
        if status == "ok" and not out.exists():
            status = "failed: no output written"
        log[part.name] = {"status": status, "seconds": round(seconds, 1)}
        print(f"[paper] {part.name}: {status} in {seconds:.0f} s", flush=True)
    return log


def _run_one(part: Part, args: list[str], timeout: float, in_process: bool) -> str:
    if in_process:  # tests: no interpreter start-up per part (CPU only: no memory to share)
        import importlib

        try:
            code = importlib.import_module(part.module).main(args)
        except (Exception, SystemExit) as exc:  # recorded, like a failing subprocess
            return f"failed: {type(exc).__name__}: {exc}"
        return "ok" if code == 0 else f"failed: exit code {code}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    for key, value in part.env:  # XLA_FLAGS add to the caller's flags; the rest replace
        env[key] = " ".join(filter(None, [env.get(key), value])) if key == "XLA_FLAGS" else value
    try:
        proc = subprocess.run([sys.executable, "-m", part.module, *args], cwd=REPO, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout:.0f} s"
    return "ok" if proc.returncode == 0 else f"failed: exit code {proc.returncode}"


def build_report(results_dir: Path, figures: list[str], readme: bool, log: dict | None = None) -> dict[str, Path]:
    """Merged JSON, PNGs and (optionally) README sections of the figures whose parts ran."""
    from benchmarks.paper import report

    statuses = log if log is not None else (read_raw(results_dir / "paper_run.json") or {}).get("parts", {})
    written = {}
    for figure in figures:
        names = [p.name for p in PARTS if p.figure == figure]
        raws = {name: read_raw(raw_path(results_dir, name)) for name in names}
        if not any(raws.values()) and not any(statuses.get(name) for name in names):
            print(f"[paper] {figure}: no raw results in {results_dir}; nothing to report")
            continue
        summary, markdown = report.BUILDERS[figure](raws, results_dir)
        summary["parts"] = {name: statuses.get(name) for name in names}
        ran = [f"`{name}` {statuses[name]['status']} ({statuses[name]['seconds']:.0f} s)" for name in names if statuses.get(name)]
        if ran:
            markdown += "\n\nLast run of each part: " + "; ".join(ran) + "."
        written[figure] = write_raw(results_dir / f"paper_{figure}.json", summary)
        print(markdown + "\n")
        if readme:
            from benchmarks import common

            common.update_readme_section(report.TITLES[figure], markdown)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/paper.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(FIGURES), help="comma-separated figures to run (default: %(default)s)")
    parser.add_argument("--parts", default=None, help="comma-separated parts to run, in this order (e.g. table1_torch); overrides --only for measuring")
    parser.add_argument("--quick", action="store_true", help="small shapes, tiny models, few repeats; results to a temp folder, README untouched")
    parser.add_argument("--results-dir", default=None, help="default: benchmarks/results (a temp folder with --quick)")
    parser.add_argument("--report-only", action="store_true", help="do not measure; rebuild JSON, PNGs and README from the raw results")
    parser.add_argument("--no-readme", action="store_true", help="leave benchmarks/README.md as it is")
    parser.add_argument("--budget-s", type=float, default=570.0, help="time budget of all parts together (default %(default)s)")
    parser.add_argument("--in-process", action="store_true", help="run the parts in this process (CPU tests only)")
    parser.add_argument("--table1-args", default="", help="extra arguments for the Table 1 parts, e.g. '--tenants 2,10'")
    parser.add_argument("--figure3-args", default="", help="extra arguments for the Figure 3 parts, e.g. '--models mobilenetv2'")
    parser.add_argument("--figure5-args", default="", help="extra arguments for the Figure 5 parts")
    args = parser.parse_args(argv)

    figures = [f for f in args.only.split(",") if f]
    unknown = sorted(set(figures) - set(FIGURES))
    if unknown:
        parser.error(f"unknown figure(s) {unknown}; choose from {FIGURES}")
    if args.results_dir:
        results_dir = Path(args.results_dir)
    elif args.quick:
        results_dir = Path(tempfile.mkdtemp(prefix="jaxmt-paper-quick-"))
    else:
        from benchmarks.common import RESULTS_DIR

        results_dir = RESULTS_DIR
    results_dir.mkdir(parents=True, exist_ok=True)
    readme = not (args.no_readme or args.quick)

    log = None
    if not args.report_only:
        names = args.parts.split(",") if args.parts else None
        by_name = {p.name: p for p in PARTS}
        unknown_parts = sorted(set(names or ()) - set(by_name))
        if unknown_parts:
            parser.error(f"unknown part(s) {unknown_parts}; choose from {sorted(by_name)}")
        parts = [by_name[n] for n in names] if names else [p for p in PARTS if p.figure in figures]
        extra = {"table1": args.table1_args.split(), "figure3": args.figure3_args.split(), "figure5": args.figure5_args.split()}
        start = time.monotonic()
        log = run_parts(parts, results_dir, args.quick, args.budget_s, extra, args.in_process)
        previous = read_raw(results_dir / "paper_run.json") or {}
        merged = {**previous.get("parts", {}), **log}
        write_raw(results_dir / "paper_run.json", {"parts": merged, "last_run_seconds": round(time.monotonic() - start, 1), "quick": args.quick})
        log = merged
        figures = sorted({p.figure for p in parts}, key=FIGURES.index) if args.parts else figures
    written = build_report(results_dir, figures, readme, log)
    print(f"[paper] results in {results_dir}: " + ", ".join(p.name for p in written.values()))
    failed = {k: v for k, v in (log or {}).items() if v and v.get("status") != "ok"}
    if failed:
        print("[paper] parts not measured: " + json.dumps(failed))
    return 0 if not failed else 1


if __name__ == "__main__":
    raise SystemExit(main())
