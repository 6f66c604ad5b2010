"""Plans: every request row is answered exactly once, by its own slot, in bucketed steps."""

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxmt import BucketPolicy, make_plan
from jaxmt import buckets as buckets_module


def _check_plan(slots: np.ndarray, policy: BucketPolicy) -> None:
    plan = make_plan(slots, policy)
    assert plan.rows == len(slots)
    answered = np.zeros(len(slots), dtype=int)
    for step in plan.steps:
        k, b = step.row_index.shape
        assert k in policy.tenant_buckets and b in policy.row_buckets
        assert step.slots.shape == (k,) and step.slots.dtype == np.int32
        assert step.slots_in_order == np.array_equal(step.slots, np.arange(k))
        # every position (real or padding) reads a row of the slot it computes
        assert np.all(slots[step.row_index] == step.slots[:, None])
        # the real positions answer their rows
        entry = step.out_positions // b
        col = step.out_positions % b
        assert np.all(step.row_index[entry, col] == step.out_rows)
        np.add.at(answered, step.out_rows, 1)
    assert np.all(answered == 1)
    assert 0.0 <= plan.padding_waste < 1.0 or len(slots) == 0


@given(
    slots=st.lists(st.integers(0, 20), min_size=0, max_size=300),
    max_tenants=st.sampled_from([1, 3, 4, 16]),
    max_rows=st.sampled_from([1, 2, 5, 8, 64]),
)
@settings(max_examples=200, deadline=None)
def test_plan_answers_each_row_once(slots, max_tenants, max_rows):
    _check_plan(np.array(slots, dtype=np.int64), BucketPolicy.powers_of_two(max_tenants, max_rows))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_plan_splits_large_tenants_and_many_tenants(seed):
    rng = np.random.default_rng(seed)
    policy = BucketPolicy.powers_of_two(4, 8)
    slots = rng.integers(0, 11, size=200)
    plan = make_plan(slots, policy)
    assert len(plan.steps) >= 2  # 11 tenants > 4 per step, ~18 rows each > 8 per entry
    _check_plan(slots, policy)


def test_plan_pads_up_the_ladder():
    policy = BucketPolicy((1, 2, 4), (1, 4, 16), entry_cost_rows=100)  # entries are dear: one per tenant
    plan = make_plan(np.array([7, 7, 3, 7, 5]), policy)
    (step,) = plan.steps
    assert step.row_index.shape == (4, 4)  # 3 tenants -> K=4; at most 3 rows -> B=4
    assert plan.padded_rows == 16 and plan.padding_waste == pytest.approx(1 - 5 / 16)


def test_one_busy_tenant_is_split_rather_than_padding_everyone():
    policy = BucketPolicy.powers_of_two(32, 64)
    slots = np.concatenate([np.zeros(40, int), np.arange(1, 16)])  # one tenant with 40 rows, 15 with one
    plan = make_plan(slots, policy)
    # Padding all 16 tenants to 64 rows would compute 1024 rows; the busy one split into 20
    # entries of 2 rows joins the others in one 32 x 2 step, the last 3 in a 4 x 1 step.
    assert [(s.tenant_bucket, s.row_bucket) for s in plan.steps] == [(32, 2), (4, 1)] and plan.padded_rows == 68
    _check_plan(slots, policy)


@pytest.mark.parametrize(("step_cost_rows", "steps"), [(8.0, [(4, 4), (4, 4), (4, 1)]), (100.0, [(4, 8), (4, 1)])])
def test_steps_group_entries_of_like_size_and_weigh_a_step_against_padding(step_cost_rows, steps):
    """4 tenants of 8 rows and 4 of one, at most 4 tenants a step: the busy ones share steps
    and the light ones share theirs (36 padded rows either way; mixing them pads to 48); a
    dearer step keeps the busy tenants whole in one step instead of splitting them over two."""
    policy = dataclasses.replace(BucketPolicy.powers_of_two(4, 8), step_cost_rows=step_cost_rows)
    slots = np.concatenate([np.repeat([1, 3, 5, 7], 8), [0, 2, 4, 6]])  # busy and light slots interleaved
    plan = make_plan(slots, policy)
    assert [(s.tenant_bucket, s.row_bucket) for s in plan.steps] == steps and plan.padded_rows == 36
    _check_plan(slots, policy)


