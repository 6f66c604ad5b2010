"""Edges of MultiTenantTrainer, the train CLI and single-tenant import: bad input is refused
with an error that names what is wrong, and leaves the trainer as it was.

The model is a linear regression of three features (two leaves), so every test is fast;
references are plain NumPy. Tolerances: exact where nothing is computed, relative 1e-6 in
float32 where one SGD step is.
"""

from __future__ import annotations

import contextlib
import json
import warnings

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxmt import InputError, MultiTenantModel, MultiTenantTrainer, ParamMismatchError, TenantStore, add_tenant_from_checkpoint


def _init(seed: int) -> dict:
    return {"w": jax.random.normal(jax.random.key(seed), (3,)), "b": jnp.full((), 0.5 * seed)}


def _loss(params, batch):
    return jnp.mean((batch["x"] @ params["w"] + params["b"] - batch["y"]) ** 2)


def _apply(params, x):
    return x @ params["w"] + params["b"]


def _batch(n_tenants: int, seed: int = 0) -> dict[str, np.ndarray]:
    x = np.random.default_rng(seed).normal(size=(n_tenants, 8, 3)).astype(np.float32)
    return {"x": x, "y": x.sum(-1)}


def _trainer(ids=("a", "b", "c"), **kwargs) -> MultiTenantTrainer:
    kwargs.setdefault("optimizer", optax.sgd)
    kwargs.setdefault("hyperparams", {"learning_rate": [0.1, 0.2, 0.3][: len(ids)]})
    return MultiTenantTrainer.from_init(_loss, _init, {t: i for i, t in enumerate(ids)}, apply_fn=_apply, **kwargs)


def _host(tree):
    return jax.tree.map(lambda leaf: np.array(leaf, copy=True), tree)


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(leaf, np.float64)) for leaf in jax.tree.leaves(tree)])


def _assert_trees_equal(a, b):
    jax.tree.map(np.testing.assert_array_equal, _host(a), _host(b))


def _snapshot(trainer: MultiTenantTrainer):
    return _host(trainer.stacked_params), _host(trainer.opt_state), trainer.num_steps, trainer.active


def _assert_unchanged(trainer: MultiTenantTrainer, snapshot) -> None:
    params, opt_state, steps, active = snapshot
    _assert_trees_equal(trainer.stacked_params, params)
    _assert_trees_equal(trainer.opt_state, opt_state)
    assert (trainer.num_steps, trainer.active) == (steps, active)


# ------------------------------------------------------------------ from_params
@pytest.mark.parametrize(
    "other, where",
    [
        ({"w": np.zeros(3, np.float32)}, r"\['b'\] is missing, expected float32\[\]"),
        ({"w": np.zeros(3, np.float32), "b": np.float32(0), "c": np.float32(0)}, r"unexpected extra entry \['c'\]"),
        ({"w": {"kernel": np.zeros(3, np.float32)}, "b": np.float32(0)}, r"\['w'\] is dict with keys \['kernel'\], expected float32\[3\]"),
        ({"w": (np.zeros(3, np.float32),), "b": np.float32(0)}, r"\['w'\] is tuple of 1, expected float32\[3\]"),
    ],
    ids=["missing", "extra", "dict for a leaf", "tuple for a leaf"],
)
def test_from_params_names_where_a_structure_differs_from_the_first_tenant(other, where):
    params = {"a": jax.tree.map(np.asarray, _init(0)), "b": other}
    with pytest.raises(ParamMismatchError, match=r"tenant 'b': params pytree structure differs from that of tenant 'a': " + where):
        MultiTenantTrainer.from_params(_loss, params, optimizer=optax.sgd, hyperparams={"learning_rate": 0.1})


@pytest.mark.parametrize("frozen", ["second", "first"])
def test_from_params_takes_a_frozen_dict_for_a_dict_like_the_store_does(frozen):
    plain = {"a": _init(0), "b": _init(1)}
    mixed = {t: flax.core.freeze(p) if (t == "b") == (frozen == "second") else p for t, p in plain.items()}
    sgd = dict(optimizer=optax.sgd, hyperparams={"learning_rate": [0.1, 0.2]})
    got = MultiTenantTrainer.from_params(_loss, mixed, **sgd)
    want = MultiTenantTrainer.from_params(_loss, plain, **sgd)
    for tenant in ("a", "b"):
        _assert_trees_equal(dict(got.params_of(tenant)), want.params_of(tenant))
    got.step_stacked(_batch(2))
    want.step_stacked(_batch(2))
    for tenant in ("a", "b"):
        _assert_trees_equal(dict(got.params_of(tenant)), want.params_of(tenant))


