"""A MultiTenantModel against a NumPy reference of it, under random interleavings of its whole API.

``ModelMachine`` (hypothesis.stateful) drives a two-layer MLP model through adds (new ids,
duplicates, unhashable ids, float64 or JAX-array params, a caller reusing its buffers),
updates and removals of resident and unknown tenants, params of the wrong structure, shape
or dtype or holding NaN or Inf, requests of 0 rows up to more than one step holds (random
ids with repeats, unknown ids, NaN rows, x of a wrong shape or dtype) and warmups, on small
bucket ladders and stores small enough that they grow and hit ``max_capacity``. The
reference is plain NumPy: a dict of float32 params in insertion order, the capacity, the
fixed input rows and the counters. After every rule:

* ``tenants``, ``len``, ``in`` and ``get_params`` equal the reference; an unknown id raises;
* ``stats()`` agrees on tenants, capacity, free slots, bytes, rows and non-finite rows;
* every resident tenant answers with its own weights (row by row, within 1e-5 relative);
* a failed call changed nothing (the store's version included), and
* programs: at most len(K ladder) x len(B ladder) compiles per capacity the store has had,
  plus len(B ladder) where whole-store steps run and the capacity is on the K ladder
  (``MultiTenantModel``'s ``whole_store_steps``), none compiled twice, none failed.

``test_properties.ServingMachine`` checks answers across architectures; this one checks the
API's bookkeeping and error paths around them on one cheap model. Compiles dominate its
time (about 65 ms a program on a 2-core CPU), so the configurations whose rows are given to
the constructor share one model across examples (each example empties it first, so a model
that has served many tenant sets must still be right: the compile bound is then counted
over the model's life), and the two whose first request fixes the rows are built per
example, on short ladders. A failure in a shared model can leave it in a state that later
examples trip over: read the first failure hypothesis reports.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from jaxmt import (
    BucketPolicy,
    CapacityError,
    DuplicateTenantError,
    InputError,
    MultiTenantModel,
    NonFiniteParamsError,
    ParamMismatchError,
    UnknownTenantError,
)

# Params finite in float64 and inf once stored as float32 ("float64_overflow") are refused;
# NumPy warns as JAX casts them on the way.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")

IN, HIDDEN, OUT = 3, 4, 2
BYTES_PER_TENANT = 4 * (IN * HIDDEN + HIDDEN + HIDDEN * OUT + OUT)
MAX_REQUEST_ROWS = 13  # more than one step of any configuration below holds (K x B <= 12)
# Past jaxmt.buckets.SMALL_REQUEST_ROWS (64): planned without the small requests' shortcuts.
LARGE_REQUEST_ROWS = 67
RTOL = 1e-5  # float32 at full matmul precision (conftest) against a float64 reference

# Hashable ids of several types (no bools or floats: True == 1 == 1.0 would alias) ...
RESIDENT_IDS = ["a", "b", "c", "d", 0, 1, ("t", 2), b"e"]
# ... and ids that are never added: unhashable ones cannot be.
UNHASHABLE_IDS = [["a"], {"b": 1}]
UNKNOWN_IDS = ["zz", 99, ("t", 3), *UNHASHABLE_IDS]
ALL_IDS = RESIDENT_IDS + UNKNOWN_IDS
# Ids equal to resident ones name the same tenant (they are dict keys): np.int64(1) is 1.
ALIASES = [np.int64(1), np.str_("b")]
NEW_IDS = st.sampled_from(RESIDENT_IDS * 2 + ALIASES + UNHASHABLE_IDS)  # what ``add`` is given
TENANT_IDS = st.sampled_from(RESIDENT_IDS * 2 + ALIASES + UNKNOWN_IDS)  # mostly ids that may be resident


def _hashable(tenant_id: object) -> bool:
    try:
        hash(tenant_id)
    except TypeError:
        return False
    return True


def apply_fn(params: dict, x: jax.Array) -> jax.Array:
    h = jnp.tanh(x @ params["dense1"]["w"] + params["dense1"]["b"])
    return h @ params["dense2"]["w"] + params["dense2"]["b"]


def reference_apply(params: dict, x: np.ndarray) -> np.ndarray:
    """``apply_fn`` in float64 NumPy (the input as its values, whatever its dtype)."""
    x = np.asarray(x, np.float64)
    h = np.tanh(x @ params["dense1"]["w"].astype(np.float64) + params["dense1"]["b"])
    return h @ params["dense2"]["w"].astype(np.float64) + params["dense2"]["b"]


def make_params(seed: int, form: str = "float32") -> dict:
    """Params in float32 NumPy, float64 NumPy (stored as float32: JAX without x64) or as JAX arrays."""
    rng = np.random.default_rng(seed)
    shapes = {"dense1": {"w": (IN, HIDDEN), "b": (HIDDEN,)}, "dense2": {"w": (HIDDEN, OUT), "b": (OUT,)}}
    params = jax.tree.map(lambda shape: rng.normal(size=shape), shapes, is_leaf=lambda node: isinstance(node, tuple))
    if form == "float64":
        return params
    params = jax.tree.map(lambda a: a.astype(np.float32), params)
    return jax.tree.map(jnp.asarray, params) if form == "jax" else params


def as_stored(params: dict) -> dict:
    """What the store must hold for ``params``: float32 NumPy copies."""
    return jax.tree.map(lambda a: np.array(a, np.float32), params)


def _bad_params(kind: str, seed: int) -> Any:
    params = make_params(seed)
    if kind == "missing_leaf":
        del params["dense2"]["b"]
    elif kind == "extra_leaf":
        params["dense1"]["scale"] = np.ones((), np.float32)
    elif kind == "tuple_for_dict":
        params["dense1"] = (params["dense1"]["b"], params["dense1"]["w"])
    elif kind == "none":
        params = None
    elif kind == "shape":
        params["dense1"]["w"] = params["dense1"]["w"][:, :-1]
    elif kind == "transposed":
        params["dense2"]["w"] = params["dense2"]["w"].T.copy()
    elif kind == "float16":
        params["dense2"]["b"] = params["dense2"]["b"].astype(np.float16)
    elif kind == "int32":
        params["dense1"]["b"] = params["dense1"]["b"].astype(np.int32)
    elif kind == "string_leaf":
        params["dense1"]["b"] = "weights"
    elif kind == "nan":
        params["dense1"]["w"][1, 2] = np.nan
    elif kind == "inf":
        params["dense2"]["b"][0] = -np.inf
    elif kind == "float64_overflow":  # finite in float64, inf once stored as float32
        params = make_params(seed, "float64")
        params["dense2"]["w"][0, 0] = 1e300
    return params


def _overwrite(params: dict) -> None:
    """What a caller reusing one set of buffers for every tenant does after an add or update."""
    for leaf in jax.tree.leaves(params):
        leaf[...] = 7.0


BAD_KINDS: dict[str, type[Exception]] = {
    "missing_leaf": ParamMismatchError,
    "extra_leaf": ParamMismatchError,
    "tuple_for_dict": ParamMismatchError,
    "none": ParamMismatchError,
    "shape": ParamMismatchError,
    "transposed": ParamMismatchError,
    "float16": ParamMismatchError,
    "int32": ParamMismatchError,
    "string_leaf": ParamMismatchError,
    "nan": NonFiniteParamsError,
    "inf": NonFiniteParamsError,
    "float64_overflow": NonFiniteParamsError,
}

# x of a wrong shape, dtype or kind, by name (``bad_x`` builds them).
BAD_X = ("wide_rows", "flat", "scalar", "extra_row", "ragged", "float64", "int32")


def _ids_as(ids: list, form: str) -> Sequence:
    """The request's ids as a list, a tuple or a 1-d object array (whose ints stay Python ints)."""
    if form == "tuple":
        return tuple(ids)
    if form == "array":
        array = np.empty(len(ids), object)
        for i, tenant in enumerate(ids):  # one by one: a tuple id must stay one element
            array[i] = tenant
        return array
    return ids


