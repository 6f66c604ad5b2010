"""How Triton compiles the Pallas conv kernel for Hopper, read from its PTX without a GPU.

For each layer, dtype and filter layout ([C, O] or K-major [O, C]), the kernel's Triton IR
(what ``jax.export`` hands XLA for CUDA) is compiled by the ``triton`` package for
``cuda:90`` and its PTX is read: how many shared-memory copies of each width (``cp.async``
of 4 or 16 bytes) and which tensor-core instructions one unrolled loop body holds. A tile
copied 4 bytes at a time is one that Triton transposes on its way into shared memory, which
Hopper's TF32 ``wgmma`` (K-major operands only) needs for a [C, O] float32 filter tile.
Needs ``pip install triton`` (not a dependency of jaxmt); JAX may bundle a different
Triton, so this tells what that version does, not what a GPU will run.

    PYTHONPATH=. python benchmarks/kernel_ptx.py
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import common  # noqa: F401  (puts the repository on sys.path)
import jax
import jax.numpy as jnp
from common import markdown_table, write_json

from jaxmt import pallas_conv
from jaxmt.jax_compat import lowering_for_gpu

# (name, input [K, N, H, W, C], filter [K, kh, kw, C, O], stride): ResNet layers at 16x8.
LAYERS = [("3x3, 56x56, 64 -> 64", (16, 8, 56, 56, 64), (16, 3, 3, 64, 64), 1),
          ("3x3, 28x28, 128 -> 128", (16, 8, 28, 28, 128), (16, 3, 3, 128, 128), 1),
          ("3x3, 7x7, 512 -> 512", (16, 8, 7, 7, 512), (16, 3, 3, 512, 512), 1),
          ("3x3/2, 56x56, 64 -> 128", (16, 8, 56, 56, 64), (16, 3, 3, 64, 128), 2),
          ("7x7/2 stem, 3 -> 64", (16, 8, 224, 224, 3), (16, 7, 7, 3, 64), 2)]
QUICK_LAYERS = [("3x3, 8x8, 128 -> 128", (2, 1, 8, 8, 128), (2, 3, 3, 128, 128), 1)]


def triton_ir(x_shape, w_shape, stride: int, dtype: Any, k_major: bool) -> str:
    """The kernel's Triton IR, as text, for these shapes (lowered for CUDA; no GPU needed), at
    JAX's default matmul precision, where float32 dots run as TF32."""
    from jax import export
    from jax._src.pallas.triton import pallas_call_registration as registration

    captured = []
    lower = registration.lowering.lower_jaxpr_to_triton_module

    def capture(*args, **kwargs):
        result = lower(*args, **kwargs)
        captured.append(str(result.module))
        return result

    pad = w_shape[1] // 2
    conv = lambda x, w: pallas_conv.conv_implicit_gemm(  # noqa: E731
        x, w, strides=(stride, stride), padding=((pad, pad), (pad, pad)), interpret=False, filter_k_major=k_major)
    registration.lowering.lower_jaxpr_to_triton_module = capture
    try:
        # float32 dots as TF32, whatever the caller set; lowered for an H100, the sm_90 compiled for
        with jax.default_matmul_precision("default"), lowering_for_gpu():
            export.export(jax.jit(conv), platforms=["cuda"],
                          disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(
                jax.ShapeDtypeStruct(x_shape, dtype), jax.ShapeDtypeStruct(w_shape, dtype))
    finally:
        registration.lowering.lower_jaxpr_to_triton_module = lower
    (ir,) = captured
    return ir


def ptx_counts(ir: str) -> dict[str, Any]:
    """Compiles Triton IR for sm_90 (default warps and stages) and counts its copies, MMAs and
    MMA waits.

    ``triton.compile`` of an IR file skips the stage that file is in, so Triton's own TTIR
    passes (``make_ttir``, which XLA also runs first on a Pallas kernel) are run here before
    it: among them the one that folds ``acc + dot(a, b)`` into a dot accumulating into
    ``acc``, without which every loop iteration waits for its MMAs (``wgmma.wait_group 0``)
    instead of keeping one group in flight (``wait_group 1``). That needs Triton's internal
    Python API (``triton._C.libtriton``, the backend's ``make_ttir``), as of Triton 3.9."""
    import triton
    from triton._C.libtriton import ir as triton_ir_module
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    target = GPUTarget("cuda", 90, 32)
    options = {"num_warps": pallas_conv.NUM_WARPS, "num_stages": pallas_conv.NUM_STAGES}
    backend = make_backend(target)
    with tempfile.TemporaryDirectory() as folder:
        raw, passed = Path(folder) / "raw.ttir", Path(folder) / "kernel.ttir"
        raw.write_text(ir)
        context = triton_ir_module.context()
        triton_ir_module.load_dialects(context)
        backend.load_dialects(context)
        module = triton_ir_module.parse_mlir_module(str(raw), context)
        module.context = context
        module = backend.make_ttir(module, {}, backend.parse_options(options), target.arch)
        passed.write_text(str(module))
        compiled = triton.compile(str(passed), target=target, options=options)
    ptx = compiled.asm["ptx"]
    copies = collections.Counter(int(n, 0) for n in re.findall(r"cp\.async\.\w+\.shared\.global \[[^\]]*\], \[[^\]]*\], (0x\w+|\d+)", ptx))
    waits = collections.Counter(int(n) for n in re.findall(r"wgmma\.wait_group\.sync\.aligned (\d+)", ptx))
    return {"copies_by_bytes": {str(k): v for k, v in sorted(copies.items())},
            "mma": dict(collections.Counter(re.findall(r"^\s*(wgmma\.mma_async[\w.]*|mma\.sync[\w.]*)", ptx, re.M))),
            "mma_waits_by_pending": {str(k): v for k, v in sorted(waits.items())}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--quick", action="store_true", help="one small layer")
    parser.add_argument("--out", default="kernel_ptx")
    args = parser.parse_args(argv)
    import triton  # fails here, clearly, where it is not installed

    rows = []
    for name, x_shape, w_shape, stride in QUICK_LAYERS if args.quick else LAYERS:
        for dtype in args.dtypes.split(","):
            for k_major in (False, True):
                counts = ptx_counts(triton_ir(x_shape, w_shape, stride, jnp.dtype(dtype), k_major))
                rows.append({"layer": name, "dtype": dtype, "filter": "K-major [O, C]" if k_major else "[C, O]", **counts})
                print(rows[-1], file=sys.stderr, flush=True)
    write_json(args.out, {"triton": triton.__version__, "target": "cuda:90", "rows": rows})
    print(markdown_table(["layer", "dtype", "filter", "cp.async by bytes", "tensor-core instructions", "wgmma.wait_group (groups left in flight)"],
                         [[r["layer"], r["dtype"], r["filter"], ", ".join(f"{k} B x{v}" for k, v in r["copies_by_bytes"].items()),
                           ", ".join(f"{k} x{v}" for k, v in r["mma"].items()),
                           ", ".join(f"{k}: x{v}" for k, v in r["mma_waits_by_pending"].items())] for r in rows]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