def test_empty_plan():
    plan = make_plan(np.array([], dtype=np.int64), BucketPolicy())
    assert plan.steps == () and plan.rows == 0 and plan.padding_waste == 0.0


@pytest.mark.parametrize(
    "kwargs",
    [dict(tenant_buckets=()), dict(row_buckets=(4, 2)), dict(row_buckets=(0, 1)), dict(tenant_buckets=(2, 2)),
     dict(tenant_buckets=(1, 2.7)), dict(row_buckets=(1, "4")), dict(tenant_buckets=(True, 2))],
)
def test_bad_ladders_are_rejected(kwargs):
    with pytest.raises(ValueError, match="buckets must"):
        BucketPolicy(**kwargs)


def test_ladders_of_numpy_integers_become_python_ints():
    policy = BucketPolicy(np.array([1, 4]), (np.int64(2),))
    assert policy.tenant_buckets == (1, 4) and policy.row_buckets == (2,)
    assert all(type(v) is int for v in policy.tenant_buckets + policy.row_buckets)


@pytest.mark.parametrize("cost", [np.array(1.0), "jax"], ids=["0-d array", "jax scalar"])
def test_costs_given_as_array_scalars_plan_as_python_floats(cost):
    """The planner keeps its weighing of row buckets per policy (a cache keyed by it): a cost
    given as a NumPy or JAX scalar (unhashable arrays) built a policy whose every request of a
    tenant with several rows then failed with "unhashable type", one-row requests planning on."""
    if isinstance(cost, str):  # made here: JAX starts its backend when a scalar is built
        import jax.numpy as jnp

        cost = jnp.float32(1.0)
    policy, floats = BucketPolicy(entry_cost_rows=cost, step_cost_rows=cost), BucketPolicy(entry_cost_rows=1.0, step_cost_rows=1.0)
    shapes = lambda plan: [(s.tenant_bucket, s.row_bucket) for s in plan.steps]  # noqa: E731
    assert shapes(make_plan([0, 0, 0, 1], policy)) == shapes(make_plan([0, 0, 0, 1], floats))
    assert policy == floats and hash(policy) == hash(floats)


def test_policy_is_hashable_and_defaults_are_powers_of_two():
    policy = BucketPolicy()
    assert hash(policy) == hash(BucketPolicy())
    assert policy.tenant_buckets == (1, 2, 4, 8, 16, 32, 64)
    assert BucketPolicy.powers_of_two(6, 3).tenant_buckets == (1, 2, 4, 6)
    assert len(policy.shapes) == len(policy.tenant_buckets) * len(policy.row_buckets)


def test_a_step_cannot_claim_slots_in_order_that_are_not():
    (step,) = make_plan(np.array([1, 0, 1]), BucketPolicy.powers_of_two(4, 4)).steps
    assert step.slots_in_order  # slots 0, 1: the whole of a 2-slot store, in order
    with pytest.raises(ValueError, match="slots_in_order"):
        dataclasses.replace(step, slots=np.array([1, 0], np.int32))
    assert not dataclasses.replace(step, slots=np.array([1, 0], np.int32), slots_in_order=False).slots_in_order


def _ladder(limit: int):
    return st.lists(st.integers(1, limit), min_size=1, max_size=5, unique=True).map(sorted)