@dataclasses.dataclass(frozen=True)
class Config:
    """One way to build the model under test."""

    name: str
    capacity: int
    max_capacity: int | None
    buckets: BucketPolicy
    whole_store_steps: bool
    rows_given: bool  # row_shape and row_dtype passed to the constructor (else the first request fixes them)
    nonfinite_inputs: str
    shared: bool  # one model for every example of the run (its compiled programs kept)

    def build(self) -> MultiTenantModel:
        rows = {"row_shape": (IN,), "row_dtype": np.float32} if self.rows_given else {}
        return MultiTenantModel(apply_fn, make_params(0), capacity=self.capacity, buckets=self.buckets,
                                max_capacity=self.max_capacity, lowering="vmap", whole_store_steps=self.whole_store_steps,
                                nonfinite_inputs=self.nonfinite_inputs, **rows)

    def compile_bound(self, capacity: int) -> int:
        """The most programs one store capacity may ever compile (see ``MultiTenantModel``)."""
        tenant_buckets, row_buckets = self.buckets.tenant_buckets, self.buckets.row_buckets
        whole = len(row_buckets) if self.whole_store_steps and capacity in tenant_buckets else 0
        return len(tenant_buckets) * len(row_buckets) + whole


CONFIGS = (
    # Grows 1 -> 2 -> 4 -> 8 slots; 2 and 4 are on the K ladder (whole-store programs).
    Config("grows", 1, None, BucketPolicy((1, 2, 4), (1, 2)), True, True, "pass", shared=True),
    # Grows 2 -> 3 (capped, not doubled), then CapacityError; NaN rows are refused.
    Config("capped", 2, 3, BucketPolicy((1, 2), (1, 3)), False, True, "reject", shared=True),
    # Grows 3 -> 4 (capped onto the K ladder: whole-store programs appear only then).
    Config("capped_onto_ladder", 3, 4, BucketPolicy((1, 2, 4), (1, 2, 3)), True, True, "pass", shared=True),
    # Built per example, rows fixed by the first request: 1 -> 2 slots, then CapacityError.
    Config("fresh", 1, 2, BucketPolicy((1, 2), (1, 2)), True, False, "ignore", shared=False),
    # Built per example, rows fixed by the first request; no B = 1 rung, capacity 3 on the K ladder.
    Config("fresh_odd_ladder", 3, None, BucketPolicy((1, 3), (2, 3)), True, False, "reject", shared=False),
)


