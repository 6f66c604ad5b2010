"""The implicit-GEMM conv kernel (jaxmt/pallas_conv.py) per layer, beside the other lowerings.

For the 3x3 conv shapes of ResNet-18 and ResNet-50 (stride 1 and 2) and their 7x7 stride-2
stem at K tenants x B images: the
dense conv of exclusive access (one tenant's filter on all K*B images, the target), XLA's
grouped conv (``vmap``), ``grouped_nchw`` and ``im2col`` (jaxmt.lowering_ops), and the
kernel at several tile configurations. Every form's answer is checked against vmap's before
it is timed (``jaxmt.autotune.compile_and_check``; then every form and the dense conv are
timed in the same rounds of bursts, ``interleaved_seconds``); a form that fails
to compile or disagrees is reported with its error, not timed. Ratios are dense time over
the form's time (1.0 = exclusive-access speed), all from one run.

    PYTHONPATH=. python benchmarks/pallas_conv.py              # GPU: 32x8, 16x8 and 32x1 in bf16, ~4 min
    PYTHONPATH=. python benchmarks/pallas_conv.py --quick      # CPU smoke run in Pallas's interpreter, seconds
"""

from __future__ import annotations

import argparse
import functools
import re
import sys
from typing import Any

import common  # noqa: F401  (puts the repository on sys.path)
import jax
import numpy as np
from common import markdown_table, update_readme_section, write_json

from jaxmt import lowering_ops, pallas_conv
from jaxmt.autotune import check_tolerance, compile_and_check, interleaved_seconds, random_operands
from jaxmt.lowering_ops import ConvParams, ConvSignature, applicable, conv_one

# (input size, input channels, output channels, window, stride) of ResNet's stride-1 3x3
# convs, its downsampling 3x3 convs and its 7x7 stem (padding as the models pad: k // 2).
LAYERS = [(56, 64, 64, 3, 1), (28, 128, 128, 3, 1), (14, 256, 256, 3, 1), (7, 512, 512, 3, 1),
          (224, 3, 64, 7, 2), (56, 64, 128, 3, 2), (28, 128, 256, 3, 2), (14, 256, 512, 3, 2)]
QUICK_LAYERS = [(6, 16, 16, 3, 1), (4, 32, 64, 3, 1), (9, 3, 16, 7, 2)]
OTHER_FORMS = ("vmap", "grouped_nchw", "im2col")
QUICK_KERNEL_CONFIGS = [(16, 16, 16, 4, 3, False), (32, 32, 16, 4, 2, False), (16, 16, 16, 4, 3, True)]


def kernel_configs_for(dtype: str) -> list[tuple[int, ...]]:
    """(block_m, block_n, block_k, num_warps, num_stages, filter_k_major) to time, the
    kernel's default for ``dtype`` first; every configuration takes that dtype's default depth
    (``block_k``), so that a pipeline stage holds as many bytes in float32 as in bfloat16.
    4-byte dtypes time each tile with the filter laid out both ways ([C, O] and K-major
    [O, C]): Hopper's TF32 tensor-core instruction reads only K-major operands."""
    bk = pallas_conv.default_block_k(dtype)
    default = (pallas_conv.BLOCK_M, pallas_conv.BLOCK_N, bk, pallas_conv.NUM_WARPS, pallas_conv.NUM_STAGES)
    if np.dtype(dtype).itemsize == 4:  # the kernel's default layout for them (K-major) first
        return [(*tile, k_major) for tile in (default, (256, 128, bk, 8, 3)) for k_major in (True, False)]
    return [(*tile, False) for tile in (default, (64, 128, bk, 4, 3), (128, 128, bk, 8, 3), (256, 128, bk, 8, 3))]


def parse_kernel_configs(text: str) -> list[tuple[int, ...]]:
    """``--kernel-configs``: "BMxBNxBKwWsS[k]" items, comma-separated, as kernel_configs_for's tuples."""
    configs = []
    for item in text.split(","):
        match = re.fullmatch(r"(\d+)x(\d+)x(\d+)w(\d+)s(\d+)(k?)", item.strip())
        if match is None:
            raise SystemExit(f"--kernel-configs: {item!r} is not BMxBNxBKwWsS[k] (e.g. 128x128x32w4s3k)")
        configs.append((*(int(v) for v in match.groups()[:5]), match.group(6) == "k"))
    return configs


def kernel_name(config: tuple[int, ...]) -> str:
    return "kernel {}x{}x{} w{} s{}".format(*config[:5]) + (" K-major" if config[5] else "")


