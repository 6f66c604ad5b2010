"""Lowering: how a function of one tenant becomes a function of K stacked tenants.

``tenant_batched(apply_fn, choice)`` returns ``fn(params_k, x_kb) -> y_kb`` where every leaf
of ``params_k`` and ``x_kb`` has a leading tenant axis K.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

LOWERINGS = ("vmap",)


def tenant_batched(apply_fn: Callable[[Any, Any], Any], choice: str = "vmap") -> Callable[[Any, Any], Any]:
    """The tenant-batched form of ``apply_fn`` under the given lowering choice."""
    if choice not in LOWERINGS:
        raise ValueError(f"unknown lowering {choice!r}; choose one of {LOWERINGS}")
    return jax.vmap(apply_fn)
