"""Training step by backward pass: the summed losses' one batched pass against each tenant's own.

``MultiTenantTrainer(backward=...)``: "summed" takes the gradient of the summed losses (under
plain vmap each conv's filter gradient becomes one conv over every tenant), "per_tenant"
takes ``vmap(value_and_grad)`` of the one-tenant loss. For each configuration (architecture,
size, K tenants x B examples) this builds one trainer of each form from the same inits and:

- checks that one step of each on the same batch gives the same params;
- runs the summed program once on that batch with one input value of tenant 0 made NaN and
  counts the other tenants it flags: whether the batched backward carries a NaN across
  tenants on this device;
- steps the summed trainer on that batch and checks the other tenants' params against the
  clean step's (the trainer steps flagged tenants again on their own passes);
- times ``step_stacked`` of both trainers on the same batch, in rounds (median ms a step).

    PYTHONPATH=. python benchmarks/train_step.py                       # GPU configurations
    PYTHONPATH=. python benchmarks/train_step.py --quick               # CPU smoke run
"""

from __future__ import annotations

import argparse
import warnings

import common  # noqa: F401  (puts the repository on sys.path)
import jax
import jax.numpy as jnp
import numpy as np
import optax
from common import environment, markdown_table, update_readme_section, write_json

import models
from jaxmt import MultiTenantTrainer
from jaxmt.timing import time_in_rounds

FULL_CONFIGS = "resnet18:full:8:16,resnet18:full:16:8,mobilenetv2:full:8:16,mlp:full:64:32"
QUICK_CONFIGS = "resnet18:tiny:4:4,mlp:tiny:4:4"
FORMS = ("summed", "per_tenant")


def parse_configs(text: str) -> list[tuple[str, str, int, int]]:
    """``arch:size:K:B,...`` as (arch, size, K, B) tuples."""
    configs = []
    for item in text.split(","):
        parts = item.strip().split(":")
        if len(parts) != 4:
            raise ValueError(f"configuration {item!r} is not arch:size:tenants:batch")
        configs.append((parts[0], parts[1], int(parts[2]), int(parts[3])))
    return configs


def _loss_of(spec):
    def loss_fn(params, batch):
        logits = spec.apply_fn(params, batch["x"]).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

    return loss_fn


def _trainers(spec, loss_fn, seeds: list[int], learning_rate: float = 1e-2) -> dict[str, MultiTenantTrainer]:
    """One trainer per backward form, from the same inits (one ``loss_fn`` for all: the
    trainers share their compiled programs)."""
    return {form: MultiTenantTrainer.from_init(
        loss_fn, spec.init, {f"t{s}": s for s in seeds}, optimizer=optax.sgd, hyperparams={"learning_rate": learning_rate},
        trainable=lambda path: "batch_stats" not in path, backward=form) for form in FORMS}


def _rel(a, b) -> float:
    fa = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(a)])
    fb = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(b)])
    return float(np.linalg.norm(fa - fb) / max(np.linalg.norm(fb), 1e-30))


