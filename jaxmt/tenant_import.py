"""Importing one tenant from a Flax or Orbax checkpoint of a single model's params.

The checkpoint may be an Orbax PyTree checkpoint, a ``flax.training.checkpoints`` directory
or a msgpack file, holding the params, a variables dict or a train state; its leaves are
matched to the model's template by path (names, with list indices as '0'), so the tenant
arrives in the template's own structure or the model is left unchanged.
(Whole-store checkpoints of many tenants are ``jaxmt.checkpoint``.)
"""

from __future__ import annotations

import pathlib
from collections.abc import Hashable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmt.checkpoint import STORE_FILE, StrPath, _key_name, _named_leaves, _orbax_restore_numpy, _spec_text, _store_of
from jaxmt.errors import CheckpointError, DuplicateTenantError
from jaxmt.model import MultiTenantModel
from jaxmt.store import TenantStore
from jaxmt.validation import check_integers_fit, leaf_dtype

PyTree = Any


def _read_params_tree(path: pathlib.Path) -> PyTree:
    """The pytree of an Orbax PyTree checkpoint, a flax.training.checkpoints dir, or a msgpack file."""
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    if path.is_dir() and (path / STORE_FILE).exists():
        raise CheckpointError(f"{path} is a jaxmt store checkpoint of many tenants; use restore_store or restore_model")
    is_orbax = path.is_dir() and any((path / name).exists() for name in ("_METADATA", "_CHECKPOINT_METADATA", "manifest.ocdbt", "commit_success.txt"))
    try:
        if is_orbax:
            return _orbax_restore_numpy(path)
        from flax.training import checkpoints

        if path.is_dir() and checkpoints.latest_checkpoint(path) is None:
            raise CheckpointError(
                f"{path} holds no checkpoint: expected an Orbax PyTree checkpoint (with _METADATA), a "
                "flax.training.checkpoints directory (checkpoint_<step>) or a msgpack file"
            )
        restored = checkpoints.restore_checkpoint(path.absolute(), target=None)  # its Orbax reader refuses relative paths
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{path}: reading the checkpoint failed (truncated or corrupt?): {exc}") from exc
    if restored is None or (isinstance(restored, Mapping) and not restored):
        raise CheckpointError(f"{path}: the checkpoint is empty")
    return restored


def _views(found: dict[tuple[str, ...], Any], top_template: set[str]) -> list[tuple[str, dict]]:
    """Ways to read a checkpoint as the template: as saved, its 'params' entry, or as {'params': it}."""
    views = [("as saved", found)]
    top_found = {p[0] for p in found if p}
    if "params" in top_found and "params" not in top_template:
        views.append(("its 'params' entry", {p[1:]: v for p, v in found.items() if p[:1] == ("params",)}))
    if top_template == {"params"} and "params" not in top_found:
        views.append(("as the 'params' collection", {("params", *p): v for p, v in found.items()}))
    return views


def _kept_dtype(leaf: Any) -> np.dtype:
    """The dtype JAX would keep the leaf in, as the store judges it: Orbax (and so Flax) saves a
    NumPy scalar as a Python float, which reads back as float64 but is a float32 leaf."""
    try:
        return leaf_dtype(leaf)
    except (TypeError, ValueError, OverflowError):  # not array-like: reported as what NumPy makes of it
        return np.asarray(leaf).dtype


def _match(path: pathlib.Path, store: TenantStore, restored: PyTree) -> PyTree:
    """The checkpoint's leaves in the template's structure; CheckpointError naming the first difference."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(store.template)
    want = [tuple(_key_name(k) for k in p) for p, _ in flat]
    top_template = {p[0] for p in want if p}
    wanted = set(want)
    problems = []
    for how, view in _views(_named_leaves(restored), top_template):
        missing = [p for p in want if p not in view]
        extra = [p for p in view if p not in wanted and p[:1] and p[0] in top_template]
        if missing or extra:
            first = f"missing leaf {'/'.join(missing[0])}" if missing else f"unexpected leaf {'/'.join(extra[0])}"
            problems.append(f"{how}: {first} ({len(missing)} missing, {len(extra)} unexpected)")
            continue
        leaves = []
        for name, spec, leaf_path in zip(want, store.leaf_specs, store.leaf_paths):
            shape, dtype = np.shape(view[name]), _kept_dtype(view[name])
            if shape != tuple(spec.shape) or dtype != jnp.dtype(spec.dtype):
                raise CheckpointError(
                    f"{path}: leaf {leaf_path} is {_spec_text(shape, dtype)} in the checkpoint, "
                    f"expected {_spec_text(spec.shape, spec.dtype)}"
                )
            try:  # converted below: a wider integer leaf would wrap silently where its values do not fit
                check_integers_fit(view[name], dtype)
            except OverflowError as exc:
                raise CheckpointError(
                    f"{path}: leaf {leaf_path} holds integers that the template's {_spec_text(spec.shape, spec.dtype)} "
                    f"cannot ({exc})"
                ) from None
            leaves.append(np.asarray(view[name], dtype))
        return jax.tree_util.tree_unflatten(treedef, leaves)
    raise CheckpointError(f"{path}: the checkpoint's structure does not match the model's params; " + "; ".join(problems))


def add_tenant_from_checkpoint(model: MultiTenantModel | TenantStore, tenant_id: Hashable, directory: StrPath) -> None:
    """Adds one tenant whose params are in a Flax or Orbax checkpoint.

    ``directory`` is an Orbax PyTree checkpoint (``PyTreeCheckpointer``/``StandardCheckpointer``)
    of a params pytree or of a Flax variables dict or train state, a
    ``flax.training.checkpoints`` directory (its latest ``checkpoint_<step>``) or a msgpack
    file. The checkpoint may hold exactly the model's template, a dict whose ``params`` entry
    is the template (a template without a top-level ``params`` entry), or the bare params of
    a template ``{"params": ...}``; entries the template lacks at its top level
    (``opt_state``, ``step``) are ignored.

    Raises:
      DuplicateTenantError: the id is already resident (nothing is read).
      CheckpointError: missing, truncated, or a structure/shape/dtype that differs from the
        template (naming the leaf); the model is unchanged.
      NonFiniteParamsError: the checkpoint holds NaN or Inf.
    """
    store = _store_of(model)
    if tenant_id in store:
        raise DuplicateTenantError(f"tenant {tenant_id!r} is already resident; use update_tenant to replace its weights")
    path = pathlib.Path(directory)
    params = _match(path, store, _read_params_tree(path))
    store.add(tenant_id, params)
