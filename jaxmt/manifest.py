"""Reading a batch manifest: its lines, resolved to tenants and input arrays, checked up front.

The manifest is a CSV file with a header, or JSON lines, with the columns ``tenant`` (a
tenant id of the store), ``input`` (a .npy or .npz file of rows [n, *row_shape], relative
to the manifest), optional ``key`` (the array of a .npz holding several) and optional
``output`` (the output name; default ``<tenant>__<input stem>[__<key>]``). Inputs are only
peeked at (shape, dtype), so a bad line is found before any prediction runs.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import pathlib
import re
import zipfile
from collections.abc import Callable, Hashable
from typing import Any

import jax
import numpy as np

from jaxmt.errors import ManifestError
from jaxmt.model import MultiTenantModel
from jaxmt.validation import abstract_rows

_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclasses.dataclass
class Entry:
    """One manifest entry, resolved: its rows are computed once and written as one output."""

    line: int
    tenant: Hashable
    input: pathlib.Path
    key: str | None
    output: str
    rows: int = 0
    x: Any = None  # the input rows once loaded (a memory map for .npy)
    y: list[np.ndarray] | None = None  # output leaves [rows, ...], filled step by step
    filled: int = 0


def _records(manifest: pathlib.Path) -> list[tuple[int, Any]]:
    """(line number, record dict or the exception that line raised) for each non-blank line."""
    try:
        text = manifest.read_text(encoding="utf-8-sig")  # a byte-order mark (as spreadsheet tools write) is not part of the header
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"manifest {manifest} cannot be read as UTF-8 text: {exc}") from None
    stripped = text.lstrip()
    if manifest.suffix.lower() in (".jsonl", ".ndjson", ".json") or (manifest.suffix.lower() != ".csv" and stripped.startswith("{")):
        out = []
        # Lines end at "\n", "\r\n" or "\r" (as a text file reads them): str.splitlines() also
        # split at U+2028, U+2029 and U+0085, which a JSON string may hold as they are.
        for number, raw in enumerate(io.StringIO(text, newline=""), start=1):
            if raw.strip():
                try:
                    record = json.loads(raw)
                    out.append((number, record if isinstance(record, dict) else TypeError(f"expected a JSON object, got {raw.strip()[:40]!r}")))
                except ValueError as exc:
                    out.append((number, exc))
        return out
    reader = csv.DictReader(io.StringIO(text, newline=""))  # lines as csv counts them (not at U+2028 in a field)
    if not reader.fieldnames or not {"tenant", "input"} <= {f.strip() for f in reader.fieldnames}:
        raise ManifestError(f"manifest {manifest}: the CSV header must name the columns tenant and input (optional key, output); got {reader.fieldnames}", 1)
    return [(reader.line_num, _csv_record(row, reader.fieldnames)) for row in reader]


def _csv_record(row: dict, header: list[str]) -> dict | ValueError:
    """The row's fields by stripped column name; a row with more fields than the header names
    is an error (DictReader would drop the extra ones, e.g. a key or output with no column)."""
    if row.get(None):
        return ValueError(f"{len(header) + len(row[None])} fields, but the header names {len(header)} columns "
                          f"({', '.join(header)}); extra fields {row[None]}")
    return {k.strip(): (v.strip() if isinstance(v, str) else v) for k, v in row.items() if k}


def _tuples(value: Any) -> Any:
    """JSON lists as tuples, all the way down."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _resolve_tenant(raw: Any, model: MultiTenantModel) -> Hashable:
    """The resident id a manifest value names ("3" names tenant 3 if the store has no "3")."""
    raw = _tuples(raw)  # JSON has no tuples: [1, [2, 3]] names tenant (1, (2, 3))
    if raw in model and (not isinstance(raw, (bool, float)) or any(type(t) is type(raw) and t == raw for t in model.tenants)):
        return raw  # JSON true or 1.0 equals tenant 1 in Python, but does not name it
    if isinstance(raw, str):
        try:
            number = int(raw)
        except ValueError:
            number = None
        if number is not None and str(number) == raw and number in model:  # "3" names 3; "+3", "1_0" name nothing
            return number
    raise KeyError(f"unknown tenant {raw!r} ({len(model)} tenants are resident)")


