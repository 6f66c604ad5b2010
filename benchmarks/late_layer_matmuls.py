"""ResNet's late im2col layers at one image per tenant, in pieces: the batched matmul in
other shapes (split along its contracting axis), and the patch build alone.

At one image per tenant the rule lowers the 14x14 and 7x7 3x3 convs as im2col: the patches
of each tenant, then one batched matmul over the tenants' filters. This times each piece on
its own, per layer shape of ResNet-18 (K tenants, float32, TF32 dots at the default
precision), with every split form checked against the one-dot form first:

- ``dot``: the batched matmul as im2col issues it, [K, M, D] x [K, D, O];
- ``splitk<s>``: the contracting axis cut into s parts moved into the batch, summed after;
- ``splitk_nt<s>``: the same without moving the patches (two batch axes in place);
- patch builds of a 3x3 stride-1 conv: nine strided slices concatenated (im2col's), stacked
  then reshaped, and concatenated after a batch norm and ReLU's elementwise work.

    PYTHONPATH=. python benchmarks/late_layer_matmuls.py [--out late_layer_pieces]
"""

from __future__ import annotations

import argparse
import statistics
import time

import common
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# (name, M = output positions, D = 9 x input channels, O = output channels)
LAYERS = [("14x14 256->256", 196, 2304, 256), ("7x7 512->512", 49, 4608, 512),
          ("14->7 256->512", 49, 2304, 512), ("28->14 128->256", 196, 1152, 256),
          ("56->28 64->128", 784, 576, 128)]


def time_us(f, *args, calls: int = 30, rounds: int = 7) -> float:
    """Median over rounds of the mean time of ``calls`` back-to-back calls (after two warm-ups)."""
    f(*args).block_until_ready()
    f(*args).block_until_ready()
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            r = f(*args)
        r.block_until_ready()
        samples.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(samples)


def dot(p, w):
    return lax.dot_general(p, w, (((2,), (1,)), ((0,), (0,))), preferred_element_type=jnp.float32)


def splitk(s):
    def f(p, w):
        k, m, d = p.shape
        o = w.shape[-1]
        ps = p.reshape(k, m, s, d // s).transpose(0, 2, 1, 3).reshape(k * s, m, d // s)
        return dot(ps, w.reshape(k * s, d // s, o)).reshape(k, s, m, o).sum(1)
    return f


def splitk_nt(s):
    def f(p, w):
        k, m, d = p.shape
        o = w.shape[-1]
        y = lax.dot_general(p.reshape(k, m, s, d // s), w.reshape(k, s, d // s, o),
                            (((3,), (2,)), ((0, 2), (0, 1))), preferred_element_type=jnp.float32)
        return y.sum(1)
    return f


def _slices(x, s=1):
    k, n, h, w_, c = x.shape
    xp = jnp.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1), (0, 0)))
    ho, wo = (h - 1) // s + 1, (w_ - 1) // s + 1
    return [lax.slice(xp, (0, 0, i, j, 0), (k, n, i + (ho - 1) * s + 1, j + (wo - 1) * s + 1, c), (1, 1, s, s, 1))
            for i in range(3) for j in range(3)]


def concat(x):
    return jnp.concatenate(_slices(x), -1)


def stack(x):
    s = jnp.stack(_slices(x), -2)
    return s.reshape(*s.shape[:-2], -1)


def concat_after_bn_relu(x):
    return jnp.concatenate(_slices(jnp.maximum(x * 1.1 + 0.2, 0)), -1)


def reference_patches(x: np.ndarray) -> np.ndarray:
    """3x3 stride-1 patches of ``x`` [K, N, H, W, C], built by NumPy: [..., (i * 3 + j) * C + c]."""
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1), (0, 0)))
    h, w = x.shape[2:4]
    return np.concatenate([xp[:, :, i:i + h, j:j + w] for i in range(3) for j in range(3)], -1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tenants", default="32,16")
    parser.add_argument("--out", default="late_layer_pieces")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    out = {"environment": common.environment(), "matmul": [], "patches": []}
    forms = [("dot", dot), ("splitk2", splitk(2)), ("splitk4", splitk(4)),
             ("splitk_nt2", splitk_nt(2)), ("splitk_nt4", splitk_nt(4)), ("splitk_nt8", splitk_nt(8))]
    tenants = [int(k) for k in args.tenants.split(",")]
    for k in tenants:
        for name, m, d, o in LAYERS:
            p = jnp.asarray(rng.standard_normal((k, m, d), np.float32))
            w = jnp.asarray(rng.standard_normal((k, d, o), np.float32) / np.sqrt(d))
            ref = jax.jit(dot)(p, w)
            row = {"K": k, "layer": name, "filter_MB": k * d * o * 4 / 1e6}
            for form, f in forms:
                jf = jax.jit(f)
                row[form + "_err"] = err = float(jnp.linalg.norm(jf(p, w) - ref) / jnp.linalg.norm(ref))
                assert err < 1e-3, f"{form} differs from the one-dot form by {err} on {name}"
                row[form] = round(time_us(jf, p, w), 1)
            print(row, flush=True)
            out["matmul"].append(row)
    for h, c in [(14, 256), (7, 512), (28, 128)]:
        x = jnp.asarray(rng.standard_normal((tenants[0], 1, h, h, c), np.float32))
        row = {"K": tenants[0], "hw": h, "c": c, "MB": tenants[0] * h * h * 9 * c * 4 / 1e6}
        # Each build checked first against the same patches made on the host (NumPy).
        for form, f, source in [("concat", concat, x), ("stack", stack, x),
                                ("concat_after_bn_relu", concat_after_bn_relu, jnp.maximum(x * 1.1 + 0.2, 0))]:
            jf = jax.jit(f)
            want = reference_patches(np.asarray(source))
            row[form + "_err"] = err = float(np.linalg.norm(np.asarray(jf(x)) - want) / np.linalg.norm(want))
            assert err < 1e-6, f"{form} differs from the reference patches by {err} at {h}x{h}x{c}"
            row[form] = round(time_us(jf, x), 1)
        print(row, flush=True)
        out["patches"].append(row)
    print(f"wrote {common.write_json(args.out, out)}")


if __name__ == "__main__":
    main()
