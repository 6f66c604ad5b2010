"""Shared fixtures: tiny models of the zoo and a per-tenant reference apply."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import sys
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np
import pytest

import models

# Equality to the reference is checked at full float32 precision on every backend (GPUs
# otherwise run float32 matmuls in TF32, ~1e-3 relative error, which tests are not about).
jax.config.update("jax_default_matmul_precision", "highest")


ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def load_script(path: Path, name: str):
    """A script of the repository (not a package module) imported from its file as ``name``;
    registered in sys.modules first, since dataclasses look their module up while it runs."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def benchmark_script(filename: str, name: str) -> Iterator:
    """A script of benchmarks/ loaded with that folder on sys.path (its ``import common``),
    both undone afterwards."""
    sys.path.insert(0, str(BENCH))
    try:
        yield load_script(BENCH / filename, name)
    finally:
        sys.path.remove(str(BENCH))
        sys.modules.pop(name, None)


@pytest.fixture
def results_dir(tmp_path, monkeypatch):
    """A fresh folder where the benchmark scripts write their JSON (``common.RESULTS_DIR``),
    for tests whose script fixture has put benchmarks/ on sys.path."""
    import common

    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    return tmp_path


class FakeClock:
    """Seconds that move only when a test (or a gated step) says so: servers take it as their
    ``clock``, so that no assertion depends on how fast this machine runs."""

    def __init__(self, start: float = 1000.0):
        self.now = start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds


class AskedForLock:
    """Stands in for a lock (the store's), calling ``on_ask()`` whenever a thread asks for it,
    before it waits: a test can let one thread go on once another is about to take the lock."""

    def __init__(self, lock, on_ask):
        self._lock, self._on_ask = lock, on_ask

    def acquire(self, *args, **kwargs):
        self._on_ask()
        return self._lock.acquire(*args, **kwargs)

    def release(self):
        self._lock.release()

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc_info):
        self.release()


def tiny_spec(name: str) -> models.ModelSpec:
    return models.make(name, "tiny")


@functools.lru_cache(maxsize=None)
def jitted_apply(apply_fn):
    return jax.jit(apply_fn)


def reference_predict(apply_fn, params_by_tenant: dict, tenant_ids, x: np.ndarray) -> np.ndarray:
    """Row i = apply_fn(params of tenant_ids[i], x[i]); each tenant applied once on its rows."""
    tenant_ids = list(tenant_ids)
    apply = jitted_apply(apply_fn)
    out = None
    for tenant in dict.fromkeys(tenant_ids):
        rows = np.array([i for i, t in enumerate(tenant_ids) if t == tenant])
        y = np.asarray(apply(params_by_tenant[tenant], x[rows]))
        if out is None:
            out = np.empty((len(tenant_ids), *y.shape[1:]), y.dtype)
        out[rows] = y
    return out


def rel_error(got: np.ndarray, want: np.ndarray) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A fresh generator per test, seeded from the test's name so failures replay."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
