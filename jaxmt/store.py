"""TenantStore: the stacked parameters of every resident tenant, one slot per tenant.

Each leaf of the template pytree is held once, as a device array with a leading slot axis of
size ``capacity``. Adding or updating a tenant writes one slot in place through a jitted
``dynamic_update_index_in_dim`` with the stacked buffer donated, so the other tenants are
never re-stacked or copied. Capacity grows by doubling (one copy of the whole store, which a
sensible initial ``capacity`` avoids); freed slots are reused, lowest first.
"""

from __future__ import annotations

import contextlib
import heapq
import threading
from collections.abc import Hashable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmt.errors import CapacityError, DuplicateTenantError, ParamMismatchError, UnknownTenantError
from jaxmt.jax_compat import single_device_sharding
from jaxmt.validation import check_tenant_ids, leaf_dtype, leaf_paths, validate_params, validate_stacked

PyTree = Any

DEFAULT_CAPACITY = 8


def _write_slot_impl(stacked: list[jax.Array], new: list[jax.Array], slot: jax.Array) -> list[jax.Array]:
    return [jax.lax.dynamic_update_index_in_dim(s, n, slot, 0) for s, n in zip(stacked, new)]


# Donating the stacked leaves lets XLA update the slot in place instead of copying the store.
_write_slot = jax.jit(_write_slot_impl, donate_argnums=(0,))


def _write_slots_impl(stacked: list[jax.Array], new: list[jax.Array], slots: jax.Array) -> list[jax.Array]:
    return [s.at[slots].set(n) for s, n in zip(stacked, new)]


_write_slots = jax.jit(_write_slots_impl, donate_argnums=(0,))


@jax.jit
def _read_slot(stacked: list[jax.Array], slot: jax.Array) -> list[jax.Array]:
    """One slot of every stacked leaf of a single-device store, in one program (an eager
    slice per leaf costs a dispatch each: a hundred for a ResNet)."""
    return [jax.lax.dynamic_index_in_dim(s, slot, 0, keepdims=False) for s in stacked]


def _zeros(specs: tuple[jax.ShapeDtypeStruct, ...], capacity: int, device: jax.Device) -> list[jax.Array]:
    """Every stacked leaf, zero-filled, made on ``device`` by one program (not one per leaf:
    a ResNet-50 has hundreds of leaves, and a compile each made large stores slow to build)."""
    sharding = single_device_sharding(device)
    shapes = [((capacity, *s.shape), s.dtype) for s in specs]
    return jax.jit(lambda: [jnp.zeros(shape, dtype) for shape, dtype in shapes], out_shardings=sharding)()


def _grown(leaves: list[jax.Array], capacity: int, device: jax.Device) -> list[jax.Array]:
    """The leaves with zero slots appended up to ``capacity``, in one program."""
    sharding = single_device_sharding(device)

    def grow(old: list[jax.Array]) -> list[jax.Array]:
        return [jnp.concatenate([a, jnp.zeros((capacity - a.shape[0], *a.shape[1:]), a.dtype)]) for a in old]

    return jax.jit(grow, out_shardings=sharding)(leaves)


