"""Store checkpoints round-trip exactly, writes are atomic, bad checkpoints fail clearly and change nothing."""

from __future__ import annotations

import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import reference_predict, rel_error, tiny_spec

import jaxmt
import models
from jaxmt import BucketPolicy, CheckpointError, DuplicateTenantError, MultiTenantModel, NonFiniteParamsError
from jaxmt.checkpoint import STORE_FILE

POLICY = BucketPolicy.powers_of_two(8, 8)
IDS = ["alpha", 7, ("user", 3), "beta", -2]


def _model(name: str, seed: int, dtype=jnp.float32, ids=IDS):
    """A model whose tenants were added, one removed and another added (so slots have a gap)."""
    spec = tiny_spec(name)
    params = {t: spec.init(seed * 100 + i, dtype) for i, t in enumerate(ids)}
    mt = MultiTenantModel(spec.apply_fn, params[ids[0]], capacity=8, buckets=POLICY)
    for t in [*ids, "gone"]:
        mt.add_tenant(t, params.get(t, params[ids[0]]))
    mt.remove_tenant(ids[1])
    mt.add_tenant("late", params[ids[1]])
    params["late"] = params.pop(ids[1])
    return spec, mt, params


def _leaves_equal(a, b) -> bool:
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def _snapshot(directory: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(("name", "dtype"), [("mlp", jnp.float32), ("mlp", jnp.bfloat16), ("resnet18", jnp.float32)])
def test_store_round_trip_keeps_ids_order_slots_values_and_predictions(tmp_path, rng, name, dtype):
    spec, mt, params = _model(name, seed=1, dtype=dtype)
    mt.remove_tenant("gone")
    path = jaxmt.save_store(mt, tmp_path / "ckpt")
    restored = jaxmt.restore_model(path, spec.apply_fn)
    assert restored.tenants == mt.tenants == ["alpha", ("user", 3), "beta", -2, "late"]
    assert [restored.store.slot_of(t) for t in restored.tenants] == [mt.store.slot_of(t) for t in mt.tenants]
    assert restored.store.capacity == mt.store.capacity and restored.buckets == POLICY
    assert jax.tree_util.tree_structure(restored.store.template) == jax.tree_util.tree_structure(mt.store.template)
    for t in mt.tenants:
        assert _leaves_equal(restored.get_params(t), params[t]), t
    ids = [mt.tenants[i] for i in rng.permutation(len(mt.tenants))]  # one row each: one compile per side
    x = spec.random_input(rng, len(ids))
    want = reference_predict(spec.apply_fn, params, ids, x)
    assert rel_error(restored.predict(ids, x), want) < (2e-2 if dtype == jnp.bfloat16 else 1e-5)
    bare = jaxmt.restore_store(path)
    assert bare.tenants == mt.tenants and _leaves_equal(bare.get("beta"), params["beta"])


def test_a_round_trip_keeps_every_field_of_the_bucket_policy(tmp_path):
    spec = tiny_spec("mlp")
    policy = BucketPolicy((1, 3, 6), (1, 2, 5), entry_cost_rows=2.5, step_cost_rows=0.0)
    mt = MultiTenantModel(spec.apply_fn, spec.init(0), capacity=2, buckets=policy)
    mt.add_tenant("a", spec.init(1))
    restored = jaxmt.restore_model(jaxmt.save_store(mt, tmp_path / "ckpt"), spec.apply_fn)
    assert restored.buckets == policy


def test_tenants_saved_in_sparse_slots_are_packed_under_a_smaller_max_capacity(tmp_path, rng):
    """Two tenants saved in slots 0 and 7 of 8 restore into a store of at most 4 slots (their
    saved layout does not fit; they do) with their weights and answers intact."""
    spec = tiny_spec("mlp")
    params = {f"t{i}": spec.init(40 + i) for i in range(8)}
    mt = MultiTenantModel(spec.apply_fn, params["t0"], capacity=8, buckets=POLICY)
    for tenant, p in params.items():
        mt.add_tenant(tenant, p)
    for i in range(1, 7):
        mt.remove_tenant(f"t{i}")
    path = jaxmt.save_store(mt, tmp_path / "ckpt")
    store = jaxmt.restore_store(path, capacity=2, max_capacity=4)
    assert store.tenants == ["t0", "t7"] and store.capacity == 2
    restored = jaxmt.restore_model(path, spec.apply_fn, capacity=2, max_capacity=4)
    ids = ["t7", "t0", "t7"]
    x = spec.random_input(rng, len(ids))
    assert rel_error(restored.predict(ids, x), reference_predict(spec.apply_fn, params, ids, x)) < 1e-5
    assert jaxmt.restore_model(path, spec.apply_fn).store.slot_of("t7") == 7  # no limit: the saved layout


def test_a_max_capacity_below_the_saved_capacity_restores_the_tenants_that_fit(tmp_path, rng):
    """capacity defaults to the saved one, but never above a max_capacity given: three tenants
    of an 8-slot store restore under max_capacity=4."""
    spec = tiny_spec("mlp")
    params = {f"t{i}": spec.init(60 + i) for i in range(3)}
    mt = MultiTenantModel(spec.apply_fn, params["t0"], capacity=8, buckets=POLICY)
    for tenant, p in params.items():
        mt.add_tenant(tenant, p)
    path = jaxmt.save_store(mt, tmp_path / "ckpt")
    store = jaxmt.restore_store(path, max_capacity=4)
    assert store.tenants == ["t0", "t1", "t2"] and store.capacity <= 4
    restored = jaxmt.restore_model(path, spec.apply_fn, max_capacity=4)
    ids = ["t2", "t0", "t1"]
    x = spec.random_input(rng, len(ids))
    assert rel_error(restored.predict(ids, x), reference_predict(spec.apply_fn, params, ids, x)) < 1e-5


def test_a_directory_that_cannot_be_made_is_a_checkpoint_error(tmp_path):
    """save_store documents CheckpointError when writing fails, not a bare OSError."""
    spec, mt, _ = _model("mlp", seed=8)
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(CheckpointError, match="file"):
        jaxmt.save_store(mt, tmp_path / "file" / "ckpt")


def test_a_template_in_numpy_float64_round_trips_as_the_float32_model_jax_keeps(tmp_path, rng):
    """Without 64-bit mode the store holds float32 for NumPy's float64: the checkpoint must
    say what it holds, and restore with or without the original template."""
    def apply_fn(params, x):
        return x @ params["w"] * params["scale"]

    template = {"w": rng.standard_normal((3, 2)), "scale": 1.0}  # float64 and a Python float
    mt = jaxmt.MultiTenantModel(apply_fn, template, capacity=2)
    mt.add_tenant("a", template)
    mt.add_tenant("b", {"w": rng.standard_normal((3, 2)), "scale": 2.0})
    x = rng.standard_normal((4, 3)).astype(np.float32)
    want = mt.predict(["a", "b", "b", "a"], x)
    jaxmt.save_store(mt, tmp_path / "ckpt")
    for example in (None, template):
        restored = jaxmt.restore_model(tmp_path / "ckpt", apply_fn, example_params=example)
        np.testing.assert_array_equal(restored.predict(["a", "b", "b", "a"], x), want)
        assert restored.store.leaf_specs == mt.store.leaf_specs


def test_saved_structure_of_lists_tuples_and_none_is_restored(tmp_path, rng):
    def apply_fn(p, x):
        return (x @ p["layers"][0]["w"]) @ p["layers"][1]["w"] * p["pair"][0] + p["pair"][1]

    def params_of(seed):
        r = np.random.default_rng(seed)
        return {"layers": [{"w": r.normal(size=(3, 4)).astype(np.float32)}, {"w": r.normal(size=(4, 2)).astype(np.float32)}],
                "pair": (np.float32(r.normal()), r.normal(size=(2,)).astype(np.float32)), "unused": None,
                "by_index": {5: np.zeros((0,), np.float32), 2: np.array([seed], np.int32)}}

    mt = MultiTenantModel(apply_fn, params_of(0), capacity=4, buckets=POLICY)
    params = {t: params_of(i + 1) for i, t in enumerate(["a", "b", "c"])}
    for t, p in params.items():
        mt.add_tenant(t, p)
    jaxmt.save_store(mt, tmp_path / "ckpt")
    store = jaxmt.restore_store(tmp_path / "ckpt")
    assert jax.tree_util.tree_structure(store.template) == jax.tree_util.tree_structure(params_of(0))
    assert store.leaf_specs == mt.store.leaf_specs
    for t, p in params.items():
        assert _leaves_equal(store.get(t), p)
    restored = jaxmt.restore_model(tmp_path / "ckpt", apply_fn)
    x = rng.normal(size=(5, 3)).astype(np.float32)
    ids = ["c", "a", "b", "c", "c"]
    assert rel_error(restored.predict(ids, x), reference_predict(apply_fn, params, ids, x)) < 1e-5


def test_empty_store_round_trips(tmp_path):
    spec = tiny_spec("mlp")
    mt = MultiTenantModel(spec.apply_fn, spec.init(0), capacity=4)
    jaxmt.save_store(mt, tmp_path / "ckpt")
    restored = jaxmt.restore_model(tmp_path / "ckpt", spec.apply_fn)
    assert restored.tenants == [] and restored.store.leaf_specs == mt.store.leaf_specs and restored.store.capacity == 4


@pytest.mark.parametrize("bad_id", [frozenset({1}), float("nan"), object(), (1, frozenset())])
def test_ids_that_json_cannot_hold_are_rejected_before_writing(tmp_path, bad_id):
    spec, mt, _ = _model("mlp", seed=2)
    jaxmt.save_store(mt, tmp_path / "ckpt")
    before = _snapshot(tmp_path / "ckpt")
    mt.add_tenant(bad_id, spec.init(9))
    with pytest.raises(CheckpointError, match="cannot be saved"):
        jaxmt.save_store(mt, tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="cannot be saved"):
        jaxmt.save_store(mt, tmp_path / "fresh")
    assert _snapshot(tmp_path / "ckpt") == before and not (tmp_path / "fresh").exists()


def _fail_before_writing(self, directory, *args, **kwargs):
    raise OSError("disk full")


def _fail_after_writing(self, directory, *args, **kwargs):
    _REAL_SAVE(self, directory, *args, **kwargs)
    raise OSError("disk full after the data")


def _fail_half_written(self, directory, *args, **kwargs):
    pathlib.Path(directory).mkdir(parents=True)
    (pathlib.Path(directory) / "_METADATA").write_text("{\"tree_metadata\": ")
    raise KeyboardInterrupt


_REAL_SAVE = ocp.PyTreeCheckpointer.save


@pytest.mark.parametrize("failure", [_fail_before_writing, _fail_after_writing, _fail_half_written])
def test_an_interrupted_save_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch, failure):
    spec, mt, params = _model("mlp", seed=3)
    jaxmt.save_store(mt, tmp_path / "ckpt")
    before = _snapshot(tmp_path / "ckpt")
    old_tenants = mt.tenants
    mt.remove_tenant("alpha")
    mt.update_tenant("beta", spec.init(77))
    monkeypatch.setattr(ocp.PyTreeCheckpointer, "save", failure)
    expected = KeyboardInterrupt if failure is _fail_half_written else CheckpointError
    with pytest.raises(expected):
        jaxmt.save_store(mt, tmp_path / "ckpt")
    assert _snapshot(tmp_path / "ckpt") == before  # no partial data left behind, nothing overwritten
    restored = jaxmt.restore_model(tmp_path / "ckpt", spec.apply_fn)
    assert restored.tenants == old_tenants and _leaves_equal(restored.get_params("beta"), params["beta"])
    monkeypatch.setattr(ocp.PyTreeCheckpointer, "save", _REAL_SAVE)
    jaxmt.save_store(mt, tmp_path / "ckpt")  # the next save succeeds and replaces it
    assert jaxmt.restore_store(tmp_path / "ckpt").tenants == mt.tenants
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir())[1:] == [STORE_FILE]


