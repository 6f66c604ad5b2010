"""TenantStore: the stacked parameters of every resident tenant, one slot per tenant.

Each leaf of the template pytree is held once, as a device array with a leading slot axis of
size ``capacity``. Adding or updating a tenant writes one slot in place through a jitted
``dynamic_update_index_in_dim`` with the stacked buffer donated, so the other tenants are
never re-stacked or copied. Capacity grows by doubling (one copy of the whole store, which a
sensible initial ``capacity`` avoids); freed slots are reused, lowest first.
"""

from __future__ import annotations

import heapq
import threading
from collections.abc import Hashable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmt.errors import (
    CapacityError,
    DuplicateTenantError,
    NonFiniteParamsError,
    ParamMismatchError,
    UnknownTenantError,
)

PyTree = Any

DEFAULT_CAPACITY = 8


def _leaf_paths(tree: PyTree) -> list[str]:
    return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _first_structure_difference(template: PyTree, params: PyTree) -> str:
    """Names the first leaf path present in one tree and not the other."""
    want, got = _leaf_paths(template), _leaf_paths(params)
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


def _write_slot_impl(stacked: list[jax.Array], new: list[jax.Array], slot: jax.Array) -> list[jax.Array]:
    return [jax.lax.dynamic_update_index_in_dim(s, n, slot, 0) for s, n in zip(stacked, new)]


# Donating the stacked leaves lets XLA update the slot in place instead of copying the store.
_write_slot = jax.jit(_write_slot_impl, donate_argnums=(0,))