class TenantStore:
    """Stacked parameters of many tenants that share one pytree template.

    Args:
      example_params: a pytree of arrays whose structure, shapes and dtypes every tenant
        must match. Its values are not stored.
      capacity: initial number of slots (default 8); grows by doubling as tenants arrive.
      max_capacity: hard limit on slots; growing past it raises ``CapacityError``.
      device: where the stacked parameters live (default: the first JAX device).
      sharding: instead of ``device``, a ``NamedSharding`` splitting the slot axis in blocks
        over a 1-D mesh (``jaxmt.sharding``): each slot lives on one device, writes and growth
        happen on that device, new tenants go to the device with the most free slots.
        Capacity and ``max_capacity`` are multiples of the device count (capacity is rounded
        up); growing renumbers slots (``version`` changes) instead of moving weights.
    """

    def __init__(
        self,
        example_params: PyTree,
        capacity: int | None = None,
        *,
        max_capacity: int | None = None,
        device: jax.Device | None = None,
        sharding: jax.sharding.NamedSharding | None = None,
    ):
        capacity = DEFAULT_CAPACITY if capacity is None else int(capacity)
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.sharding = sharding
        self.devices: list[jax.Device] = [device if device is not None else jax.devices()[0]]
        if sharding is not None:
            from jaxmt.sharding import shard_count, shard_devices

            if device is not None:
                raise ValueError("give device or sharding, not both")
            count = shard_count(sharding)
            capacity = -(-capacity // count) * count
            if max_capacity is not None and max_capacity % count:
                raise ValueError(f"max_capacity {max_capacity} is not a multiple of the {count} devices of the sharding")
            self.devices = shard_devices(sharding, capacity)
            device = self.devices[0]
        if max_capacity is not None and max_capacity < capacity:
            raise ValueError(f"max_capacity {max_capacity} is below capacity {capacity}")
        leaves, self._treedef = jax.tree_util.tree_flatten(example_params)
        if not leaves:
            raise ParamMismatchError(f"example_params has no array leaves, got {type(example_params).__name__} {example_params!r:.200}; expected a pytree of arrays")
        self.leaf_paths: tuple[str, ...] = tuple(leaf_paths(example_params))
        self.leaf_specs: tuple[jax.ShapeDtypeStruct, ...] = tuple(
            jax.ShapeDtypeStruct(np.shape(leaf), leaf_dtype(leaf)) for leaf in leaves
        )
        # The params' structure with each leaf's shape and dtype, not its values: keeping
        # example_params itself would hold one tenant's worth of device memory that no
        # slot accounts for.
        self.template: PyTree = jax.tree_util.tree_unflatten(self._treedef, list(self.leaf_specs))
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
        """Slots allocated now, used or free (grows by doubling; programs are compiled per capacity)."""
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
        except (KeyError, TypeError):  # TypeError: an unhashable id is not resident either
            raise UnknownTenantError(tenant_id, len(self._slot_of)) from None

    def slots_of(self, tenant_ids: Sequence[Hashable]) -> np.ndarray:
        """Slots of a sequence of ids as int32 (O(n) dict look-ups, no JAX work; ``map`` over
        the dict's own look-up instead of a generator saves a Python frame per id)."""
        try:
            return np.fromiter(map(self._slot_of.__getitem__, tenant_ids), dtype=np.int32, count=len(tenant_ids))
        except (KeyError, TypeError):
            for t in tenant_ids:
                self.slot_of(t)
            raise

    @property
    def treedef(self) -> jax.tree_util.PyTreeDef:
        """The template's structure: ``stacked_leaves`` (or one tenant's leaves) unflatten with it."""
        return self._treedef

    @property
    def stacked_leaves(self) -> list[jax.Array]:
        """The stacked leaves [capacity, ...] in template order (read under ``lock``)."""
        return self._leaves

    def stacked(self) -> PyTree:
        """The stacked pytree: every leaf has a leading slot axis of size ``capacity`` (call
        under ``lock``: a write donates these buffers)."""
        return jax.tree_util.tree_unflatten(self._treedef, self._leaves)

    def get(self, tenant_id: Hashable) -> PyTree:
        """One tenant's params, sliced out of the store.

        Under ``lock``: a concurrent write donates the stacked buffers (reading them after
        would fail), and a removal and an addition could hand the slot to another tenant
        between the look-up and the read. The read is only dispatched under it.
        """
        with self.lock:
            slot = self.slot_of(tenant_id)
            if self.sharding is None:
                return jax.tree_util.tree_unflatten(self._treedef, _read_slot(self._leaves, jnp.int32(slot)))
            # A jitted dynamic index over the split slot axis would gather the whole store onto
            # every device first; a static slice moves only the owner's one slot.
            return jax.tree_util.tree_unflatten(self._treedef, [leaf[slot] for leaf in self._leaves])

    @property
    def bytes_per_tenant(self) -> int:
        """Bytes of one tenant's params (one slot of every stacked leaf)."""
        return int(sum(np.prod(s.shape, dtype=np.int64) * np.dtype(s.dtype).itemsize for s in self.leaf_specs))

    @property
    def param_bytes(self) -> int:
        """Device bytes held by the store (all slots, used or free)."""
        return self.bytes_per_tenant * self._capacity

    def stats(self) -> dict[str, int]:
        """Tenants, slots and bytes of one store: every figure derives from one count of the
        tenants and one of the slots, so that a tenant added or removed meanwhile is counted
        wholly before or after. Read without ``lock``, which a dispatch holds through a
        compile and a grow through its copy: a metrics scrape must not wait for them. The
        tenants are counted first: capacity only grows, and grows before a tenant takes a
        new slot, so free slots are never negative."""
        per_tenant = self.bytes_per_tenant
        resident = len(self._slot_of)
        capacity = self._capacity
        return {
            "resident_tenants": resident,
            "capacity": capacity,
            "free_slots": capacity - resident,
            "bytes_per_tenant": per_tenant,
            "param_bytes": per_tenant * capacity,
            "resident_param_bytes": per_tenant * resident,
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
        check_tenant_ids([tenant_id])
        with self.lock:
            if tenant_id in self._slot_of:
                raise DuplicateTenantError(f"tenant {tenant_id!r} is already resident; use update_tenant to replace its weights")
            leaves = self._validate(tenant_id, params)
            with self._all_or_nothing():  # a failed write after growing leaves the old size
                if not self._free:
                    self._grow(self._capacity * 2)
                slot = self._take_free_slot()
                self._write(slot, leaves)
            self._slot_of[tenant_id] = slot
            self.version += 1
            return slot

    def update(self, tenant_id: Hashable, params: PyTree) -> int:
        """Replaces a resident tenant's params in place; returns its slot."""
        with self.lock:
            slot = self.slot_of(tenant_id)
            leaves = self._validate(tenant_id, params)
            self._write(slot, leaves)
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

    def add_stacked(
        self, tenant_ids: Sequence[Hashable], stacked_params: PyTree, *, at_slots: Sequence[int] | None = None
    ) -> np.ndarray:
        """Adds many tenants whose params arrive stacked along a leading axis; returns their slots.

        Row i of every leaf of ``stacked_params`` is tenant ``tenant_ids[i]``. The rows go
        from device to device: one validation of the whole stack and one scatter into the
        store, with no per-tenant dispatch and no copy through host memory (what a trainer
        that holds its tenants stacked needs). All or nothing: on any error no tenant is
        added and the store is as it was. ``at_slots`` puts tenant i in slot ``at_slots[i]``
        (each free and below ``capacity``) instead of the lowest free slots: restoring a
        checkpoint keeps its layout.

        Raises:
          TypeError: an id is not hashable.
          ValueError: ``at_slots`` has the wrong length, repeats, or names a slot that is taken or out of range.
          DuplicateTenantError: an id is repeated or already resident.
          ParamMismatchError: structure, leading axis, shape or dtype differ from the template.
          NonFiniteParamsError: a tenant's floating leaf holds NaN or Inf.
          CapacityError: the tenants do not fit under ``max_capacity``.
        """
        tenant_ids = check_tenant_ids(tenant_ids)
        with self.lock:
            for tenant_id in tenant_ids:
                if tenant_id in self._slot_of:
                    raise DuplicateTenantError(f"tenant {tenant_id!r} is already resident; use update_tenant to replace its weights")
            if at_slots is not None:
                at_slots = self._check_free_slots(at_slots, tenant_ids)
            leaves = self._validate_stacked(tenant_ids, stacked_params)
            if not tenant_ids:
                return np.zeros((0,), np.int32)
            needed = len(self._slot_of) + len(tenant_ids)
            if self.max_capacity is not None and needed > self.max_capacity:
                raise CapacityError(
                    f"{len(tenant_ids)} new tenants do not fit: {len(self._slot_of)} resident, max_capacity={self.max_capacity}"
                )
            with self._all_or_nothing():
                if needed > self._capacity:
                    capacity = self._capacity
                    while capacity < needed:
                        capacity *= 2
                    self._grow(capacity if self.max_capacity is None else min(capacity, self.max_capacity))
                slots = self._claim_slots(at_slots) if at_slots is not None else np.array([self._take_free_slot() for _ in tenant_ids], np.int32)
                if self.sharding is None:
                    self._leaves = _write_slots(self._leaves, leaves, jax.device_put(slots, self.device))
                else:  # onto each slot's own device, not donated: a failed write restores the saved leaves
                    from jaxmt.sharding import write_slots_sharded

                    self._leaves = write_slots_sharded(self._leaves, leaves, slots)
            for tenant_id, slot in zip(tenant_ids, slots):
                self._slot_of[tenant_id] = int(slot)
            self.version += 1
            return slots

    def reserve(self, capacity: int) -> None:
        """Grows the store to at least ``capacity`` slots now (avoids later recompiles).

        Raises:
          CapacityError: ``capacity`` exceeds ``max_capacity``, or the allocation failed;
            the store keeps its old size.
        """
        with self.lock:
            if self.max_capacity is not None and capacity > self.max_capacity:
                raise CapacityError(f"cannot reserve {capacity} slots: max_capacity={self.max_capacity}")
            if capacity > self._capacity:
                self._grow(capacity)

    # -------------------------------------------------------------- internals
    def _validate(self, tenant_id: Hashable, params: PyTree) -> list[jax.Array]:
        return validate_params(tenant_id, params, **self._template_checks())

    def check_stacked(self, tenant_ids: Sequence[Hashable], stacked_params: PyTree) -> None:
        """Checks tenants stacked along a leading axis as ``add_stacked`` does, writing nothing:
        for a caller about to write several of them (some added, some updated) that must fail
        before the first write.

        Raises:
          ParamMismatchError, NonFiniteParamsError: as ``add_stacked``, naming the tenant.
        """
        self._validate_stacked(list(tenant_ids), stacked_params)

    def _validate_stacked(self, tenant_ids: list[Hashable], stacked_params: PyTree) -> list[jax.Array]:
        return validate_stacked(tenant_ids, stacked_params, **self._template_checks())

    def _template_checks(self) -> dict[str, Any]:
        return {"template": self.template, "treedef": self._treedef, "paths": self.leaf_paths,
                "specs": self.leaf_specs, "floating": self._floating, "device": self.device}

    def _check_free_slots(self, slots: Sequence[int], tenant_ids: list[Hashable]) -> np.ndarray:
        count = len(tenant_ids)
        slots = np.asarray(slots, np.int64).reshape(-1)
        if slots.size != count or len(set(slots.tolist())) != count:
            raise ValueError(f"at_slots must give {count} distinct slots, got {slots.tolist()}")
        free = set(self._free)
        for i, slot in enumerate(slots.tolist()):
            if slot not in free:
                where = "taken" if 0 <= slot < self._capacity else f"outside the {self._capacity} slots (reserve first)"
                raise ValueError(f"at_slots[{i}] (tenant {tenant_ids[i]!r}): slot {slot} is {where}; expected a free slot")
        return slots.astype(np.int32)

    @contextlib.contextmanager
    def _all_or_nothing(self) -> Iterator[None]:
        """Puts the leaves, capacity and slots back as they were if the body raises (a grow
        that succeeded before a failed write included: growing does not donate the old
        leaves, and the caller holds the lock throughout). The version only ever rises: if
        the body moved it, it moves once more, so that a reader who saw the intermediate
        version never takes the restored store for it."""
        saved = (self._leaves, self._capacity, list(self._free), dict(self._slot_of))
        version = self.version
        try:
            yield
        except BaseException:
            self._leaves, self._capacity, self._free, self._slot_of = saved
            if self.version != version:
                self.version += 1
            raise

    def _claim_slots(self, slots: np.ndarray) -> np.ndarray:
        taken = set(slots.tolist())
        self._free = [slot for slot in self._free if slot not in taken]
        heapq.heapify(self._free)
        return slots

    def _take_free_slot(self) -> int:
        if self.sharding is None:
            return heapq.heappop(self._free)
        from jaxmt.sharding import pick_free_slot

        slot = pick_free_slot(self._free, self._capacity // len(self.devices))
        self._free.remove(slot)
        heapq.heapify(self._free)
        return slot

    def _write(self, slot: int, leaves: list[jax.Array]) -> None:
        if self.sharding is None:
            self._leaves = _write_slot(self._leaves, leaves, jnp.int32(slot))
        else:
            from jaxmt.sharding import write_slot_sharded

            self._leaves = write_slot_sharded(self._leaves, leaves, slot)

    def _renumber(self, old_per: int, new_per: int) -> None:
        """Slot numbers after every device's block grew from ``old_per`` to ``new_per`` slots."""
        from jaxmt.sharding import renumber_slot

        self._slot_of = {t: renumber_slot(s, old_per, new_per) for t, s in self._slot_of.items()}
        self._free = [renumber_slot(s, old_per, new_per) for s in self._free]
        self._free += [d * new_per + i for d in range(len(self.devices)) for i in range(old_per, new_per)]
        heapq.heapify(self._free)

    def _allocate(self, capacity: int) -> list[jax.Array]:
        try:
            if self.sharding is not None:  # created in place, block by block: no copy through one device
                return [jnp.zeros((capacity, *s.shape), s.dtype, device=self.sharding) for s in self.leaf_specs]
            return _zeros(self.leaf_specs, capacity, self.device)
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
        if self.sharding is not None:
            new_capacity = -(-new_capacity // len(self.devices)) * len(self.devices)
        try:
            if self.sharding is not None:
                from jaxmt.sharding import grow_sharded

                grown = grow_sharded(self._leaves, new_capacity)
            else:
                grown = _grown(self._leaves, new_capacity, self.device)
            jax.block_until_ready(grown)
        except Exception as exc:
            raise CapacityError(
                f"cannot grow the store from {self._capacity} to {new_capacity} slots "
                f"({self.bytes_per_tenant * new_capacity} bytes); the store keeps serving at its old size: {exc}"
            ) from exc
        if self.sharding is not None:
            self._renumber(self._capacity // len(self.devices), new_capacity // len(self.devices))
        else:
            for slot in range(self._capacity, new_capacity):
                heapq.heappush(self._free, slot)
        self._leaves = grown
        self._capacity = new_capacity
        self.version += 1