def signature(tenants: int, images: int, size: int, c_in: int, c_out: int, dtype: str, window: int = 3,
              stride: int = 1) -> ConvSignature:
    pad = (window // 2, window // 2)
    return ConvSignature(tenants, (images, size, size, c_in), (window, window, c_in, c_out), (stride, stride), (pad, pad),
                         (1, 1), (1, 1), lhs_dtype=dtype, rhs_dtype=dtype)


def kernel_forms(sig: ConvSignature, kernel_configs: list[tuple[int, ...]], interpret: bool | None) -> dict[str, Any]:
    """The kernel at each tile configuration, as functions of (x, w)."""
    forms = {}
    for config in kernel_configs:
        bm, bn, bk, warps, stages, k_major = config
        forms[kernel_name(config)] = functools.partial(
            pallas_conv.conv_implicit_gemm, strides=sig.window_strides, padding=sig.padding, interpret=interpret,
            block_m=bm, block_n=bn, block_k=bk, num_warps=warps, num_stages=stages, filter_k_major=k_major)
    return forms


def bench_layer(sig: ConvSignature, kernel_configs: list[tuple[int, ...]], repeats: int, interpret: bool | None) -> dict[str, Any]:
    """Dense time and every form's time and error for one layer, all timed in the same rounds."""
    params = ConvParams.of(sig)
    forms = {f: functools.partial(lowering_ops.lower_conv, f, p=params) for f in OTHER_FORMS if applicable(f, sig)}
    forms.update(kernel_forms(sig, kernel_configs, interpret))
    x, w = random_operands(sig, 0)
    reference = jax.jit(lambda a, b: lowering_ops.lower_conv("vmap", a, b, params))(x, w)
    timings, programs = compile_and_check(forms, (x, w), reference, check_tolerance(sig.lhs_dtype))
    programs["dense"] = jax.jit(lambda a, f: conv_one(a.reshape(-1, *a.shape[2:]), f[0], params)).lower(x, w).compile()
    seconds = interleaved_seconds(programs, (x, w), repeats=repeats)
    for name, row in timings.items():
        if name in seconds:
            row["us"] = seconds[name] * 1e6
    return {"signature": sig.key, "dense_us": seconds["dense"] * 1e6, "forms": timings}


def table(rows: list[dict[str, Any]], kernel_configs: list[tuple[int, ...]]) -> str:
    names = [*OTHER_FORMS, *(kernel_name(c) for c in kernel_configs)]
    body = []
    for r in rows:
        cells = []
        for name in names:
            form = r["forms"].get(name)
            if form is None:
                cells.append("")
            elif form["us"] is None:
                cells.append("failed")
            else:
                cells.append(f"{r['dense_us'] / form['us']:.2f}")
        body.append([f"{r['tenants']}x{r['images']}", r["layer"], f"{r['dense_us']:.1f}", *cells])
    return markdown_table(["K x B", "layer (HxW, C -> O[, window/stride])", "dense us", *names], body)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="32x8,16x8,32x1", help="tenants x images per tenant, comma-separated")
    parser.add_argument("--dtype", default="bfloat16", choices=list(pallas_conv.DTYPES))
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--quick", action="store_true", help="tiny layers in Pallas's interpreter: a CPU smoke run")
    parser.add_argument("--out", default=None, help="results/<out>.json (default pallas_conv, pallas_conv_quick)")
    parser.add_argument("--kernel-configs", default=None,
                        help="kernel tiles to time instead of the dtype's set, e.g. 128x128x32w4s4k,256x128x32w8s3 "
                             "(block_m x block_n x block_k, warps, stages; a trailing k: filters K-major)")
    parser.add_argument("--layers", default=None, help="indices into LAYERS (QUICK_LAYERS with --quick) to run, comma-separated; default all")
    parser.add_argument("--no-readme", action="store_true")
    args = parser.parse_args(argv)
    layers, kernel_configs, interpret = LAYERS, kernel_configs_for(args.dtype), None
    if args.quick:
        layers, kernel_configs, interpret = QUICK_LAYERS, QUICK_KERNEL_CONFIGS, True
        args.configs, args.repeats = "2x1,2x2", 2
    if args.kernel_configs is not None:
        kernel_configs = parse_kernel_configs(args.kernel_configs)
    if args.layers is not None:
        picked = [int(i) for i in args.layers.split(",")]
        if any(not 0 <= i < len(layers) for i in picked):
            raise SystemExit(f"--layers: indices into {len(layers)} layers (0-{len(layers) - 1}), got {args.layers}")
        layers = [layers[i] for i in picked]
    env = common.environment()
    print(f"device {env['device']}, jax {env['jax']}, commit {env['commit']}", file=sys.stderr, flush=True)
    rows = []
    for config in args.configs.split(","):
        tenants, images = (int(v) for v in config.lower().split("x"))
        for size, c_in, c_out, window, stride in layers:
            sig = signature(tenants, images, size, c_in, c_out, args.dtype, window, stride)
            name = f"{size}x{size}, {c_in} -> {c_out}" + ("" if (window, stride) == (3, 1) else f", {window}x{window}/{stride}")
            row = {"tenants": tenants, "images": images, "layer": name,
                   **bench_layer(sig, kernel_configs, args.repeats, interpret)}
            rows.append(row)
            ratios = " ".join(f"{n}={row['dense_us'] / f['us']:.2f}" if f["us"] else f"{n}=failed" for n, f in row["forms"].items())
            print(f"[{config}] {row['layer']}: dense {row['dense_us']:.1f} us | {ratios}", file=sys.stderr, flush=True)
    text = table(rows, kernel_configs)
    print(text)
    out = args.out or ("pallas_conv_quick" if args.quick else "pallas_conv")
    write_json(out, {"environment": env, "args": vars(args), "kernel_configs": kernel_configs, "rows": rows})
    partial = args.layers is not None or args.kernel_configs is not None  # a sweep: kept in its JSON, not the README's table
    if not args.no_readme and not args.quick and not partial:
        update_readme_section(
            "Pallas conv kernel",
            f"`PYTHONPATH=. python benchmarks/pallas_conv.py {' '.join(argv if argv is not None else sys.argv[1:])}` "
            f"({env['device']}, jax {env['jax']}, commit {env['commit']}, {args.dtype}). Throughput of each form relative to "
            "the dense conv on all K*B images with one filter (1.00 = exclusive-access speed; \"failed\": did not compile or "
            f"disagreed with vmap, see results/{out}.json).\n\n" + text,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
