"""The tenant axis over several devices of one host: each device computes its own tenants.

The store's stacked leaves [capacity, ...] are split in contiguous blocks over a 1-D mesh
(``NamedSharding(mesh, P("tenants"))``): device d holds slots ``[d * per, (d + 1) * per)``
with ``per = capacity / devices``. A step's K = devices * k entries are laid out the same
way: block d of the step holds only entries whose slot lives on device d, so the compiled
program (a ``shard_map`` over the mesh) gathers every entry's weights from its own device's
shard. Tenants' weights never cross devices per step; only the input rows of a block go to
its device and the answers come back.

The layout is kept under change:

* adding writes the tenant's slot on its owner device only (that shard is updated in place,
  the others are reused as they are); new tenants go to the device with the most free slots,
  so tenants spread evenly;
* growing doubles every device's shard where it lives. Slot numbers are renumbered
  (slot ``d * per + i`` becomes ``d * 2 * per + i``), never moved: the store's ``version``
  changes and ``slot_of`` answers the new number;
* capacity is always a multiple of the device count.

A tenant mix whose busy tenants sit on one device leaves the other devices computing padding
in that step: placement is by slot, not by load.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxmt.buckets import BucketPolicy, Plan, Step, _make_step, _split_entries
from jaxmt.model import MultiTenantModel
from jaxmt.programs import ProgramKey
from jaxmt.steps import check_output_rows
from jaxmt.store import TenantStore
from jaxmt.validation import device_dtype

PyTree = Any

TENANT_AXIS = "tenants"


def tenant_mesh(devices: Sequence[jax.Device] | None = None, axis: str = TENANT_AXIS) -> Mesh:
    """A 1-D mesh over ``devices`` (default: every device of this host) named ``axis``."""
    devices = list(jax.local_devices() if devices is None else devices)
    if not devices:
        raise ValueError("tenant_mesh needs at least one device")
    if len(set(devices)) != len(devices):
        raise ValueError(f"devices must be distinct, got {devices}")
    return Mesh(np.asarray(devices, dtype=object), (axis,))


# ------------------------------------------------------------------ store layout
def shard_devices(sharding: NamedSharding, capacity: int) -> list[jax.Device]:
    """The devices holding the slot blocks of a store of ``capacity`` slots, in slot order.

    Raises:
      TypeError: the sharding is not a ``NamedSharding``.
      ValueError: the sharding does not give every device its own block of the slot axis
        (replicated, split along another axis, or spanning several hosts).
    """
    if not isinstance(sharding, NamedSharding):
        raise TypeError(f"the store's sharding must be a jax.sharding.NamedSharding, got {type(sharding).__name__}")
    if not sharding.is_fully_addressable:
        raise ValueError("the store's sharding spans several hosts; one store serves the devices of one host")
    shape = (capacity,)
    index_map = sharding.devices_indices_map(shape)
    starts = {device: index[0].indices(capacity)[0] for device, index in index_map.items()}
    if len(set(starts.values())) != len(starts):
        raise ValueError(
            f"sharding {sharding.spec} replicates slots over {len(starts)} devices; "
            f"expected the slot axis split over a 1-D mesh (PartitionSpec('{TENANT_AXIS}'))"
        )
    return sorted(starts, key=starts.__getitem__)


def shard_count(sharding: NamedSharding) -> int:
    """How many blocks the slot axis is split into (the device count of the mesh)."""
    return len(sharding.device_set)


def _ordered_shards(leaf: jax.Array) -> list[jax.Array]:
    """The single-device arrays of a leaf's slot blocks, in slot order."""
    shards = sorted(leaf.addressable_shards, key=lambda s: s.index[0].indices(leaf.shape[0])[0])
    return [s.data for s in shards]


@functools.partial(jax.jit, donate_argnums=(0,))
def _write_local(shard_leaves: list[jax.Array], new: list[jax.Array], local_slot: jax.Array) -> list[jax.Array]:
    return [jax.lax.dynamic_update_index_in_dim(s, n, local_slot, 0) for s, n in zip(shard_leaves, new)]


