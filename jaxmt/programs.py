"""ProgramCache: one compiled executable per step shape, built ahead of time and bounded.

A program is keyed by everything that changes its XLA shape or code: the tenant bucket K,
the row bucket B, the store capacity (the stacked parameters are an argument), the row shape
and dtype of the input, the lowering choice, whether the step reads the whole store in slot
order (no weight gather) and whether its inputs come in pinned host buffers. Programs are
built with ``jax.jit(...).lower(...).compile()`` so a cache miss is explicit and counted;
nothing is traced on a hit. The cache is an LRU bounded by ``max_programs``.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax

from jaxmt.errors import CompileError


@dataclasses.dataclass(frozen=True)
class ProgramKey:
    """What makes one compiled step program different from another."""

    tenant_bucket: int
    row_bucket: int
    capacity: int
    row_shape: tuple[int, ...]
    row_dtype: str
    lowering: str = "vmap"
    whole_store: bool = False  # the step holds every slot once, in order: no weight gather
    host_inputs: bool = False  # slots and rows come in pinned host buffers (jaxmt.host_inputs)


class ProgramCache:
    """LRU cache of compiled programs with hit, miss and compile-time counters.

    Args:
      build: ``build(key) -> compiled executable``; called on a miss, timed, and any
        exception it raises is re-raised as ``CompileError`` naming the key.
      max_programs: how many executables are kept; the least recently used goes first.
      lower: ``lower(key) -> jax.stages.Lowered``, the traced but uncompiled program, with
        ``compile_lowered(lower(key))`` the same program as ``build(key)``; with it,
        ``ensure_many`` compiles several programs at once on worker threads.
      compile_lowered: ``compile_lowered(lowered) -> compiled executable`` (default:
        ``lowered.compile()``), how ``ensure_many``'s threads compile what ``lower`` returns.

    ``compile_seconds`` adds up the time of every build; builds on worker threads overlap,
    so it can exceed the wall-clock time they took.
    """

    def __init__(self, build: Callable[[ProgramKey], Any], max_programs: int = 256,
                 lower: Callable[[ProgramKey], Any] | None = None,
                 compile_lowered: Callable[[Any], Any] | None = None):
        if max_programs < 1:
            raise ValueError(f"max_programs must be >= 1, got {max_programs}")
        self._build = build
        self._lower = lower
        self._compile_lowered = compile_lowered or (lambda lowered: lowered.compile())
        self.max_programs = max_programs
        self._programs: collections.OrderedDict[ProgramKey, Any] = collections.OrderedDict()
        self._lock = threading.RLock()
        self.hits = 0
        self.misses = 0
        self.compiles = 0
        self.compile_failures = 0
        self.evictions = 0
        self.compile_seconds = 0.0

    def __len__(self) -> int:
        return len(self._programs)

    def __contains__(self, key: ProgramKey) -> bool:
        return key in self._programs

    def keys(self) -> list[ProgramKey]:
        """The cached programs' keys, least recently used first."""
        with self._lock:
            return list(self._programs)

    def get(self, key: ProgramKey) -> Any:
        """The executable for ``key``, compiling it on a miss."""
        with self._lock:
            program = self._programs.get(key)
            if program is not None:
                self.hits += 1
                self._programs.move_to_end(key)
                return program
            self.misses += 1
            return self._compile(key)

    def peek(self, key: ProgramKey) -> Any | None:
        """The cached executable for ``key`` or None, counting neither a hit nor a miss."""
        with self._lock:
            return self._programs.get(key)

    def ensure(self, key: ProgramKey) -> bool:
        """Compiles ``key`` unless cached, without counting a hit or miss; True if compiled."""
        with self._lock:
            if key in self._programs:
                return False
            self._compile(key)
            return True

    def ensure_many(self, keys: Iterable[ProgramKey], workers: int = 1,
                    on_built: Callable[[ProgramKey], None] | None = None) -> int:
        """Compiles every key not cached yet; returns how many were compiled.

        With ``workers > 1`` (and a ``lower`` function) the programs are traced one after
        another on this thread (tracing holds the GIL, and the lowering planner may time
        kernels on the device while tracing) and each is handed to one of ``workers``
        threads to compile as soon as it is traced (XLA compiles release the GIL).
        ``on_built(key)`` is called once per key when its build has finished, failed or
        not. On threads, failures are raised together as one ``CompileError`` naming every
        failing key, after the other builds finish; with one worker the first failure is
        raised at once. Either way the programs that compiled are kept.
        """
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        missing = list(dict.fromkeys(k for k in keys if k not in self._programs))
        done_one = on_built or (lambda key: None)
        if workers == 1 or self._lower is None or len(missing) < 2:
            compiled = 0
            for key in missing:
                try:
                    compiled += self.ensure(key)
                finally:
                    done_one(key)
            return compiled

        def compile_one(key: ProgramKey, lowered: Any, lower_s: float) -> tuple[ProgramKey, Any, BaseException | None, float]:
            start = time.perf_counter()
            try:
                return key, self._compile_lowered(lowered), None, lower_s + time.perf_counter() - start
            except Exception as exc:
                return key, None, exc, lower_s + time.perf_counter() - start
            finally:
                done_one(key)

        failures: list[tuple[ProgramKey, BaseException]] = []
        trace_seconds = 0.0
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="jaxmt-compile") as pool:
            futures = []
            for key in missing:
                start = time.perf_counter()
                try:
                    lowered = self._lower(key)
                except Exception as exc:
                    trace_seconds += time.perf_counter() - start
                    failures.append((key, exc))
                    done_one(key)
                    continue
                futures.append(pool.submit(compile_one, key, lowered, time.perf_counter() - start))
            done = [future.result() for future in futures]
        compiled = 0
        with self._lock:
            self.compile_seconds += trace_seconds
            for key, program, exc, seconds in done:
                self.compile_seconds += seconds
                if exc is not None:
                    failures.append((key, exc))
                elif key not in self._programs:  # not built meanwhile by a get() on another thread
                    self._insert(key, program)
                    compiled += 1
            self.compile_failures += len(failures)
        if failures:
            named = "; ".join(f"{key}: {type(exc).__name__}: {exc}" for key, exc in failures)
            raise CompileError(f"building {len(failures)} program(s) failed: {named}") from failures[0][1]
        return compiled

    def clear(self) -> None:
        """Drops every cached program (counters are kept); the next use of a key compiles again."""
        with self._lock:
            self._programs.clear()

    def discard(self, stale: Callable[[ProgramKey], bool]) -> int:
        """Drops the programs whose key ``stale`` holds for (not counted as evictions);
        returns how many."""
        with self._lock:
            keys = [key for key in self._programs if stale(key)]
            for key in keys:
                del self._programs[key]
            return len(keys)

    def stats(self) -> dict[str, float]:
        """Program count and the hit, miss, eviction and compile counters, for ``stats()``."""
        return {
            "programs": len(self._programs),
            "compiles": self.compiles,
            "compile_failures": self.compile_failures,
            "cache_hits": self.hits,
            "cache_misses": self.misses,
            "evictions": self.evictions,
            "compile_seconds": round(self.compile_seconds, 4),
        }

    def _compile(self, key: ProgramKey) -> Any:
        start = time.perf_counter()
        try:
            program = self._build(key)
        except Exception as exc:
            self.compile_failures += 1
            raise CompileError(f"building the program for {key} failed: {type(exc).__name__}: {exc}") from exc
        finally:
            self.compile_seconds += time.perf_counter() - start
        self._insert(key, program)
        return program

    def _insert(self, key: ProgramKey, program: Any) -> None:
        self.compiles += 1
        self._programs[key] = program
        while len(self._programs) > self.max_programs:
            self._programs.popitem(last=False)
            self.evictions += 1


def enable_persistent_compilation_cache(path: str, min_compile_seconds: float = 0.0) -> None:
    """Points JAX's persistent compilation cache at ``path`` so a restart skips XLA compiles."""
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_seconds))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
