"""What the paper's parts share: the paper's numbers, step timing for JAX and PyTorch, raw JSON.

Timing discipline (every part): results are checked against a reference before anything is
timed; then warm-up, then repeats whose median is reported. Two kinds of figures:

* latency: one step at a time, each waited for (``synchronous``);
* steady-state throughput: ``steps`` steps launched back-to-back with inputs already on the
  device and one wait at the end, as a server with a full queue runs; the per-step time is
  the repeat's time divided by ``steps``.

This module imports neither JAX nor PyTorch at import time, so a PyTorch part never starts a
JAX client on the GPU (which would take 75% of its memory).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a script or a module from anywhere in the tree
    sys.path.insert(0, str(REPO))

# The paper's claims (V100, 16 GB), quoted in the README next to ours.
PAPER_TABLE1: dict[str, dict[str, Any]] = {
    "rnn": {"baseline": "time-only", "geomean": 2.48, "r10": 1.21, "r20": 2.14},
    "conv2_2": {"baseline": "space-only", "geomean": 3.23, "r10": 1.68, "r20": 2.88},
    "square": {"baseline": "space-only", "geomean": 4.93, "r10": 2.42, "r20": 2.47},
}
PAPER_FIGURE3 = {"time-only": 4.6, "space-only": 2.2}  # geometric-mean slowdown vs exclusive
PAPER_FIGURE4_SPREAD = 0.25  # latency gap, slowest vs fastest of 10 co-located models (MPS)
PAPER_FIGURE5 = {"gpu_gb": 16, "most_approaches": 18, "streams_one_process": 60}

# Each GEMM: y [N, M] = x [N, K] @ w [K, M] for one tenant (the paper's C = A B with A = w^T).
GEMM_SHAPES: dict[str, dict[str, Any]] = {
    "rnn": {"label": "RNN matrix-vector", "M": 512, "N": 1, "K": 512},
    "conv2_2": {"label": "ResNet-18 conv2_2 (im2col)", "M": 256, "N": 128, "K": 1152},
    "square": {"label": "square", "M": 256, "N": 256, "K": 256},
}


def geomean(values: Sequence[float]) -> float:
    values = [float(v) for v in values if v is not None and v > 0 and math.isfinite(v)]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def rel_error(got: Any, want: Any) -> float:
    """Relative Frobenius error of ``got`` against ``want`` (float64)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def check(name: str, got: Any, want: Any, tolerance: float) -> float:
    """The relative error, or ``AssertionError`` naming the contender if above ``tolerance``."""
    error = rel_error(got, want)
    if not error <= tolerance:  # also catches NaN
        raise AssertionError(f"{name}: relative error {error:.3g} against the reference exceeds {tolerance:g}")
    return error


def time_steps(
    launch: Callable[[], Any],
    wait: Callable[[Any], Any],
    *,
    repeats: int = 7,
    warmup: int = 3,
    min_repeat_s: float = 0.02,
    max_steps: int = 4000,
    steps: int | None = None,
) -> dict[str, float]:
    """Per-step seconds of ``launch()`` run back-to-back and waited for once per repeat.

    Args:
      launch: dispatches one step and returns something ``wait`` can block on.
      wait: blocks until everything launched so far has finished (``jax.block_until_ready``
        of the last output: one GPU stream runs them in order; or ``torch.cuda.synchronize``).
      steps: steps per repeat; by default enough for ``min_repeat_s`` (1 gives latency).

    Returns:
      median_s, min_s (seconds per step), steps (per repeat), repeats.
    """
    for _ in range(warmup):
        wait(launch())
    if steps is None:
        start = time.perf_counter()
        wait(launch())
        once = max(time.perf_counter() - start, 1e-7)
        steps = int(min(max_steps, max(1, math.ceil(min_repeat_s / once))))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = None
        for _ in range(steps):
            out = launch()
        wait(out)
        samples.append((time.perf_counter() - start) / steps)
    return {"median_s": statistics.median(samples), "min_s": min(samples), "steps": steps, "repeats": repeats}


def gemm_data(shape: dict[str, int], tenants: int, seed: int, dtype_name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weights w [R, K, M], inputs x [R, N, K] (float32 holding values exact in ``dtype_name``)
    and the reference y [R, N, M] (float64 products of those values, rounded to float32).

    Both frameworks draw the same numbers: standard normal, scaled so that outputs are O(1),
    never zero.
    """
    m, n, k = shape["M"], shape["N"], shape["K"]
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((tenants, k, m), dtype=np.float32) / np.float32(math.sqrt(k))
    x = rng.standard_normal((tenants, n, k), dtype=np.float32)
    if dtype_name == "bfloat16":
        import ml_dtypes

        w = w.astype(ml_dtypes.bfloat16).astype(np.float32)
        x = x.astype(ml_dtypes.bfloat16).astype(np.float32)
    y = np.matmul(x.astype(np.float64), w.astype(np.float64)).astype(np.float32)
    return w, x, y


# Relative error allowed against the float64 reference: float32 without TF32 (TF32 would
# miss this by 10x, so the check also proves it is off) and bfloat16 outputs.
GEMM_TOLERANCE = {"float32": 1e-4, "bfloat16": 1e-2}


def write_raw(path: str | Path, payload: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
    return path


def read_raw(path: str | Path) -> dict[str, Any] | None:
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else None


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def jax_environment() -> dict[str, Any]:
    """``benchmarks.common.environment()`` (starts the JAX client: call in JAX parts only)."""
    from benchmarks import common

    return {**common.environment(), "xla_flags": os.environ.get("XLA_FLAGS", "")}


def source_record() -> dict[str, str]:
    """The commit and date that ``benchmarks.common.environment()`` records, without JAX (for
    the PyTorch parts, whose results would otherwise not say which tree they ran)."""
    import datetime
    import subprocess

    commit = os.environ.get("JAXMT_COMMIT")  # set where the tree travels without its history
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                    check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            commit = "unknown"
    return {"commit": commit, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def torch_environment() -> dict[str, Any]:
    import platform

    import torch

    env = {"torch": torch.__version__, "python": platform.python_version(), "cuda": torch.version.cuda, **source_record()}
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name(0)
        env["cuda_device_max_connections"] = os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS", "default (8)")
    return env


def torch_cuda_or_reason() -> str | None:
    """None if PyTorch with a CUDA device is importable, else why the part is skipped."""
    try:
        import torch
    except ImportError:
        return "PyTorch is not installed"
    if not torch.cuda.is_available():
        return "PyTorch sees no CUDA device"
    return None


def torch_fp32_exact() -> None:
    """Float32 matmuls and convolutions in PyTorch without TF32 (as the paper's V100 ran).

    The GEMM checks (tolerance 1e-4) would fail under TF32, so they also prove it is off.
    """
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # newer PyTorch prefers fp32_precision; both still work
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