@dataclasses.dataclass
class Served:
    """A model and what outlives one example of it: compiles counted per store capacity."""

    model: MultiTenantModel
    compiles_at: dict[int, int] = dataclasses.field(default_factory=dict)
    compiles_seen: int = 0


@functools.cache
def _shared(config: Config) -> Served:
    return Served(config.build())


def _served(config: Config) -> Served:
    return _shared(config) if config.shared else Served(config.build())


class ModelMachine(RuleBasedStateMachine):
    """MultiTenantModel against a NumPy reference: see the module docstring."""

    @initialize(config=st.sampled_from(CONFIGS), seed=st.integers(0, 2**16))
    def start(self, config: Config, seed: int) -> None:
        self.config = config
        self.served = _served(config)
        self.mt = self.served.model
        for tenant in self.mt.tenants:  # left by the previous example
            self.mt.remove_tenant(tenant)
        self.rng = np.random.default_rng(seed)
        # The reference.
        self.params: dict[Hashable, dict] = {}  # insertion order is the model's tenant order
        stats = self.mt.stats()
        self.capacity = stats["capacity"]  # a shared model keeps what it grew to
        self.row_dtype: np.dtype | None = self.mt.row_dtype  # None until a request fixes the rows
        self.rows, self.nonfinite_rows = stats["rows"], stats["nonfinite_rows"]
        self._account_compiles()

    # ------------------------------------------------------------------ helpers
    def _unchanged_after(self, error: type[BaseException] | tuple, operation: Callable, *args: Any) -> None:
        """``operation(*args)`` raises ``error`` and leaves the store and the counters as they were."""
        version, before = self.mt.store.version, self.mt.stats()
        with pytest.raises(error):
            operation(*args)
        after = self.mt.stats()
        assert self.mt.store.version == version
        for counter in ("capacity", "resident_tenants", "steps", "rows", "padded_rows", "compiles", "nonfinite_rows"):
            assert after[counter] == before[counter], counter

    def _account_compiles(self) -> None:
        """Credits the programs compiled since the last call to the store's capacity now (only
        requests and warmups compile, and neither changes the capacity)."""
        compiles = self.mt.stats()["compiles"]
        capacity = self.mt.store.capacity
        at = self.served.compiles_at
        at[capacity] = at.get(capacity, 0) + compiles - self.served.compiles_seen
        self.served.compiles_seen = compiles

    def _resident(self, tenant: object) -> bool:
        return _hashable(tenant) and tenant in self.params

    def _full(self) -> bool:
        return len(self.params) == self.capacity

    def _capped(self) -> bool:
        return self._full() and self.config.max_capacity is not None and self.capacity >= self.config.max_capacity

    def _grown_capacity(self) -> int:
        """What a full store grows to: double, up to max_capacity."""
        doubled = 2 * self.capacity
        return doubled if self.config.max_capacity is None else min(doubled, self.config.max_capacity)

    def _rows_unchanged(self) -> None:
        """The model's input rows are the reference's: both unfixed, or fixed to one dtype (not
        compared with ``==`` alone: ``np.dtype("float64") == None`` holds)."""
        if self.row_dtype is None:
            assert self.mt.row_dtype is None and self.mt.row_shape is None, (self.mt.row_shape, self.mt.row_dtype)
        else:
            assert self.mt.row_shape == (IN,) and self.mt.row_dtype == self.row_dtype, (self.mt.row_shape, self.mt.row_dtype)

    def _rows_dtype(self) -> np.dtype:
        return np.dtype(np.float32) if self.row_dtype is None else self.row_dtype

    def _x(self, n: int, dtype: np.dtype | None = None) -> np.ndarray:
        dtype = self._rows_dtype() if dtype is None else np.dtype(dtype)
        if dtype.kind in "iu":
            return self.rng.integers(-3, 4, size=(n, IN)).astype(dtype)
        return self.rng.normal(size=(n, IN)).astype(dtype)

    def _predict_and_check(self, ids: Sequence, x: np.ndarray, jax_rows: bool = False) -> None:
        """A request every check lets through: its answers equal the reference row by row."""
        got = self.mt.predict(ids, jnp.asarray(x) if jax_rows else x)
        self._account_compiles()
        assert isinstance(got, np.ndarray) and got.shape == (len(ids), OUT) and got.dtype == np.float32
        if len(ids):
            if self.row_dtype is None:
                self.row_dtype = x.dtype  # the first request that computes fixes the rows
            self.rows += len(ids)
            if self.config.nonfinite_inputs == "pass":
                self.nonfinite_rows += int((~np.isfinite(x.reshape(len(ids), -1)).all(axis=1)).sum())
            self._programs_of_one_capacity()
        for i, (tenant, row) in enumerate(zip(ids, x)):
            want = reference_apply(self.params[tenant], row[None])[0]
            if not np.isfinite(row).all():
                assert not np.isfinite(got[i]).all(), f"row {i} (tenant {tenant!r}) has NaN input but a finite answer"
                continue
            error = np.linalg.norm(got[i] - want) / max(np.linalg.norm(want), 1.0)
            assert error < RTOL, f"row {i} of {len(ids)} (tenant {tenant!r}): got {got[i]}, want {want}"

    def _programs_of_one_capacity(self) -> None:
        """After a request that ran steps: every cached program is of the store's capacity now,
        and each was compiled once (the count compiled at this capacity)."""
        capacity = self.mt.store.capacity
        keys = self.mt.programs.keys()
        assert all(key.capacity == capacity for key in keys), [key for key in keys if key.capacity != capacity]
        assert all(key.tenant_bucket == capacity for key in keys if key.whole_store)
        assert len(keys) == self.served.compiles_at[capacity], (keys, self.served.compiles_at)

    # ------------------------------------------------------------------ tenants
    @rule(tenant=NEW_IDS, seed=st.integers(1, 2**20), form=st.sampled_from(["float32", "float64", "jax"]),
          reuse_buffers=st.booleans())
    def add(self, tenant, seed, form, reuse_buffers):
        params = make_params(seed, form)
        if not _hashable(tenant):
            self._unchanged_after(TypeError, self.mt.add_tenant, tenant, params)
            return
        if tenant in self.params:
            self._unchanged_after(DuplicateTenantError, self.mt.add_tenant, tenant, params)
            return
        if self._capped():
            self._unchanged_after(CapacityError, self.mt.add_tenant, tenant, params)
            return
        self.mt.add_tenant(tenant, params)
        if self._full():
            self.capacity = self._grown_capacity()
        self.params[tenant] = as_stored(params)
        if reuse_buffers and form != "jax":
            _overwrite(params)

    @precondition(lambda self: len(self.params) < len(RESIDENT_IDS))
    @rule(data=st.data(), seed=st.integers(1, 2**20))
    def add_new(self, data, seed):
        """Adds of an id that is not resident (TENANT_IDS draws many that are), so that stores
        fill up, grow and reach their limit."""
        tenant = data.draw(st.sampled_from([t for t in RESIDENT_IDS if t not in self.params]))
        self.add(tenant, seed, "float32", reuse_buffers=True)

    @precondition(lambda self: self.params)
    @rule(data=st.data(), tenant=NEW_IDS.filter(_hashable))
    def copy_tenant(self, data, tenant):
        """Adds (or updates) a tenant with another's params as ``get_params`` gives them: device
        arrays read out of the store, which the write into a slot must not disturb."""
        source = data.draw(st.sampled_from(list(self.params)))
        params = self.mt.get_params(source)
        if tenant in self.params:
            self.mt.update_tenant(tenant, params)
        elif self._capped():
            self._unchanged_after(CapacityError, self.mt.add_tenant, tenant, params)
            return
        else:
            self.mt.add_tenant(tenant, params)
            if self._full():
                self.capacity = self._grown_capacity()
        self.params[tenant] = as_stored(self.params[source])
        jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, params), self.params[source])

    @rule(tenant=TENANT_IDS, seed=st.integers(1, 2**20), form=st.sampled_from(["float32", "float64", "jax"]),
          reuse_buffers=st.booleans())
    def update(self, tenant, seed, form, reuse_buffers):
        params = make_params(seed, form)
        if not self._resident(tenant):
            self._unchanged_after(UnknownTenantError, self.mt.update_tenant, tenant, params)
            return
        self.mt.update_tenant(tenant, params)
        self.params[tenant] = as_stored(params)  # in place: the tenant keeps its place in the order
        if reuse_buffers and form != "jax":
            _overwrite(params)

    @precondition(lambda self: self.params)
    @rule(data=st.data(), seed=st.integers(1, 2**20))
    def update_resident(self, data, seed):
        """Updates of a tenant that is resident (TENANT_IDS draws many that are not)."""
        tenant = data.draw(st.sampled_from(list(self.params)))
        self.update(tenant, seed, "float32", reuse_buffers=False)

    @rule(tenant=TENANT_IDS)
    def remove(self, tenant):
        if not self._resident(tenant):
            self._unchanged_after(UnknownTenantError, self.mt.remove_tenant, tenant)
            return
        self.mt.remove_tenant(tenant)
        del self.params[tenant]
        if self.row_dtype is not None:
            self._unchanged_after(UnknownTenantError, self.mt.predict, [tenant], self._x(1))

    @rule(tenant=TENANT_IDS, kind=st.sampled_from(sorted(BAD_KINDS)), seed=st.integers(1, 2**20), update=st.booleans())
    def bad_params(self, tenant, kind, seed, update):
        params = _bad_params(kind, seed)
        if update:
            error = BAD_KINDS[kind] if self._resident(tenant) else UnknownTenantError
            self._unchanged_after(error, self.mt.update_tenant, tenant, params)
        elif not _hashable(tenant):
            self._unchanged_after(TypeError, self.mt.add_tenant, tenant, params)
        elif tenant in self.params:
            self._unchanged_after(DuplicateTenantError, self.mt.add_tenant, tenant, params)
        else:  # checked before the store would grow; a full store may say so first
            error = (BAD_KINDS[kind], CapacityError) if self._capped() else BAD_KINDS[kind]
            self._unchanged_after(error, self.mt.add_tenant, tenant, params)

    # ----------------------------------------------------------------- requests
    @rule(data=st.data(), n=st.integers(0, MAX_REQUEST_ROWS) | st.just(LARGE_REQUEST_ROWS),
          unknown=st.none() | st.none() | st.sampled_from(UNKNOWN_IDS),
          nan_rows=st.sampled_from([0, 0, 0, 1, 2]), ids_as=st.sampled_from(["list", "tuple", "array"]),
          jax_rows=st.booleans())
    def predict(self, data, n, unknown, nan_rows, ids_as, jax_rows):
        """n rows of resident tenants (repeats, any order), maybe one unknown id, maybe NaN rows;
        ids as a list, tuple or object array, rows as NumPy or JAX arrays."""
        if not self.params and unknown is None:
            n = 0
        ids = data.draw(st.lists(st.sampled_from(list(self.params)), min_size=n, max_size=n)) if self.params else [unknown] * n
        if unknown is not None and n:
            ids[data.draw(st.integers(0, n - 1))] = unknown
        x = self._x(n)
        if x.dtype.kind == "f" and nan_rows and n:
            x[self.rng.choice(n, size=min(nan_rows, n), replace=False), self.rng.integers(IN)] = np.nan
        nonfinite = not np.isfinite(x).all()
        ids = _ids_as(ids, ids_as)
        jax_rows = jax_rows and x.dtype == np.float32  # (a JAX array of float64 rows is float32)
        if nonfinite and self.config.nonfinite_inputs == "reject":
            self._unchanged_after(InputError, self.mt.predict, ids, x)
        elif unknown is not None and n:
            self._unchanged_after(UnknownTenantError, self.mt.predict, ids, jnp.asarray(x) if jax_rows else x)
            self._rows_unchanged()  # a failed first request does not fix the rows
        else:
            self._predict_and_check(ids, x, jax_rows)

    @rule(data=st.data(), n=st.integers(0, 4), kind=st.sampled_from(BAD_X))
    def bad_x(self, data, n, kind):
        """x of a wrong shape, dtype or kind: InputError and nothing changes, except that rows
        not fixed yet are fixed by a first request the model can compute, of any dtype."""
        ids = data.draw(st.lists(st.sampled_from(list(self.params)), min_size=n, max_size=n)) if self.params else []
        n = len(ids)
        x: Any = self._x(n)
        if kind == "wide_rows":
            x = np.zeros((n, IN + 1), x.dtype)
        elif kind == "flat":
            x = x[:, 0].copy()
        elif kind == "scalar":
            x = x.dtype.type(1)
        elif kind == "extra_row":
            x = self._x(n + 1)
        elif kind == "ragged":
            x = [[1.0] * IN, [1.0] * (IN - 1)] + [[0.0] * IN] * max(n - 2, 0)
        else:
            x = self._x(n, np.dtype(kind))
        # Rows not fixed yet are fixed by a first request of any dtype the model computes; an
        # empty 1-d x (``[]``) has no rows to be of a wrong shape once rows are fixed.
        computable = kind in ("float64", "int32") and (self.row_dtype is None or self.row_dtype == np.dtype(kind))
        empty_flat = kind == "flat" and n == 0 and self.row_dtype is not None
        if computable or empty_flat:
            self._predict_and_check(ids, x)
            return
        self._unchanged_after(InputError, self.mt.predict, ids, x)
        self._rows_unchanged()

    @rule(execute=st.booleans(), k_first=st.booleans(), off_ladder=st.booleans())
    def warmup(self, execute, k_first, off_ladder):
        """The whole ladder, or the smallest K (or B) rung, or a rung that is not on it."""
        ladder = self.config.buckets
        ks = (ladder.tenant_buckets[0],) if k_first else None
        bs = None if k_first else (ladder.row_buckets[0],)
        if self.row_dtype is None:
            self._unchanged_after(InputError, self.mt.warmup, ks, bs)
        elif off_ladder:
            self._unchanged_after(ValueError, self.mt.warmup, (ladder.max_tenants + 1,), bs)
        else:
            before = self.mt.stats()["compiles"]
            built = self.mt.warmup(ks, bs, execute=execute)
            self._account_compiles()
            assert built == self.mt.stats()["compiles"] - before

    # --------------------------------------------------------------- invariants
    @invariant()
    def tenants_and_params_match_the_reference(self):
        if not hasattr(self, "params"):
            return
        assert self.mt.tenants == list(self.params)
        assert len(self.mt) == len(self.params)
        assert all((t in self.mt) == self._resident(t) for t in ALL_IDS)
        for tenant, params in self.params.items():
            got = jax.tree.map(np.asarray, self.mt.get_params(tenant))
            assert jax.tree.structure(got) == jax.tree.structure(params)
            jax.tree.map(np.testing.assert_array_equal, got, params)
        absent = next(t for t in ALL_IDS if not self._resident(t))
        with pytest.raises(UnknownTenantError):
            self.mt.get_params(absent)

    @invariant()
    def stats_match_the_reference(self):
        if not hasattr(self, "params"):
            return
        stats = self.mt.stats()
        resident = len(self.params)
        assert {k: stats[k] for k in ("resident_tenants", "capacity", "free_slots", "bytes_per_tenant", "param_bytes",
                                      "resident_param_bytes")} == {
            "resident_tenants": resident,
            "capacity": self.capacity,
            "free_slots": self.capacity - resident,
            "bytes_per_tenant": BYTES_PER_TENANT,
            "param_bytes": BYTES_PER_TENANT * self.capacity,
            "resident_param_bytes": BYTES_PER_TENANT * resident,
        }
        assert self.mt.store.capacity == self.capacity
        assert all(leaf.shape[0] == self.capacity for leaf in self.mt.store.stacked_leaves)
        assert stats["rows"] == self.rows and stats["nonfinite_rows"] == self.nonfinite_rows
        assert stats["padded_rows"] >= stats["rows"]
        assert stats["compile_failures"] == 0 and stats["evictions"] == 0
        self._rows_unchanged()

    @invariant()
    def compiles_are_bounded_per_capacity(self):
        if not hasattr(self, "params"):
            return
        self._account_compiles()
        for capacity, compiles in self.served.compiles_at.items():
            assert compiles <= self.config.compile_bound(capacity), (capacity, self.served.compiles_at)

    @invariant()
    def every_tenant_answers_with_its_own_weights(self):
        if not getattr(self, "params", None) or self.row_dtype is None:
            return  # a request would fix the rows: left to the rules
        ids = [t for t in self.params for _ in range(int(self.rng.integers(1, 4)))]
        ids = [ids[i] for i in self.rng.permutation(len(ids))]
        self._predict_and_check(ids, self._x(len(ids)))


ModelMachine.TestCase.settings = settings(
    max_examples=30,
    stateful_step_count=25,
    deadline=None,
    derandomize=True,  # the same examples on every run: CI failures replay
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestModelStateMachine = ModelMachine.TestCase