def test_a_failed_commit_removes_the_new_data_and_keeps_the_old(tmp_path, monkeypatch):
    spec, mt, params = _model("mlp", seed=4)
    jaxmt.save_store(mt, tmp_path / "ckpt")
    before = _snapshot(tmp_path / "ckpt")
    mt.remove_tenant("beta")

    def fail(path, value):
        raise OSError("rename failed")

    monkeypatch.setattr(jaxmt.checkpoint, "_write_json_atomic", fail)
    with pytest.raises(CheckpointError, match="previous one is intact"):
        jaxmt.save_store(mt, tmp_path / "ckpt")
    assert _snapshot(tmp_path / "ckpt") == before


def _remove(pattern):
    def damage(directory: pathlib.Path) -> None:
        matches = list(directory.glob(pattern))
        assert matches, pattern
        for p in matches:
            if p.is_dir():
                import shutil

                shutil.rmtree(p)
            else:
                p.unlink()

    damage.__name__ = f"remove {pattern}"
    return damage


def _truncate_largest(directory: pathlib.Path) -> None:
    biggest = max((p for p in directory.rglob("*") if p.is_file() and p.parent.name == "d"), key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 3])


def _edit_json(change):
    def damage(directory: pathlib.Path) -> None:
        metadata = json.loads((directory / STORE_FILE).read_text())
        change(metadata)
        (directory / STORE_FILE).write_text(json.dumps(metadata))

    return damage


