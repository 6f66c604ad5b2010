"""Checkpoints (Orbax) of a whole tenant store; one tenant from Flax/Orbax is ``jaxmt.tenant_import``.

A store checkpoint is a directory holding ``jaxmt_store.json`` (tenant ids in insertion
order, their slots, the capacity, the template's structure, leaf shapes and dtypes) and one
Orbax PyTree checkpoint ``arrays-<id>/`` with one array per template leaf, stacked over the
resident tenants only ([tenants, *leaf_shape]; free slots are not written). A save writes a
new ``arrays-<id>/`` beside the old one (Orbax writes it to a temporary name and renames it),
then replaces ``jaxmt_store.json`` with ``os.replace``: that rename is the commit, so a save
interrupted at any point leaves the previous checkpoint loadable. One writer at a time.

Example:
  >>> import tempfile, jax, numpy as np, jaxmt
  >>> def apply_fn(params, x):
  ...     return x @ params["w"]
  >>> mt = jaxmt.MultiTenantModel(apply_fn, {"w": np.ones((3, 2), np.float32)})
  >>> mt.add_tenant("a", {"w": np.full((3, 2), 2.0, np.float32)})
  >>> path = jaxmt.save_store(mt, tempfile.mkdtemp() + "/ckpt")
  >>> restored = jaxmt.restore_model(path, apply_fn)
  >>> restored.tenants, float(restored.get_params("a")["w"][0, 0])
  (['a'], 2.0)
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import shutil
import uuid
from collections.abc import Callable, Hashable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxmt.buckets import BucketPolicy
from jaxmt.errors import CheckpointError
from jaxmt.model import MultiTenantModel
from jaxmt.sharding import ShardedMultiTenantModel
from jaxmt.store import TenantStore
from jaxmt.validation import leaf_dtype

PyTree = Any
StrPath = str | os.PathLike

STORE_FILE = "jaxmt_store.json"
FORMAT = "jaxmt.store"
FORMAT_VERSION = 1
_ARRAYS_PREFIX = "arrays-"
_TMP_MARK = ".tmp-"


# ------------------------------------------------------------------------ ids, structure
def _encode_id(tenant_id: Hashable) -> Any:
    """A JSON value that decodes to an id equal to ``tenant_id`` (tuples become {"tuple": [...]})."""
    if isinstance(tenant_id, np.generic):
        tenant_id = tenant_id.item()
    if tenant_id is None or isinstance(tenant_id, (str, int)):
        return tenant_id
    if isinstance(tenant_id, float) and math.isfinite(tenant_id):
        return tenant_id
    if type(tenant_id) is tuple:
        return {"tuple": [_encode_id(part) for part in tenant_id]}
    raise CheckpointError(
        f"tenant id {tenant_id!r} ({type(tenant_id).__name__}) cannot be saved: ids must be str, int, "
        "finite float, bool, None or tuples of those"
    )


def _decode_id(value: Any) -> Hashable:
    if isinstance(value, dict):
        return tuple(_decode_id(part) for part in value["tuple"])
    if isinstance(value, list):
        raise TypeError(f"a tenant id cannot be a list: {value!r}")
    return value


def _encode_structure(node: Any, counter: list[int], path: str = "") -> Any:
    """JSON of the template's containers (dict, list, tuple, None) with leaf indices."""
    if node is None:
        return {"none": None}
    if isinstance(node, Mapping):
        items = []
        for key in sorted(node):  # jax flattens dicts in sorted key order
            if not isinstance(key, (str, int)) or isinstance(key, bool):
                raise CheckpointError(f"template key {key!r} at {path or 'the root'} cannot be saved: keys must be str or int")
            items.append([key, _encode_structure(node[key], counter, f"{path}[{key!r}]")])
        return {"dict": items}
    if type(node) in (list, tuple):
        kind = type(node).__name__
        return {kind: [_encode_structure(child, counter, f"{path}[{i}]") for i, child in enumerate(node)]}
    if not jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(node)):
        raise CheckpointError(
            f"template node {type(node).__name__} at {path or 'the root'} cannot be saved: "
            "use dicts, lists and tuples of arrays (e.g. flax.serialization.to_state_dict)"
        )
    counter[0] += 1
    return {"leaf": counter[0] - 1}


