"""What differs between the jax versions jaxmt runs on (0.10 with Python 3.11, 0.12 with 3.12)."""

from __future__ import annotations

import jax


def single_device_sharding(device: jax.Device, memory_kind: str | None = None) -> jax.sharding.Sharding:
    """A sharding that places a whole array on ``device`` (in ``memory_kind``, e.g.
    "pinned_host"). jax 0.12 deprecates constructing ``SingleDeviceSharding`` directly in
    favour of ``make_single_device_sharding``, which older releases may lack."""
    make = getattr(jax.sharding, "make_single_device_sharding", None)
    if make is not None:
        return make(device, memory_kind=memory_kind)
    return jax.sharding.SingleDeviceSharding(device, memory_kind=memory_kind)