def test_tenant_ids_may_come_from_an_iterator():
    stack = jax.vmap(_init)(jnp.arange(2))
    trainer = MultiTenantTrainer(_loss, stack, iter(["a", "b"]), optimizer=optax.sgd, hyperparams={"learning_rate": 0.1})
    assert trainer.tenants == ["a", "b"]
    _assert_trees_equal(trainer.params_of("b"), _init(1))


# --------------------------------------------------------------- hyperparameters
@pytest.mark.parametrize(
    "values, match",
    [
        (True, r"'learning_rate' must be a number or a sequence of 3 numbers, got True"),
        (None, r"'learning_rate' must be a number or a sequence of 3 numbers, got None"),
        ("fast", r"'learning_rate' must be a number or a sequence of 3 numbers, got 'fast'"),
        ({"b": "fast"}, r"'learning_rate' of tenant 'b' must be a number, got 'fast'"),
        ({"b": None}, r"'learning_rate' of tenant 'b' must be a number, got None"),
        ({"b": [0.1, 0.2]}, r"'learning_rate' of tenant 'b' must be a number, got \[0.1, 0.2\]"),
        ({"b": 1e39}, r"'learning_rate' of tenant 'b' is held as float32, which cannot hold 1e\+39 \(it would become inf\)"),
    ],
    ids=["bool", "None", "string", "tenant string", "tenant None", "tenant list", "float32 overflow"],
)
def test_set_hyperparam_rejects_what_is_not_a_number_it_can_hold_and_changes_nothing(values, match):
    trainer = _trainer()
    hyper = trainer.hyperparams["learning_rate"].copy()
    with pytest.raises(ValueError, match=match):
        trainer.set_hyperparam("learning_rate", values)
    np.testing.assert_array_equal(trainer.hyperparams["learning_rate"], hyper)


@pytest.mark.parametrize(
    "values, match",
    [
        ({"b": 2**40}, r"'weight_decay' of tenant 'b' is held as int32, which cannot hold 1099511627776.0 \(it would become"),
        ([0, 2**40, 0], r"'weight_decay' of tenant 'b' is the integer 1099511627776, which int32 cannot hold"),
    ],
    ids=["mapping", "sequence"],
)
def test_an_integer_hyperparameter_refuses_values_int32_cannot_hold(values, match):
    trainer = _trainer(optimizer=optax.adamw, hyperparams={"learning_rate": 0.1, "weight_decay": 0})
    with pytest.raises(ValueError, match=match):
        trainer.set_hyperparam("weight_decay", values)
    np.testing.assert_array_equal(trainer.hyperparams["weight_decay"], [0, 0, 0])


def test_the_constructor_refuses_integers_int32_cannot_hold():
    with pytest.raises(ValueError, match=r"'weight_decay' of tenant 'b' is the integer 1099511627776, which int32 cannot hold"):
        _trainer(optimizer=optax.adamw, hyperparams={"learning_rate": 0.1, "weight_decay": [0, 2**40, 0]})


# ------------------------------------------------------------------ divergence
def test_a_divergence_warning_raised_as_an_error_leaves_the_step_recorded():
    """Under ``-W error`` the warning is an exception: the step it reports is committed and
    recorded all the same, so the history, the diverged steps and the params agree."""
    trainer, reference = _trainer(), _trainer()
    trainer.step_stacked(_batch(3, seed=0))
    reference.step_stacked(_batch(3, seed=0))
    bad = _batch(3, seed=1)
    bad["x"][1, 0, 0] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeWarning, match=r"step 1: tenants \['b'\] diverged"):
            trainer.step_stacked(bad)
    with pytest.warns(RuntimeWarning, match=r"step 1: tenants \['b'\] diverged"):
        want_losses = reference.step_stacked(bad)
    assert trainer.num_steps == reference.num_steps == 2 and trainer.diverged == reference.diverged == {"b": 1}
    for tenant in trainer.tenants:
        np.testing.assert_array_equal(trainer.history[tenant], reference.history[tenant])
        _assert_trees_equal(trainer.params_of(tenant), reference.params_of(tenant))
    np.testing.assert_array_equal(trainer.history["a"][1], np.float32(want_losses["a"]))


# ---------------------------------------------------------------- tenant lists
@pytest.mark.parametrize("call", ["freeze", "export_to", "to_model"])
def test_a_lone_string_is_not_taken_for_a_list_of_tenants(call):
    trainer = _trainer(ids=("a", "b", "ab"))
    snapshot = _snapshot(trainer)
    model = MultiTenantModel(_apply, trainer.params_of("a"), capacity=4)
    with pytest.raises(TypeError, match=rf"{call} takes a sequence of tenant ids, got the string 'ab'; pass \['ab'\]"):
        {"freeze": lambda: trainer.freeze("ab"), "export_to": lambda: trainer.export_to(model, "ab"),
         "to_model": lambda: trainer.to_model("ab")}[call]()
    _assert_unchanged(trainer, snapshot)
    assert model.tenants == []
    trainer.freeze(["ab"])
    assert trainer.active == ["a", "b"]


