"""What every benchmark shares: environment record, honest timing, JSON and README output.

Timing discipline: warm up first, synchronise with ``block_until_ready``, take the median of
repeats; results are compared against a reference before anything is timed (by the caller).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
README = BENCH_DIR / "README.md"

if str(BENCH_DIR.parent) not in sys.path:  # run as a script from anywhere in the tree
    sys.path.insert(0, str(BENCH_DIR.parent))

from jaxmt.timing import percentile, time_in_rounds  # noqa: E402  (needs the repository on sys.path)


def environment() -> dict[str, Any]:
    """Device, software versions and commit: what a figure needs to be reproduced."""
    commit = os.environ.get("JAXMT_COMMIT")  # set where the tree travels without its history
    if not commit:
        try:
            commit = subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=BENCH_DIR, capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            commit = "unknown"
    device = jax.devices()[0]
    return {
        "device": getattr(device, "device_kind", str(device)),
        "platform": device.platform,
        "device_count": jax.device_count(),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def time_call(fn: Callable[[], Any], *, warmup: int = 3, repeats: int = 20, min_seconds: float = 0.0) -> dict[str, float]:
    """Median, min and spread (seconds) of ``fn()`` followed by ``block_until_ready``."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    samples: list[float] = []
    start_all = time.perf_counter()
    while len(samples) < repeats or time.perf_counter() - start_all < min_seconds:
        start = time.perf_counter()
        jax.block_until_ready(fn())
        samples.append(time.perf_counter() - start)
    samples.sort()
    return {
        "median_s": statistics.median(samples),
        "min_s": samples[0],
        "p90_s": percentile(samples, 0.9),
        "repeats": len(samples),
    }


def time_calls_interleaved(fns: dict[str, Callable[[], Any]], *, warmup: int = 3, repeats: int = 20,
                           min_sample_s: float = 0.0) -> dict[str, dict[str, float | int]]:
    """Each of ``fns`` timed in rounds: every round times one sample of each in turn, so that
    the shared device's drift over the run moves them alike (ratios between them are what the
    benchmarks report). A sample is one call, or with ``min_sample_s`` a burst of back-to-back
    calls of about that long (``jaxmt.timing.time_in_rounds``); times are per call, and with
    bursts ``min_s`` and ``p90_s`` are over the bursts' means. Unlike ``time_call``'s
    ``min_seconds`` (the whole run's least length), ``min_sample_s`` sizes each sample."""
    return time_in_rounds(fns, warmup=warmup, repeats=repeats, min_sample_s=min_sample_s)


def write_json(name: str, payload: dict[str, Any]) -> Path:
    """Writes ``results/<name>.json`` with the environment attached."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps({"environment": environment(), **payload}, indent=2, default=str) + "\n")
    return path


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def fmt(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


# The opening of a fenced code block: three or more backticks or tildes (CommonMark).
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")


def update_readme_section(title: str, body: str) -> None:
    """Replaces (or appends) the ``## title`` section of benchmarks/README.md: from its heading
    to the next heading of level 1 or 2 (lines in fenced code blocks are not headings)."""
    text = README.read_text() if README.exists() else "# Benchmarks\n"
    section = f"## {title}\n\n{body.strip()}\n"
    lines = text.splitlines(keepends=True)
    start = end = None
    fence = None  # the marker of the code block the line is in
    for i, line in enumerate(lines):
        marker = _FENCE.match(line)
        if fence is not None:
            fence = None if marker and marker.group(1).startswith(fence) else fence
        elif marker:
            fence = marker.group(1)
        elif start is None:
            start = i if line.rstrip() == f"## {title}" else None
        elif line.startswith(("# ", "## ")):
            end = i
            break
    if start is None:
        text = text.rstrip() + "\n\n" + section
    else:
        text = "".join(lines[:start]) + section + "\n" + "".join(lines[len(lines) if end is None else end:])
    README.write_text(text.rstrip() + "\n")
