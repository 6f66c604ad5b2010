"""Checking a tenant's params against the store's template before they are written.

A tenant's params must have the template's pytree structure (up to the type of its mappings:
a flax FrozenDict stands for a dict and the reverse), and every leaf its shape and dtype
(one row per tenant more for a stacked batch of tenants); floating leaves must be
finite. The checks run before any slot is touched, so a rejected tenant leaves the store as
it was, and the errors name the tenant, the leaf path and what was expected.
"""

from __future__ import annotations

import reprlib
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmt.errors import DuplicateTenantError, NonFiniteParamsError, ParamMismatchError

PyTree = Any


def leaf_paths(tree: PyTree) -> list[str]:
    """``jax.tree_util.keystr`` of every leaf's path, in flattening order."""
    return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


class _StructureDifference(Exception):
    """The first place where a params pytree's structure leaves the template's (internal:
    the callers turn it into a ParamMismatchError that names the tenants)."""


Children = list[tuple[Any, Any]]  # (key entry, child) pairs one level down


def _one_level(node: Any) -> tuple[jax.tree_util.PyTreeDef | None, Children] | None:
    """``node``'s own pytree node (its treedef with every child a leaf) and its keyed
    children, or None for a leaf. None and empty containers are nodes without children. A
    mapping that JAX cannot flatten has no treedef (None): its children are its items."""
    try:
        whole = jax.tree_util.tree_structure(node)
    except (TypeError, ValueError):  # e.g. a dict whose keys JAX cannot sort (mixed types), here or below
        if isinstance(node, Mapping):
            return None, [(jax.tree_util.DictKey(key), child) for key, child in node.items()]
        raise
    if whole.num_nodes == 1 and whole.num_leaves == 1:
        return None
    keyed, own = jax.tree_util.tree_flatten_with_path(node, is_leaf=lambda child: child is not node)
    return own, [(path[0], child) for path, child in keyed]


def _mapping_keys(node: Any, children: Children) -> list[Hashable] | None:
    """The keys of a mapping node (a dict, a flax FrozenDict...), or None for another node."""
    if isinstance(node, Mapping) and all(isinstance(k, jax.tree_util.DictKey) for k, _ in children):
        return [k.key for k, _ in children]
    return None


def _describe(node: Any) -> str:
    """What stands at a path, for messages: ``float32[3, 2]``, ``None``, ``tuple of 2``,
    ``dict with keys ['b', 'w']``."""
    level = _one_level(node)
    if level is None:
        try:
            return f"{leaf_dtype(node).name}{list(np.shape(node))}"
        except (TypeError, ValueError, OverflowError):
            return f"{type(node).__name__} {reprlib.repr(node)}"
    if node is None:
        return "None"
    _, children = level
    keys = _mapping_keys(node, children)
    if keys is not None:
        return f"{type(node).__name__} with keys {keys}" if keys else f"empty {type(node).__name__}"
    return f"{type(node).__name__} of {len(children)}"


def _where(path: tuple) -> str:
    return jax.tree_util.keystr(path) if path else "the top level"


def _paired_mappings(want: Children, got: Children, path: tuple) -> list[tuple[Any, Any, Any]]:
    """(key, template child, params child) in the template's order, once both mappings hold
    the same keys; the mapping types may differ (see ``template_ordered_leaves``)."""
    got_by_key = {k.key: (k, child) for k, child in got}
    want_keys = {k.key for k, _ in want}
    for key, child in want:
        if key.key not in got_by_key:
            raise _StructureDifference(f"{jax.tree_util.keystr((*path, key))} is missing, expected {_describe(child)}")
    for key, child in got:
        if key.key not in want_keys:
            raise _StructureDifference(
                f"unexpected extra entry {jax.tree_util.keystr((*path, key))} ({_describe(child)}), not in the template"
            )
    return [(key, child, got_by_key[key.key][1]) for key, child in want]