def measure(arch: str, size: str, tenants: int, batch: int, repeats: int, seed: int, tol: float) -> dict:
    spec = models.make(arch, size)
    rng = np.random.default_rng(seed)
    x = spec.random_input(rng, tenants * batch).reshape(tenants, batch, *spec.input_shape)
    classes = jax.eval_shape(spec.apply_fn, spec.init(0), jnp.zeros((1, *spec.input_shape), spec.input_dtype)).shape[-1]
    data = {"x": x, "y": rng.integers(0, classes, (tenants, batch)).astype(np.int32)}
    bad = {"x": x.copy(), "y": data["y"]}
    bad["x"][0, 0].flat[0] = np.nan
    seeds = [seed + i for i in range(tenants)]
    loss_fn = _loss_of(spec)

    stepped = _trainers(spec, loss_fn, seeds)  # one clean step of each form: the same params?
    for trainer in stepped.values():
        trainer.step_stacked(data)
    agree = _rel(stepped["summed"].stacked_params, stepped["per_tenant"].stacked_params)
    assert agree < tol, f"{arch}: the two backward forms' steps differ by {agree:.2e} (relative)"

    probe = _trainers(spec, loss_fn, seeds)["summed"]  # the summed program alone on the NaN batch: who is flagged?
    *_, finite = probe._step_program(probe._params, probe._opt_state, jnp.ones(tenants, bool), bad)
    others_flagged = int((~np.asarray(finite)[1:]).sum())

    guarded = _trainers(spec, loss_fn, seeds)["summed"]  # the trainer's step on it: the others as in the clean step
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        guarded.step_stacked(bad)
    clean = stepped["summed"].stacked_params
    others = _rel(jax.tree.map(lambda leaf: leaf[1:], guarded.stacked_params), jax.tree.map(lambda leaf: leaf[1:], clean))
    assert guarded.active == [f"t{s}" for s in seeds[1:]] and others < tol, (guarded.active, others)

    # Timed at a learning rate of 0: every round then steps the same params on the same batch.
    # At 1e-2, repeated steps on one batch drove ResNet-18 tenants to NaN on an H100, and a step
    # that flags tenants also runs their second pass: the rounds would time unlike work.
    timed = _trainers(spec, loss_fn, seeds, learning_rate=0.0)
    timings = time_in_rounds({form: (lambda t=trainer: t.step_stacked(data)) for form, trainer in timed.items()},
                             warmup=3, repeats=repeats)
    assert all(not trainer.diverged for trainer in timed.values()), {f: t.diverged for f, t in timed.items()}
    ms = {form: timings[form]["median_s"] * 1e3 for form in FORMS}
    return {"arch": arch, "size": size, "tenants": tenants, "batch": batch, "ms_per_step": ms,
            "per_tenant_over_summed": ms["per_tenant"] / ms["summed"], "forms_rel_diff": agree,
            "others_flagged_by_summed_pass": others_flagged, "others_rel_diff_after_nan_step": others,
            "auto": MultiTenantTrainer.from_init(loss_fn, spec.init, {"a": 0}, optimizer=optax.sgd,
                                                 hyperparams={"learning_rate": 0.1}).backward}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=None, help=f"arch:size:tenants:batch,... (default {FULL_CONFIGS}; --quick: {QUICK_CONFIGS})")
    parser.add_argument("--quick", action="store_true", help="tiny configurations, few repeats, no README (a CPU smoke run)")
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="results/<out>.json (default train_step, --quick: train_step_quick)")
    parser.add_argument("--no-readme", action="store_true", help="do not update benchmarks/README.md")
    args = parser.parse_args(argv)
    configs = parse_configs(args.configs or (QUICK_CONFIGS if args.quick else FULL_CONFIGS))
    repeats = 3 if args.quick else args.repeats
    # float32 on a CPU agrees to rounding; a GPU's TF32 convolutions differ between forms more.
    tol = 1e-4 if jax.devices()[0].platform == "cpu" else 2e-2
    rows = []
    for arch, size, tenants, batch in configs:
        row = measure(arch, size, tenants, batch, repeats, args.seed, tol)
        rows.append(row)
        print(f"{arch}-{size} {tenants}x{batch}: summed {row['ms_per_step']['summed']:.2f} ms, per_tenant "
              f"{row['ms_per_step']['per_tenant']:.2f} ms ({row['per_tenant_over_summed']:.2f}x); NaN in tenant 0 flagged "
              f"{row['others_flagged_by_summed_pass']} others in the summed pass; auto = {row['auto']}", flush=True)
    out = args.out or ("train_step_quick" if args.quick else "train_step")
    path = write_json(out, {"args": vars(args), "tolerance": tol, "configs": rows})
    table = markdown_table(
        ["model", "K x B", "summed ms", "per-tenant ms", "per-tenant / summed", "others flagged by a NaN (summed pass)", "others after the trainer's step (rel. diff)", "auto"],
        [[f"{r['arch']} ({r['size']})", f"{r['tenants']}x{r['batch']}", round(r["ms_per_step"]["summed"], 2), round(r["ms_per_step"]["per_tenant"], 2),
          round(r["per_tenant_over_summed"], 2), f"{r['others_flagged_by_summed_pass']} of {r['tenants'] - 1}",
          f"{r['others_rel_diff_after_nan_step']:.1e}", r["auto"]] for r in rows])
    print(table)
    print(f"wrote {path}")
    if not (args.quick or args.no_readme):
        env = environment()
        update_readme_section(
            "Training step: the backward pass",
            f"`PYTHONPATH=. python benchmarks/train_step.py` ({env['device']}, jax {env['jax']}, commit {env['commit']}; "
            f"[results/{out}.json](results/{out}.json)). `MultiTenantTrainer.step_stacked` with each backward form, SGD, "
            "float32, BatchNorm statistics not trained; median ms a step over rounds. Each pair was checked to give the same "
            f"params first (relative L2 within {tol:g}).\n\n" + table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