def _decode_structure(node: Any, leaves: list[Any]) -> Any:
    (kind, value), = node.items()
    if kind == "none":
        return None
    if kind == "leaf":
        return leaves[value]
    if kind == "dict":
        return {key: _decode_structure(child, leaves) for key, child in value}
    children = [_decode_structure(child, leaves) for child in value]
    return children if kind == "list" else tuple(children)


def _key_name(key: Any) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _named_leaves(tree: PyTree) -> dict[tuple[str, ...], Any]:
    """Leaves by path of names ('0' for list index 0), so lists and {"0": ...} dicts agree."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {tuple(_key_name(k) for k in path): leaf for path, leaf in flat}


def _spec_text(shape: tuple[int, ...], dtype: Any) -> str:
    return f"{jnp.dtype(dtype).name}{list(shape)}"


# ------------------------------------------------------------------------ files
def _write_json_atomic(path: pathlib.Path, value: Any) -> None:
    tmp = path.with_name(f".{path.name}{_TMP_MARK}{uuid.uuid4().hex[:12]}")
    try:
        with open(tmp, "w") as f:
            json.dump(value, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fsync_dir(directory: pathlib.Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not every platform opens directories
        return
    try:
        os.fsync(fd)
    except OSError:  # nor fsyncs them (EINVAL on some filesystems): the rename stands, only less durably
        pass
    finally:
        os.close(fd)


def _ours(name: str) -> bool:
    return name == STORE_FILE or name.startswith(_ARRAYS_PREFIX) or name.startswith(f".{STORE_FILE}{_TMP_MARK}")


def _prepare_directory(directory: pathlib.Path) -> None:
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"{directory} is a file, not a checkpoint directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        names = [p.name for p in directory.iterdir()]
    except OSError as exc:
        raise CheckpointError(f"cannot write a store checkpoint into {directory}: {exc}") from exc
    foreign = sorted(name for name in names if not _ours(name))
    if foreign:
        raise CheckpointError(
            f"refusing to write a store checkpoint into {directory}: it holds files that are not "
            f"part of one ({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''})"
        )


def _remove_ours(directory: pathlib.Path, keep: str | None) -> None:
    """Removes data dirs and temporaries other than ``keep`` (old saves, interrupted saves)."""
    for entry in directory.iterdir():
        if entry.name in (STORE_FILE, keep) or not _ours(entry.name):
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _orbax():
    import orbax.checkpoint as ocp

    return ocp


def _orbax_metadata(path: pathlib.Path) -> PyTree:
    ocp = _orbax()
    metadata = ocp.PyTreeCheckpointer().metadata(path.absolute())  # Orbax needs absolute paths
    metadata = getattr(metadata, "item_metadata", metadata)  # StepMetadata in orbax >= 0.11
    metadata = getattr(metadata, "tree", metadata)
    if metadata is None:
        raise CheckpointError(f"{path}: Orbax finds no tree metadata (missing _METADATA or manifest; truncated checkpoint?)")
    return metadata


def _orbax_restore_numpy(path: pathlib.Path) -> PyTree:
    """Restores an Orbax PyTree checkpoint as host NumPy arrays, whatever device saved it."""
    ocp = _orbax()
    metadata = _orbax_metadata(path)
    restore_args = jax.tree_util.tree_map(
        lambda m: ocp.RestoreArgs(restore_type=np.ndarray) if hasattr(m, "shape") and hasattr(m, "dtype") else ocp.RestoreArgs(),
        metadata,
    )
    return ocp.PyTreeCheckpointer().restore(path.absolute(), args=ocp.args.PyTreeRestore(restore_args=restore_args))


# ------------------------------------------------------------------------ store checkpoints
def _store_of(model_or_store: Any) -> TenantStore:
    store = getattr(model_or_store, "store", model_or_store)
    if not isinstance(store, TenantStore):
        raise TypeError(f"expected a MultiTenantModel or TenantStore, got {type(model_or_store).__name__}")
    return store


def save_store(model_or_store: MultiTenantModel | TenantStore, directory: StrPath) -> pathlib.Path:
    """Writes every resident tenant of a model's (or a bare) store to ``directory``, atomically.

    Saves ids in insertion order, their slots, the capacity, the template's structure, leaf
    shapes and dtypes; for a model also its input row shape/dtype and bucket ladders. Only
    resident tenants' slots are written. Replaces an earlier checkpoint in ``directory``
    only once the new one is complete.

    Returns:
      The checkpoint directory.

    Raises:
      CheckpointError: an id is not JSON-able, the template has containers other than
        dicts/lists/tuples, ``directory`` holds unrelated files, or writing failed (the
        previous checkpoint there is intact).
    """
    store = _store_of(model_or_store)
    directory = pathlib.Path(directory)
    counter = [0]
    structure = _encode_structure(store.template, counter)
    rebuilt = _decode_structure(structure, list(range(counter[0])))
    if tuple(jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(rebuilt)[0]) != store.leaf_paths:
        raise CheckpointError("the template's leaf order cannot be reproduced from dicts, lists and tuples; save a plain-dict template")
    with store.lock:  # one consistent snapshot of ids, slots and values
        tenant_ids = store.tenants
        encoded_ids = [_encode_id(t) for t in tenant_ids]
        slots = [store.slot_of(t) for t in tenant_ids]
        capacity = store.capacity
        index = jnp.asarray(slots, jnp.int32)
        # Leaf by leaf to the host: the device holds at most one extra gathered leaf.
        arrays = {f"leaf_{i:05d}": np.asarray(jnp.take(leaf, index, axis=0)) for i, leaf in enumerate(store.stacked_leaves) if slots and math.prod(leaf.shape[1:])}
    _prepare_directory(directory)
    arrays_name = f"{_ARRAYS_PREFIX}{uuid.uuid4().hex[:12]}" if arrays else None
    metadata = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "tenants": encoded_ids,
        "slots": slots,
        "capacity": capacity,
        "structure": structure,
        "leaves": [{"path": p, "shape": list(s.shape), "dtype": jnp.dtype(s.dtype).name} for p, s in zip(store.leaf_paths, store.leaf_specs)],
        "model": _model_metadata(model_or_store),
        "arrays": arrays_name,
    }
    try:
        if arrays_name is not None:
            _orbax().PyTreeCheckpointer().save((directory / arrays_name).absolute(), arrays)
        _write_json_atomic(directory / STORE_FILE, metadata)
    except BaseException as exc:
        if arrays_name is not None:
            for entry in directory.glob(f"{arrays_name}*"):
                shutil.rmtree(entry, ignore_errors=True)
        if isinstance(exc, Exception) and not isinstance(exc, CheckpointError):
            raise CheckpointError(f"writing the store checkpoint {directory} failed (the previous one is intact): {exc}") from exc
        raise
    # Committed: from here on the new arrays are the checkpoint, whatever happens next.
    _fsync_dir(directory)
    _remove_ours(directory, keep=arrays_name)
    return directory


def _model_metadata(model_or_store: Any) -> dict[str, Any] | None:
    if not isinstance(model_or_store, MultiTenantModel):
        return None
    buckets = model_or_store.buckets
    row_shape, row_dtype = model_or_store.row_shape, model_or_store.row_dtype
    return {
        "row_shape": None if row_shape is None else list(row_shape),
        "row_dtype": None if row_dtype is None else jnp.dtype(row_dtype).name,
        "buckets": {"tenant_buckets": list(buckets.tenant_buckets), "row_buckets": list(buckets.row_buckets), "entry_cost_rows": buckets.entry_cost_rows,
                    "step_cost_rows": buckets.step_cost_rows},
    }


def _read_store_metadata(directory: StrPath) -> dict[str, Any]:
    """The JSON metadata of a store checkpoint (ids still encoded); raises CheckpointError."""
    directory = pathlib.Path(directory)
    path = directory / STORE_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a jaxmt store checkpoint (no {STORE_FILE}; missing, or its first save did not finish)")
    try:
        metadata = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is unreadable or not JSON: {exc}") from exc
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a jaxmt store checkpoint (format {metadata.get('format') if isinstance(metadata, dict) else None!r})")
    if metadata.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has format version {metadata.get('version')!r}; this jaxmt reads version {FORMAT_VERSION}")
    return metadata


def _load_store_checkpoint(directory: StrPath, example_params: PyTree | None) -> dict[str, Any]:
    """Reads and checks everything; returns template, ids, slots, capacity, stacked params,
    model metadata and the saved bucket policy (None if none was saved)."""
    directory = pathlib.Path(directory)
    metadata = _read_store_metadata(directory)
    try:
        tenant_ids = [_decode_id(v) for v in metadata["tenants"]]
        slots = [int(s) for s in metadata["slots"]]
        capacity = int(metadata["capacity"])
        specs = [(str(leaf["path"]), tuple(int(d) for d in leaf["shape"]), jnp.dtype(leaf["dtype"])) for leaf in metadata["leaves"]]
        template = _decode_structure(metadata["structure"], [np.zeros(shape, dtype) for _, shape, dtype in specs])
        saved_buckets = (metadata.get("model") or {}).get("buckets")
        buckets = None if not saved_buckets else BucketPolicy(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in saved_buckets.items()})
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise CheckpointError(f"{directory / STORE_FILE} is malformed: {type(exc).__name__}: {exc}") from exc
    n = len(tenant_ids)
    if len(slots) != n or len(set(slots)) != n or len(set(tenant_ids)) != n or any(not 0 <= s < capacity for s in slots):
        raise CheckpointError(f"{directory / STORE_FILE} is malformed: {n} tenant ids, slots {slots}, capacity {capacity}")
    if example_params is not None:
        template = _check_template(directory, specs, example_params)
    expected = {f"leaf_{i:05d}": (path, (n, *shape), dtype) for i, (path, shape, dtype) in enumerate(specs) if n and math.prod(shape)}
    found = _read_arrays(directory, metadata.get("arrays"), expected)
    stacked_leaves = [found.get(f"leaf_{i:05d}", np.zeros((n, *shape), dtype)) for i, (_, shape, dtype) in enumerate(specs)]
    treedef = jax.tree_util.tree_structure(template)
    try:
        stacked = jax.tree_util.tree_unflatten(treedef, stacked_leaves)
    except ValueError as exc:  # a structure whose leaves are not the listed ones
        raise CheckpointError(f"{directory / STORE_FILE} is malformed: {type(exc).__name__}: {exc}") from exc
    return {"template": template, "tenant_ids": tenant_ids, "slots": slots, "capacity": capacity, "stacked": stacked,
            "model": metadata.get("model"), "buckets": buckets}


def _check_template(directory: pathlib.Path, specs: list, example_params: PyTree) -> PyTree:
    """The caller's template if the checkpoint's leaves match it, as zeros of its structure."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(example_params)
    want = [(jax.tree_util.keystr(p), tuple(np.shape(leaf)), leaf_dtype(leaf)) for p, leaf in flat]  # dtypes as the store keeps them
    for i, (saved, expected) in enumerate(zip(specs, want)):
        if saved != expected:
            raise CheckpointError(
                f"{directory} does not fit the model: leaf {i} is {saved[0]} {_spec_text(saved[1], saved[2])} in the checkpoint, "
                f"expected {expected[0]} {_spec_text(expected[1], expected[2])}"
            )
    if len(specs) != len(want):
        raise CheckpointError(f"{directory} does not fit the model: {len(specs)} leaves in the checkpoint, the model has {len(want)}")
    return jax.tree_util.tree_unflatten(treedef, [np.zeros(shape, dtype) for _, shape, dtype in want])