def _collect_aligned(template: Any, params: Any, path: tuple, out: list[Any]) -> None:
    """Appends ``params``' leaves under ``path`` to ``out`` in the template's leaf order,
    walking both trees one level at a time; raises _StructureDifference at the first path
    where the node type, the number of children or the keys differ."""
    want, got = _one_level(template), _one_level(params)
    if want is None and got is None:
        out.append(params)
        return
    if want is None or got is None:
        raise _StructureDifference(f"{_where(path)} is {_describe(params)}, expected {_describe(template)}")
    (want_def, want_children), (got_def, got_children) = want, got
    if _mapping_keys(template, want_children) is not None and _mapping_keys(params, got_children) is not None:
        pairs = _paired_mappings(want_children, got_children, path)
    elif want_def is not None and got_def is not None and want_def == got_def:
        pairs = [(key, w, g) for (key, w), (_, g) in zip(want_children, got_children)]
    else:
        raise _StructureDifference(f"{_where(path)} is {_describe(params)}, expected {_describe(template)}")
    for key, template_child, params_child in pairs:
        _collect_aligned(template_child, params_child, (*path, key), out)


def first_structure_difference(template: PyTree, params: PyTree) -> str | None:
    """Names the first path where ``params``' structure differs from the template's (node
    type, number of children, or keys), with what the template has there and what was
    given; None where they differ only in the type of their mappings (accepted, see
    ``template_ordered_leaves``)."""
    try:
        _collect_aligned(template, params, (), [])
    except _StructureDifference as difference:
        return str(difference)
    return None


def template_ordered_leaves(params: PyTree, template: PyTree, treedef: jax.tree_util.PyTreeDef, who: str) -> list[Any]:
    """``params``' leaves in the template's flattening order.

    Params whose structure is the template's up to the TYPE of its mappings are accepted: a
    flax ``FrozenDict`` (what linen gave before flax 0.8, and what ``flax.core.freeze``
    makes) where the template has a dict, or the reverse, holds the same entries; they are
    matched by key, and the store keeps only the leaves, so nothing downstream sees the
    given container types.

    Raises:
      ParamMismatchError: any other difference, naming the first path where the trees
        differ; ``who`` starts the message (it names the tenants).
    """
    try:
        leaves, got_treedef = jax.tree_util.tree_flatten(params)
    except (TypeError, ValueError):  # e.g. a dict whose keys JAX cannot sort: the walk below names them
        leaves, got_treedef = [], None
    if got_treedef is not None and got_treedef == treedef:
        return leaves
    aligned: list[Any] = []
    try:
        _collect_aligned(template, params, (), aligned)
    except _StructureDifference as difference:
        raise ParamMismatchError(f"{who} pytree structure differs from the template ({difference})") from None
    return aligned


def _owned_on_device(leaves: Sequence[Any], device: jax.Device) -> list[jax.Array]:
    """``leaves`` on ``device``, in one transfer call, reading none of the caller's NumPy
    arrays once this returns.

    On a CPU ``device_put`` makes a NumPy array's own bytes the device array's (and with
    ``may_alias=False`` its copy was still seen to take later writes after
    ``block_until_ready``), while the write into the store's slot runs after ``add``
    returns. A caller that reuses one buffer for every tenant (a loader reading each into
    the same array) had the store take the later values, even half of them. NumPy leaves
    are therefore copied first, a copy only the store holds, in native byte order (JAX
    refuses a swapped dtype).
    """
    return jax.device_put([np.array(leaf, leaf.dtype.newbyteorder("=")) if isinstance(leaf, np.ndarray) else leaf
                           for leaf in leaves], device)


@jax.jit
def _finite_flags(leaves: list[jax.Array]) -> jax.Array:
    """One bool per leaf: are all its values finite? (one fused reduction per add)."""
    return jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves])


@jax.jit
def _finite_flags_per_row(leaves: list[jax.Array]) -> jax.Array:
    """[leaves, n] bools: is row i of each stacked leaf all finite?"""
    return jnp.stack([jnp.all(jnp.isfinite(leaf.reshape(leaf.shape[0], -1)), axis=1) for leaf in leaves])


