"""Params checked against the template: a mismatch names the tenant, the path where the trees
differ, what the template has there and what was given, and changes nothing; a FrozenDict
stands for a dict."""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest
from flax.core import freeze

from jaxmt import ParamMismatchError, TenantStore


def _w(value: float = 0.0) -> np.ndarray:
    return np.full((3, 2), value, np.float32)


def _snapshot(store: TenantStore) -> tuple:
    return store.tenants, store.capacity, store.version, [np.asarray(leaf).copy() for leaf in store.stacked_leaves]


def _assert_unchanged(store: TenantStore, before: tuple) -> None:
    tenants, capacity, version, leaves = before
    assert (store.tenants, store.capacity, store.version) == (tenants, capacity, version)
    for old, new in zip(leaves, store.stacked_leaves):
        np.testing.assert_array_equal(old, np.asarray(new))


def _raises_and_changes_nothing(template, given, operation: str, message: str) -> None:
    """``operation`` ("add" a new tenant or "update" a resident one) with ``given`` raises
    ParamMismatchError naming the tenant and matching ``message``; the store is as it was."""
    store = TenantStore(template, capacity=1)
    store.add("resident", template)
    before = _snapshot(store)
    tenant = "new" if operation == "add" else "resident"
    with pytest.raises(ParamMismatchError, match=f"^tenant '{tenant}': .*" + message):
        getattr(store, operation)(tenant, given)
    _assert_unchanged(store, before)


# ---------------------------------------------------------------- structure: same leaf paths
STRUCTURE_CASES = {
    "a list where the template has a tuple": (
        {"enc": {"layers": (_w(), _w())}, "dec": _w()},
        {"enc": {"layers": [_w(), _w()]}, "dec": _w()},
        "['enc']['layers'] is list of 2, expected tuple of 2",
    ),
    "a key missing whose template value is None": (
        {"enc": {"w": _w(), "bias": None}, "dec": _w()},
        {"enc": {"w": _w()}, "dec": _w()},
        "['enc']['bias'] is missing, expected None",
    ),
    "a key missing whose template value is an empty dict": (
        {"enc": {"w": _w(), "state": {}}, "dec": _w()},
        {"enc": {"w": _w()}, "dec": _w()},
        "['enc']['state'] is missing, expected empty dict",
    ),
    "an array where the template has None": (
        {"w": _w(), "bias": None},
        {"w": _w(), "bias": np.zeros(2, np.float32)},
        "['bias'] is float32[2], expected None",
    ),
    "a dict where the template has an array": (
        {"w": _w(), "b": _w()},
        {"w": {"kernel": _w()}, "b": _w()},
        "['w'] is dict with keys ['kernel'], expected float32[3, 2]",
    ),
    "an extra entry": (
        {"w": _w()},
        {"w": _w(), "extra": None},
        "unexpected extra entry ['extra'] (None), not in the template",
    ),
    "a list at the top level for a tuple template": (
        (_w(), _w()),
        [_w(), _w()],
        "the top level is list of 2, expected tuple of 2",
    ),
}


@pytest.mark.parametrize("operation", ["add", "update"])
@pytest.mark.parametrize("case", list(STRUCTURE_CASES))
def test_a_structure_difference_names_the_path_with_expected_and_given(case, operation):
    template, given, message = STRUCTURE_CASES[case]
    _raises_and_changes_nothing(template, given, operation, re.escape(f"structure differs from the template ({message})"))


def test_a_structure_difference_in_stacked_params_names_the_path():
    template = {"enc": {"layers": (_w(), _w())}}
    store = TenantStore(template, capacity=2)
    before = _snapshot(store)
    stacked = {"enc": {"layers": [np.stack([_w()] * 2), np.stack([_w()] * 2)]}}
    with pytest.raises(ParamMismatchError, match=re.escape(
        "stacked params of tenants ['a', 'b']: pytree structure differs from the template "
        "(['enc']['layers'] is list of 2, expected tuple of 2)"
    )):
        store.add_stacked(["a", "b"], stacked)
    _assert_unchanged(store, before)


# ------------------------------------------------------------------ FrozenDict stands for dict
def test_a_frozendict_is_accepted_for_a_dict_template_and_read_back_as_the_template():
    """Linen variables may come as a FrozenDict (older flax, ``flax.core.freeze``): they hold
    the same entries, matched by key, and the store keeps only leaves."""
    template = {"params": {"dense": {"kernel": _w(), "bias": np.zeros(2, np.float32)}}, "batch_stats": {"mean": np.zeros(2, np.float32)}}
    store = TenantStore(template, capacity=2)
    given = {"params": {"dense": {"kernel": _w(1.0), "bias": np.full(2, 2.0, np.float32)}}, "batch_stats": {"mean": np.full(2, 3.0, np.float32)}}
    store.add("frozen", freeze(given))
    store.add("half frozen", {"params": freeze(given["params"]), "batch_stats": given["batch_stats"]})
    store.update("frozen", freeze(given))
    for tenant in ("frozen", "half frozen"):
        got = store.get(tenant)
        assert jax.tree.structure(got) == jax.tree.structure(template)
        jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, got), given)


def test_a_dict_is_accepted_for_a_frozendict_template_and_stacked_too():
    template = freeze({"w": _w(), "b": np.zeros(2, np.float32)})
    store = TenantStore(template, capacity=2)
    store.add("plain", {"w": _w(1.0), "b": np.ones(2, np.float32)})
    store.add_stacked(["x", "y"], {"w": np.stack([_w(2.0), _w(3.0)]), "b": np.zeros((2, 2), np.float32)})
    np.testing.assert_array_equal(np.asarray(store.get("plain")["w"]), _w(1.0))
    np.testing.assert_array_equal(np.asarray(store.get("y")["w"]), _w(3.0))


@pytest.mark.parametrize("operation", ["add", "update"])
def test_a_frozendict_with_other_keys_is_refused_naming_the_key(operation):
    template = {"params": {"w": _w(), "b": None}}
    _raises_and_changes_nothing(template, freeze({"params": {"w": _w()}}), operation, re.escape("['params']['b'] is missing, expected None"))


# ------------------------------------------------------------------------- leaves of no array
LEAF_CASES = {
    "a string": ("b", "oops", r"leaf \['b'\] is str 'oops', which is not array-like; expected float32\[2\]"),
    "an arbitrary object": ("b", object(), r"leaf \['b'\] is object <object .*>, which is not array-like; expected float32\[2\]"),
    "a Python int beyond int32": ("step", 2**40, r"leaf \['step'\] is int 1099511627776, which JAX cannot hold \(.*\); expected int32\[\]"),
}


@pytest.mark.parametrize("operation", ["add", "update"])
@pytest.mark.parametrize("case", list(LEAF_CASES))
def test_a_leaf_jax_cannot_hold_names_the_tenant_and_leaf(case, operation):
    key, value, message = LEAF_CASES[case]
    template = {"w": _w(), "b": np.zeros(2, np.float32), "step": 0}
    _raises_and_changes_nothing(template, {**template, key: value}, operation, message)


def test_a_leaf_jax_cannot_hold_in_stacked_params_names_the_tenants():
    store = TenantStore({"w": _w(), "step": 0}, capacity=2)
    before = _snapshot(store)
    with pytest.raises(ParamMismatchError, match=r"stacked params of tenants \['a', 'b'\]: leaf \['step'\] is str 'x', "
                                                 r"which is not array-like; expected int32\[2\]"):
        store.add_stacked(["a", "b"], {"w": np.stack([_w(), _w()]), "step": "x"})
    _assert_unchanged(store, before)