def _read_arrays(directory: pathlib.Path, arrays_name: Any, expected: dict[str, tuple]) -> dict[str, np.ndarray]:
    if not expected:
        return {}
    if not isinstance(arrays_name, str) or not (directory / arrays_name).is_dir():
        raise CheckpointError(f"{directory}: the arrays directory {arrays_name!r} is missing (truncated checkpoint)")
    path = directory / arrays_name
    try:
        metadata = _named_leaves(_orbax_metadata(path))
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read the Orbax metadata (truncated checkpoint?): {exc}") from exc
    names = {key[0]: meta for key, meta in metadata.items() if len(key) == 1}
    for name, (leaf_path, shape, dtype) in expected.items():
        meta = names.get(name)
        if meta is None:
            raise CheckpointError(f"{path}: array {name} of leaf {leaf_path} is missing (truncated checkpoint)")
        got = (tuple(meta.shape), jnp.dtype(meta.dtype))
        if got != (shape, dtype):
            raise CheckpointError(f"{path}: leaf {leaf_path} is {_spec_text(*got)} on disk, expected {_spec_text(shape, dtype)}")
    try:
        restored = _orbax_restore_numpy(path)
    except Exception as exc:
        raise CheckpointError(f"{path}: restoring the arrays failed (truncated or corrupt checkpoint): {exc}") from exc
    out = {}
    for name, (leaf_path, shape, dtype) in expected.items():
        array = np.asarray(restored.get(name)) if isinstance(restored, Mapping) and name in restored else None
        if array is None or array.shape != shape or array.dtype != dtype:
            got = "nothing" if array is None else _spec_text(array.shape, array.dtype)
            raise CheckpointError(f"{path}: leaf {leaf_path} restored as {got}, expected {_spec_text(shape, dtype)}")
        out[name] = array
    return out


