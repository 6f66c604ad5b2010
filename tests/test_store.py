"""TenantStore: slots written in place, doubling growth, slot reuse, validation that changes nothing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmt import (
    CapacityError,
    DuplicateTenantError,
    NonFiniteParamsError,
    ParamMismatchError,
    TenantStore,
    UnknownTenantError,
)


def _params(seed: int, width: int = 6) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "dense": {"w": rng.normal(size=(width, 3)).astype(np.float32), "b": rng.normal(size=(3,)).astype(np.float32)},
        "steps": np.int32(seed),
    }


def _snapshot(store: TenantStore) -> tuple:
    return (
        store.tenants,
        store.capacity,
        store.version,
        [np.asarray(leaf).copy() for leaf in store.stacked_leaves],
    )


def _assert_unchanged(store: TenantStore, before: tuple) -> None:
    tenants, capacity, version, leaves = before
    assert store.tenants == tenants and store.capacity == capacity and store.version == version
    for old, new in zip(leaves, store.stacked_leaves):
        np.testing.assert_array_equal(old, np.asarray(new))


def test_add_writes_its_slot_in_place_and_leaves_others():
    store = TenantStore(_params(0), capacity=4)
    store.add("a", _params(1))
    pointers = [leaf.unsafe_buffer_pointer() for leaf in store.stacked_leaves]
    before = [np.asarray(leaf).copy() for leaf in store.stacked_leaves]
    store.add("b", _params(2))
    if jax.default_backend() in ("cpu", "gpu"):  # both honour donation: no copy of the store
        assert [leaf.unsafe_buffer_pointer() for leaf in store.stacked_leaves] == pointers
    slot_a, slot_b = store.slot_of("a"), store.slot_of("b")
    assert slot_a != slot_b
    for old, new in zip(before, store.stacked_leaves):
        np.testing.assert_array_equal(old[slot_a], np.asarray(new)[slot_a])
    got = store.get("b")
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, got), _params(2))


def test_capacity_doubles_and_existing_tenants_survive():
    store = TenantStore(_params(0), capacity=2)
    for i in range(5):
        store.add(i, _params(10 + i))
    assert store.capacity == 8 and len(store) == 5
    for i in range(5):
        np.testing.assert_array_equal(np.asarray(store.get(i)["dense"]["w"]), _params(10 + i)["dense"]["w"])
    assert store.param_bytes == 8 * store.bytes_per_tenant
    assert store.bytes_per_tenant == (6 * 3 + 3 + 1) * 4


def test_removed_slots_are_reused_lowest_first():
    store = TenantStore(_params(0), capacity=4)
    for name in "abcd":
        store.add(name, _params(ord(name)))
    freed = [store.remove("c"), store.remove("a")]
    assert sorted(freed) == [0, 2]
    assert store.add("e", _params(5)) == 0
    assert store.add("f", _params(6)) == 2
    assert store.capacity == 4 and store.tenants == ["b", "d", "e", "f"]


def test_update_replaces_weights_in_place():
    store = TenantStore(_params(0), capacity=2)
    store.add("a", _params(1))
    slot = store.slot_of("a")
    store.update("a", _params(7))
    assert store.slot_of("a") == slot
    np.testing.assert_array_equal(np.asarray(store.get("a")["dense"]["b"]), _params(7)["dense"]["b"])


def _bad_structure():
    p = _params(3)
    del p["steps"]
    return p


def _extra_leaf():
    p = _params(3)
    p["dense"]["extra"] = np.zeros(2, np.float32)
    return p


def _bad_shape():
    return _params(3, width=5)


def _bad_dtype():
    p = _params(3)
    p["dense"]["w"] = p["dense"]["w"].astype(np.float16)
    return p


def _nan_leaf():
    p = _params(3)
    p["dense"]["b"][1] = np.nan
    return p


def _inf_leaf():
    p = _params(3)
    p["dense"]["w"][0, 0] = np.inf
    return p


@pytest.mark.parametrize(
    "make_params, error, leaf",
    [
        (_bad_structure, ParamMismatchError, "steps"),
        (_extra_leaf, ParamMismatchError, "extra"),
        (_bad_shape, ParamMismatchError, "['dense']['w']"),
        (_bad_dtype, ParamMismatchError, "['dense']['w']"),
        (_nan_leaf, NonFiniteParamsError, "['dense']['b']"),
        (_inf_leaf, NonFiniteParamsError, "['dense']['w']"),
    ],
)
@pytest.mark.parametrize("operation", ["add", "update"])
def test_bad_params_raise_naming_the_leaf_and_change_nothing(make_params, error, leaf, operation):
    store = TenantStore(_params(0), capacity=2)
    store.add("a", _params(1))
    before = _snapshot(store)
    with pytest.raises(error, match="tenant 'a'" if operation == "update" else "tenant 'new'") as info:
        getattr(store, operation)("a" if operation == "update" else "new", make_params())
    assert leaf in str(info.value)
    _assert_unchanged(store, before)


@pytest.mark.parametrize("template_w", ["jax float32", "numpy float64"])
def test_leaves_take_the_dtype_jax_keeps_them_in(template_w):
    """A Python float is float32 in the store, as jnp.asarray makes it, and so is NumPy's
    float64 (JAX keeps no float64 without 64-bit mode): a template matches itself, tenants
    written either way match it, and a dtype JAX does keep apart (float16) does not."""
    w = jnp.ones((3, 2)) if template_w == "jax float32" else np.ones((3, 2))
    template = {"w": w, "scale": 1.0}
    store = TenantStore(template, capacity=4)
    assert [np.dtype(s.dtype) for s in store.leaf_specs] == [np.float32, np.float32]
    store.add("same as template", template)
    store.add("scalar", {"w": jnp.zeros((3, 2)), "scale": 2.5})
    store.add("numpy float64", {"w": np.zeros((3, 2)), "scale": np.float64(2.5)})
    for tenant in ("scalar", "numpy float64"):
        got = store.get(tenant)
        assert got["scale"].dtype == jnp.float32 and float(got["scale"]) == 2.5 and got["w"].dtype == jnp.float32
    with pytest.raises(ParamMismatchError, match=r"leaf \['w'\] is float16\[3, 2\], expected float32\[3, 2\]"):
        store.add("float16", {"w": np.zeros((3, 2), np.float16), "scale": 2.5})


@pytest.mark.parametrize("operation", ["add", "update", "add_stacked"])
def test_leaves_in_swapped_byte_order_are_their_native_dtype(operation):
    """A big-endian array (np.load of a file written so, np.frombuffer of '>f4' bytes) holds
    the same float32 values: it matches a float32 template and is stored in native order, as
    a swapped template is a native store (JAX holds no swapped dtype)."""
    template = {"w": np.arange(6, dtype=">f4").reshape(3, 2), "steps": np.array(7, ">i8")}
    store = TenantStore(template, capacity=2)
    assert [np.dtype(s.dtype) for s in store.leaf_specs] == [np.int32, np.float32]
    store.add("a", {"w": np.zeros((3, 2), np.float32), "steps": np.int32(0)})
    swapped = {"w": np.array([[1.5, -2.0], [3e38, 0.25], [7.0, 8.0]], ">f4"), "steps": np.array(2**31 - 1, ">i8")}
    if operation == "add_stacked":
        store.add_stacked(["b"], jax.tree.map(lambda leaf: leaf[None], swapped))
    else:
        getattr(store, operation)("a" if operation == "update" else "b", swapped)
    got = store.get("a" if operation == "update" else "b")
    assert got["w"].dtype == np.float32 and got["steps"].dtype == np.int32
    np.testing.assert_array_equal(np.asarray(got["w"]), swapped["w"].astype(np.float32))
    assert int(got["steps"]) == 2**31 - 1


@pytest.mark.parametrize("operation", ["add", "update"])
def test_wide_integers_that_the_store_would_wrap_are_refused(operation):
    """Without 64-bit mode the store keeps int64 leaves as int32: values that fit are taken,
    values that do not are refused naming the leaf instead of wrapping (2**40 + 5 -> 5)."""
    store = TenantStore(_params(0), capacity=2)
    store.add("a", _params(1))
    before = _snapshot(store)
    fits = {**_params(2), "steps": np.int64(2**31 - 1)}
    wraps = {**_params(2), "steps": np.int64(2**40 + 5)}
    with pytest.raises(ParamMismatchError, match=r"\['steps'\].*do not fit int32"):
        getattr(store, operation)("a" if operation == "update" else "new", wraps)
    _assert_unchanged(store, before)
    getattr(store, operation)("a" if operation == "update" else "new", fits)
    assert int(store.get("a" if operation == "update" else "new")["steps"]) == 2**31 - 1


def test_duplicate_and_unknown_ids():
    store = TenantStore(_params(0), capacity=2)
    store.add("a", _params(1))
    before = _snapshot(store)
    with pytest.raises(DuplicateTenantError, match="'a'"):
        store.add("a", _params(2))
    with pytest.raises(UnknownTenantError, match="'zz'") as info:
        store.update("zz", _params(2))
    assert isinstance(info.value, KeyError) and info.value.tenant_id == "zz"
    with pytest.raises(UnknownTenantError):
        store.remove("zz")
    with pytest.raises(TypeError, match="hashable"):
        store.add(["not", "hashable"], _params(2))
    _assert_unchanged(store, before)


def test_a_repeated_id_among_numpy_integers_and_tuples_is_named():
    """Ids are compared as the store's dict compares them: a NumPy integer beside a tuple id
    (which NumPy would compare elementwise) does not hide the repeat."""
    store = TenantStore(_params(0), capacity=2)
    stacked = jax.tree.map(lambda *leaves: np.stack(leaves), *[_params(i) for i in range(3)])
    with pytest.raises(DuplicateTenantError, match=r"tenant np.int64\(0\) appears more than once"):
        store.add_stacked([np.int64(0), ("a", 1), np.int64(0)], stacked)
    assert store.tenants == [] and store.version == 0


def test_capacity_limit_raises_and_store_keeps_serving():
    store = TenantStore(_params(0), capacity=2, max_capacity=2)
    store.add("a", _params(1))
    store.add("b", _params(2))
    before = _snapshot(store)
    with pytest.raises(CapacityError, match="max_capacity=2"):
        store.add("c", _params(3))
    _assert_unchanged(store, before)
    store.remove("a")
    store.add("c", _params(3))
    assert store.tenants == ["b", "c"]


def test_params_on_host_or_device_and_reserve():
    store = TenantStore(jax.tree.map(jnp.asarray, _params(0)), capacity=1)
    store.add("host", _params(1))
    store.add("device", jax.tree.map(jnp.asarray, _params(2)))
    store.reserve(16)
    assert store.capacity == 16 and store.tenants == ["host", "device"]
    assert store.stats()["resident_param_bytes"] == 2 * store.bytes_per_tenant


def test_the_template_holds_shapes_and_dtypes_not_a_tenants_arrays():
    """The store keeps the example params' structure only: their arrays would be one tenant's
    worth of device memory that no slot accounts for."""
    example = jax.tree_util.tree_map(jnp.asarray, _params(0))
    store = TenantStore(example, capacity=2)
    leaves = jax.tree_util.tree_leaves(store.template)
    assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves)
    assert [(leaf.shape, leaf.dtype) for leaf in leaves] == [(s.shape, s.dtype) for s in store.leaf_specs]
    assert jax.tree_util.tree_structure(store.template) == jax.tree_util.tree_structure(example) == store.treedef
    store.add("a", _params(1))
    stacked = jax.tree_util.tree_unflatten(store.treedef, store.stacked_leaves)  # what step programs do
    assert jax.tree_util.tree_structure(stacked) == store.treedef


def test_a_tenants_params_are_read_under_the_store_lock():
    """Between the slot look-up and the read, no write may donate the buffers or hand the slot
    to another tenant: another thread cannot take the lock meanwhile."""
    import threading

    store = TenantStore(_params(0), capacity=2)
    store.add("a", _params(1))
    taken_by_another_thread = []
    look_up = store.slot_of

    def slot_of(tenant_id):
        probe = threading.Thread(target=lambda: taken_by_another_thread.append(store.lock.acquire(blocking=False)))
        probe.start()
        probe.join()
        return look_up(tenant_id)

    store.slot_of = slot_of
    np.testing.assert_array_equal(store.get("a")["dense"]["w"], _params(1)["dense"]["w"])
    assert taken_by_another_thread == [False]


def _write_one_buffer(store: TenantStore, operation: str, tenant_id: str, buffer: dict) -> None:
    if operation == "add":
        store.add(tenant_id, buffer)
    elif operation == "update":
        store.update(tenant_id, buffer)
    else:
        store.add_stacked([tenant_id], jax.tree.map(lambda leaf: leaf[None], buffer))


@pytest.mark.parametrize("operation", ["add", "update", "add_stacked"])
def test_a_tenant_keeps_the_values_given_though_the_callers_arrays_are_reused(operation):
    """A loader that reads every tenant into one reused NumPy buffer hands it to the store and
    overwrites it at once: each tenant must keep what the buffer held when it was given (on a
    CPU ``device_put`` aliases NumPy memory, and the write into the slot runs after the call
    returns). Integer leaves, as a quantized model has, are checked for NaN by no program."""
    buffer = {"q": np.zeros((1024, 1024), np.int32), "scale": np.ones((4,), np.float32)}
    store = TenantStore(buffer, capacity=8)
    ids = [f"t{i}" for i in range(8)]
    if operation == "update":
        for tenant_id in ids:
            store.add(tenant_id, buffer)
    for i, tenant_id in enumerate(ids):
        buffer["q"][...] = i + 1
        buffer["scale"][...] = i + 1
        _write_one_buffer(store, operation, tenant_id, buffer)
    buffer["q"][...] = -1
    buffer["scale"][...] = -1
    for i, tenant_id in enumerate(ids):
        got = store.get(tenant_id)
        assert np.all(np.asarray(got["q"]) == i + 1) and np.all(np.asarray(got["scale"]) == i + 1), tenant_id


def test_stats_count_a_tenant_removed_meanwhile_wholly_before_or_after():
    """A metrics scrape while tenants come and go: every figure of one ``stats()`` is of one
    store (a removal between its reads reported, e.g., 2 resident tenants and 1 tenant's bytes)."""
    import threading

    store = TenantStore(_params(0), capacity=4)
    for name in "abc":
        store.add(name, _params(ord(name)))
    remover = threading.Thread(target=store.remove, args=("a",))

    class RemovesWhileCounted(dict):
        def __len__(self) -> int:
            count = super().__len__()
            if remover.ident is None:  # the first count read: the removal comes right after it
                remover.start()
                remover.join(timeout=0.5)  # done at once unless stats() holds the store
            return count

    store._slot_of = RemovesWhileCounted(store._slot_of)
    stats = store.stats()
    remover.join()
    assert stats["resident_param_bytes"] == stats["resident_tenants"] * stats["bytes_per_tenant"]
    assert stats["free_slots"] == stats["capacity"] - stats["resident_tenants"]
    assert store.tenants == ["b", "c"] and store.stats()["resident_tenants"] == 2


def test_stats_do_not_wait_for_a_writer_holding_the_store():
    """``stats()`` serves metrics scrapes (``TenantReplica.metrics_text``, on the replica's
    event loop): it must not wait while another thread holds ``lock``, as the Scheduler's
    dispatch does through a program's compile and a store grow does through its copy."""
    import threading

    store = TenantStore(_params(0), capacity=4)
    for name in "ab":
        store.add(name, _params(ord(name)))
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with store.lock:
            held.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(30)
    got = []
    reader = threading.Thread(target=lambda: got.append(store.stats()))
    reader.start()
    reader.join(timeout=2.0)
    answered = not reader.is_alive()
    release.set()
    holder.join()
    reader.join()
    assert answered
    assert (got[0]["resident_tenants"], got[0]["capacity"], got[0]["free_slots"]) == (2, 4, 2)


def test_at_slots_naming_a_taken_slot_names_the_tenant_and_changes_nothing():
    store = TenantStore(_params(0), capacity=4)
    store.add("a", _params(1))
    stacked = jax.tree.map(lambda *leaves: np.stack(leaves), _params(2), _params(3))
    with pytest.raises(ValueError, match=r"at_slots\[1\] \(tenant 'c'\): slot 0 is taken"):
        store.add_stacked(["b", "c"], stacked, at_slots=[1, 0])
    with pytest.raises(ValueError, match=r"at_slots\[0\] \(tenant 'b'\): slot 9 is outside the 4 slots"):
        store.add_stacked(["b", "c"], stacked, at_slots=[9, 1])
    assert store.tenants == ["a"]


def test_example_params_without_leaves_are_named():
    with pytest.raises(ParamMismatchError, match=r"example_params has no array leaves, got dict \{'w': None\}"):
        TenantStore({"w": None})