def write_slot_sharded(leaves: list[jax.Array], new: list[jax.Array], slot: int) -> list[jax.Array]:
    """The stacked leaves with ``slot`` set to ``new``, written on the slot's device only.

    The owner device's shards are donated and updated in place; the other devices' shards
    are reused as they are. ``new`` may live anywhere: it is copied to the owner device.
    """
    per_leaf = [_ordered_shards(leaf) for leaf in leaves]
    per = per_leaf[0][0].shape[0]
    owner, local = divmod(int(slot), per)
    device = next(iter(per_leaf[0][owner].devices()))
    updated = _write_local([shards[owner] for shards in per_leaf], jax.device_put(new, device), jnp.int32(local))
    return [
        jax.make_array_from_single_device_arrays(leaf.shape, leaf.sharding, [*shards[:owner], fresh, *shards[owner + 1 :]])
        for leaf, shards, fresh in zip(leaves, per_leaf, updated)
    ]


@jax.jit
def _write_local_rows(shard_leaves: list[jax.Array], new: list[jax.Array], local_slots: jax.Array) -> list[jax.Array]:
    return [s.at[local_slots].set(n) for s, n in zip(shard_leaves, new)]


def write_slots_sharded(leaves: list[jax.Array], new: list[jax.Array], slots: Sequence[int]) -> list[jax.Array]:
    """The stacked leaves with row i of ``new`` written into ``slots[i]``, each on its slot's
    device (one write per device).

    Nothing is donated: each device that takes rows writes a copy of its block, so ``leaves``
    stay whole. A caller that puts them back when a later device's write fails (all or
    nothing) gets them as they were; a donated block would be freed under them.
    """
    per_leaf = [_ordered_shards(leaf) for leaf in leaves]
    per = per_leaf[0][0].shape[0]
    slots = np.asarray(slots, np.int64)
    owners = slots // per
    blocks = [list(shards) for shards in per_leaf]
    for owner in np.unique(owners).tolist():
        rows = np.flatnonzero(owners == owner)
        device = next(iter(per_leaf[0][owner].devices()))
        rows_new, local = jax.device_put(([leaf[rows] for leaf in new], (slots[rows] % per).astype(np.int32)), device)
        updated = _write_local_rows([shards[owner] for shards in per_leaf], rows_new, local)
        for shards, fresh in zip(blocks, updated):
            shards[owner] = fresh
    return [jax.make_array_from_single_device_arrays(leaf.shape, leaf.sharding, shards) for leaf, shards in zip(leaves, blocks)]


@functools.partial(jax.jit, static_argnums=(1,))
def _extend_local(shard: jax.Array, extra: int) -> jax.Array:
    return jnp.concatenate([shard, jnp.zeros((extra, *shard.shape[1:]), shard.dtype)])


def grow_sharded(leaves: list[jax.Array], new_capacity: int) -> list[jax.Array]:
    """Every leaf grown to ``new_capacity`` slots by extending each device's block in place.

    Old slot ``d * per + i`` is at ``d * new_per + i`` afterwards (see ``renumber_slot``).
    """
    out = []
    for leaf in leaves:
        shards = _ordered_shards(leaf)
        extra = new_capacity // len(shards) - shards[0].shape[0]
        grown = [_extend_local(shard, extra) for shard in shards]
        out.append(jax.make_array_from_single_device_arrays((new_capacity, *leaf.shape[1:]), leaf.sharding, grown))
    return out


def renumber_slot(slot: int, old_per: int, new_per: int) -> int:
    """Where ``slot`` of a store with ``old_per`` slots per device is after growing to ``new_per``."""
    owner, local = divmod(slot, old_per)
    return owner * new_per + local