def restore_store(directory: StrPath, example_params: PyTree | None = None, **store_kwargs: Any) -> TenantStore:
    """A new TenantStore holding the checkpoint's tenants, in their order and (where its
    ``max_capacity`` allows) their slots.

    Args:
      directory: a store checkpoint written by ``save_store``.
      example_params: if given, the checkpoint's leaves must match it (paths, shapes,
        dtypes) and the store uses its pytree structure; otherwise the saved structure
        (dicts, lists, tuples) with zero-valued template leaves.
      store_kwargs: passed to ``TenantStore`` (capacity defaults to the saved capacity, capped
        at a ``max_capacity`` given).

    Raises:
      CheckpointError: missing, truncated, malformed or mismatched checkpoint.
      NonFiniteParamsError: a saved tenant holds NaN or Inf.
    """
    loaded = _load_store_checkpoint(directory, example_params)
    store_kwargs.setdefault("capacity", _default_capacity(loaded, store_kwargs))
    store = TenantStore(loaded["template"], **store_kwargs)
    _fill(store, loaded)
    return store


def restore_model(
    directory: StrPath,
    apply_fn: Callable[[PyTree, Any], Any],
    example_params: PyTree | None = None,
    *,
    mesh: Mesh | None = None,
    **model_kwargs: Any,
) -> MultiTenantModel:
    """A new MultiTenantModel over a store checkpoint's tenants.

    ``apply_fn`` is the one-tenant function; ``example_params`` as in ``restore_store``.
    ``model_kwargs`` go to the constructor; capacity, row_shape/row_dtype and buckets default
    to what was saved. With ``mesh`` (a 1-D mesh, as ``jaxmt.tenant_mesh`` makes) the model
    is a ``ShardedMultiTenantModel`` over it, whatever the saving model was: the tenants are
    spread over the mesh's devices and keep their ids and insertion order, not their slots.
    Raises what ``restore_store`` raises.
    """
    model_class: type[MultiTenantModel] = MultiTenantModel
    if mesh is not None:
        model_class, model_kwargs = ShardedMultiTenantModel, {**model_kwargs, "mesh": mesh}
    loaded = _load_store_checkpoint(directory, example_params)
    saved = loaded["model"] or {}
    model_kwargs.setdefault("capacity", _default_capacity(loaded, model_kwargs))
    if "row_shape" not in model_kwargs and "row_dtype" not in model_kwargs and saved.get("row_shape") is not None:
        model_kwargs.update(row_shape=tuple(saved["row_shape"]), row_dtype=jnp.dtype(saved["row_dtype"]))
    if "buckets" not in model_kwargs and loaded["buckets"] is not None:
        model_kwargs["buckets"] = loaded["buckets"]
    model = model_class(apply_fn, loaded["template"], **model_kwargs)
    _fill(model.store, loaded)
    return model


