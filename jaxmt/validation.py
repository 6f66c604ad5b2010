"""Checking a tenant's params against the store's template before they are written.

A tenant's params must have the template's pytree structure, and every leaf its shape and
dtype (one row per tenant more for a stacked batch of tenants); floating leaves must be
finite. The checks run before any slot is touched, so a rejected tenant leaves the store as
it was, and the errors name the tenant, the leaf path and what was expected.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmt.errors import DuplicateTenantError, NonFiniteParamsError, ParamMismatchError

PyTree = Any


def leaf_paths(tree: PyTree) -> list[str]:
    """``jax.tree_util.keystr`` of every leaf's path, in flattening order."""
    return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def first_structure_difference(template: PyTree, params: PyTree) -> str:
    """Names the first leaf path present in one tree and not the other."""
    want, got = leaf_paths(template), leaf_paths(params)
    for i, (w, g) in enumerate(zip(want, got)):
        if w != g:
            return f"leaf {i}: expected {w}, got {g}"
    if len(want) > len(got):
        return f"missing leaf {want[len(got)]}"
    if len(got) > len(want):
        return f"unexpected extra leaf {got[len(want)]}"
    return "same leaf paths but different container types"


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
      TypeError: an id is not hashable.
      DuplicateTenantError: an id appears more than once.
    """
    ids = list(tenant_ids)
    for tenant_id in ids:
        try:
            hash(tenant_id)
        except TypeError:
            raise TypeError(f"tenant id must be hashable, got {type(tenant_id).__name__} {tenant_id!r}") from None
    if len(set(ids)) != len(ids):
        repeated = next(t for i, t in enumerate(ids) if t in ids[:i])
        raise DuplicateTenantError(f"tenant {repeated!r} appears more than once in tenant_ids")
    return ids


def leaf_dtype(leaf: Any) -> np.dtype:
    """A leaf's dtype as the store keeps it on the device: JAX's canonical form of the
    array's own dtype, or of what ``jnp.asarray`` makes of a Python scalar. Without 64-bit
    mode JAX keeps float64 and int64 as float32 and int32, so a template or tenant given
    in NumPy's float64 is a float32 model, and its checkpoint says so."""
    return np.dtype(jax.dtypes.canonicalize_dtype(leaf.dtype if hasattr(leaf, "dtype") else jnp.asarray(leaf).dtype))


def _check_leaves(leaves: Sequence[Any], paths: Sequence[str], specs: Sequence[jax.ShapeDtypeStruct],
                  lead: tuple[int, ...], who: str) -> None:
    """Raises ParamMismatchError for the first leaf whose shape is not ``lead + spec.shape``
    or whose dtype is not the spec's; ``who`` starts the message (it names the tenants)."""
    for path, spec, leaf in zip(paths, specs, leaves):
        shape, dtype = tuple(np.shape(leaf)), leaf_dtype(leaf)
        want = (*lead, *spec.shape)
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
    leaves, got_treedef = jax.tree_util.tree_flatten(params)
    if got_treedef != treedef:
        raise ParamMismatchError(
            f"tenant {tenant_id!r}: params pytree structure differs from the template "
            f"({first_structure_difference(template, params)})"
        )
    _check_leaves(leaves, paths, specs, (), f"tenant {tenant_id!r}: leaf")
    arrays = jax.device_put(list(leaves), device)  # one transfer call for every leaf
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
    leaves, got_treedef = jax.tree_util.tree_flatten(stacked_params)
    if got_treedef != treedef:
        raise ParamMismatchError(
            f"stacked params of tenants {tenant_ids!r}: pytree structure differs from the template "
            f"({first_structure_difference(template, stacked_params)})"
        )
    n = len(tenant_ids)
    _check_leaves(leaves, paths, specs, (n,), f"stacked params of tenants {tenant_ids!r}: leaf")
    arrays = [jax.device_put(leaf, device) for leaf in leaves]
    floating_arrays = [(p, a) for p, a, f in zip(paths, arrays, floating) if f]
    if floating_arrays and n:
        flags = np.asarray(_finite_flags_per_row([a for _, a in floating_arrays]))  # [leaves, n]
        if not flags.all():
            leaf_index, row = np.argwhere(~flags)[0]
            raise NonFiniteParamsError(
                f"tenant {tenant_ids[row]!r}: leaf {floating_arrays[leaf_index][0]} holds NaN or Inf values"
            )
    return arrays