def check_tenant_ids(tenant_ids: Sequence[Hashable]) -> list[Hashable]:
    """The ids as a list, once each is hashable and none repeats.

    Raises:
      TypeError: an id is not hashable, or ``tenant_ids`` is a lone string (iterated, it
        would name its characters as tenants).
      DuplicateTenantError: an id appears more than once.
    """
    if isinstance(tenant_ids, (str, bytes)):
        raise TypeError(f"tenant_ids must be a sequence of tenant ids, got the string {tenant_ids!r}; pass [{tenant_ids!r}]")
    ids = list(tenant_ids)
    for tenant_id in ids:
        try:
            hash(tenant_id)
        except TypeError:
            raise TypeError(f"tenant id must be hashable, got {type(tenant_id).__name__} {tenant_id!r}") from None
    seen: set[Hashable] = set()
    for tenant_id in ids:  # by hash, as the store looks ids up: ``t in ids[:i]`` would compare a
        if tenant_id in seen:  # NumPy integer with a tuple id elementwise, and fail on the array
            raise DuplicateTenantError(f"tenant {tenant_id!r} appears more than once in tenant_ids")
        seen.add(tenant_id)
    return ids


def leaf_dtype(leaf: Any) -> np.dtype:
    """A leaf's dtype as the store keeps it on the device: JAX's canonical form of the
    array's own dtype, or of what ``jnp.asarray`` makes of a Python scalar. Without 64-bit
    mode JAX keeps float64 and int64 as float32 and int32, so a template or tenant given
    in NumPy's float64 is a float32 model, and its checkpoint says so. A NumPy array in
    swapped byte order ('>f4' on a little-endian host) is its native dtype: JAX holds none
    other (``_owned_on_device`` swaps the bytes)."""
    return device_dtype(leaf.dtype if hasattr(leaf, "dtype") else jnp.asarray(leaf).dtype)


def device_dtype(dtype: Any) -> np.dtype:
    """The dtype JAX holds values of ``dtype`` in: canonical (int64 as int32 without 64-bit
    mode) and in native byte order."""
    return np.dtype(jax.dtypes.canonicalize_dtype(np.dtype(dtype).newbyteorder("=")))


def abstract_rows(shape: Sequence[int], dtype: Any) -> jax.ShapeDtypeStruct:
    """Rows of ``shape`` and ``dtype`` as a traced program sees them (``device_dtype``): a
    ShapeDtypeStruct asked for in int64 without 64-bit mode warns on newer jax."""
    return jax.ShapeDtypeStruct(tuple(shape), device_dtype(dtype))


def _shape_and_dtype(leaf: Any, where: str, expected: str) -> tuple[tuple[int, ...], np.dtype]:
    """A leaf's shape and the dtype the store would keep it in.

    Raises:
      ParamMismatchError: the leaf is not array-like (a string, an arbitrary object) or is a
        Python int that does not fit the integer dtype JAX would make of it (int32 without
        64-bit mode); ``where`` names the tenant and leaf, ``expected`` the template's leaf.
    """
    try:
        shape, dtype = tuple(np.shape(leaf)), leaf_dtype(leaf)
        check_integers_fit(leaf, dtype)
        return shape, dtype
    except OverflowError as error:
        raise ParamMismatchError(f"{where} is {type(leaf).__name__} {reprlib.repr(leaf)}, which JAX cannot hold "
                                 f"({error}); expected {expected}") from error
    except (TypeError, ValueError) as error:
        raise ParamMismatchError(f"{where} is {type(leaf).__name__} {reprlib.repr(leaf)}, which is not "
                                 f"array-like; expected {expected}") from error


def check_integers_fit(leaf: Any, dtype: np.dtype) -> None:
    """Raises OverflowError where an integer array of a wider dtype than the store keeps
    (int64 without 64-bit mode) holds values that ``dtype`` cannot: the conversion would wrap
    them silently."""
    own = getattr(leaf, "dtype", None)
    if own is None or np.dtype(own) == dtype or np.dtype(own).kind not in "iu" or dtype.kind not in "iu" or np.size(leaf) == 0:
        return
    values, info = np.asarray(leaf), np.iinfo(dtype)
    low, high = values.min(), values.max()
    if low < info.min or high > info.max:
        raise OverflowError(f"values from {low} to {high} do not fit {dtype.name}")