def test_the_constructor_and_add_stacked_refuse_a_lone_string_of_ids():
    stack = jax.vmap(_init)(jnp.arange(2))
    with pytest.raises(TypeError, match=r"MultiTenantTrainer takes a sequence of tenant ids, got the string 'ab'; pass \['ab'\]"):
        MultiTenantTrainer(_loss, stack, "ab", optimizer=optax.sgd, hyperparams={"learning_rate": 0.1})
    store = TenantStore(_init(0), capacity=4)
    with pytest.raises(TypeError, match=r"got the string 'ab'; pass \['ab'\]"):
        store.add_stacked("ab", stack)
    assert len(store) == 0


# ------------------------------------------------------------------ train CLI
@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lr-range", "0.1", "inf"], "--lr-range needs 0 < LOW <= HIGH < inf, got 0.1 inf"),
        (["--optimizer", "adamw", "--wd-range", "1e-3", "inf"], "--wd-range needs 0 < LOW <= HIGH < inf"),
        (["--val-fraction", "0.0001"], "--val-fraction 0.0001 leaves 1797 training and 0 validation rows"),
        (["--val-fraction", "0.9999"], "--val-fraction 0.9999 leaves 0 training and 1797 validation rows"),
        (["--optimizer", "sgd", "--wd-range", "1e-3", "1e-2"], "--wd-range applies to adamw only; --optimizer sgd has no weight decay"),
        (["--compare-steps", "5"], "--compare-steps needs --compare"),
        (["--seed", "-1"], "--seed must be in [0, 2**31 - tenants] = [0, 2147483646], got -1"),
        (["--seed", "2147483647"], "--seed must be in [0, 2**31 - tenants]"),  # tenant 1's seed would leave int32
        (["--json", "/nonexistent-folder/r.json"], "--json /nonexistent-folder/r.json: its folder does not exist"),
        (["--plot", "/nonexistent-folder/r.png"], "--plot /nonexistent-folder/r.png: its folder does not exist"),
        (["--json", ""], "--json is empty"),  # "$OUT" of an unset variable: no JSON was written, and exit code 0
    ],
    ids=["infinite lr", "infinite wd", "no validation rows", "no training rows", "wd for sgd", "compare steps alone",
         "negative seed", "seed beyond int32", "json folder missing", "plot folder missing", "empty json path"],
)
def test_train_cli_rejects_arguments_it_cannot_use_with_exit_code_2(argv, message, capsys):
    if "--val-fraction" in argv:
        pytest.importorskip("sklearn")
    from jaxmt.cli import main

    assert main(["train", "--tenants", "2", "--epochs", "1", "--no-progress", *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("optimizer, wd_range", [("sgd", None), ("adamw", [1e-6, 1e-1])])
def test_train_cli_records_only_the_settings_the_run_used(optimizer, wd_range, tmp_path):
    """The JSON config is what the run did: SGD has no weight decay and a run without
    --compare takes no compare steps, so neither default is recorded as if it had applied."""
    pytest.importorskip("sklearn")
    from jaxmt.cli import main

    assert main(["train", "--tenants", "2", "--epochs", "1", "--batch-size", "256", "--no-progress",
                 "--optimizer", optimizer, "--json", str(tmp_path / "r.json")]) == 0
    config = json.loads((tmp_path / "r.json").read_text())["config"]
    assert config.get("wd_range") == wd_range and "compare_steps" not in config
    assert config["optimizer"] == optimizer and config["lr_range"] == [1e-4, 3e-1]


def test_train_cli_records_the_batch_size_it_trained_with(tmp_path):
    """A --batch-size above the training rows runs as one batch of them all: the JSON says so."""
    pytest.importorskip("sklearn")
    from jaxmt.cli import main

    assert main(["train", "--tenants", "2", "--epochs", "1", "--batch-size", "100000", "--no-progress",
                 "--json", str(tmp_path / "r.json")]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["config"]["batch_size"] == result["train_rows"] and result["steps"] == 1


@pytest.mark.parametrize("option", ["--json", "--plot"])
def test_train_cli_refuses_an_output_path_that_is_a_folder_before_training(option, tmp_path, monkeypatch, capsys):
    """Writing to a folder fails only after the training (IsADirectoryError): refuse it up front."""
    import jaxmt.train_cli
    from jaxmt.cli import main

    monkeypatch.setattr(jaxmt.train_cli, "load_digits_split", lambda *args, **kwargs: pytest.fail("the training started"))
    assert main(["train", "--tenants", "2", "--epochs", "1", "--no-progress", option, str(tmp_path)]) == 2
    assert f"{option} {tmp_path}" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["curves", "curves.plot"])
def test_train_cli_plots_a_png_at_the_path_given_whatever_its_suffix(name, tmp_path):
    """--plot is a PNG file: matplotlib, left to pick a format by suffix, wrote "curves" to
    curves.png (while the command said "plot written to curves") and refused ".plot" with a
    traceback after the whole training, before the JSON was written."""
    pytest.importorskip("matplotlib")
    from jaxmt.train_cli import plot_curves

    rows = [{"tenant": t, "learning_rate": lr, "weight_decay": 1e-3, "val_accuracy": 0.5} for t, lr in (("a", 0.1), ("b", 0.01))]
    result = {"tenants": rows, "config": {"arch": "mlp", "optimizer": "adamw"}, "steps": 2,
              "curves": {"train_loss": {"a": [2.0, 1.0], "b": [2.0, 1.5]}, "val_accuracy": {"a": [0.5], "b": [0.4]}}}
    plot_curves(result, str(tmp_path / name))
    assert [p.name for p in tmp_path.iterdir()] == [name]
    assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_cli_without_matplotlib_refuses_plot_before_training(tmp_path, monkeypatch, capsys):
    """A missing package is exit code 1 with one line, as for scikit-learn; not a traceback
    once the training is over (and the --json results lost with it)."""
    pytest.importorskip("sklearn")
    import sys

    import jaxmt.train_cli
    from jaxmt.cli import main

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    monkeypatch.setattr(jaxmt.train_cli, "load_digits_split", lambda *args, **kwargs: pytest.fail("the training started"))
    assert main(["train", "--tenants", "2", "--epochs", "1", "--no-progress", "--plot", str(tmp_path / "c.png")]) == 1
    err = capsys.readouterr().err
    assert "--plot needs matplotlib" in err and "Traceback" not in err


# ---------------------------------------------------------------- single import
def test_a_flax_checkpoint_with_a_numpy_scalar_leaf_imports_into_its_float32_template(tmp_path):
    """Orbax (under flax.training.checkpoints) saves a NumPy scalar as a Python float, which
    reads back as float64; JAX keeps it as float32, as the store does for any tenant."""
    from flax.training import checkpoints

    params = {"params": {"w": np.arange(3, dtype=np.float32), "temperature": np.float32(0.25)}}
    checkpoints.save_checkpoint(tmp_path / "run", {"params": params["params"], "step": 7}, step=7)
    store = TenantStore(jax.tree.map(np.zeros_like, params), capacity=2)
    add_tenant_from_checkpoint(store, "imported", tmp_path / "run")
    got = jax.tree.map(np.asarray, store.get("imported"))
    assert got["params"]["temperature"].dtype == np.float32
    _assert_trees_equal(got, params)


# -------------------------------------------------------------------- evaluate
@pytest.mark.parametrize("lowering", ["vmap", "rule"])
@pytest.mark.parametrize("rows", [1, 2, 4])
def test_evaluate_refuses_a_stacked_batch_without_one_row_per_tenant(lowering, rows):
    trainer = _trainer(lowering=lowering)
    x = np.ones((rows, 4, 3), np.float32)
    with pytest.raises(InputError, match=rf"batch array has shape \[{rows}, 4, 3\]; expected a leading tenant axis of 3"):
        trainer.evaluate(_apply, x, stacked=True)
    x = np.random.default_rng(0).normal(size=(3, 4, 3)).astype(np.float32)
    got = trainer.evaluate(_apply, x, stacked=True)
    for t, tenant in enumerate(trainer.tenants):
        params = trainer.params_of(tenant)
        np.testing.assert_allclose(got[tenant], x[t] @ np.asarray(params["w"]) + np.asarray(params["b"]), rtol=1e-6)


# ------------------------------------------------------------------------ step
@pytest.mark.parametrize(
    "other, where",
    [
        (lambda b: {"x": b["x"]}, r"\['y'\] is missing, expected float32\[8\]"),
        (lambda b: {**b, "w": b["y"]}, r"unexpected extra entry \['w'\] \(float32\[8\]\), not in the template"),
        (lambda b: {"x": (b["x"],), "y": b["y"]}, r"\['x'\] is tuple of 1, expected float32\[8, 3\]"),
        (lambda b: flax.core.freeze(b), r"mappings of other types"),
    ],
    ids=["missing", "extra", "tuple for a leaf", "frozen dict"],
)
def test_step_names_where_a_batch_structure_differs_and_changes_nothing(other, where):
    trainer = _trainer()
    snapshot = _snapshot(trainer)
    stacked = _batch(3)
    batches = {t: {k: v[i] for k, v in stacked.items()} for i, t in enumerate(trainer.tenants)}
    batches["c"] = other(batches["c"])
    with pytest.raises(InputError, match=r"tenant 'c': batch structure differs from that of tenant 'a': " + where):
        trainer.step(batches)
    _assert_unchanged(trainer, snapshot)


def _trained_alone(tx: optax.GradientTransformation, loss_fn, params, batches: list, t: int):
    """Tenant t's params trained on its slice of each stacked batch by ``tx`` alone (plain
    optax, no trainer): the reference the trainer's tenants are held to."""
    state = tx.init(params)
    for batch in batches:
        grads = jax.grad(loss_fn)(params, {k: v[t] for k, v in batch.items()})
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params


# ------------------------------------------------------------- optimizer options
@pytest.mark.parametrize("mask", [{"w": True, "b": False}, lambda params: {"w": True, "b": False}], ids=["pytree", "callable"])
def test_a_pytree_option_such_as_adamws_mask_is_passed_as_given(mask):
    """adamw's mask may be a pytree of bools like the params, or a callable making one."""
    hyper = {"learning_rate": [0.1, 0.05], "weight_decay": 0.5, "mask": mask}
    trainer = _trainer(ids=("a", "b"), optimizer=optax.adamw, hyperparams=hyper)
    batches = [_batch(2, seed=s) for s in range(3)]
    for batch in batches:
        trainer.step_stacked(batch)
    for t, tenant in enumerate(trainer.tenants):
        params = _trained_alone(optax.adamw(hyper["learning_rate"][t], weight_decay=0.5, mask=mask), _loss, _init(t), batches, t)
        got, want = _flat(trainer.params_of(tenant)), _flat(params)
        assert np.linalg.norm(got - want) < 1e-5 * np.linalg.norm(want), tenant  # Adam magnifies rounding differences


# ------------------------------------------------------------------ interrupts
class _Interrupt:
    """Stands for the step's losses; reading them raises as Ctrl-C does while a program runs."""

    def __array__(self, *args, **kwargs):
        raise KeyboardInterrupt("while waiting for the losses")


@pytest.mark.parametrize("on_nonfinite", ["freeze", "raise"])
def test_an_interrupt_while_waiting_for_the_losses_leaves_usable_weights(on_nonfinite):
    """With on_nonfinite="freeze" the step donates the old buffers: the trainer must hold the
    new ones (the update is kept, the step not counted); with "raise" nothing is donated."""
    trainer, reference = _trainer(on_nonfinite=on_nonfinite), _trainer()
    real = trainer._step_program
    trainer._step_program = lambda *args: (lambda out: (out[0], out[1], _Interrupt(), out[3]))(real(*args))
    before = _host(trainer.stacked_params)
    with pytest.raises(KeyboardInterrupt):
        trainer.step_stacked(_batch(3))
    trainer._step_program = real
    assert trainer.num_steps == 0 and trainer.active == ["a", "b", "c"]
    if on_nonfinite == "freeze":
        reference.step_stacked(_batch(3))
        _assert_trees_equal(trainer.stacked_params, reference.stacked_params)
        _assert_trees_equal(trainer.opt_state, reference.opt_state)
    else:
        _assert_trees_equal(trainer.stacked_params, before)
    trainer.step_stacked(_batch(3, seed=1))  # and it trains on
    assert trainer.num_steps == 1


# ------------------------------------------------------------- static hyperparameters
def _init_matrix(seed: int) -> dict:
    return {"w": jax.random.normal(jax.random.key(seed), (3, 2))}  # adafactor factors matrices only


def _loss_matrix(params, batch):
    return jnp.mean((batch["x"] @ params["w"]).sum(-1) - batch["y"]) ** 2


def test_static_hyperparams_reach_the_optimizer_as_given_and_train_like_each_alone():
    """adafactor reads min_dim_size_to_factor in Python: given in static_hyperparams, every
    tenant trains as optax.adafactor with that value trains it alone."""
    lrs = {"a": 0.05, "b": 0.2}
    trainer = MultiTenantTrainer.from_init(_loss_matrix, _init_matrix, {"a": 0, "b": 1}, optimizer=optax.adafactor,
                                           hyperparams={"learning_rate": list(lrs.values())},
                                           static_hyperparams={"min_dim_size_to_factor": 2})
    start = {t: _host(trainer.params_of(t)) for t in lrs}
    batches = [_batch(2, seed) for seed in range(3)]
    for batch in batches:
        trainer.step_stacked(batch)
    for t, (tenant, lr) in enumerate(lrs.items()):
        params = _trained_alone(optax.adafactor(learning_rate=lr, min_dim_size_to_factor=2), _loss_matrix, start[tenant], batches, t)
        got, want = _flat(trainer.params_of(tenant)), _flat(params)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert set(trainer.hyperparams) == {"learning_rate"}


def _bfloat16_init_matrix(seed: int) -> dict:
    return jax.tree.map(lambda leaf: leaf.astype(jnp.bfloat16), _init_matrix(seed))


def _bfloat16_loss_matrix(params, batch):
    return _loss_matrix(jax.tree.map(lambda leaf: leaf.astype(jnp.float32), params), batch)


# (optimizer, init, loss, tolerance relative to the weights' norm, batch seeds or None for fresh
# ones): the defaults left out matter. adafactor reads min_dim_size_to_factor (default 128) in
# Python; adam's b2 (default 0.999) is 1.0 in bfloat16, where its bias correction would divide by
# zero. bfloat16 weights round to 2**-8; the trainer's float32 learning rate rounds the update once
# more than a Python float. Adam's first steps move each weight by about +-lr whatever its
# gradient's size, so a weight one rounding apart can flip a near-zero gradient's sign and move by
# 2*lr: with fresh batches that broke the bfloat16 tolerance now and then, so its batches are fixed.
DEFAULTS_LEFT_OUT = {
    "adafactor": (optax.adafactor, _init_matrix, _loss_matrix, 1e-5, None),
    "adamw in bfloat16": (optax.adamw, _bfloat16_init_matrix, _bfloat16_loss_matrix, 2e-2, (11, 12, 13)),
}


@pytest.mark.parametrize("case", list(DEFAULTS_LEFT_OUT), ids=list(DEFAULTS_LEFT_OUT))
def test_an_optimizers_defaults_are_its_own_not_traced_nor_cast_to_the_params_dtype(case):
    """Arguments of the optimizer that are not given (its defaults) reach it as optax.adafactor()
    or optax.adamw() alone take them: every tenant trains as it would alone, none diverges."""
    factory, init_fn, loss_fn, tolerance, batch_seeds = DEFAULTS_LEFT_OUT[case]
    if batch_seeds is None:
        batch_seeds = np.random.default_rng().integers(0, 2**31, size=3)
    lrs = {"a": 0.05, "b": 0.2}
    seeds = {"a": 3, "b": 4}
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a tenant frozen as diverged fails the test
        trainer = MultiTenantTrainer.from_init(loss_fn, init_fn, seeds, optimizer=factory, hyperparams={"learning_rate": list(lrs.values())})
        batches = [_batch(2, seed) for seed in batch_seeds]
        for batch in batches:
            trainer.step_stacked(batch)
    assert trainer.diverged == {} and set(trainer.hyperparams) == {"learning_rate"}
    for t, (tenant, lr) in enumerate(lrs.items()):
        params = _trained_alone(factory(learning_rate=lr), loss_fn, init_fn(seeds[tenant]), batches, t)
        got, want = _flat(trainer.params_of(tenant)), _flat(params)
        assert np.linalg.norm(got - want) <= tolerance * np.linalg.norm(want), tenant


@contextlib.contextmanager
def _compiles():
    """The XLA compiles that happen inside the block, as a list that grows while it runs."""
    compiles = []

    def listener(event, *_, **__):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield compiles
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


@pytest.mark.parametrize("optimizer, hyper", [(optax.sgd, {"learning_rate": [0.1, 0.2], "momentum": 0.9}),
                                               (optax.adamw, {"learning_rate": [0.1, 0.2]})], ids=["sgd", "adamw"])
def test_steps_after_the_first_compile_nothing_even_from_weakly_typed_init_leaves(optimizer, hyper):
    """_init's bias is jnp.full((), ...), weakly typed: the trainer must hold it (and the moments
    made from it) in the type its updates give it, so that no later step compiles again."""
    assert jax.tree.leaves(_init(1))[0].weak_type  # the case under test
    trainer = _trainer(ids=("a", "b"), optimizer=optimizer, hyperparams=hyper)
    trainer.step_stacked(_batch(2, seed=0))
    with _compiles() as compiles:
        for seed in (1, 2):
            trainer.step_stacked(_batch(2, seed=seed))
    assert compiles == []


def _decaying_sgd(learning_rate):
    """sgd whose step size decays by a factor kept in the state, which init makes weakly typed
    (``jnp.asarray(1.0)``, as a hand-written optimizer's init often does)."""
    def init(params):
        return {"scale": jnp.asarray(1.0), "updates": jnp.asarray(0)}

    def update(grads, state, params=None):
        updates = jax.tree.map(lambda g: -learning_rate * state["scale"] * g, grads)
        return updates, {"scale": state["scale"] * 0.9, "updates": state["updates"] + 1}

    return optax.GradientTransformation(init, update)


def test_steps_after_the_first_compile_nothing_even_from_weakly_typed_opt_state_leaves():
    """An optimizer whose init state is weakly typed: the state the step returns is cast to
    the init's dtypes, strongly typed; held as init made it, the second step saw a new
    signature and compiled again."""
    trainer = _trainer(ids=("a", "b"), optimizer=_decaying_sgd, hyperparams={"learning_rate": [0.1, 0.2]})
    trainer.step_stacked(_batch(2, seed=0))
    with _compiles() as compiles:
        for seed in (1, 2):
            trainer.step_stacked(_batch(2, seed=seed))
    assert compiles == []
    assert np.asarray(trainer.opt_state.inner_state["updates"]).tolist() == [3, 3]


def _clipped_sgd(learning_rate, **options):
    """A factory taking its options through ``**kwargs`` (as wrappers of optax aliases do)."""
    return optax.chain(optax.clip(options.pop("max_delta", 1e9)), optax.sgd(learning_rate))


@pytest.mark.parametrize("given", ["static", "per_tenant"])
def test_hyperparameters_an_optimizer_takes_through_kwargs_reach_it(given):
    """``max_delta`` is no named parameter of the factory but a key of its ``**options``:
    ``optax.inject_hyperparams`` binds arguments by signature and handed them over as one
    argument named ``options`` (the factory saw ``options={"options": {...}}`` and clipped
    nothing), silently."""
    max_delta = 1e-3
    if given == "static":
        kwargs = {"hyperparams": {"learning_rate": [0.5, 0.5]}, "static_hyperparams": {"max_delta": max_delta}}
    else:
        kwargs = {"hyperparams": {"learning_rate": [0.5, 0.5], "max_delta": [max_delta, max_delta]}}
    trainer = _trainer(ids=("a", "b"), optimizer=_clipped_sgd, **kwargs)
    before = _flat(trainer.params_of("a"))
    trainer.step_stacked(_batch(2, seed=0))
    moved = np.abs(_flat(trainer.params_of("a")) - before).max()
    assert 0 < moved <= max_delta * (1 + 1e-5)


def _bfloat16_init(seed: int) -> dict:
    return jax.tree.map(lambda leaf: leaf.astype(jnp.bfloat16), _init(seed))


def _bfloat16_loss(params, batch):
    return _loss(jax.tree.map(lambda leaf: leaf.astype(jnp.float32), params), batch)


@pytest.mark.parametrize("optimizer, hyper", [(optax.sgd, {"learning_rate": [0.1, 0.2], "momentum": [0.9, 0.5]}),
                                               (optax.adamw, {"learning_rate": [0.1, 0.2], "b1": 0.9})], ids=["sgd", "adamw"])
def test_the_optimizer_state_keeps_the_dtypes_its_init_gave_it(optimizer, hyper):
    """The per-tenant hyperparameters are float32 arrays; with bfloat16 weights a momentum times
    them must not turn the bfloat16 moments into float32 ones (optax alone, given numbers, keeps
    them bfloat16): twice their memory, and a step that compiles again."""
    trainer = MultiTenantTrainer.from_init(_bfloat16_loss, _bfloat16_init, {"a": 0, "b": 1}, optimizer=optimizer, hyperparams=hyper)
    dtypes = [leaf.dtype for leaf in jax.tree.leaves(trainer.opt_state)]
    trainer.step_stacked(_batch(2, seed=0))
    with _compiles() as compiles:
        trainer.step_stacked(_batch(2, seed=1))
    assert [leaf.dtype for leaf in jax.tree.leaves(trainer.opt_state)] == dtypes
    assert compiles == []
    tx = optimizer(**{name: values[0] if isinstance(values, list) else values for name, values in hyper.items()})
    params = _bfloat16_init(0)
    _, alone = tx.update(jax.grad(_bfloat16_loss)(params, {k: v[0] for k, v in _batch(2).items()}), tx.init(params), params)
    assert [leaf.dtype for leaf in jax.tree.leaves(trainer.opt_state.inner_state)] == [leaf.dtype for leaf in jax.tree.leaves(alone)]


def test_a_traced_number_the_optimizer_reads_in_python_is_named_with_the_remedy():
    with pytest.raises(TypeError, match=r"tracing the training step \(optimizer adafactor, loss_fn\) needed a concrete value: "
                                        r"TracerBoolConversionError: .*\['learning_rate', 'min_dim_size_to_factor'\] are traced.*static_hyperparams="):
        MultiTenantTrainer.from_init(_loss_matrix, _init_matrix, {"a": 0, "b": 1}, optimizer=optax.adafactor,
                                     hyperparams={"learning_rate": 0.1, "min_dim_size_to_factor": 2})


def test_a_number_read_in_python_only_by_the_update_fails_its_first_step_and_changes_nothing():
    """Vectors are never factored, so adafactor's init passes; a custom optimizer that reads
    a hyperparameter in Python only in its update fails at the first step, with the remedy."""
    def clipped_sgd(learning_rate, max_norm):
        def update(grads, state, params=None):
            scale = 1.0 if max_norm > 1e6 else 0.5  # a Python branch on a traced number
            return jax.tree.map(lambda g: -learning_rate * scale * g, grads), state
        return optax.GradientTransformation(lambda params: optax.EmptyState(), update)

    trainer = _trainer(ids=("a", "b"), optimizer=clipped_sgd, hyperparams={"learning_rate": 0.1, "max_norm": 1.0})
    snapshot = _snapshot(trainer)
    with pytest.raises(TypeError, match=r"optimizer clipped_sgd, loss_fn\) needed a concrete value: .*static_hyperparams="):
        trainer.step_stacked(_batch(2))
    _assert_unchanged(trainer, snapshot)
    fixed = _trainer(ids=("a", "b"), optimizer=clipped_sgd, hyperparams={"learning_rate": 0.1}, static_hyperparams={"max_norm": 1.0})
    fixed.step_stacked(_batch(2))
    assert fixed.num_steps == 1


@pytest.mark.parametrize(
    "hyperparams, static, error, match",
    [
        ({"learning_rate": 0.1}, {"learning_rate": 0.2}, ValueError, r"\['learning_rate'\] given both in hyperparams and in static_hyperparams"),
        ({"learning_rate": 0.1}, {"no_such_option": 1}, TypeError, r"do not fit optimizer sgd"),
    ],
)
def test_static_hyperparams_that_clash_or_do_not_fit_are_refused(hyperparams, static, error, match):
    with pytest.raises(error, match=match):
        _trainer(ids=("a", "b"), hyperparams=hyperparams, static_hyperparams=static)


def test_a_loss_that_branches_on_a_traced_value_is_reported_with_the_original_error_first():
    def branching_loss(params, batch):
        loss = _loss(params, batch)
        return loss if loss > 0 else -loss  # Python reads a traced value

    trainer = MultiTenantTrainer.from_init(branching_loss, _init, {"a": 0, "b": 1}, optimizer=optax.sgd,
                                           static_hyperparams={"learning_rate": 0.1})
    with pytest.raises(TypeError, match=r"needed a concrete value: TracerBoolConversionError: Attempted boolean conversion") as info:
        trainer.step_stacked(_batch(2))
    assert "static_hyperparams" not in str(info.value)  # no per-tenant hyperparameter to blame


# ------------------------------------------------------------- optimizer state
def _linear_loss(params, batch):
    return jnp.sum(params["w"] * batch["s"])  # gradient = batch["s"], loss finite


def test_an_optimizer_state_that_overflows_freezes_that_tenant_while_its_params_stay_finite():
    """A gradient of 1e20 is finite, its square is not in float32: Adam's second moment turns
    to inf and its updates to 0, so the params stay finite and stop moving. That tenant is
    frozen and named; its state stays as it was; the other trains on."""
    stack = {"w": jnp.ones((2, 3))}
    trainer = MultiTenantTrainer(_linear_loss, stack, ["calm", "wild"], optimizer=optax.adam, hyperparams={"learning_rate": 0.1})
    before = _host(trainer.opt_state)
    batch = {"s": np.array([[1.0] * 3, [1e20] * 3], np.float32)}
    with pytest.warns(RuntimeWarning, match="'wild'"):
        trainer.step_stacked(batch)
    assert trainer.diverged == {"wild": 0} and trainer.active == ["calm"]
    after = _host(trainer.opt_state)
    for old, new in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(new[1], old[1])  # wild's state as it was
        assert np.all(np.isfinite(new)) if np.issubdtype(new.dtype, np.floating) else True
    assert np.all(trainer.params_of("wild")["w"] == 1.0) and np.all(trainer.params_of("calm")["w"] < 1.0)


def test_a_summed_step_that_flags_tenants_does_not_compile_the_own_pass_again():
    """An unhashable static option (adamw's pytree mask) keeps the step programs out of the
    cache: the trainer must still build its per-tenant program once, not at every flagged step."""
    hyper = {"learning_rate": [0.1, 0.05, 0.02], "weight_decay": 0.5, "mask": {"w": True, "b": False}}
    trainer = _trainer(optimizer=optax.adamw, hyperparams=hyper, backward="summed")
    trainer.step_stacked(_batch(3))  # a clean step first: the params' weak types settle
    with _compiles() as compiles:
        for tenant in (0, 1):  # each step flags a tenant: the second pass runs at both
            bad = _batch(3, seed=1 + tenant)
            bad["x"][tenant, 0, 0] = np.nan
            compiles.clear()
            with pytest.warns(RuntimeWarning, match="diverged"):
                trainer.step_stacked(bad)
    assert trainer.active == ["c"]
    assert compiles == []  # the second flagged step compiled nothing