class TenantStore:
    """Stacked parameters of many tenants that share one pytree template.

    Args:
      example_params: a pytree of arrays whose structure, shapes and dtypes every tenant
        must match. Its values are not stored.
      capacity: initial number of slots (default 8); grows by doubling as tenants arrive.
      max_capacity: hard limit on slots; growing past it raises ``CapacityError``.
      device: where the stacked parameters live (default: the first JAX device).
    """

    def __init__(
        self,
        example_params: PyTree,
        capacity: int | None = None,
        *,
        max_capacity: int | None = None,
        device: jax.Device | None = None,
    ):
        capacity = DEFAULT_CAPACITY if capacity is None else int(capacity)
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if max_capacity is not None and max_capacity < capacity:
            raise ValueError(f"max_capacity {max_capacity} is below capacity {capacity}")
        leaves, self._treedef = jax.tree_util.tree_flatten(example_params)
        if not leaves:
            raise ParamMismatchError("example_params has no array leaves")
        self.template = example_params
        self.leaf_paths: tuple[str, ...] = tuple(_leaf_paths(example_params))
        self.leaf_specs: tuple[jax.ShapeDtypeStruct, ...] = tuple(
            jax.ShapeDtypeStruct(np.shape(leaf), jnp.asarray(leaf).dtype if not hasattr(leaf, "dtype") else leaf.dtype)
            for leaf in leaves
        )
        self._floating = tuple(jnp.issubdtype(s.dtype, jnp.inexact) for s in self.leaf_specs)
        self.device = device if device is not None else jax.devices()[0]
        self.max_capacity = max_capacity
        self.lock = threading.RLock()
        self._capacity = capacity
        self._leaves = self._allocate(capacity)
        self._slot_of: dict[Hashable, int] = {}
        self._free: list[int] = list(range(capacity))
        heapq.heapify(self._free)
        self.version = 0  # bumped on every change, so callers can tell the store moved

    # ----------------------------------------------------------------- queries
    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def tenants(self) -> list[Hashable]:
        """Resident tenant ids in insertion order."""
        return list(self._slot_of)

    def __len__(self) -> int:
        return len(self._slot_of)

    def __contains__(self, tenant_id: object) -> bool:
        try:
            return tenant_id in self._slot_of
        except TypeError:
            return False

    def __iter__(self) -> Iterator[Hashable]:
        return iter(self.tenants)

    def slot_of(self, tenant_id: Hashable) -> int:
        """The slot holding ``tenant_id``; raises UnknownTenantError."""
        try:
            return self._slot_of[tenant_id]
        except KeyError:
            raise UnknownTenantError(tenant_id, len(self._slot_of)) from None
        except TypeError:
            raise UnknownTenantError(tenant_id, len(self._slot_of)) from None

    def slots_of(self, tenant_ids) -> np.ndarray:
        """Slots of a sequence of ids as int32 (O(n) dict look-ups, no JAX work)."""
        slot_of = self._slot_of
        try:
            return np.fromiter((slot_of[t] for t in tenant_ids), dtype=np.int32, count=len(tenant_ids))
        except (KeyError, TypeError):
            for t in tenant_ids:
                self.slot_of(t)
            raise

    @property
    def stacked_leaves(self) -> list[jax.Array]:
        """The stacked leaves [capacity, ...] in template order (read under ``lock``)."""
        return self._leaves

    def stacked(self) -> PyTree:
        """The stacked pytree: every leaf has a leading slot axis of size ``capacity``."""
        return jax.tree_util.tree_unflatten(self._treedef, self._leaves)

    def get(self, tenant_id: Hashable) -> PyTree:
        """One tenant's params, sliced out of the store."""
        slot = self.slot_of(tenant_id)
        return jax.tree_util.tree_unflatten(self._treedef, [leaf[slot] for leaf in self._leaves])

    @property
    def bytes_per_tenant(self) -> int:
        return int(sum(np.prod(s.shape, dtype=np.int64) * np.dtype(s.dtype).itemsize for s in self.leaf_specs))

    @property
    def param_bytes(self) -> int:
        """Device bytes held by the store (all slots, used or free)."""
        return self.bytes_per_tenant * self._capacity

    def stats(self) -> dict[str, int]:
        return {
            "resident_tenants": len(self._slot_of),
            "capacity": self._capacity,
            "free_slots": self._capacity - len(self._slot_of),
            "bytes_per_tenant": self.bytes_per_tenant,
            "param_bytes": self.param_bytes,
            "resident_param_bytes": self.bytes_per_tenant * len(self._slot_of),
        }

    # --------------------------------------------------------------- mutation
    def add(self, tenant_id: Hashable, params: PyTree) -> int:
        """Validates ``params`` and writes them into a free slot; returns the slot.

        Raises:
          TypeError: the id is not hashable.
          DuplicateTenantError: the id is already resident.
          ParamMismatchError: structure, shape or dtype differ from the template.
          NonFiniteParamsError: a floating leaf holds NaN or Inf.
          CapacityError: the store is full and cannot grow.
        """
        try:
            hash(tenant_id)
        except TypeError:
            raise TypeError(f"tenant id must be hashable, got {type(tenant_id).__name__} {tenant_id!r}") from None
        with self.lock:
            if tenant_id in self._slot_of:
                raise DuplicateTenantError(f"tenant {tenant_id!r} is already resident; use update_tenant to replace its weights")
            leaves = self._validate(tenant_id, params)
            if not self._free:
                self._grow(self._capacity * 2)
            slot = heapq.heappop(self._free)
            try:
                self._leaves = _write_slot(self._leaves, leaves, jnp.int32(slot))
            except BaseException:
                heapq.heappush(self._free, slot)
                raise
            self._slot_of[tenant_id] = slot
            self.version += 1
            return slot

    def update(self, tenant_id: Hashable, params: PyTree) -> int:
        """Replaces a resident tenant's params in place; returns its slot."""
        with self.lock:
            slot = self.slot_of(tenant_id)
            leaves = self._validate(tenant_id, params)
            self._leaves = _write_slot(self._leaves, leaves, jnp.int32(slot))
            self.version += 1
            return slot

    def remove(self, tenant_id: Hashable) -> int:
        """Frees the tenant's slot for reuse; returns the freed slot."""
        with self.lock:
            slot = self.slot_of(tenant_id)
            del self._slot_of[tenant_id]
            heapq.heappush(self._free, slot)
            self.version += 1
            return slot

    def reserve(self, capacity: int) -> None:
        """Grows the store to at least ``capacity`` slots now (avoids later recompiles)."""
        with self.lock:
            if capacity > self._capacity:
                self._grow(capacity)

    # -------------------------------------------------------------- internals
    def _validate(self, tenant_id: Hashable, params: PyTree) -> list[jax.Array]:
        leaves, treedef = jax.tree_util.tree_flatten(params)
        if treedef != self._treedef:
            raise ParamMismatchError(
                f"tenant {tenant_id!r}: params pytree structure differs from the template "
                f"({_first_structure_difference(self.template, params)})"
            )
        arrays = []
        for path, spec, leaf in zip(self.leaf_paths, self.leaf_specs, leaves):
            shape = tuple(np.shape(leaf))
            dtype = leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype
            if shape != tuple(spec.shape) or np.dtype(dtype) != np.dtype(spec.dtype):
                raise ParamMismatchError(
                    f"tenant {tenant_id!r}: leaf {path} is {np.dtype(dtype).name}{list(shape)}, "
                    f"expected {np.dtype(spec.dtype).name}{list(spec.shape)}"
                )
            arrays.append(jax.device_put(leaf, self.device))
        floating = [a for a, f in zip(arrays, self._floating) if f]
        if floating:
            flags = np.asarray(_finite_flags(floating))
            if not flags.all():
                bad = int(np.argmin(flags))
                path = [p for p, f in zip(self.leaf_paths, self._floating) if f][bad]
                raise NonFiniteParamsError(f"tenant {tenant_id!r}: leaf {path} holds NaN or Inf values")
        return arrays

    def _allocate(self, capacity: int) -> list[jax.Array]:
        try:
            return [
                jax.device_put(jnp.zeros((capacity, *s.shape), s.dtype), self.device) for s in self.leaf_specs
            ]
        except Exception as exc:  # XLA reports OOM as a runtime error
            raise CapacityError(
                f"cannot allocate a store of {capacity} slots ({self.bytes_per_tenant * capacity} bytes): {exc}"
            ) from exc

    def _grow(self, new_capacity: int) -> None:
        if self.max_capacity is not None:
            if self._capacity >= self.max_capacity:
                raise CapacityError(
                    f"store is full: {len(self._slot_of)} tenants in {self._capacity} slots, max_capacity={self.max_capacity}"
                )
            new_capacity = min(new_capacity, self.max_capacity)
        try:
            grown = [
                jnp.concatenate([old, jnp.zeros((new_capacity - self._capacity, *s.shape), s.dtype)])
                for old, s in zip(self._leaves, self.leaf_specs)
            ]
            jax.block_until_ready(grown)
        except Exception as exc:
            raise CapacityError(
                f"cannot grow the store from {self._capacity} to {new_capacity} slots "
                f"({self.bytes_per_tenant * new_capacity} bytes); the store keeps serving at its old size: {exc}"
            ) from exc
        for slot in range(self._capacity, new_capacity):
            heapq.heappush(self._free, slot)
        self._leaves = grown
        self._capacity = new_capacity
        self.version += 1