def _peek(path: pathlib.Path, key: str | None) -> tuple[tuple[int, ...], np.dtype, str | None]:
    """Shape, dtype and (for a .npz) key of an input array, without reading its data."""
    if not path.is_file():
        raise FileNotFoundError(f"input file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        if key:
            raise ValueError(f"key {key!r} given for the .npy file {path.name}")
        try:
            with open(path, "rb") as f:
                np.lib.format.read_magic(f)  # without the header np.load takes any file for a pickle, and says so
            array = np.load(path, mmap_mode="r")
        except (ValueError, OSError, EOFError) as exc:
            raise ValueError(f"input {path.name} is not a readable .npy file: {exc}") from None
        return array.shape, array.dtype, None
    if suffix != ".npz":
        raise ValueError(f"input {path.name} is neither .npy nor .npz")
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise ValueError(f"input {path.name} is not a readable .npz file: {exc}") from None
    with archive:
        names = [n[:-4] for n in archive.namelist() if n.endswith(".npy")]
        if key is None:
            if len(names) != 1:
                raise ValueError(f"{path.name} holds arrays {names}: give a key")
            key = names[0]
        if key not in names:
            raise KeyError(f"{path.name} has no array {key!r} (it has {names})")
        try:
            with archive.open(key + ".npy") as f:
                version = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, _, dtype = read(f)
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
            raise ValueError(f"input {path.name}[{key}] is not a readable array: {exc}") from None
    return tuple(shape), np.dtype(dtype), key


def _fitting_rows(model: MultiTenantModel, path: pathlib.Path, key: str | None, shape: tuple, dtype: np.dtype) -> tuple:
    """(row shape, dtype) of this input, once the model is traced on such rows: an input the
    model cannot take must fail its own line, not fix the rows that every later line is held to."""
    try:
        jax.eval_shape(model.apply_fn, model.store.template, abstract_rows((1, *shape[1:]), dtype))
    except Exception as exc:
        raise ValueError(f"input {path.name}{f'[{key}]' if key else ''} has rows of shape {list(shape[1:])} and dtype "
                         f"{dtype.name}, which the model cannot take: {exc}") from None
    return tuple(shape[1:]), dtype


def read_entries(manifest: pathlib.Path, model: MultiTenantModel, fail: Callable[[int, str], None]) -> tuple[list[Entry], tuple | None, int]:
    """Resolved entries in manifest order, the (row shape, dtype) they share, and the line count.

    ``fail(line, message)`` handles each bad line. Without a row shape fixed by the model,
    the first readable input fixes it.
    """
    entries, lines_of_output = [], {}
    row_spec = None if model.row_shape is None else (tuple(model.row_shape), np.dtype(model.row_dtype))
    records = _records(manifest)
    for line, record in records:
        try:
            if isinstance(record, Exception):
                raise ValueError(f"unreadable line: {record}")
            empty = [c for c, bad in (("tenant", record.get("tenant") in (None, "")), ("input", not record.get("input"))) if bad]
            if empty:
                raise ValueError(f"the {' and '.join(empty)} column{'s' if len(empty) > 1 else ''} must not be empty "
                                 f"(got tenant {record.get('tenant')!r}, input {record.get('input')!r})")
            tenant = _resolve_tenant(record["tenant"], model)
            path = manifest.parent / str(record["input"])
            key = None if record.get("key") in (None, "") else str(record["key"])  # (JSON's 0 is a key)
            output = "" if record.get("output") in (None, "") else str(record["output"]).removesuffix(".npz")
            if not output:
                output = re.sub(r"[^A-Za-z0-9._-]+", "_", "__".join(str(p) for p in (record["tenant"], path.stem, key) if p is not None and p != "")).lstrip("._")
                if not _SAFE_NAME.fullmatch(output):  # nothing left of the names (e.g. only non-ASCII letters)
                    raise ValueError(f"no output name can be made from tenant {record['tenant']!r} and input {path.name!r}; give an output column")
            elif not _SAFE_NAME.fullmatch(output):
                raise ValueError(f"output name {output!r} must be letters, digits, '.', '_' or '-' (no path)")
            if output in lines_of_output:
                raise ValueError(f"output name {output!r} is also the output of line {lines_of_output[output]}; give an output column")
            shape, dtype, key = _peek(path, key)
            if row_spec is None and len(shape) >= 1:
                row_spec = _fitting_rows(model, path, key, shape, dtype)
            if len(shape) < 1 or shape[1:] != row_spec[0]:
                row = "..." if row_spec is None else ", ".join(map(str, row_spec[0]))
                raise ValueError(f"input {path.name}{f'[{key}]' if key else ''} has shape {list(shape)}, expected [rows, {row}]")
            if not np.can_cast(dtype, row_spec[1], "same_kind"):
                raise ValueError(f"input {path.name} has dtype {dtype.name}, which does not cast to {row_spec[1].name}")
        except (KeyError, ValueError, TypeError, OSError, EOFError, zipfile.BadZipFile) as exc:
            fail(line, str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc))
            continue
        lines_of_output[output] = line
        entries.append(Entry(line, tenant, path, key, output, rows=int(shape[0])))
    return entries, row_spec, len(records)