@given(
    slots=st.lists(st.one_of(st.integers(0, 70), st.integers(0, 10**6)), min_size=1, max_size=buckets_module.SMALL_REQUEST_ROWS),
    policy=st.one_of(
        st.builds(BucketPolicy.powers_of_two, st.sampled_from([1, 3, 4, 16, 64]), st.sampled_from([1, 2, 5, 8, 64])),
        st.builds(BucketPolicy, _ladder(70), _ladder(70), st.sampled_from([0.0, 1.0, 3.5]), st.sampled_from([0.0, 8.0, 40.0])),
    ),
)
@settings(max_examples=400, deadline=None)
def test_small_requests_get_exactly_the_plan_of_the_array_path(slots, policy):
    """Any ladders (first rungs above 1 too), costs, and slot numbers up to a million."""
    from jaxmt import buckets

    got, want = make_plan(slots, policy), buckets._plan_arrays(np.array(slots, np.int64), policy)
    assert got.rows == want.rows and len(got.steps) == len(want.steps)
    for a, b in zip(got.steps, want.steps):
        assert a.slots_in_order == b.slots_in_order
        if a.rows_in_order:  # the same step with its entries in request order, not slot order
            assert a.row_index.shape == b.row_index.shape
            assert _slot_of_each_row(a) == _slot_of_each_row(b)
            continue
        for field in ("slots", "row_index", "out_positions", "out_rows"):
            x, y = getattr(a, field), getattr(b, field)
            assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y), field


def _slot_of_each_row(step) -> dict[int, int]:
    entries = step.out_positions // step.row_bucket
    return dict(zip(step.out_rows.tolist(), step.slots[entries].tolist()))


@pytest.mark.parametrize("n, k", [(1, 1), (3, 4), (5, 8), (8, 8)])
def test_one_row_entries_keep_request_order_and_pad_with_the_first_row(n, k, rng):
    """Each row its own entry, in request order (no gather or scatter of rows on the host);
    padding entries repeat row 0 and its slot."""
    slots = rng.integers(3, 40, size=n)  # not 0..n-1: no whole-store step
    slots[-1] = slots[0]  # a tenant with two rows still gets one entry per row at B = 1
    policy = BucketPolicy((1, 2, 4, 8), (1, 2, 4), entry_cost_rows=0.0, step_cost_rows=0.0)
    (step,) = make_plan(slots, policy).steps
    assert step.rows_in_order and not step.slots_in_order
    assert step.row_index.shape == (k, 1)
    assert step.row_index[:, 0].tolist() == list(range(n)) + [0] * (k - n)
    assert step.slots.tolist() == slots.tolist() + [slots[0]] * (k - n)
    assert step.out_rows.tolist() == step.out_positions.tolist() == list(range(n))
    _check_plan(slots, policy)


def test_a_step_of_several_rows_per_entry_cannot_claim_rows_in_order():
    (step,) = make_plan(np.array([5, 5, 5]), BucketPolicy.powers_of_two(4, 4)).steps
    assert step.row_bucket == 4 and not step.rows_in_order
    with pytest.raises(ValueError, match="rows_in_order"):
        dataclasses.replace(step, rows_in_order=True)


@pytest.mark.parametrize("slots", [[3, 1, 0, 2], [0], [1], [0, 1, 2, 4], [1, 2, 3, 4], [0, 0, 1, 2], [2, 0, 1], [0, 1, 2, 3, 4, 5, 7, 6]])
def test_one_row_steps_over_the_whole_store_in_order_are_told_as_the_array_path_tells_them(slots):
    from jaxmt import buckets

    policy = BucketPolicy.powers_of_two(8, 4)
    (got,), (want,) = make_plan(slots, policy).steps, buckets._plan_arrays(np.array(slots, np.int64), policy).steps
    assert got.slots_in_order == want.slots_in_order == (sorted(slots) == list(range(got.tenant_bucket)))
    assert got.rows_in_order != got.slots_in_order  # a step in slot order is not in request order, and vice versa
    if got.slots_in_order:
        assert np.array_equal(got.slots, want.slots) and np.array_equal(got.row_index, want.row_index)
    assert _slot_of_each_row(got) == _slot_of_each_row(want)


def test_a_count_past_the_ladder_names_the_ladder_and_its_largest_bucket():
    policy = BucketPolicy(tenant_buckets=(1, 2), row_buckets=(1, 4))
    with pytest.raises(ValueError, match=r"5 rows exceed the largest of row_buckets \[1, 4\]; expected at most 4"):
        policy.row_bucket(5)
    with pytest.raises(ValueError, match=r"3 tenant entries exceed the largest of tenant_buckets \[1, 2\]; expected at most 2"):
        policy.tenant_bucket(3)
