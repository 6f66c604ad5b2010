"""RowParts: several requests' rows read as their concatenation, each row copied once."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import reference_predict

import jaxmt
from jaxmt.rows import DIRECT_ROW_BYTES, RowParts, take_rows
from jaxmt.steps import _nonfinite_row_indices

# Rows below and above DIRECT_ROW_BYTES (float32): the NumPy gather and the row-by-row copy.
ROW_SHAPES = [(5,), (3, 4), (48, 48, 3)]


def _parts(rng: np.random.Generator, row_shape: tuple[int, ...], count: int, dtype=np.float32) -> list[np.ndarray]:
    return [rng.normal(size=(int(rng.integers(1, 4)), *row_shape)).astype(dtype) for _ in range(count)]


def test_row_shapes_cover_both_copy_paths():
    sizes = [4 * int(np.prod(shape)) for shape in ROW_SHAPES]
    assert min(sizes) < DIRECT_ROW_BYTES <= max(sizes)


@pytest.mark.parametrize("row_shape", ROW_SHAPES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_take_equals_concatenate_then_index(row_shape, seed):
    rng = np.random.default_rng(seed)
    parts = _parts(rng, row_shape, int(rng.integers(1, 9)))
    joined = np.concatenate(parts)
    rows = RowParts(parts)
    assert rows.shape == joined.shape and rows.dtype == joined.dtype and len(rows) == len(joined)
    for index_shape in [(7,), (4, 3), (1, 1), (0,)]:
        index = rng.integers(0, len(joined), size=index_shape)
        got = rows.take(index)
        assert got.shape == (*index_shape, *row_shape)
        np.testing.assert_array_equal(got, joined[index])  # copies: exact
        np.testing.assert_array_equal(take_rows(rows, index), take_rows(joined, index))
    np.testing.assert_array_equal(np.asarray(rows), joined)


@pytest.mark.parametrize("row_shape", ROW_SHAPES)
def test_take_copies_so_parts_can_change_afterwards(row_shape):
    rng = np.random.default_rng(3)
    parts = _parts(rng, row_shape, 3)
    index = np.array([[0, 1], [2, 0]])
    got = RowParts(parts).take(index)
    want = np.concatenate(parts)[index]
    for part in parts:
        part[...] = np.nan
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("row_shape", ROW_SHAPES)
def test_index_out_of_range_raises(row_shape):
    rows = RowParts(_parts(np.random.default_rng(4), row_shape, 2))
    with pytest.raises(IndexError, match=f"index {len(rows)} is out of"):
        rows.take(np.array([0, len(rows)]))
    with pytest.raises(IndexError, match="row index -1 is out of range for 3 rows"):
        take_rows(np.zeros((3, *row_shape), np.float32), np.array([1, -1]), out=np.zeros((2, *row_shape), np.float32))


def test_parts_of_another_row_shape_or_dtype_are_named():
    a, b = np.zeros((2, 3), np.float32), np.zeros((1, 4), np.float32)
    with pytest.raises(ValueError, match=r"part 1 has shape \[1, 4\].*rows of shape \[3\]"):
        RowParts([a, b])
    with pytest.raises(ValueError, match=r"part 1 .* dtype float64.*float32"):
        RowParts([a, np.zeros((1, 3))])
    with pytest.raises(ValueError, match="at least one"):
        RowParts([])


def test_nonfinite_rows_are_found_in_every_part():
    rng = np.random.default_rng(5)
    parts = _parts(rng, (6,), 5)
    parts[1][0, 2] = np.nan
    parts[4][-1, 0] = np.inf
    np.testing.assert_array_equal(_nonfinite_row_indices(RowParts(parts)), _nonfinite_row_indices(np.concatenate(parts)))
    assert _nonfinite_row_indices(RowParts(_parts(rng, (6,), 3))).size == 0


@pytest.mark.parametrize("row_shape", [(6,), (48, 48, 3)])
def test_dispatch_of_parts_equals_predict_of_their_concatenation(row_shape):
    rng = np.random.default_rng(6)
    size = int(np.prod(row_shape))

    def apply_fn(params, x):
        return x.reshape(x.shape[0], -1) @ params["w"]

    params = {f"t{i}": {"w": rng.normal(size=(size, 3)).astype(np.float32)} for i in range(4)}
    mt = jaxmt.MultiTenantModel(apply_fn, params["t0"], capacity=4, lowering="vmap")
    for tenant, p in params.items():
        mt.add_tenant(tenant, p)
    parts = _parts(rng, row_shape, 6)
    ids = [f"t{rng.integers(4)}" for part in parts for _ in range(len(part))]
    got = mt.dispatch(ids, RowParts(parts)).result()
    want = reference_predict(apply_fn, params, ids, np.concatenate(parts))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(jaxmt.InputError, match="len"):
        mt.dispatch(ids[:-1], RowParts(parts))


@pytest.mark.parametrize("server", [jaxmt.Scheduler, jaxmt.TimeOnlyServer, jaxmt.SpaceOnlyServer])
def test_servers_answer_steps_of_large_rows_from_many_requests(server):
    """Rows above DIRECT_ROW_BYTES take the row-by-row copy when requests share a step."""
    rng = np.random.default_rng(7)
    row_shape = (48, 48, 3)

    def apply_fn(params, x):
        return x.reshape(x.shape[0], -1)[:, :16] @ params["w"]

    params = {f"t{i}": {"w": rng.normal(size=(16, 2)).astype(np.float32)} for i in range(3)}
    mt = jaxmt.MultiTenantModel(apply_fn, params["t0"], capacity=4, lowering="vmap",
                                buckets=jaxmt.BucketPolicy.powers_of_two(4, 4))
    for tenant, p in params.items():
        mt.add_tenant(tenant, p)
    requests = [(f"t{i % 3}", rng.normal(size=(int(rng.integers(1, 3)), *row_shape)).astype(np.float32)) for i in range(24)]
    with server(mt, max_delay_ms=20.0, default_slo_ms=600_000.0) as sched:
        futures = [sched.submit(tenant, x) for tenant, x in requests]
        answers = [f.result(timeout=120) for f in futures]
        steps = sched.metrics()["steps"]
    assert steps["steps"] < len(requests)  # requests did share steps
    for (tenant, x), got in zip(requests, answers):
        np.testing.assert_allclose(got, apply_fn(params[tenant], x), rtol=1e-5, atol=1e-5)


def test_as_an_array_it_copies_when_asked_and_is_read_only_otherwise():
    rng = np.random.default_rng(9)
    parts = _parts(rng, (3,), 3)
    rows = RowParts(parts)
    copied = np.array(rows, copy=True)
    copied[...] = 0.0
    np.testing.assert_array_equal(rows.take(np.arange(len(rows))), np.concatenate(parts))
    shared = np.asarray(rows)
    with pytest.raises(ValueError):
        shared[0] = 0.0  # later takes read the concatenation
    single = RowParts([parts[0]])
    assert np.asarray(single) is parts[0] and np.array(single, copy=True) is not parts[0]
    assert np.asarray(rows, dtype=np.float64).dtype == np.float64


@pytest.mark.parametrize("row_shape", ROW_SHAPES)
def test_rows_are_a_view_inside_one_part_and_copied_across_parts(row_shape):
    rng = np.random.default_rng(10)
    parts = [rng.normal(size=(n, *row_shape)).astype(np.float32) for n in (3, 1, 4)]
    joined = np.concatenate(parts)
    rows = RowParts(parts)
    inside = rows.rows(4, 8)
    assert np.shares_memory(inside, parts[2])
    for start, stop in [(0, 3), (1, 2), (2, 5), (0, 8), (3, 4)]:
        np.testing.assert_array_equal(rows.rows(start, stop), joined[start:stop])


@pytest.mark.parametrize("row_shape", ROW_SHAPES)
def test_take_into_a_strided_out_fills_it(row_shape):
    """``out`` may be a strided view (a slice of a larger buffer): the rows land in it."""
    rng = np.random.default_rng(11)
    parts = _parts(rng, row_shape, 3)
    joined = np.concatenate(parts)
    index = rng.integers(0, len(joined), size=(2, 2))
    out = np.zeros((2, 3, *row_shape), np.float32)[:, :2]
    got = take_rows(RowParts(parts), index, out=out)
    assert got is out
    np.testing.assert_array_equal(out, joined[index])


def test_parts_in_swapped_byte_order_are_rows_of_the_native_dtype():
    """Rows read from a big-endian file (as ``as_row_array`` takes them): a first request of
    such parts must fix the model's rows as float32, not as a byte-swapped float32 that every
    later native request is then refused against ("x has dtype float32, expected float32")."""
    rng = np.random.default_rng(7)
    x = rng.normal(size=(3, 4)).astype(np.float32)
    rows = RowParts([x[:1].astype(">f4"), x[1:]])  # one part swapped, one native: the same rows
    assert rows.dtype == np.float32 and rows.dtype.isnative
    np.testing.assert_array_equal(rows.take(np.array([2, 0])), x[[2, 0]])
    mt = jaxmt.MultiTenantModel(lambda p, x: x * p["s"], {"s": np.ones(4, np.float32)}, capacity=2)
    mt.add_tenant("a", {"s": np.full(4, 2.0, np.float32)})
    np.testing.assert_allclose(mt.dispatch(["a"] * 3, RowParts([x[:2].astype(">f4"), x[2:].astype(">f4")])).result(), 2 * x)
    assert mt.row_dtype.isnative
    np.testing.assert_allclose(mt.predict(["a"] * 3, x), 2 * x)
