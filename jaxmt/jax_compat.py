"""What differs between the jax versions jaxmt runs on: 0.10 (what Python 3.11 installs), 0.11
(the GPU machine's) and 0.12 (what Python 3.12 installs)."""

from __future__ import annotations

import contextlib

import jax


def single_device_sharding(device: jax.Device, memory_kind: str | None = None) -> jax.sharding.Sharding:
    """A sharding that places a whole array on ``device`` (in ``memory_kind``, e.g.
    "pinned_host"). jax 0.12 deprecates constructing ``SingleDeviceSharding`` directly in
    favour of ``make_single_device_sharding``, which older releases may lack."""
    make = getattr(jax.sharding, "make_single_device_sharding", None)
    if make is not None:
        return make(device, memory_kind=memory_kind)
    return jax.sharding.SingleDeviceSharding(device, memory_kind=memory_kind)


# The GPU that Pallas kernels are lowered for where none is attached (see ``lowering_for_gpu``).
H100 = "NVIDIA H100 80GB HBM3"


def lowering_for_gpu(device_kind: str = H100, cores: int = 132) -> contextlib.AbstractContextManager:
    """A context in which ``jax.export(..., platforms=["cuda"])`` lowers Pallas GPU kernels for
    a GPU of ``device_kind`` on a machine that has none: jax 0.12's Triton lowering asks the
    target's compute capability of the device it lowers for, and a CPU-only machine has no
    GPU to ask (jax 0.10 lowered without one)."""
    target = jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=cores, platform="gpu")
    return jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=target))