def _check_leaves(leaves: Sequence[Any], paths: Sequence[str], specs: Sequence[jax.ShapeDtypeStruct],
                  lead: tuple[int, ...], who: str) -> None:
    """Raises ParamMismatchError for the first leaf whose shape is not ``lead + spec.shape``
    or whose dtype is not the spec's; ``who`` starts the message (it names the tenants)."""
    for path, spec, leaf in zip(paths, specs, leaves):
        want = (*lead, *spec.shape)
        shape, dtype = _shape_and_dtype(leaf, f"{who} {path}", f"{np.dtype(spec.dtype).name}{list(want)}")
        if shape != want or dtype != np.dtype(spec.dtype):
            per_tenant = f" (one row per tenant of {lead[0]})" if lead else ""
            raise ParamMismatchError(f"{who} {path} is {dtype.name}{list(shape)}, expected "
                                     f"{np.dtype(spec.dtype).name}{list(want)}{per_tenant}")


def validate_params(
    tenant_id: Hashable,
    params: PyTree,
    *,
    template: PyTree,
    treedef: jax.tree_util.PyTreeDef,
    paths: Sequence[str],
    specs: Sequence[jax.ShapeDtypeStruct],
    floating: Sequence[bool],
    device: jax.Device,
) -> list[jax.Array]:
    """One tenant's leaves on ``device``, in template order, once they match the template.

    ``treedef``, ``paths``, ``specs`` and ``floating`` describe ``template``'s leaves (its
    structure, key paths, shapes/dtypes, and which are floating point).

    Raises:
      ParamMismatchError: structure, shape or dtype differ from the template.
      NonFiniteParamsError: a floating leaf holds NaN or Inf.
    """
    leaves = template_ordered_leaves(params, template, treedef, f"tenant {tenant_id!r}: params")
    _check_leaves(leaves, paths, specs, (), f"tenant {tenant_id!r}: leaf")
    arrays = _owned_on_device(leaves, device)
    floating_arrays = [a for a, f in zip(arrays, floating) if f]
    if floating_arrays:
        flags = np.asarray(_finite_flags(floating_arrays))
        if not flags.all():
            bad = int(np.argmin(flags))
            path = [p for p, f in zip(paths, floating) if f][bad]
            raise NonFiniteParamsError(f"tenant {tenant_id!r}: leaf {path} holds NaN or Inf values")
    return arrays


def validate_stacked(
    tenant_ids: list[Hashable],
    stacked_params: PyTree,
    *,
    template: PyTree,
    treedef: jax.tree_util.PyTreeDef,
    paths: Sequence[str],
    specs: Sequence[jax.ShapeDtypeStruct],
    floating: Sequence[bool],
    device: jax.Device,
) -> list[jax.Array]:
    """Like ``validate_params`` for tenants stacked along a leading axis (row i is ``tenant_ids[i]``).

    Raises:
      ParamMismatchError: structure, leading axis, shape or dtype differ from the template.
      NonFiniteParamsError: a tenant's floating leaf holds NaN or Inf (naming that tenant).
    """
    leaves = template_ordered_leaves(stacked_params, template, treedef, f"stacked params of tenants {tenant_ids!r}:")
    n = len(tenant_ids)
    _check_leaves(leaves, paths, specs, (n,), f"stacked params of tenants {tenant_ids!r}: leaf")
    arrays = _owned_on_device(leaves, device)
    floating_arrays = [(p, a) for p, a, f in zip(paths, arrays, floating) if f]
    if floating_arrays and n:
        flags = np.asarray(_finite_flags_per_row([a for _, a in floating_arrays]))  # [leaves, n]
        if not flags.all():
            leaf_index, row = np.argwhere(~flags)[0]
            raise NonFiniteParamsError(
                f"tenant {tenant_ids[row]!r}: leaf {floating_arrays[leaf_index][0]} holds NaN or Inf values"
            )
    return arrays
