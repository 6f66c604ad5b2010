"""The rows of several requests, read as one input without first concatenating them.

A server's step answers many requests, each holding its own rows. Concatenating them and
then gathering the step's padded block ``[K, B, ...]`` copies every row twice; for images
(a 224x224x3 float32 row is 588 KiB) those copies are most of the host's work per request.
``RowParts.take`` copies each row once, straight from its request into the block; when the
server staged the requests' rows on the device (``jaxmt.staging``), it joins them there
instead and copies no row on the host.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from jaxmt.errors import InputError
from jaxmt.staging import join_rows

# Rows at least this large are copied one by one from their request; smaller ones are
# concatenated first and gathered by NumPy, whose per-row cost is lower than a Python loop's.
# On a 2-core CPU, a block of 8 positions from 6 one-row requests took
# 0.52 ms row by row against 0.71 ms concatenated and gathered for 224x224x3 float32 rows
# (64 positions from 48 requests: 7.6 against 10.2 ms), and 10 against 3 us for rows of 64
# floats; the two met between 12 KiB (32x32x3) and 27 KiB (48x48x3) rows.
DIRECT_ROW_BYTES = 16 * 1024


class RowParts:
    """Arrays ``[r_i, *row_shape]`` of one dtype, addressed as their concatenation.

    Args:
      parts: one or more arrays of the same row shape and dtype (each request's rows); a
        part in swapped byte order is taken as a native copy, as ``as_row_array`` takes rows.
      staged: per part, its rows on the device (one [1, *row_shape] array per row, as
        ``jaxmt.staging.StagedRows.device_rows()`` gives them) or None. When any part has
        them, ``take`` (and ``rows``) return a device block joined from them, taking the
        rows of the other parts from the host.
      device: where host rows go in that case (the staged rows' device).

    Raises:
      ValueError: no parts, a scalar part, parts of different row shapes or dtypes (naming
        the first), ``staged`` not one entry per part, or a part's staged rows not one per row.
    """

    def __init__(self, parts: Sequence[np.ndarray], staged: Sequence[Any] | None = None, device: Any = None):
        parts = [_in_native_order(np.asarray(p)) for p in parts]
        if not parts:
            raise ValueError("RowParts needs at least one array")
        first = parts[0]
        if first.ndim == 0:
            raise ValueError("each part needs a leading row axis, got a scalar")
        for i, part in enumerate(parts):
            if part.ndim == 0 or part.shape[1:] != first.shape[1:] or part.dtype != first.dtype:
                raise ValueError(
                    f"part {i} has shape {list(part.shape)} and dtype {part.dtype.name}, expected rows of shape "
                    f"{list(first.shape[1:])} and dtype {first.dtype.name} (as part 0)"
                )
        if staged is not None and len(staged) != len(parts):
            raise ValueError(f"staged needs one entry per part: {len(staged)} for {len(parts)} parts")
        for i, (part, rows) in enumerate(zip(parts, staged or ())):
            if rows is not None and len(rows) != part.shape[0]:
                raise ValueError(f"part {i} has {part.shape[0]} rows but {len(rows)} staged rows")
        self.parts = parts
        self.staged = None if staged is None or all(s is None for s in staged) else list(staged)
        self.device = device
        lengths = np.array([p.shape[0] for p in parts], np.int64)
        self._ends = np.cumsum(lengths)
        self._starts = self._ends - lengths
        self.shape: tuple[int, ...] = (int(self._ends[-1]), *first.shape[1:])
        self.dtype: np.dtype = first.dtype
        self.ndim = len(self.shape)
        self._joined: np.ndarray | None = None

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def starts(self) -> np.ndarray:
        """Index of each part's first row in the concatenation."""
        return self._starts

    @property
    def row_nbytes(self) -> int:
        """Bytes of one row: rows of ``DIRECT_ROW_BYTES`` or more are taken from their parts
        instead of from the concatenation."""
        return int(self.dtype.itemsize * np.prod(self.shape[1:], dtype=np.int64))

    def joined(self) -> np.ndarray:
        """The concatenation, built once on first use (read-only: later takes read it; with
        one part, the part itself)."""
        if self._joined is None:
            if len(self.parts) == 1:
                self._joined = self.parts[0]
            else:
                self._joined = np.concatenate(self.parts)
                self._joined.flags.writeable = False
        return self._joined

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        joined = self.joined()
        if copy:
            return joined.astype(dtype or joined.dtype, copy=True)
        if copy is False and dtype is not None and np.dtype(dtype) != joined.dtype:
            raise ValueError(f"RowParts of {joined.dtype.name} cannot become {np.dtype(dtype).name} without a copy")
        return joined if dtype is None else joined.astype(dtype, copy=False)

    def rows(self, start: int, stop: int) -> Any:
        """Rows ``start:stop`` of the concatenation as one array: a view when they lie in one
        part, else copied once (small rows: a slice of the concatenation); a device block
        when some parts are staged (see ``take``)."""
        if self.staged is not None:
            return self.take(np.arange(start, stop))
        part = int(np.searchsorted(self._ends, start, side="right"))
        if part < len(self.parts) and stop <= self._ends[part]:
            first = int(self._starts[part])
            return self.parts[part][start - first : stop - first]
        if self._joined is not None or self.row_nbytes < DIRECT_ROW_BYTES:
            return self.joined()[start:stop]
        return self.take(np.arange(start, stop))

    def take(self, index: np.ndarray, out: np.ndarray | None = None) -> Any:
        """``np.concatenate(parts)[index]`` for an int array ``index`` of any shape: a NumPy
        array (written into ``out`` when given), or a device array when some parts' rows are
        staged on the device (``out`` is then refused)."""
        index = np.asarray(index)
        if self.staged is not None:
            if out is not None:
                raise ValueError("rows staged on the device cannot be taken into a host array")
            return self._join(index, self.staged)
        if len(self.parts) == 1 or self._joined is not None or self.row_nbytes < DIRECT_ROW_BYTES:
            return take_rows(self.joined(), index, out)
        which, offsets = self._locate(index)
        block = np.empty((*index.shape, *self.shape[1:]), self.dtype) if out is None else out
        # Rows go through a flat view of the block; a strided ``out`` (a slice of a larger
        # buffer) has none (reshape would copy), so it is filled from a contiguous block.
        target = block if block.flags.c_contiguous else np.empty(block.shape, self.dtype)
        flat = target.reshape(which.size, *self.shape[1:])
        parts = self.parts
        for position, (part, offset) in enumerate(zip(which.tolist(), offsets.tolist())):
            flat[position] = parts[part][offset]
        if target is not block:
            np.copyto(block, target)
        return block

    def _locate(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(part, offset in it) of each entry of ``index``, flattened; IndexError if out of range."""
        flat = index.reshape(-1).astype(np.int64, copy=False)
        if flat.size and (flat.min() < 0 or flat.max() >= self.shape[0]):
            raise IndexError(_out_of_range(flat, self.shape[0]))
        which = np.searchsorted(self._ends, flat, side="right")
        return which, flat - self._starts[which]

    def _join(self, index: np.ndarray, device_rows: list) -> Any:
        """The block of ``index`` joined on the device from staged rows (and host rows, for the
        parts whose copy is not issued yet, put on the device first in one call)."""
        which, offsets = self._locate(index)
        if not which.size:  # no rows to join (the join program needs one): an empty block
            return jax.device_put(np.empty((*index.shape, *self.shape[1:]), self.dtype), self.device)
        rows: list[Any] = []
        from_host: list[int] = []
        for part, offset in zip(which.tolist(), offsets.tolist()):
            staged = device_rows[part]
            if staged is None:
                from_host.append(len(rows))
                rows.append(self.parts[part][offset : offset + 1])
            else:
                rows.append(staged[offset])
        if from_host:
            for position, row in zip(from_host, jax.device_put([rows[p] for p in from_host], self.device)):
                rows[position] = row
        return join_rows(rows, (*index.shape, *self.shape[1:]))


def as_row_array(x: Any, copy: bool = False) -> np.ndarray:
    """``x`` as one NumPy array of rows in native byte order (copied with ``copy``, or when
    its bytes are swapped, e.g. rows read from a big-endian file).

    Raises:
      InputError: ``x`` is nested sequences of unequal lengths (not one array).
    """
    try:
        rows = np.array(x) if copy else np.asarray(x)
    except ValueError as exc:  # ragged nested sequences
        raise InputError(f"x is not one array of rows: {exc}") from exc
    return _in_native_order(rows)


def _in_native_order(rows: np.ndarray) -> np.ndarray:
    """``rows`` in native byte order (copied only when swapped): a swapped dtype compares
    unequal to the native one of the same name, so rows fixed from it would refuse every
    native request, and the pinned buffers and programs hold native bytes."""
    return rows if rows.dtype.isnative else rows.astype(rows.dtype.newbyteorder("="))


def take_rows(x: "np.ndarray | RowParts", index: np.ndarray, out: np.ndarray | None = None) -> Any:
    """``x[index]`` for an array or a ``RowParts`` (a device array when its rows are staged),
    written into ``out`` when given (host rows only)."""
    if isinstance(x, RowParts):
        return x.take(index, out=out)
    if out is None:
        return x[index]
    if index.size and (index.min() < 0 or index.max() >= x.shape[0]):  # "clip" below would not tell
        raise IndexError(_out_of_range(index, x.shape[0]))
    return np.take(x, index, axis=0, out=out, mode="clip")  # "raise" would copy through a buffer


def _out_of_range(index: np.ndarray, rows: int) -> str:
    flat = index.reshape(-1)
    bad = int(flat[(flat < 0) | (flat >= rows)][0])
    return f"row index {bad} is out of range for {rows} rows (expected 0 <= index < {rows})"