def _set_leaf(field, value):
    def change(metadata):
        metadata["leaves"][1][field] = value

    return change


DAMAGE = {
    "no store file": _remove(STORE_FILE),
    "no arrays dir": _remove("arrays-*"),
    "no orbax metadata": _remove("arrays-*/_METADATA"),
    "no ocdbt manifest": _remove("arrays-*/manifest.ocdbt"),
    "no data files": _remove("arrays-*/d/*"),
    "truncated data": _truncate_largest,
    "store file not json": lambda d: (d / STORE_FILE).write_text("{\"format\": \"jaxmt.st"),
    "wrong shape on record": _edit_json(_set_leaf("shape", [16, 33])),
    "wrong dtype on record": _edit_json(_set_leaf("dtype", "float16")),
    "missing field": _edit_json(lambda m: m.pop("slots")),
    "future version": _edit_json(lambda m: m.update(version=99)),
    "slot beyond capacity": _edit_json(lambda m: m.update(slots=[0, 1, 2, 3, 4, 99])),
    "structure names a leaf not listed": _edit_json(lambda m: m.update(structure={"leaf": 99})),
    "structure names one leaf twice": _edit_json(lambda m: m.update(structure={"dict": [["a", {"leaf": 0}], ["b", {"leaf": 0}]]})),
    "bucket ladder not a ladder": _edit_json(lambda m: m["model"]["buckets"].update(tenant_buckets=[0])),
}