def pick_free_slot(free: Sequence[int], slots_per_device: int) -> int:
    """The lowest free slot of the device with the most free slots (spreads tenants evenly)."""
    free_by_device = collections.Counter(slot // slots_per_device for slot in free)
    device = max(free_by_device, key=lambda d: (free_by_device[d], -d))
    return min(slot for slot in free if slot // slots_per_device == device)


# ------------------------------------------------------------------------ plans
def make_sharded_plan(slots: Sequence[int] | np.ndarray, policy: BucketPolicy, devices: int, slots_per_device: int) -> Plan:
    """Like ``make_plan``, with each step's entries in per-device blocks.

    Step K is ``devices * k`` where k is the tenant bucket of the busiest device in that step;
    block d (entries ``[d * k, (d + 1) * k)``) holds only slots of device d, padded with a
    slot of device d. So the per-device ladder is ``policy.tenant_buckets``.

    Args:
      slots: int [n]: the store slot of each request row, in request order.
      policy: the bucket ladders (K per device, B per entry).
      devices: number of slot blocks.
      slots_per_device: the block size (capacity / devices).
    """
    slots = np.asarray(slots, dtype=np.int64)
    n = int(slots.shape[0])
    if n == 0:
        return Plan(steps=(), rows=0)
    order, entry_slot, entry_start, entry_count = _split_entries(slots, policy)
    entry_device = entry_slot // slots_per_device
    by_device = []
    for d in range(devices):
        mine = np.flatnonzero(entry_device == d)
        by_device.append(mine[np.argsort(-entry_count[mine], kind="stable")])  # largest first
    k_max = policy.max_tenants
    steps = []
    for first in range(0, max(len(e) for e in by_device), k_max):
        chosen = [e[first : first + k_max] for e in by_device]
        k = policy.tenant_bucket(max(len(c) for c in chosen))
        b = policy.row_bucket(int(max(entry_count[c].max() for c in chosen if len(c))))
        blocks = []
        for d, c in enumerate(chosen):
            if len(c):
                blocks.append(_make_step(order, entry_slot[c], entry_start[c], entry_count[c], policy, tenant_bucket=k, row_bucket=b))
            else:  # an idle device computes one padding entry of its own, discarded
                empty = np.zeros(0, np.int64)
                blocks.append(Step(np.full(k, d * slots_per_device, np.int32), np.zeros((k, b), np.int32), empty, empty))
        steps.append(
            Step(
                slots=np.concatenate([blk.slots for blk in blocks]),
                row_index=np.concatenate([blk.row_index for blk in blocks]),
                out_positions=np.concatenate([blk.out_positions + d * k * b for d, blk in enumerate(blocks)]),
                out_rows=np.concatenate([blk.out_rows for blk in blocks]),
            )
        )
    return Plan(steps=tuple(steps), rows=n)


# ---------------------------------------------------------------------- program
def _sharded_step_program(
    apply_kb: Callable, treedef: Any, mesh: Mesh, slots_per_device: int, leaves: list[jax.Array], slots: jax.Array, x_kb: PyTree
) -> PyTree:
    """One step as a shard_map: each device gathers its block's slots from its own shard."""
    spec = P(mesh.axis_names[0])

    def local_step(shard_leaves: list[jax.Array], block_slots: jax.Array, block_x: PyTree) -> PyTree:
        local = block_slots % slots_per_device  # global slot -> index in this device's shard
        params_k = jax.tree_util.tree_unflatten(treedef, [jnp.take(leaf, local, axis=0) for leaf in shard_leaves])
        y = apply_kb(params_k, block_x)
        check_output_rows(y, block_x.shape[1])
        return y

    # check_vma=False: the lowering interpreter (jaxmt.lowering) evaluates the model's jaxpr
    # with constants that carry no mesh-axis annotation; every value here is per-device anyway.
    return jax.shard_map(local_step, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(
        leaves, slots, x_kb
    )


class ShardedMultiTenantModel(MultiTenantModel):
    """A ``MultiTenantModel`` whose tenants are spread over the devices of a 1-D mesh.

    Same API and answers as ``MultiTenantModel`` (``predict``, ``dispatch``, ``warmup``,
    tenant management, ``from_flax``). The tenant bucket ladder counts entries PER DEVICE:
    a step runs up to ``devices * buckets.max_tenants`` tenant entries.

    Args:
      apply_fn, example_params, capacity, buckets, **kwargs: as for ``MultiTenantModel``
        (``device`` excepted). ``capacity`` is rounded up to a multiple of the device count.
      mesh: a 1-D ``jax.sharding.Mesh`` (default: ``tenant_mesh()``, every local device).

    Example:
      >>> import jax, numpy as np, jaxmt
      >>> def apply_fn(params, x):
      ...     return x @ params["w"]
      >>> def params_of(seed):
      ...     return {"w": jax.random.normal(jax.random.key(seed), (3, 2))}
      >>> mt = jaxmt.ShardedMultiTenantModel(apply_fn, params_of(0), capacity=4)
      >>> for name, seed in [("a", 1), ("b", 2), ("c", 3)]:
      ...     mt.add_tenant(name, params_of(seed))
      >>> x = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
      >>> mt.predict(["a", "c", "b", "a"], x).shape
      (4, 2)
    """

    def __init__(
        self,
        apply_fn: Callable[[PyTree, Any], Any],
        example_params: PyTree,
        capacity: int | None = None,
        buckets: BucketPolicy | None = None,
        *,
        mesh: Mesh | None = None,
        **kwargs: Any,
    ):
        if "device" in kwargs:
            raise TypeError("ShardedMultiTenantModel places tenants over a mesh; pass mesh=, not device=")
        mesh = tenant_mesh() if mesh is None else mesh
        if not isinstance(mesh, Mesh) or len(mesh.axis_names) != 1:
            raise ValueError(f"mesh must be a 1-D jax.sharding.Mesh (see jaxmt.tenant_mesh), got {mesh!r}")
        self.mesh = mesh
        self.devices = int(mesh.devices.size)
        # Where a step's [K, ...] arrays live (block d on device d), and the store's slot layout.
        self.entry_sharding = NamedSharding(mesh, P(mesh.axis_names[0]))
        super().__init__(apply_fn, example_params, capacity, buckets, **kwargs)

    _whole_store_steps = False  # run_step always gathers per device

    def _host_input_buffers(self, host_inputs: bool | None) -> None:
        if host_inputs:
            raise ValueError("ShardedMultiTenantModel places each step's rows per device; host_inputs=True is not supported")
        return None

    @property
    def input_device(self) -> None:
        """None: each step's rows are placed per device (block d on device d), not staged."""
        return None

    def _output_sharding(self, outputs_to_host: bool | None) -> None:
        if outputs_to_host:
            raise ValueError("ShardedMultiTenantModel keeps step outputs on the mesh; outputs_to_host=True is not supported")
        return None

    def _make_store(self, example_params: PyTree, capacity: int | None, max_capacity: int | None, device: Any) -> TenantStore:
        return TenantStore(example_params, capacity, max_capacity=max_capacity, sharding=self.entry_sharding)

    @property
    def max_step_entries(self) -> int:
        """The largest tenant bucket on every device: a step of tenants spread evenly over
        the mesh holds that many (a device given more runs them in a second step)."""
        return self.devices * self.buckets.max_tenants

    @property
    def slots_per_device(self) -> int:
        """Store slots per device (the capacity over the device count): slot // this is a slot's device."""
        return self.store.capacity // self.devices

    def device_of(self, tenant_id: Any) -> jax.Device:
        """The device holding ``tenant_id``'s weights (raises UnknownTenantError)."""
        with self.store.lock:  # the slot and the block size of one layout (growing renumbers slots)
            return self.store.devices[self.store.slot_of(tenant_id) // self.slots_per_device]

    def _plan(self, slots: np.ndarray) -> Plan:
        return make_sharded_plan(slots, self.buckets, self.devices, self.slots_per_device)

    def run_step(self, step: Step, x_kb: np.ndarray) -> PyTree:
        """Launches one planned step (K = devices * k) on gathered input [K, B, *row_shape]."""
        program = self.programs.get(self._key(step.tenant_bucket // self.devices, step.row_bucket))
        slots, x_kb = jax.device_put((step.slots, x_kb), self.entry_sharding)  # block d -> device d only
        return program(self.store.stacked_leaves, slots, x_kb)

    def _zero_step_inputs(self, key: ProgramKey) -> tuple:
        k = key.tenant_bucket
        slots = np.repeat(np.arange(self.devices, dtype=np.int32) * self.slots_per_device, k)  # block d: a slot of device d
        x_kb = np.zeros((k * self.devices, key.row_bucket, *key.row_shape), key.row_dtype)
        return jax.device_put((slots, x_kb), self.entry_sharding)

    def _program_device(self) -> jax.Device:
        return self.store.devices[0]

    def _lower_program(self, key: ProgramKey) -> Any:
        k = key.tenant_bucket * self.devices  # the key counts entries per device
        leaves = [
            jax.ShapeDtypeStruct((key.capacity, *s.shape), s.dtype, sharding=self.store.sharding) for s in self.store.leaf_specs
        ]
        slots = jax.ShapeDtypeStruct((k,), jnp.int32, sharding=self.entry_sharding)
        x_kb = jax.ShapeDtypeStruct((k, key.row_bucket, *key.row_shape), device_dtype(key.row_dtype), sharding=self.entry_sharding)
        fn = functools.partial(
            _sharded_step_program, self._apply_kb, self.store.treedef, self.mesh, key.capacity // self.devices
        )
        return jax.jit(fn).lower(leaves, slots, x_kb)

    def stats(self) -> dict[str, Any]:
        """``MultiTenantModel.stats()`` plus the device count and the tenant spread over devices."""
        model = super().stats()
        with self.store.lock:  # the block size of the layout whose slots are counted, and its tenants and slots
            per = self.slots_per_device
            counts = collections.Counter(self.store.slot_of(t) // per for t in self.store.tenants)
            store = self.store.stats()
        per_device = [counts.get(d, 0) for d in range(self.devices)]
        return {**model, **store, "devices": self.devices, "max_device_tenants": max(per_device), "min_device_tenants": min(per_device)}
