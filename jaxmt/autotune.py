"""Choosing a lowering per conv signature: a default rule, measurement, and a disk cache.

``Planner.choose(sig, params)`` answers, in order: the in-memory memo; the on-disk cache
(JSON, keyed by platform, device kind, jax version and the signature key, so that a cache
copied to another GPU or kept across a jax upgrade is not trusted); with autotuning on, the
choice measured for the same layer at a size within ``measure_spread`` of this one, else a
measurement on the device (every applicable candidate is compiled, checked against the
``vmap`` reference on random inputs, warmed up and timed: median of repeats, each repeat a
burst of asynchronous calls closed by ``block_until_ready``); else the choice cached for
the same layer at the nearest K x N (``Planner.nearest``); else ``default_rule``.

Measured choices are only as stable as XLA's own kernel picks: on an H100 the same batched
matmul ran at 0.3x of the dense conv in one process and 1.3x in another, as XLA's GEMM
autotuning chose differently. A choice is re-measured only when its cache entry is deleted.

The rule is what an H100 measured (benchmarks/README.md, "Lowering"; ``default_rule``):
1x1 convs as a batched matmul beat the grouped conv that vmap emits by 1.3-16x per ResNet-50
shape (4.2x over all its 1x1 convs); late, small kxk convs, RGB stems and channel-widening
downsampling convs as im2col; on Hopper GPUs 16-bit kxk convs and large stems as a Pallas
kernel; the rest stay on vmap's grouped form unless measured.
Measurement costs a compile per candidate (about a second on a GPU): it is on by default
on GPUs and TPUs and off on CPUs, whose timings say nothing about the accelerator.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime
import functools
import json
import os
import re
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmt import pallas_conv
from jaxmt.lowering_ops import CONV_LOWERINGS, ConvParams, ConvSignature, applicable, lower_conv
from jaxmt.timing import time_in_rounds

CACHE_ENV = "JAXMT_LOWERING_CACHE"
AUTOTUNE_ENV = "JAXMT_AUTOTUNE"
SPREAD_ENV = "JAXMT_AUTOTUNE_SPREAD"
DEFAULT_MEASURE_SPREAD = 8.0
# 2: the Pallas kernel's float32 filters became K-major (1.3-2.0x faster), so choices timed
# against the [C, O] kernel are stale.
CACHE_FORMAT = 2

# Lowerings the autotuner times, by layer kind: those that won at least one layer shape on
# an H100 (benchmarks/results/lowering_explore.json) or are cheap to try. The per-tenant
# loop of convs never won a GPU layer but is the CPU rule's choice. "implicit_gemm" (a
# Pallas Triton kernel, GPUs only) won 3x3 layers of ResNet-18 on an H100 (benchmarks/README.md,
# "Pallas conv kernel").
_CANDIDATES: dict[str, tuple[str, ...]] = {
    "1x1": ("einsum", "vmap", "loop"),
    "kxk": ("vmap", "batch_group", "grouped_nchw", "im2col", "im2col_rows", "shift_sum", "implicit_gemm", "loop"),
    "depthwise": ("vmap", "depthwise_direct", "grouped_nchw"),
    "grouped": ("vmap", "einsum", "grouped_nchw"),
}


def default_rule(sig: ConvSignature, platform: str | None = None) -> str:
    """The lowering used without measurement (autotune off and nothing cached, or a tie).

    ``platform`` defaults to JAX's default backend. Each choice below was measured on an
    H100 (bf16, 16 tenants x 8 images unless noted; benchmarks/README.md, "Lowering",
    "Step time: kxk convs as im2col" and "Pallas conv kernel") against vmap's grouped conv
    and against what the rule chose before it:

    * 1x1 convs: a batched matmul (0.3-1.6x of the dense conv; vmap's grouped form 0.07-0.8x).
    * kxk convs whose output is at most 7x7, or with at most 4 input channels and a 3x3 or
      smaller window (an RGB stem): im2col, one batched matmul on slices (0.6-1.2x vs
      0.13-0.5x for vmap); other kxk convs: vmap (0.45-0.75x; the best form varies by
      shape and run, which is what autotuning is for).
    * kxk convs of one image per tenant for several tenants (the B = 1 steps a server forms
      for its rarely seen tenants) with outputs of at most 196 positions (14x14): im2col.
      Whole ResNet-18 steps of 16 and 32 tenants x 1 image with every kxk conv as im2col ran
      4-8% faster in float32 and 14-28% in bfloat16 than with every one in the grouped form;
      at 2 or more images per tenant they ran 9-68% slower (benchmarks/README.md, "Step time:
      kxk convs as im2col"). Per layer the grouped form won the larger outputs: at 32 tenants
      x 1 image in float32 the autotuner timed im2col at 0.48x of it on 56x56 and 0.69x on
      28x28 (0.30 and 0.39x of the dense conv against 0.63 and 0.56x at 32x1 in "At the
      kernel's own float32 depth"), while im2col won 14x14 by 1.3x. Inside whole float32
      ResNet-18 steps (32 and 16 tenants x 1 image), the late 14x14 and 7x7 convs as vmap's
      grouped conv, as shift_sum or as im2col_rows made the step 1.4-1.9x slower than with
      im2col ("Kernel profile: the late layers in other forms").
    * Downsampling convs with windows of at most 3x3 that widen the channels (ResNet-18's
      3x3/2, C -> 2C) of several tenants: im2col. It ran them at 1.9-13x the speed of vmap's
      grouped form in every configuration timed: float32 at 16x8 and 32x1 and in the
      autotuner's timings at 32x8 and 32x1 (results/lowering_cache_f32_autotune.json),
      bfloat16 at 32x8, 16x8 and 32x1 ("Pallas conv kernel", where it also beat the kernel on
      8 of 9 layers and lost the ninth by 4%). Downsampling convs that keep the channels
      (ResNet-50's) are split, so the rules above decide them: vmap or the NCHW grouped form
      won on 56x56 and 28x28 inputs in bfloat16 and vmap on the 56x56 one at one image per
      tenant in float32 (im2col 0.89x of it), im2col on the 28x28 and 14x14 inputs there
      (outputs of 14x14 and 7x7).
    * The two rules just above, end to end on an H100 against the rule before them
      (benchmarks/README.md, "Lowering: NVIDIA H100, the default rule by tenant count"; each
      pair in the same rounds): ResNet-18 float32 4-30% faster at 8, 16 and 32 tenants (8 and
      1 images per tenant), ResNet-50 at 1 image 10-12% faster in float32 (16 and 32 tenants)
      and 4% in bfloat16 (32); ResNet-18 bfloat16 32x8 tied. At 4 tenants, timed as streams
      of back-to-back steps: ResNet-18 float32 4x1 18% and 25% faster, bfloat16 4x8 2%,
      ResNet-50 bfloat16 4x1 tied (timed one step at a time, 4-tenant pairs had disagreed
      from one call to the next: such steps last about a millisecond).
    * depthwise convs with a stride: a fused multiply-add (1.1x vs 0.4x); unstrided: vmap.
    * On Hopper GPUs (where it was timed), before the kxk rules above: bfloat16 and float16
      kxk convs of several tenants at stride 1, and RGB stems with windows larger than 3x3 at
      stride 2, as the Pallas implicit-GEMM kernel (``jaxmt.pallas_conv``). ResNet's stride-1
      3x3 layers at 32x8, 16x8 and 32x1 ran at 0.54-1.66x of the dense conv; against vmap's
      form (0.08-1.0x) the kernel was never more than 6% slower and up to 13x faster on all 24
      measured, against im2col where the rule took it before (outputs of 7x7, one image per
      tenant) it was faster on 11 of 12 and 11% slower on one. The 7x7 stem ran at 1.8-2.35x
      against 0.2-0.66x for every other form. Other strided kxk convs keep the rules above
      (im2col for the widening ones). In float32 (TF32 dots) the kernel is the rule's choice
      only for those stems: per layer at 16x8 it ran the 7x7 stem at 0.61-0.92x of the dense
      stem over four tiles against 0.41x for vmap and 0.39x for im2col, and end to end it
      lifted six float32 ResNet configurations by 0.04-0.12x of exclusive access. With K-major
      filters (the kernel's float32 default since) the stem ran at 1.03x and the 3x3 layers at
      0.22-0.59x, below the better of vmap and im2col on all but the 56x56 one (0.59 against
      0.54x), so float32 3x3 convs stay off the kernel. Other GPUs may lack the shared memory
      for its tiles, so there it is the autotuner's to try, on any CUDA GPU it compiles for.

    On CPUs, XLA's grouped convolutions are a slow generic loop, so convs other than 1x1
    run per tenant (depthwise ones as the fused multiply-add): 2-15x faster than vmap's
    form on the tiny models.
    """
    platform = platform or jax.default_backend()
    if sig.kind in ("1x1", "grouped") and applicable("einsum", sig):
        return "einsum"
    if platform == "cpu":
        return "depthwise_direct" if applicable("depthwise_direct", sig) else "loop"
    if sig.kind == "depthwise":
        strided = any(s > 1 for s in sig.window_strides)
        return "depthwise_direct" if strided and applicable("depthwise_direct", sig) else "vmap"
    if platform == "gpu" and sig.kind == "kxk" and sig.tenants > 1 and applicable("implicit_gemm", sig) \
            and _kernel_is_timed_here():
        sixteen_bit = sig.lhs_dtype in ("bfloat16", "float16")
        large_rgb_stem = sig.in_channels <= 4 and int(np.prod(sig.window)) > 9 and all(s == 2 for s in sig.window_strides)
        if (sixteen_bit and all(s == 1 for s in sig.window_strides)) or large_rgb_stem:
            return "implicit_gemm"
    if sig.kind == "kxk" and applicable("im2col", sig):
        outputs = int(np.prod(sig.out_spatial))
        rgb_stem = sig.in_channels <= 4 and int(np.prod(sig.window)) <= 9
        several_tenants = sig.tenants > 1  # one tenant: vmap's form is a plain conv
        widening_downsample = (any(s > 1 for s in sig.window_strides) and 4 < sig.in_channels < sig.out_channels
                               and int(np.prod(sig.window)) <= 9)  # timed on 3x3 windows only
        one_small_image = sig.lhs_shape[0] == 1 and outputs <= 196
        if outputs <= 49 or rgb_stem or (several_tenants and (widening_downsample or one_small_image)):
            return "im2col"
    return "vmap"


# Lowerings that compile only for one platform (Pallas's Triton backend; elsewhere the
# kernel would run in Pallas's interpreter, which is for tests).
_PLATFORM_ONLY = {"implicit_gemm": "gpu"}


def _kernel_is_timed_here(device: Any = None) -> bool:
    """Whether ``device`` (default: the first device) is of the kind the kernel was timed on
    (Hopper: compute capability 9.x), so that the rule may choose it unmeasured; True where
    JAX runs on no GPU (a rule asked about "gpu" from a CPU describes such a GPU)."""
    device = device or jax.devices()[0]
    return device.platform != "gpu" or (
        pallas_conv.compiles_on(device) and str(getattr(device, "compute_capability", "")).startswith("9."))


def _kernel_compiles() -> bool:
    """Whether the Pallas kernel compiles for the default device (True where JAX runs on
    no GPU: a rule asked about "gpu" from a CPU describes a GPU that can)."""
    device = jax.devices()[0]
    return device.platform != "gpu" or pallas_conv.compiles_on(device)


def candidates(sig: ConvSignature, platform: str | None = None) -> tuple[str, ...]:
    """The applicable lowerings the autotuner times for ``sig`` on ``platform`` (default:
    JAX's default backend), the rule's choice first."""
    platform = platform or jax.default_backend()
    rule = default_rule(sig, platform)
    names = (rule, *(n for n in _CANDIDATES[sig.kind] if _PLATFORM_ONLY.get(n, platform) == platform
                     and (n != "implicit_gemm" or _kernel_compiles())))
    return tuple(dict.fromkeys(n for n in names if applicable(n, sig)))


def default_cache_path() -> Path:
    """``$JAXMT_LOWERING_CACHE``, else ``~/.cache/jaxmt/lowering.json``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "jaxmt" / "lowering.json").expanduser()


def device_tag(device: jax.Device | None = None) -> str:
    """``platform:device kind`` (default: the first device): choices measured on one kind of
    device are not reused on another."""
    device = device or jax.devices()[0]
    return f"{device.platform}:{getattr(device, 'device_kind', device.platform)}"


def cache_key(sig: ConvSignature, device: jax.Device | None = None) -> str:
    """What a cached choice is valid for: device kind, jax version, the layer signature."""
    return f"{device_tag(device)}|jax-{jax.__version__}|{sig.key}"


class LoweringCache:
    """Chosen lowerings on disk: ``{"format": CACHE_FORMAT, "entries": {cache_key: {"choice", ...}}}``.

    Reads are lazy and once; every ``put`` merges with what is on disk (another process
    may have written) and replaces the file atomically. A corrupt or foreign file is
    ignored (and overwritten on the next put), never fatal.
    """

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path).expanduser() if path is not None else default_cache_path()
        self._entries: dict[str, dict[str, Any]] | None = None
        self._mtime: float | None = None
        self._lock = threading.Lock()

    def _mtime_now(self) -> float | None:
        try:
            return self.path.stat().st_mtime
        except OSError:
            return None

    def _refresh(self) -> None:
        # Re-read when another writer (a process, or a second cache object) changed the file.
        mtime = self._mtime_now()
        if self._entries is None or mtime != self._mtime:
            self._entries = {**(self._entries or {}), **self._read_disk()}
            self._mtime = mtime

    def _read_disk(self) -> dict[str, dict[str, Any]]:
        try:
            payload = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(payload, dict) or payload.get("format") != CACHE_FORMAT:
            return {}
        entries = payload.get("entries")
        if not isinstance(entries, dict):
            return {}
        return {key: entry for key, entry in entries.items() if isinstance(entry, dict)}  # a foreign value is no entry

    def get(self, key: str) -> dict[str, Any] | None:
        """The cached entry for ``key`` (refreshed from disk if another writer changed it), or None
        when there is none or its choice is no known lowering."""
        with self._lock:
            self._refresh()
            entry = self._entries.get(key)
        if not isinstance(entry, dict) or entry.get("choice") not in CONV_LOWERINGS:
            return None
        return entry

    def entries(self) -> dict[str, dict[str, Any]]:
        """A snapshot of every entry (refreshed from disk if another writer changed it)."""
        with self._lock:
            self._refresh()
            return dict(self._entries)

    def put(self, key: str, entry: dict[str, Any]) -> None:
        """Stores ``entry`` under ``key``: merged with the file's current entries and written
        atomically under a file lock, so concurrent writers keep each other's choices."""
        with self._lock, _locked_file(self.path.with_name(self.path.name + ".lock")):
            merged = self._read_disk()
            if self._entries:
                merged = {**self._entries, **merged}
            merged[key] = entry
            # Serialised before anything changes: an entry JSON cannot hold fails this put alone,
            # instead of staying in memory to fail every later one.
            text = json.dumps({"format": CACHE_FORMAT, "entries": merged}, indent=1, sort_keys=True)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".tmp")
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(text)
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            self._entries = merged
            self._mtime = self._mtime_now()

    def remember(self, key: str, entry: dict[str, Any]) -> None:
        """Keeps ``entry`` in memory only (where ``put`` cannot write the file); a later
        successful ``put`` writes it too."""
        with self._lock:
            self._refresh()
            self._entries[key] = entry

    def __len__(self) -> int:
        with self._lock:
            self._refresh()
            return len(self._entries)


@contextlib.contextmanager
def _locked_file(lock_path: Path) -> Any:
    """Holds an exclusive lock on ``lock_path`` (created if needed) for the body: processes
    that share a choices file then merge their writes in turn instead of each replacing the
    file with its own read of it. Where ``fcntl`` is missing (Windows) the body runs unlocked."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


_PERIOD = 1_000_003  # prime: a tiled pattern never lines up with a tenant or row boundary


def _normal(rng: np.random.Generator, shape: tuple[int, ...], dtype: str, scale: float = 1.0) -> jax.Array:
    """Standard normal values drawn on the host (jax.random compiles for seconds per shape on
    a CPU); large arrays tile a prime-length block, so tenants and rows still differ."""
    size = int(np.prod(shape))
    if size <= 4 * _PERIOD:
        values = jnp.asarray(rng.standard_normal(shape, np.float32) * np.float32(scale))
    else:
        values = jnp.resize(jnp.asarray(rng.standard_normal(_PERIOD, np.float32) * np.float32(scale)), shape)
    return values.astype(dtype)


def random_operands(sig: ConvSignature, seed: int = 0) -> tuple[jax.Array, jax.Array]:
    """Random x [K, *lhs_shape] and w [K, *rhs_shape] (scaled by 1/sqrt(fan-in)) for ``sig``."""
    rng = np.random.default_rng(seed)
    x = _normal(rng, (sig.tenants, *sig.lhs_shape), sig.lhs_dtype)
    fan_in = int(np.prod(sig.rhs_shape[:-1]))
    w = _normal(rng, (sig.tenants, *sig.rhs_shape), sig.rhs_dtype, 1.0 / np.sqrt(fan_in))
    return x, w


def check_tolerance(dtype: str) -> float:
    """The relative L2 error a lowering may differ from the vmap form by, in ``dtype``."""
    # Relative L2 error vs the vmap form: bf16/fp16 products round at 2^-8; float32 convs
    # may run in tf32 on GPUs (about 1e-3); doubles are exact to far below.
    return {"bfloat16": 3e-2, "float16": 1e-2}.get(dtype, 5e-3)


def burst_seconds(fn: Any, args: tuple, *, warmup: int = 2, repeats: int = 7, min_burst_s: float = 2e-3) -> float:
    """Median seconds of one call of the compiled ``fn(*args)`` (``interleaved_seconds`` of one)."""
    return interleaved_seconds({"fn": fn}, args, warmup=warmup, repeats=repeats, min_burst_s=min_burst_s)["fn"]


def interleaved_seconds(fns: dict[str, Any], args: tuple, *, warmup: int = 2, repeats: int = 7,
                        min_burst_s: float = 2e-3) -> dict[str, float]:
    """Median seconds of one call of each compiled ``fns[name](*args)``, timed in rounds of
    bursts of at least ``min_burst_s`` (``jaxmt.timing.time_in_rounds``)."""
    timed = time_in_rounds({name: functools.partial(fn, *args) for name, fn in fns.items()},
                           warmup=warmup, repeats=repeats, min_sample_s=min_burst_s)
    return {name: t["median_s"] for name, t in timed.items()}


def compile_and_check(fns: dict[str, Any], args: tuple, reference: Any, tolerance: float) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Compiles each ``fns[name]`` for ``args`` and checks its answer against ``reference``.

    Returns ``(rows, programs)``: a row per name (``{"us": None, "compile_s", "rel_err"}``,
    plus ``"error"`` where it failed to compile or its relative L2 error exceeds
    ``tolerance``) and the compiled programs of those that passed, ready to time.
    """
    want = np.asarray(reference, np.float64)
    rows: dict[str, dict[str, Any]] = {}
    programs: dict[str, Any] = {}
    for name, fn in fns.items():
        row: dict[str, Any] = {"us": None}
        try:
            start = time.perf_counter()
            program = jax.jit(fn).lower(*args).compile()
            row["compile_s"] = round(time.perf_counter() - start, 3)
            got = np.asarray(program(*args), np.float64)
            err = float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))
            row["rel_err"] = err
            if not np.isfinite(err) or err > tolerance:
                row["error"] = f"differs from the vmap reference: relative error {err:.3g} > {tolerance:g}"
            else:
                programs[name] = program
        except Exception as exc:  # a form XLA (or Triton) rejects on this device is skipped, not fatal
            row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        rows[name] = row
    return rows, programs


def measure(
    sig: ConvSignature,
    params: ConvParams | None = None,
    names: tuple[str, ...] | None = None,
    *,
    seed: int = 0,
    repeats: int = 7,
    baselines: dict[str, Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """Compiles, checks and times each lowering of ``sig`` on the default device.

    ``baselines`` (name -> function of the same operands, e.g. the dense conv of exclusive
    access) are compiled, not checked, and timed in the same rounds as the lowerings, so
    that ratios to them come from one stretch of the device's time; their rows come back
    beside the lowerings' (callers drop them before ``pick``).

    Returns:
      ``{name: {"us": median microseconds or None, "compile_s": ..., "rel_err": ...,
      "error": message if it failed to compile or disagreed with the reference}}``.
    """
    params = params or ConvParams.of(sig)
    names = names or candidates(sig)
    clashing = sorted(set(baselines or {}) & set(names))
    if clashing:
        raise ValueError(f"baselines {clashing} have the names of lowerings; name them otherwise")
    x, w = random_operands(sig, seed)
    reference = jax.jit(lambda a, b: lower_conv("vmap", a, b, params))(x, w)
    fns = {name: (lambda a, b, _n=name: lower_conv(_n, a, b, params)) for name in names}
    results, programs = compile_and_check(fns, (x, w), reference, check_tolerance(sig.lhs_dtype))
    for name, fn in (baselines or {}).items():
        start = time.perf_counter()
        programs[name] = jax.jit(fn).lower(x, w).compile()
        results[name] = {"us": None, "compile_s": round(time.perf_counter() - start, 3)}
    try:
        timed = interleaved_seconds(programs, (x, w), repeats=repeats)
    except Exception:  # one form failing mid-burst (out of memory, say): time each alone, fail only it
        timed = {}
        for name, program in programs.items():
            results[name]["timed_alone"] = True  # not in shared rounds: ratios span different stretches of time
            try:
                timed[name] = burst_seconds(program, (x, w), repeats=repeats)
            except Exception as exc:
                results[name]["error"] = f"{type(exc).__name__} while timing: {str(exc)[:300]}"
    for name, seconds in timed.items():
        results[name]["us"] = seconds * 1e6
    return results


def _measure_outside_the_trace(sig: ConvSignature, params: ConvParams | None) -> dict[str, dict[str, Any]]:
    """``measure`` on a thread of its own, for ``Planner.choose``, which runs while a program
    is traced.

    JAX keeps its trace state per thread, so a fresh thread computes eagerly.
    ``jax.ensure_compile_time_eval`` does not do here: it also evaluates the Pallas kernel's
    ``program_id`` on the spot, which has no evaluation rule, so the kernel failed to compile
    and was never timed (and never chosen). The settings a caller entered with a context
    manager are thread-local too; the two that change what is measured, the default matmul
    precision (the kernel's dots) and the default device, are carried over.
    """
    precision, device = jax.config.jax_default_matmul_precision, jax.config.jax_default_device

    def run() -> dict[str, dict[str, Any]]:
        with contextlib.ExitStack() as stack:
            if precision is not None:
                stack.enter_context(jax.default_matmul_precision(precision))
            if device is not None:
                stack.enter_context(jax.default_device(device))
            return measure(sig, params)

    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jaxmt-autotune") as pool:
        return pool.submit(run).result()


def _images_of(key: str) -> int | None:
    """N (images per tenant) of the signature a cache key names (``... x=NxHxWxC ...``)."""
    found = re.search(r" x=(\d+)x", key)
    return int(found.group(1)) if found else None


def cache_entry(sig: ConvSignature, choice: str, timings: dict[str, dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """What the cache keeps of one measurement (the family fields serve ``Planner.nearest``)."""
    return {
        "choice": choice,
        "us": {n: (None if r.get("us") is None else round(r["us"], 2)) for n, r in timings.items()},
        "errors": {n: r["error"] for n, r in timings.items() if "error" in r},
        "family": sig.family(),
        "family_any_dtype": sig.family(with_dtype=False),
        "work": sig.tenants * sig.lhs_shape[0],
        "measured": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        **extra,
    }


def pick(sig: ConvSignature, timings: dict[str, dict[str, Any]], *, margin: float = 0.03) -> str:
    """The fastest measured lowering; the rule's choice unless another beats it by ``margin``."""
    rule = default_rule(sig)
    timed = {n: r["us"] for n, r in timings.items() if r.get("us") is not None}
    if not timed:
        return rule
    best = min(timed, key=timed.get)
    if rule in timed and timed[best] > timed[rule] * (1.0 - margin):
        return rule
    return best


def autotune_default() -> bool:
    """Autotune unless ``JAXMT_AUTOTUNE=0``, or the default backend is a CPU."""
    env = os.environ.get(AUTOTUNE_ENV)
    if env is not None:
        return env.strip().lower() not in ("0", "false", "no", "off", "")
    return jax.default_backend() != "cpu"


class Planner:
    """Chooses a lowering per conv signature: memo, disk cache, measurement, rule.

    A model served over a bucket ladder meets each conv layer at every K x B of the ladder
    (28 sizes for K up to 64 and B up to 8): measuring each would cost minutes of compiles
    per layer at warm-up. So a layer is measured once per ``measure_spread`` factor of work
    (K x N): a size within that factor of one already measured for the same layer and dtype
    on this device takes that choice ("nearest"), which bounds the measurements to a few
    per layer over the whole ladder. Which sizes are the measured ones follows the order in
    which programs are traced (warm up the sizes that matter most first).

    Args:
      autotune: measure on the device when the cache has no entry (None: ``autotune_default()``).
      cache_path: the JSON file (None: ``default_cache_path()``); ``cache=False`` keeps
        choices in memory only.
      measure_spread: sizes within this factor of work of a measured one are not measured
        again (1.0: measure every size; default ``$JAXMT_AUTOTUNE_SPREAD`` or 8). The
        measured sizes are looked up in the cache, so with ``cache=False`` every size is
        measured.
    """

    def __init__(self, autotune: bool | None = None, cache_path: str | os.PathLike | None = None, *, cache: bool = True,
                 measure_spread: float | None = None):
        self.autotune = autotune_default() if autotune is None else bool(autotune)
        source = "measure_spread"
        if measure_spread is None:
            source, raw = f"${SPREAD_ENV}", os.environ.get(SPREAD_ENV) or DEFAULT_MEASURE_SPREAD
            try:
                measure_spread = float(raw)
            except ValueError:
                raise ValueError(f"{source} must be a number >= 1, got {raw!r}") from None
        if not measure_spread >= 1.0:
            raise ValueError(f"{source} must be >= 1 (1: measure every size), got {measure_spread}")
        self.measure_spread = float(measure_spread)
        self.cache = LoweringCache(cache_path) if cache else None
        self._memo: dict[str, tuple[str, str]] = {}
        self._lock = threading.Lock()
        self.measurements = 0

    def choose(self, sig: ConvSignature, params: ConvParams | None = None) -> tuple[str, str]:
        """``(lowering, source)``: source is "memo", "cache", "autotune", "nearest" or "rule"."""
        key = cache_key(sig)
        with self._lock:
            if key in self._memo:
                return self._memo[key][0], "memo"
        if self.cache is not None:
            entry = self.cache.get(key)
            if entry is not None and applicable(entry["choice"], sig):
                self._memo[key] = (entry["choice"], "cache")
                return entry["choice"], "cache"
        if not self.autotune:
            near = self.nearest(sig)
            choice, source = (near, "nearest") if near is not None else (default_rule(sig), "rule")
            self._memo[key] = (choice, source)
            return choice, source
        near = self.nearest(sig, within=self.measure_spread, any_dtype=False) if self.measure_spread > 1.0 else None
        if near is not None:
            self._memo[key] = (near, "nearest")
            return near, "nearest"
        timings = _measure_outside_the_trace(sig, params)
        self.measurements += 1
        choice = pick(sig, timings)
        self._memo[key] = (choice, "autotune")
        if self.cache is not None:
            self._persist(key, cache_entry(sig, choice, timings))
        return choice, "autotune"

    def _persist(self, key: str, entry: dict[str, Any]) -> None:
        """Writes a measured choice to the cache file. A file that cannot be written (a
        read-only home in a container) must not fail the program being traced, which would
        fail every model served with "auto": the entry is kept in memory (so that other sizes
        of the layer still borrow it), with a warning naming the file."""
        try:
            self.cache.put(key, entry)
        except OSError as exc:
            self.cache.remember(key, entry)
            warnings.warn(f"jaxmt: could not write the lowering choice for {key!r} to {self.cache.path} ({exc}); "
                          f"it is kept for this process only", RuntimeWarning, stacklevel=3)

    def nearest(self, sig: ConvSignature, *, within: float | None = None, any_dtype: bool = True) -> str | None:
        """The choice measured on this device and jax for the same layer at the closest K x N
        (same dtype first, then, if ``any_dtype``, any dtype); None if the cache holds no
        such layer, or none whose work is within a factor ``within`` of this one's."""
        work = sig.tenants * sig.lhs_shape[0]
        if self.cache is None or work <= 0:
            return None
        prefix = cache_key(sig).split("|conv ", 1)[0] + "|"
        entries = self.cache.entries()
        fields = [("family", sig.family())] + ([("family_any_dtype", sig.family(with_dtype=False))] if any_dtype else [])
        # A kxk conv's best form flips between one image per tenant and several (im2col
        # against the grouped form, benchmarks/README.md "Step time: kxk convs as im2col"):
        # no choice is lent across that line.
        one_image = sig.kind == "kxk" and sig.lhs_shape[0] == 1
        for field, family in fields:
            matches = [
                e for k, e in entries.items()
                if k.startswith(prefix) and e.get(field) == family and e.get("choice") in CONV_LOWERINGS
                and applicable(e["choice"], sig) and isinstance(e.get("work"), int) and e["work"] > 0
                and (sig.kind != "kxk" or (_images_of(k) == 1) == one_image)
            ]
            if matches:
                best = min(matches, key=lambda e: abs(np.log(e["work"] / work)))
                if within is None or abs(np.log(best["work"] / work)) <= np.log(within) + 1e-9:
                    return best["choice"]
        return None