# Orbax's reader threads may log an unraisable "event loop is closed" after a failed read.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", list(DAMAGE), ids=list(DAMAGE))
def test_a_truncated_or_tampered_checkpoint_raises_checkpoint_error(tmp_path, damage):
    spec, mt, _ = _model("mlp", seed=5)
    jaxmt.save_store(mt, tmp_path / "ckpt")
    DAMAGE[damage](tmp_path / "ckpt")
    with pytest.raises(CheckpointError):
        jaxmt.restore_model(tmp_path / "ckpt", spec.apply_fn)
    with pytest.raises(CheckpointError):
        jaxmt.restore_store(tmp_path / "ckpt")


@pytest.mark.parametrize(("other", "match"), [
    (lambda: jax.eval_shape(lambda: models.make("resnet18").init(0)), "leaf 0"),
    (lambda: jax.eval_shape(lambda: tiny_spec("mlp").init(0, jnp.bfloat16)), r"bfloat16\[32\]"),
    (lambda: {"params": {"Dense_0": tiny_spec("mlp").init(0)["params"]["Dense_0"]}}, "leaves"),
])
def test_a_checkpoint_of_another_architecture_is_rejected(tmp_path, other, match):
    spec, mt, _ = _model("mlp", seed=6)
    jaxmt.save_store(mt, tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match=match):
        jaxmt.restore_model(tmp_path / "ckpt", spec.apply_fn, other())
    restored = jaxmt.restore_model(tmp_path / "ckpt", spec.apply_fn, jax.eval_shape(lambda: spec.init(0)))
    assert restored.tenants == mt.tenants


def test_refuses_to_write_into_an_unrelated_directory(tmp_path):
    spec, mt, _ = _model("mlp", seed=7)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="notes.txt"):
        jaxmt.save_store(mt, tmp_path / "mine")
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


# ---------------------------------------------------------------------------- one tenant
def _orbax_pytree(path, tree):
    ocp.PyTreeCheckpointer().save(path, tree)


def _orbax_standard(path, tree):
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, tree)
    checkpointer.wait_until_finished()


