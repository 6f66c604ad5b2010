"""Formatting shared by the report builders (environment line, skipped parts, numbers)."""

from __future__ import annotations

import math
from typing import Any

COMMAND = "`PYTHONPATH=. python benchmarks/paper.py`"


def env_line(raws: dict[str, Any]) -> str:
    jax_env = next((r["environment"] for r in raws.values() if r and "environment" in r and "jax" in r["environment"]), {})
    torch_env = next((r["environment"] for r in raws.values() if r and "environment" in r and "torch" in r["environment"]), {})
    parts = [f"{jax_env.get('device', '?')}", f"jax {jax_env.get('jax', '?')}"]
    if torch_env:
        parts.append(f"torch {torch_env.get('torch')} (CUDA {torch_env.get('cuda')})")
    parts += [f"commit {jax_env.get('commit', '?')}", jax_env.get("date", "?")]
    return ", ".join(parts)


def skipped_parts(raws: dict[str, Any]) -> str:
    """One line per part that did not run, was skipped, or stopped before its end."""
    lines = []
    for name, raw in raws.items():
        if not raw:
            lines.append(f"- `{name}` not measured (see paper_run.json)")
        elif "skipped" in raw:
            lines.append(f"- `{name}` not measured: {raw['skipped']}")
        elif raw.get("partial"):
            lines.append(f"- `{name}` stopped before its end (time limit or error; see paper_run.json): its tables are partial")
    return "\n".join(lines)


def fmt(value: float | None, digits: int = 2, suffix: str = "") -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}{suffix}"


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
