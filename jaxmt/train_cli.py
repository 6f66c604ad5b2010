"""``python -m jaxmt train``: a hyperparameter search of many small models, trained as one program.

Trains N MLPs or small CNNs on scikit-learn's 8x8 digits (shipped inside the scikit-learn
wheel, nothing is downloaded), each with its own learning rate, weight decay and seed (init
and data order), as one vmapped Optax program. Prints a table of the tenants, writes the
curves and results as JSON (--json) and plots them (--plot). With --compare it also times
the one program against N separate jitted training loops on the same batches and reports how
far apart their weights ended (it reports, it does not fail on a difference).

Exit codes: 0 done, 1 every tenant diverged or a needed package is missing, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxmt.lowering import lowering_key
from jaxmt.train import MultiTenantTrainer
from jaxmt.train_step import shuffled_batch_indices

OPTIMIZERS = {"adamw": optax.adamw, "sgd": optax.sgd}
ARCHS = ("mlp", "cnn")
DEFAULT_WD_RANGE = (1e-6, 1e-1)
DEFAULT_COMPARE_STEPS = 50


class DigitsCNN(nn.Module):
    """Two 3x3 convs (the second strided), global mean pool, dense head: [b, 8, 8, 1] -> [b, 10]."""

    features: tuple[int, int] = (16, 32)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Logits [b, 10] of images [b, 8, 8, 1]."""
        x = nn.relu(nn.Conv(self.features[0], (3, 3))(x))
        x = nn.relu(nn.Conv(self.features[1], (3, 3), strides=(2, 2))(x))
        return nn.Dense(10)(x.mean(axis=(1, 2)))