def _flax_train_state(path, tree):
    from flax.training import checkpoints

    state = {**tree, "opt_state": {"mu": jax.tree_util.tree_map(np.ones_like, tree["params"])}, "step": 12}
    checkpoints.save_checkpoint(path, state, step=12)


def _flax_msgpack(path, tree):
    from flax import serialization

    path.mkdir()
    (path / "checkpoint_3").write_bytes(serialization.to_bytes(tree))


def _bare_params(path, tree):
    ocp.PyTreeCheckpointer().save(path, tree["params"])


WRITERS = [_orbax_pytree, _orbax_standard, _flax_train_state, _flax_msgpack, _bare_params]


# Bare params only for the mlp: a resnet's template also holds batch_stats.
@pytest.mark.parametrize(("name", "writer"), [(n, w) for n in ("mlp", "resnet18") for w in WRITERS if (n, w) != ("resnet18", _bare_params)],
                         ids=lambda v: getattr(v, "__name__", v))
def test_add_tenant_from_flax_and_orbax_checkpoints(tmp_path, rng, name, writer):
    spec, mt, params = _model(name, seed=8)
    new = spec.init(4242)
    writer(tmp_path / "one", jax.tree_util.tree_map(np.asarray, new))
    jaxmt.add_tenant_from_checkpoint(mt, "new", tmp_path / "one")
    assert mt.tenants[-1] == "new" and _leaves_equal(mt.get_params("new"), new)
    params["new"] = new
    ids = ["new", "alpha", "late", "beta"]
    x = spec.random_input(rng, 4)
    assert rel_error(mt.predict(ids, x), reference_predict(spec.apply_fn, params, ids, x)) < 1e-5


@pytest.mark.parametrize("writer", WRITERS, ids=lambda w: w.__name__)
def test_add_tenant_from_a_checkpoint_given_by_a_relative_path(tmp_path, monkeypatch, writer):
    spec, mt, _ = _model("mlp", seed=11)
    new = spec.init(4243)
    writer(tmp_path / "one", jax.tree_util.tree_map(np.asarray, new))
    monkeypatch.chdir(tmp_path)
    jaxmt.add_tenant_from_checkpoint(mt, "new", "one")  # Orbax (under Flax too) reads absolute paths only
    assert _leaves_equal(mt.get_params("new"), new)


def _without_first_leaf(tree):
    tree = jax.tree_util.tree_map(np.asarray, tree)
    del tree["params"]["Dense_0"]["bias"]
    return tree


def _with_extra_leaf(tree):
    tree = jax.tree_util.tree_map(np.asarray, tree)
    tree["params"]["Dense_9"] = {"kernel": np.ones((2, 2), np.float32)}
    return tree


BAD_SINGLE = {
    "wrong shape": (lambda: models.make("resnet18").init(1), CheckpointError, "does not match|missing leaf"),
    "wrong dtype": (lambda: tiny_spec("mlp").init(1, jnp.bfloat16), CheckpointError, r"bfloat16\[32\] in the checkpoint, expected float32\[32\]"),
    "missing leaf": (lambda: _without_first_leaf(tiny_spec("mlp").init(1)), CheckpointError, "missing leaf params/Dense_0/bias"),
    "extra leaf": (lambda: _with_extra_leaf(tiny_spec("mlp").init(1)), CheckpointError, "unexpected leaf params/Dense_9/kernel"),
    "non-finite": (lambda: jax.tree_util.tree_map(lambda a: np.full(a.shape, np.nan, a.dtype), tiny_spec("mlp").init(1)), NonFiniteParamsError, "NaN"),
}


@pytest.mark.parametrize("case", list(BAD_SINGLE), ids=list(BAD_SINGLE))
def test_a_mismatched_single_checkpoint_changes_nothing(tmp_path, case):
    spec, mt, params = _model("mlp", seed=9)
    make, error, match = BAD_SINGLE[case]
    _orbax_pytree(tmp_path / "one", jax.tree_util.tree_map(np.asarray, make()))
    tenants, version = mt.tenants, mt.store.version
    with pytest.raises(error, match=match):
        jaxmt.add_tenant_from_checkpoint(mt, "new", tmp_path / "one")
    assert mt.tenants == tenants and mt.store.version == version and "new" not in mt