def _default_capacity(loaded: dict[str, Any], kwargs: Mapping[str, Any]) -> int:
    """The saved capacity, but not above a ``max_capacity`` given (``_fill`` packs the tenants)."""
    max_capacity = kwargs.get("max_capacity")
    return loaded["capacity"] if max_capacity is None else min(loaded["capacity"], max_capacity)


def _fill(store: TenantStore, loaded: dict[str, Any]) -> None:
    if not loaded["tenant_ids"]:
        return
    slots = loaded["slots"]
    # A sharded store balances slots over its devices itself; a plain one keeps the saved
    # layout where its max_capacity allows it, and packs the tenants into free slots otherwise.
    keep_layout = getattr(store, "sharding", None) is None and (store.max_capacity is None or max(slots) < store.max_capacity)
    if keep_layout:
        store.reserve(max(slots) + 1)
    free = set(range(store.capacity)) - set(store.slot_of(t) for t in store.tenants)
    at_slots = slots if keep_layout and set(slots) <= free else None
    store.add_stacked(loaded["tenant_ids"], loaded["stacked"], at_slots=at_slots)


def __getattr__(name: str) -> Any:
    """``add_tenant_from_checkpoint`` lives in ``jaxmt.tenant_import``; still importable from here."""
    if name == "add_tenant_from_checkpoint":
        from jaxmt.tenant_import import add_tenant_from_checkpoint

        return add_tenant_from_checkpoint
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
