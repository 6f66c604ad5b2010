"""``jaxmt.jax_compat``: one spelling for what jax versions spell differently, without the
deprecation warnings of the newer ones."""

from __future__ import annotations

import warnings

import jax
import numpy as np
import pytest

from jaxmt.jax_compat import single_device_sharding
from jaxmt.validation import abstract_rows, device_dtype


@pytest.mark.parametrize("memory_kind", [None, "device"])
def test_single_device_sharding_places_a_whole_array_on_the_device(memory_kind):
    device = jax.devices()[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sharding = single_device_sharding(device, memory_kind=memory_kind)
        placed = jax.device_put(np.arange(6.0, dtype=np.float32).reshape(2, 3), sharding)
    assert sharding.device_set == {device} and sharding.is_fully_replicated
    assert placed.sharding == sharding
    np.testing.assert_array_equal(np.asarray(placed), np.arange(6.0).reshape(2, 3))


@pytest.mark.parametrize("given, held", [
    (np.int64, np.int32), (np.uint64, np.uint32), (np.float64, np.float32), (">f4", np.float32),
    (np.int8, np.int8), ("bfloat16", "bfloat16"),
])
def test_rows_are_abstracted_in_the_dtype_jax_holds_them_in_without_a_warning(given, held):
    if jax.config.jax_enable_x64:
        pytest.skip("64-bit mode keeps 64-bit dtypes")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rows = abstract_rows((1, 3), given)
    assert rows.shape == (1, 3) and rows.dtype == np.dtype(held) == device_dtype(given)