def test_single_checkpoint_location_errors(tmp_path):
    spec, mt, _ = _model("mlp", seed=10)
    tenants = mt.tenants
    with pytest.raises(CheckpointError, match="no checkpoint"):
        jaxmt.add_tenant_from_checkpoint(mt, "new", tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        jaxmt.add_tenant_from_checkpoint(mt, "new", tmp_path / "empty")
    jaxmt.save_store(mt, tmp_path / "store")
    with pytest.raises(CheckpointError, match="restore_store"):
        jaxmt.add_tenant_from_checkpoint(mt, "new", tmp_path / "store")
    _orbax_pytree(tmp_path / "one", jax.tree_util.tree_map(np.asarray, spec.init(3)))
    os.remove(tmp_path / "one" / "_METADATA")
    with pytest.raises(CheckpointError):
        jaxmt.add_tenant_from_checkpoint(mt, "new", tmp_path / "one")
    with pytest.raises(DuplicateTenantError):
        jaxmt.add_tenant_from_checkpoint(mt, "alpha", tmp_path / "absent")  # checked before reading
    assert mt.tenants == tenants


def test_store_add_stacked_at_slots_rejects_taken_or_out_of_range_slots():
    spec, mt, params = _model("mlp", seed=11)
    stacked = jax.tree_util.tree_map(lambda a: np.stack([a, a]), spec.init(5))
    free = sorted(set(range(mt.store.capacity)) - {mt.store.slot_of(t) for t in mt.tenants})
    tenants, version = mt.tenants, mt.store.version
    for at_slots in ([mt.store.slot_of("alpha"), free[0]], [free[0], mt.store.capacity], [free[0], free[0]], [free[0]]):
        with pytest.raises(ValueError, match="slot"):
            mt.store.add_stacked(["x", "y"], stacked, at_slots=at_slots)
        assert mt.tenants == tenants and mt.store.version == version
    mt.store.add_stacked(["x", "y"], stacked, at_slots=free[:2][::-1])
    assert [mt.store.slot_of("x"), mt.store.slot_of("y")] == free[:2][::-1]


@pytest.mark.parametrize("interruption", [KeyboardInterrupt, OSError], ids=["ctrl-c", "os-error"])
def test_a_save_interrupted_after_its_commit_is_the_checkpoint(tmp_path, monkeypatch, interruption):
    """Once the store file is renamed into place the new save is the checkpoint: an
    interruption while the directory is synced after it must not delete its arrays."""
    import jaxmt.checkpoint as checkpoint

    def apply_fn(p, x):
        return x @ p["w"]

    mt = MultiTenantModel(apply_fn, {"w": np.ones((6, 3), np.float32)}, capacity=4)
    for i, tenant in enumerate("ab"):
        mt.add_tenant(tenant, {"w": np.full((6, 3), i + 1, np.float32)})
    jaxmt.save_store(mt, tmp_path / "c")
    mt.add_tenant("c", {"w": np.full((6, 3), 9, np.float32)})

    def interrupted(directory):
        raise interruption("interrupted while syncing the directory")

    with monkeypatch.context() as patch:
        patch.setattr(checkpoint, "_fsync_dir", interrupted)
        with pytest.raises(interruption):
            jaxmt.save_store(mt, tmp_path / "c")
    restored = jaxmt.restore_model(tmp_path / "c", apply_fn)
    assert restored.tenants == ["a", "b", "c"]
    np.testing.assert_array_equal(restored.get_params("c")["w"], np.full((6, 3), 9, np.float32))


def test_a_checkpoint_integer_leaf_too_wide_for_the_template_is_refused_not_wrapped(tmp_path):
    """An int64 leaf whose values do not fit the template's int32 is refused (as ``store.add``
    refuses it), not wrapped into other values by the conversion; the store is unchanged."""
    rng = np.random.default_rng(12)
    template = {"w": rng.normal(size=(4, 3)).astype(np.float32), "ids": np.zeros((3,), np.int32)}
    store = jaxmt.TenantStore(template, capacity=2)
    ids = rng.integers(0, 100, size=3).astype(np.int64) + np.array([2**40, 0, 0])
    _bare_params(tmp_path / "one", {"params": {"w": template["w"], "ids": ids}})
    with pytest.raises(CheckpointError, match=r"leaf \['ids'\] holds integers .*int32\[3\]"):
        jaxmt.add_tenant_from_checkpoint(store, "new", tmp_path / "one")
    assert "new" not in store and store.version == 0