def digits_arch(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    """(module, row shape) of an architecture for 8x8 digits: "mlp" (64 -> 64 -> 10) or "cnn"."""
    if name == "mlp":
        from models.mlp import MLP

        return MLP(hidden_features=(64,), num_classes=10), (64,)
    if name == "cnn":
        return DigitsCNN(), (8, 8, 1)
    raise ValueError(f"unknown architecture {name!r}; expected one of {ARCHS}")


def load_digits_split(row_shape: tuple[int, ...], val_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """scikit-learn's digits scaled to [0, 1], split into train and validation rows by ``seed``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32).reshape(-1, *row_shape)
    y = digits.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(y))
    n_val = int(round(val_fraction * len(y)))
    val, train = order[:n_val], order[n_val:]
    return {"x_train": x[train], "y_train": y[train], "x_val": x[val], "y_val": y[val]}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds ``python -m jaxmt train``'s arguments (the CLI's contract, see ``jaxmt.cli``)."""
    parser.epilog = "Exit codes: 0 done, 1 every tenant diverged or scikit-learn (or, for --plot, matplotlib) is missing, 2 bad arguments."
    parser.add_argument("--arch", default="mlp", choices=ARCHS, help="architecture (default mlp)")
    parser.add_argument("--tenants", type=int, default=32, help="models trained together (default 32)")
    parser.add_argument("--epochs", type=int, default=20, help="passes over the training rows (default 20)")
    parser.add_argument("--batch-size", type=int, default=64, help="rows per step of each tenant, at most the training rows (default 64)")
    parser.add_argument("--optimizer", default="adamw", choices=sorted(OPTIMIZERS), help="Optax optimizer (default adamw)")
    parser.add_argument("--lr-range", type=float, nargs=2, default=(1e-4, 3e-1), metavar=("LOW", "HIGH"),
                        help="learning rates are drawn log-uniformly from [LOW, HIGH] (default 1e-4 3e-1)")
    parser.add_argument("--wd-range", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                        help="weight decays are drawn log-uniformly from [LOW, HIGH] (adamw only; default 1e-6 1e-1)")
    parser.add_argument("--lowering", default="auto",
                        help="how tenants' layers are batched (jaxmt.lowering): vmap, auto, rule or a conv lowering; "
                             "vmap makes per-tenant convs grouped convs, whose gradients are slow (default auto)")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="rows held out for validation (default 0.2)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the search, the split, and tenant t's init and data order (seed + t)")
    parser.add_argument("--compare", action="store_true", help="also time one program against N separate jitted training loops")
    parser.add_argument("--compare-steps", type=int, default=None, help="timed steps of each tenant for --compare (default 50)")
    parser.add_argument("--json", metavar="PATH", help="write results, curves and the settings the run used as JSON ('-' for stdout; the table then goes to stderr)")
    parser.add_argument("--plot", metavar="PNG", help="plot loss and accuracy curves to this PNG file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _check_args(args: argparse.Namespace) -> str | None:
    # An option that this run would ignore is refused rather than silently dropped.
    if args.wd_range is not None and args.optimizer != "adamw":
        return f"--wd-range applies to adamw only; --optimizer {args.optimizer} has no weight decay"
    if args.compare_steps is not None and not args.compare:
        return "--compare-steps needs --compare"
    if args.tenants < 1:
        return f"--tenants must be >= 1, got {args.tenants}"
    if not 0 <= args.seed <= 2**31 - args.tenants:  # tenant t's seed is seed + t, a non-negative int32
        return f"--seed must be in [0, 2**31 - tenants] = [0, {2**31 - args.tenants}], got {args.seed}"
    if args.epochs < 1 or args.batch_size < 1 or (args.compare_steps is not None and args.compare_steps < 1):
        return "--epochs, --batch-size and --compare-steps must be >= 1"
    for name, (low, high) in (("--lr-range", args.lr_range), ("--wd-range", args.wd_range or DEFAULT_WD_RANGE)):
        if not 0 < low <= high < math.inf:
            return f"{name} needs 0 < LOW <= HIGH < inf, got {low} {high}"
    if not 0 < args.val_fraction < 1:
        return f"--val-fraction must be in (0, 1), got {args.val_fraction}"
    try:
        lowering_key(args.lowering)
    except ValueError as exc:
        return f"--lowering: {exc}"
    for option, path in (("--json", args.json), ("--plot", args.plot)):  # refused now, not after the training
        if path == "":  # e.g. "$OUT" of an unset variable: nothing would be written, silently
            return f"{option} is empty"
        if path and path != "-" and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            return f"{option} {path}: its folder does not exist"
        if path and path != "-" and os.path.isdir(path):
            return f"{option} {path} is a folder, not a file"
    return None


def _with_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """The checked arguments with the defaults of options left out (None until checked, so
    that an option given where it does not apply can be told from its default), less the
    options this run does not use: the JSON config records only settings that applied."""
    used = {
        "wd_range": (args.optimizer == "adamw", DEFAULT_WD_RANGE),  # SGD has no weight decay
        "compare_steps": (args.compare, DEFAULT_COMPARE_STEPS),
    }
    settings = {k: v for k, v in vars(args).items() if k not in used}
    for name, (applies, default) in used.items():
        if applies:
            settings[name] = default if getattr(args, name) is None else getattr(args, name)
    return argparse.Namespace(**settings)


def _search_space(args: argparse.Namespace) -> tuple[list[str], dict[str, Any], list[int]]:
    rng = np.random.default_rng(args.seed)

    def log_uniform(low: float, high: float) -> list[float]:
        return [float(v) for v in np.exp(rng.uniform(math.log(low), math.log(high), size=args.tenants))]

    names = [f"trial-{t:03d}" for t in range(args.tenants)]
    hyper: dict[str, Any] = {"learning_rate": log_uniform(*args.lr_range)}
    if args.optimizer == "adamw":
        hyper["weight_decay"] = log_uniform(*args.wd_range)
    return names, hyper, [args.seed + t for t in range(args.tenants)]


def run(args: argparse.Namespace) -> int:
    """Runs ``python -m jaxmt train``; returns the exit code (see the parser's epilog)."""
    problem = _check_args(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    args = _with_defaults(args)
    try:
        import sklearn  # noqa: F401
    except ImportError:
        print("error: the digits data set comes with scikit-learn: pip install 'jaxmt[examples]'", file=sys.stderr)
        return 1
    if args.plot:
        try:
            import matplotlib  # noqa: F401 (missing: found now, not after the training)
        except ImportError:
            print("error: --plot needs matplotlib: pip install 'jaxmt[examples]'", file=sys.stderr)
            return 1
    from tqdm import tqdm

    module, row_shape = digits_arch(args.arch)
    data = load_digits_split(row_shape, args.val_fraction, args.seed)
    if not (len(data["y_train"]) and len(data["y_val"])):
        print(f"error: --val-fraction {args.val_fraction} leaves {len(data['y_train'])} training and {len(data['y_val'])} "
              "validation rows; each needs at least one", file=sys.stderr)
        return 2
    names, hyper, seeds = _search_space(args)

    def init_fn(seed: jax.Array) -> Any:
        return module.init(jax.random.key(seed), jnp.zeros((1, *row_shape), jnp.float32))

    def loss_fn(params: Any, batch: dict[str, jax.Array]) -> jax.Array:
        logits = module.apply(params, batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

    def metrics_fn(params: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        logits = module.apply(params, batch["x"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
        return {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["y"])}

    started = time.perf_counter()
    trainer = MultiTenantTrainer.from_init(
        loss_fn, init_fn, dict(zip(names, seeds)), optimizer=OPTIMIZERS[args.optimizer], hyperparams=hyper,
        apply_fn=module.apply, lowering=args.lowering,
    )
    n_train = len(data["y_train"])
    batch_size = args.batch_size = min(args.batch_size, n_train)  # recorded as run
    idx = shuffled_batch_indices(n_train, batch_size, seeds, epochs=args.epochs)
    steps_per_epoch = n_train // batch_size
    val = {"x": data["x_val"], "y": data["y_val"]}
    val_curves: dict[str, list[list[float]]] = {"loss": [], "accuracy": []}
    with tqdm(total=len(idx), desc=f"training {args.tenants} {args.arch}s", unit="step", disable=args.no_progress, file=sys.stderr) as bar:
        for s in range(len(idx)):
            trainer.step_stacked({"x": data["x_train"][idx[s]], "y": data["y_train"][idx[s]]})
            bar.update()
            if (s + 1) % steps_per_epoch == 0:
                metrics = trainer.evaluate(metrics_fn, val)
                for key in val_curves:
                    val_curves[key].append([float(metrics[t][key]) for t in names])
                bar.set_postfix(best_val_acc=f"{max(val_curves['accuracy'][-1]):.3f}", diverged=len(trainer.diverged))
    train_seconds = time.perf_counter() - started

    history = trainer.history
    rows = []
    for t, name in enumerate(names):
        rows.append({
            "tenant": name,
            "learning_rate": hyper["learning_rate"][t],
            "weight_decay": hyper.get("weight_decay", [0.0] * args.tenants)[t],
            "seed": seeds[t],
            "final_train_loss": _last_finite(history[name][-steps_per_epoch:]),
            "val_loss": val_curves["loss"][-1][t],
            "val_accuracy": val_curves["accuracy"][-1][t],
            "diverged_at_step": trainer.diverged.get(name),
        })
    result: dict[str, Any] = {
        "environment": _environment(),
        "config": {k: v for k, v in vars(args).items() if not k.startswith("_")},
        "train_rows": n_train,
        "val_rows": len(data["y_val"]),
        "steps": len(idx),
        "train_seconds": train_seconds,
        "tenants": rows,
        "curves": {
            "train_loss": {name: [float(v) for v in history[name]] for name in names},
            "val_loss": {name: [c[t] for c in val_curves["loss"]] for t, name in enumerate(names)},
            "val_accuracy": {name: [c[t] for c in val_curves["accuracy"]] for t, name in enumerate(names)},
        },
    }
    if args.compare:
        result["compare"] = compare_separate_loops(
            loss_fn, init_fn, OPTIMIZERS[args.optimizer], hyper, seeds, data, batch_size, args.compare_steps,
            lowering=args.lowering, progress=not args.no_progress,
        )

    table_stream = sys.stderr if args.json == "-" else sys.stdout
    print(_table(rows), file=table_stream)
    if "compare" in result:
        c = result["compare"]
        print(
            f"\n{args.tenants} tenants, {c['steps']} steps each: one program {c['one_program_steps_per_s']:.1f} steps/s, "
            f"{args.tenants} separate jitted loops {c['separate_loops_steps_per_s']:.1f} steps/s "
            f"(speed-up x{c['speedup']:.2f}); same weights to rel {c['median_rel_error']:.1e} (median), "
            f"{c['max_rel_error']:.1e} (worst tenant), losses to {c['max_loss_abs_diff']:.1e}",
            file=table_stream,
        )
    if args.plot:
        plot_curves(result, args.plot)
        print(f"plot written to {args.plot}", file=table_stream)
    if args.json == "-":
        print(json.dumps(_strict_json(result), indent=2))
    elif args.json:
        with open(args.json, "w") as f:
            json.dump(_strict_json(result), f, indent=2)
    return 1 if len(trainer.diverged) == args.tenants else 0


def compare_separate_loops(
    loss_fn: Callable[[Any, Any], jax.Array],
    init_fn: Callable[[jax.Array], Any],
    optimizer: Callable[..., optax.GradientTransformation],
    hyper: dict[str, list[float]],
    seeds: list[int],
    data: dict[str, np.ndarray],
    batch_size: int,
    steps: int,
    *,
    lowering: str = "vmap",
    progress: bool = False,
) -> dict[str, Any]:
    """Steps/s of one vmapped program vs one jitted loop per tenant, on the same batches.

    A "step" updates every tenant once. The separate loops share one compiled step (the
    hyperparameters are its arguments), dispatch every tenant's step, then read all losses,
    as the one program reads its losses once per step. Both run one untimed warm-up step,
    and their weights after the timed steps are compared before the figures are returned.

    Args:
      loss_fn, init_fn: one tenant's loss ``loss_fn(params, batch)`` and ``init_fn(seed)``.
      optimizer, hyper: the Optax factory and its keyword arguments, one value per tenant.
      seeds: one per tenant: init and data order.
      data: ``x_train`` and ``y_train`` arrays; batches are drawn by ``shuffled_batch_indices``.
      batch_size, steps: rows per tenant per step, and timed steps.
      lowering: the one program's lowering (``MultiTenantTrainer``'s ``lowering``).

    Returns:
      Seconds and steps/s of both ways, the speed-up, and how far their weights and losses
      differ (relative weight error per tenant: median and worst; largest loss difference).
    """
    from tqdm import tqdm

    names = [f"t{t}" for t in range(len(seeds))]
    n_train = len(data["y_train"])
    idx = shuffled_batch_indices(n_train, batch_size, seeds, epochs=math.ceil((steps + 1) / (n_train // batch_size)))[: steps + 1]
    batches = [{"x": data["x_train"][i], "y": data["y_train"][i]} for i in idx]  # [tenants, batch, ...]

    trainer = MultiTenantTrainer.from_init(
        loss_fn, init_fn, dict(zip(names, seeds)), optimizer=optimizer, hyperparams=hyper, lowering=lowering
    )
    trainer.step_stacked(batches[0])
    start = time.perf_counter()
    for batch in tqdm(batches[1:], desc="one program", unit="step", disable=not progress, file=sys.stderr):
        trainer.step_stacked(batch)
    one_program_s = time.perf_counter() - start

    @jax.jit
    def step(params, state, batch, hp):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, state = optimizer(**hp).update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    hps = [{k: jnp.float32(v[t]) for k, v in hyper.items()} for t in range(len(seeds))]
    params = [jax.jit(init_fn)(seed) for seed in seeds]
    states = [optimizer(**hp).init(p) for hp, p in zip(hps, params)]
    per_tenant = [[jax.tree.map(lambda leaf: leaf[t], b) for t in range(len(seeds))] for b in batches]

    def one_round(batch_by_tenant):
        losses = []
        for t in range(len(seeds)):
            params[t], states[t], loss = step(params[t], states[t], batch_by_tenant[t], hps[t])
            losses.append(loss)
        return [float(v) for v in losses]

    separate_losses = [one_round(per_tenant[0])]
    start = time.perf_counter()
    for batch_by_tenant in tqdm(per_tenant[1:], desc="separate loops", unit="step", disable=not progress, file=sys.stderr):
        separate_losses.append(one_round(batch_by_tenant))
    separate_s = time.perf_counter() - start

    errors = []
    for t, name in enumerate(names):
        got = np.concatenate([np.ravel(v) for v in jax.tree.leaves(trainer.params_of(name))])
        want = np.concatenate([np.ravel(v) for v in jax.tree.leaves(params[t])])
        errors.append(float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)))
    one_program_losses = np.stack([trainer.history[name] for name in names], axis=1)
    return {
        "steps": steps,
        "tenants": len(seeds),
        # Adam divides by the root of the squared gradient, so rounding differences in tiny
        # gradients (vmapped and single matmuls sum in different orders) become visible
        # differences in the weights; SGD agrees to ~1e-7. The losses show the practical gap.
        "max_rel_error": max(errors),
        "median_rel_error": float(np.median(errors)),
        "max_loss_abs_diff": float(np.nanmax(np.abs(one_program_losses - np.array(separate_losses)))),
        "one_program_s": one_program_s,
        "separate_loops_s": separate_s,
        "one_program_steps_per_s": steps / one_program_s,
        "separate_loops_steps_per_s": steps / separate_s,
        "speedup": separate_s / one_program_s,
    }


def plot_curves(result: dict[str, Any], path: str) -> None:
    """Train loss per step and validation accuracy per epoch, one line per tenant coloured by learning rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["tenants"]
    log_lrs = np.log10([r["learning_rate"] for r in rows])
    norm = matplotlib.colors.Normalize(log_lrs.min(), log_lrs.max() + 1e-12)
    cmap = matplotlib.colormaps["viridis"]
    fig, (ax_loss, ax_acc, ax_lr) = plt.subplots(1, 3, figsize=(15, 4.2))
    for row, log_lr in zip(rows, log_lrs):
        name, color = row["tenant"], cmap(norm(log_lr))
        ax_loss.plot(np.asarray(result["curves"]["train_loss"][name], float), color=color, lw=0.8, alpha=0.8)
        acc = result["curves"]["val_accuracy"][name]
        ax_acc.plot(np.arange(1, len(acc) + 1), acc, color=color, lw=0.8, alpha=0.8)
    ax_loss.set(yscale="log", xlabel="step", ylabel="train loss (per batch)", title="training loss")
    ax_acc.set(xlabel="epoch", ylabel="validation accuracy", title="validation accuracy", ylim=(0, 1))
    log_wd = np.log10(np.maximum([r["weight_decay"] for r in rows], 1e-12))
    sizes = 15 + 60 * (log_wd - log_wd.min()) / max(float(np.ptp(log_wd)), 1e-12)
    ax_lr.scatter([r["learning_rate"] for r in rows], [r["val_accuracy"] for r in rows], c=log_lrs, cmap=cmap, norm=norm, s=sizes)
    ax_lr.set(xscale="log", xlabel="learning rate (marker size: weight decay)", ylabel="final validation accuracy", title="search result", ylim=(0, 1))
    fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax_lr, label="log10 learning rate")
    config = result["config"]
    fig.suptitle(f"{len(rows)} {config['arch'].upper()}s on digits trained as one program ({config['optimizer']}, {result['steps']} steps)")
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")  # at the path given: matplotlib would add ".png" to a name without it, or refuse another suffix
    plt.close(fig)


def _table(rows: list[dict[str, Any]]) -> str:
    ranked = sorted(rows, key=lambda r: -r["val_accuracy"] if math.isfinite(r["val_accuracy"]) else 1.0)
    lines = [f"{'tenant':<10} {'lr':>9} {'wd':>9} {'seed':>5} {'train loss':>10} {'val loss':>9} {'val acc':>8}"]
    for r in ranked:
        note = f"  diverged at step {r['diverged_at_step']}" if r["diverged_at_step"] is not None else ""
        lines.append(
            f"{r['tenant']:<10} {r['learning_rate']:>9.2e} {r['weight_decay']:>9.2e} {r['seed']:>5} "
            f"{r['final_train_loss']:>10.4f} {r['val_loss']:>9.4f} {r['val_accuracy']:>8.3f}{note}"
        )
    return "\n".join(lines)


def _last_finite(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")


def _json_float(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _strict_json(value: Any) -> Any:
    """NaN and Inf as null, so that strict JSON parsers read the file."""
    if isinstance(value, float):
        return _json_float(value)
    if isinstance(value, dict):
        return {k: _strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(v) for v in value]
    return value


def _environment() -> dict[str, Any]:
    device = jax.devices()[0]
    return {"device": getattr(device, "device_kind", str(device)), "platform": device.platform, "jax": jax.__version__, "python": platform.python_version()}
