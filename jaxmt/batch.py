"""``python -m jaxmt batch``: offline predictions for a manifest of (tenant, input file) entries.

The manifest is a CSV file with a header, or JSON lines, with the columns ``tenant`` (a
tenant id of the store checkpoint), ``input`` (a .npy or .npz file of rows [n, *row_shape],
relative to the manifest), optional ``key`` (the array of a .npz holding several) and
optional ``output`` (the output name; default ``<tenant>__<input stem>[__<key>]``). Rows of
many tenants are mixed into bucket-sized steps, as the scheduler would: a window of up to K
tenants (the largest tenant bucket) each gives up to B rows (the largest row bucket) per step.
An entry's output is the array ``y`` (a model returning one array) or one array per output
leaf named by its path (``logits``, ``0``, ``a.b``), in ``<output>.npz`` of --output-dir; in
the one .npz of --output-file, ``<output>`` or ``<output>/<leaf>``. Every output is written
atomically as soon as its entry is complete, so a rerun skips finished entries (resume) and
removes the temporary files (``.<name>.tmp-<host>-<pid>-<hex>``) that a killed write of its
outputs left: those of a process of this host that is no longer running, never another
running job's write in flight (on POSIX systems; on Windows a job cannot ask whether a
process runs, so it leaves them for you to delete once no job writes there).
A bad line (unknown tenant, missing or misshapen input) stops the job with an error naming
it, or is recorded in the summary with ``--skip-errors``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import hashlib
import importlib
import json
import os
import pathlib
import re
import socket
import sys
import time
import uuid
import zipfile
from collections.abc import Collection
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmt.errors import JaxmtError, ManifestError
from jaxmt.manifest import Entry, read_entries
from jaxmt.model import MultiTenantModel
from jaxmt.validation import abstract_rows

# ---------------------------------------------------------------------------- outputs
# What _temporary names: the writer's host and process id, then a random tag. Names without
# the writer (``.<name>.tmp-<hex>``, written before the writer was recorded) are all stale.
_TEMPORARY = re.compile(r"\.(?P<name>.+)\.tmp-(?:(?P<host>.+)-(?P<pid>[0-9]+)-)?[0-9a-f]{8}")


def _host_tag(hostname: str) -> str:
    """``hostname`` as one field of a temporary's name: letters, digits and dots (no "-", which
    ends the field), at most 32 characters. A name that had to change gets a digest of itself,
    so that no two hosts share a tag: a job reads a tag of its own host's, with a pid not
    running here, as a killed write and removes it, another host's write in flight included."""
    tag = re.sub(r"[^A-Za-z0-9.]", "_", hostname)
    if tag == hostname and 0 < len(tag) <= 32:
        return tag
    return f"{tag[:23]}_{hashlib.sha256(hostname.encode()).hexdigest()[:8]}"


_HOST = _host_tag(socket.gethostname())


def _temporary(path: pathlib.Path) -> pathlib.Path:
    """Where ``path`` is written before it is renamed into place: beside it, hidden, named
    with its writer so that another job can tell whether the write may still be in flight."""
    return path.with_name(f".{path.name}.tmp-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _writer_is_gone(match: re.Match) -> bool:
    """Whether the process that wrote a temporary has ended, so that the write was cut short.
    A writer on another host, or a process of this one that still runs, may be writing it now."""
    if match["pid"] is None:
        return True
    if match["host"] != _HOST or int(match["pid"]) == os.getpid() or os.name != "posix":
        return False  # (signal 0 only asks after a process on POSIX systems; elsewhere it kills)
    try:
        os.kill(int(match["pid"]), 0)
    except ProcessLookupError:
        return True
    except (OverflowError, OSError):  # another user's process (PermissionError), or a pid out of range
        return False
    return False


def _remove_stale_temporaries(folder: pathlib.Path, names: Collection[str] | None) -> None:
    """Removes the temporaries of the files ``names`` (None: of any file) in ``folder`` that a
    write killed before it could clean up (SIGKILL, power loss) left behind. Only those whose
    writer has ended: two jobs writing the same names may run side by side, and removing the
    other's temporary would make its rename fail."""
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        match = _TEMPORARY.fullmatch(path.name)
        if match and (names is None or match["name"] in names) and path.is_file() and _writer_is_gone(match):
            path.unlink(missing_ok=True)


def _atomic_savez(path: pathlib.Path, arrays: dict[str, np.ndarray]) -> None:
    tmp = _temporary(path)
    try:
        # The archive np.savez writes, without its keywords: an array named "file" or
        # "allow_pickle" (an output name, or an output leaf's path) must not become an argument.
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            for name, array in arrays.items():
                with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, _savable(np.asanyarray(array)), allow_pickle=False)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _savable(array: np.ndarray) -> np.ndarray:
    """``array`` in a dtype the .npy format describes: JAX's extra dtypes (bfloat16, the
    float8 and int4 kinds), which it would store as raw bytes, as float32 (or int32); every
    value of theirs is exact there."""
    if array.dtype.kind != "V" or array.dtype.names is not None:
        return array
    return array.astype(np.float32 if jnp.issubdtype(array.dtype, jnp.floating) else np.int32)


def _output_arrays(spec_tree: Any, leaves: list[np.ndarray]) -> dict[str, np.ndarray]:
    """'y' for a single output array, else the path of each output leaf ('logits', '0', 'a.b')."""
    paths = [".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(spec_tree)[0]]
    return {"y": leaves[0]} if paths == [""] else dict(zip(paths, leaves))


def _file_keys(name: str, arrays) -> dict[str, np.ndarray]:
    """One entry's arrays (as in its .npz of an output directory) keyed for the one output
    file: a plain array (``y``) by the output name, each leaf of a pytree output, even a lone
    one, by ``<output>/<leaf>``, so that a leaf's name is kept as the directory keeps it."""
    if arrays.files == ["y"]:  # a pytree whose only leaf is "y" is stored as a plain array in a directory too
        return {name: arrays["y"]}
    return {f"{name}/{k}": arrays[k] for k in arrays.files}


class _Outputs:
    """Where finished entries go: one .npz per entry in a directory, or one .npz keyed by entry."""

    def __init__(self, output_dir: str | os.PathLike | None, output_file: str | os.PathLike | None):
        if (output_dir is None) == (output_file is None):
            raise ValueError("give exactly one of output_dir and output_file")
        self.file = None if output_file is None else pathlib.Path(output_file)
        self.dir = pathlib.Path(output_dir) if output_dir is not None else self.file.with_name(self.file.name + ".parts")
        self._combined = set()
        if self.file is not None and self.file.exists():
            try:
                with np.load(self.file) as done:
                    self._combined = {name.split("/")[0] for name in done.files}
            except (OSError, ValueError, AttributeError, zipfile.BadZipFile) as exc:  # AttributeError: a .npy has no .files
                raise ValueError(f"output file {self.file} exists but is not a .npz archive of outputs (resume needs one): {exc}") from None

    def remove_stale_temporaries(self, names: Collection[str]) -> None:
        """Those of the outputs ``names``, of the output file, and all of the parts folder
        (which belongs to the output file alone, and is removed once merged only if empty)."""
        if self.file is None:
            _remove_stale_temporaries(self.dir, {f"{name}.npz" for name in names})
        else:
            _remove_stale_temporaries(self.dir, None)
            _remove_stale_temporaries(self.file.parent, {self.file.name})

    def done(self, name: str) -> bool:
        return name in self._combined or (self.dir / f"{name}.npz").exists()

    def write(self, name: str, arrays: dict[str, np.ndarray]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        _atomic_savez(self.dir / f"{name}.npz", arrays)

    def finish(self) -> pathlib.Path:
        """Single-file mode: merges the parts into the file (atomically), then drops the parts."""
        if self.file is None or not self.dir.is_dir():
            return self.dir if self.file is None else self.file
        parts = sorted(self.dir.glob("*.npz"))
        if parts:
            merged = {}
            if self.file.exists():
                with np.load(self.file) as old:
                    merged.update({k: old[k] for k in old.files})
            for part in parts:
                with np.load(part) as arrays:
                    merged.update(_file_keys(part.stem, arrays))
            _atomic_savez(self.file, merged)
            for part in parts:
                part.unlink()
        if not any(self.dir.iterdir()):
            self.dir.rmdir()
        return self.file


# ---------------------------------------------------------------------------- the job
def _load(entry: Entry) -> Any:
    if entry.input.suffix.lower() == ".npy":
        return np.load(entry.input, mmap_mode="r")  # rows are read step by step
    with np.load(entry.input) as archive:
        return archive[entry.key]


def _batches(entries: list[Entry], k_max: int, b_max: int, row_dtype: np.dtype, fail, check=None):
    """Yields (ids, x, pieces): up to b_max rows from each of up to k_max tenants per batch.

    ``pieces`` are (entry, first row, count); an entry's input is read when it starts and
    released when its output is written, so at most about k_max inputs are held at once.
    """
    waiting = collections.OrderedDict()
    for entry in entries:
        waiting.setdefault(entry.tenant, collections.deque()).append(entry)
    active: list[list] = []  # [tenant, deque of entries, next row of the first entry]
    while waiting or active:
        while len(active) < k_max and waiting:
            tenant, queue = waiting.popitem(last=False)
            active.append([tenant, queue, 0])
        ids, chunks, pieces = [], [], []
        for cursor in active:
            tenant, queue, start = cursor
            budget = b_max
            while budget and queue:
                entry = queue[0]
                if entry.x is None:
                    try:
                        entry.x = _load(entry)
                        if entry.x.shape[0] != entry.rows:
                            raise ValueError(f"input {entry.input.name} changed while the job ran")
                        if check is not None:
                            check(entry)  # e.g. NaN rows under nonfinite_inputs="reject": this line's error
                    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as exc:
                        entry.x = None  # a skipped input is not held (or kept mapped) until the job ends
                        fail(entry.line, f"reading {entry.input.name} failed: {exc}")  # raises unless skipping
                        queue.popleft()
                        continue
                count = min(budget, entry.rows - start)
                chunks.append(np.asarray(entry.x[start:start + count], dtype=row_dtype))
                pieces.append((entry, start, count))
                ids.extend([tenant] * count)
                budget -= count
                start += count
                if start == entry.rows:
                    queue.popleft()
                    start = 0
            cursor[2] = start
        active = [cursor for cursor in active if cursor[1]]
        if ids:
            yield ids, np.concatenate(chunks), pieces


def predict_manifest(
    model: MultiTenantModel,
    manifest: str | os.PathLike,
    output_dir: str | os.PathLike | None = None,
    *,
    output_file: str | os.PathLike | None = None,
    skip_errors: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Predicts every manifest entry whose output does not exist yet; returns the summary.

    Args:
      model: a MultiTenantModel holding the manifest's tenants.
      manifest: CSV (with header) or JSON-lines file; see the module docstring.
      output_dir: write ``<output>.npz`` per entry here (array ``y``, or one array per
        output leaf named by its path, e.g. ``logits``, for pytree outputs); or
      output_file: write one .npz keyed by output name: ``<output>`` for an array output,
        ``<output>/<leaf>`` for each leaf of a pytree output (parts are kept beside it until
        the job ends, so an interrupted job resumes).
      skip_errors: record bad lines in the summary instead of raising.
      progress: show a tqdm bar over rows.

    Returns:
      dict with manifest, outputs (the output directory or file), entries, computed,
      skipped_existing, failed, errors ([{line, error}]), rows (rows computed now), seconds,
      rows_per_second, steps, compiles, compile_seconds and padding_waste.

    Raises:
      ManifestError: a bad line (without ``skip_errors``), naming the manifest and line.
    """
    manifest = pathlib.Path(manifest)
    if not manifest.is_file():
        raise ManifestError(f"manifest {manifest} does not exist")
    errors: list[dict[str, Any]] = []

    def fail(line: int, message: str) -> None:
        if not skip_errors:
            raise ManifestError(f"manifest {manifest} line {line}: {message}", line)
        errors.append({"line": line, "error": message})

    outputs = _Outputs(output_dir, output_file)
    entries, row_spec, lines = read_entries(manifest, model, fail)
    outputs.remove_stale_temporaries([e.output for e in entries])
    todo = [e for e in entries if not outputs.done(e.output)]
    before, start_time = model.stats(), time.perf_counter()
    computed = rows = 0
    if todo:
        computed, rows = _run(model, todo, outputs, row_spec, progress, fail)
    seconds = time.perf_counter() - start_time
    after = model.stats()
    result_path = outputs.finish()
    padded = after["padded_rows"] - before["padded_rows"]
    return {
        "manifest": str(manifest),
        "outputs": str(result_path),
        "entries": lines,
        "computed": computed,
        "skipped_existing": len(entries) - len(todo),
        "failed": len(errors),
        "errors": errors,
        "rows": rows,
        "seconds": round(seconds, 4),
        "rows_per_second": round(rows / seconds, 2) if rows and seconds > 0 else 0.0,
        "steps": after["steps"] - before["steps"],
        "compiles": after["compiles"] - before["compiles"],
        "compile_seconds": round(after["compile_seconds"] - before["compile_seconds"], 4),
        "padding_waste": round(1.0 - (after["rows"] - before["rows"]) / padded, 6) if padded else 0.0,
    }


def _run(model: MultiTenantModel, todo: list[Entry], outputs: _Outputs, row_spec: tuple, progress: bool, fail) -> tuple[int, int]:
    """Computes and writes the entries; returns (entries written, rows computed)."""
    from tqdm.auto import tqdm

    row_shape, row_dtype = row_spec
    out_spec = jax.eval_shape(model.apply_fn, model.store.template, abstract_rows((1, *row_shape), row_dtype))
    out_leaves = jax.tree_util.tree_leaves(out_spec)
    bar = tqdm(total=sum(e.rows for e in todo), unit="row", desc="batch", disable=not progress)
    written = [0, 0]

    def finish(entry: Entry) -> None:
        outputs.write(entry.output, _output_arrays(out_spec, entry.y))
        written[0] += 1
        written[1] += entry.rows
        entry.x = entry.y = None

    for entry in todo:
        if entry.rows == 0:
            entry.y = [np.zeros((0, *s.shape[1:]), s.dtype) for s in out_leaves]
            finish(entry)

    def collect(pending) -> None:
        handle, pieces = pending
        leaves = jax.tree_util.tree_leaves(handle.result())
        offset = 0
        for entry, start, count in pieces:
            if entry.y is None:
                entry.y = [np.empty((entry.rows, *s.shape[1:]), s.dtype) for s in out_leaves]
            for buffer, leaf in zip(entry.y, leaves):
                buffer[start:start + count] = leaf[offset:offset + count]
            offset += count
            entry.filled += count
            if entry.filled == entry.rows:
                finish(entry)
        bar.update(offset)

    pending = None
    try:
        buckets = model.buckets
        check = None
        if model.nonfinite_inputs == "reject":
            check = lambda entry: model.check_finite([entry.tenant] * entry.rows, entry.x)  # noqa: E731
        for ids, x, pieces in _batches([e for e in todo if e.rows], buckets.max_tenants, buckets.max_rows, row_dtype, fail, check):
            handle = model.dispatch(ids, x)  # the device runs this step while the last one is copied back
            if pending is not None:
                last, pending = pending, None
                collect(last)
            pending = (handle, pieces)
        if pending is not None:
            last, pending = pending, None
            collect(last)
    except BaseException:
        # A later line failed (or the job was stopped) with a step in flight: its finished
        # entries are written still, so that the rerun does not compute them again.
        if pending is not None:
            with contextlib.suppress(Exception):
                collect(pending)
        raise
    finally:
        bar.close()
    return written[0], written[1]


# ---------------------------------------------------------------------------- command line
EXIT_INTERRUPTED = 130  # as a shell reports a job stopped by SIGINT
EXIT_CODES = """\
exit codes:
  0    every entry's output is written (by this run or an earlier one)
  1    an error stopped the job before or while it ran (a bad manifest line, an option
       or path it cannot use, a checkpoint or model it cannot load, an output or the
       summary it cannot write), or with --skip-errors some lines failed: they are in
       the summary, the other outputs are written
  2    the command line does not parse (a missing or unknown option)
  130  interrupted (Ctrl-C): the outputs finished so far are kept; run the same
       command again to resume"""


def _positive_int(text: str) -> int:
    """An option's count of at least 1 (argparse names the option and exits 2 otherwise)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds ``python -m jaxmt batch``'s arguments (the CLI's contract, see ``jaxmt.cli``)."""
    parser.description = __doc__
    parser.epilog = EXIT_CODES
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("manifest", help="CSV with header (tenant,input[,key][,output]) or JSON lines with those keys")
    parser.add_argument("--checkpoint", required=True, help="store checkpoint directory (jaxmt.save_store)")
    arch = parser.add_mutually_exclusive_group(required=True)
    arch.add_argument("--arch", help="architecture from models/ (mlp, resnet18, ...)")
    arch.add_argument("--model", metavar="MODULE:FUNCTION", help="import path of a function returning (apply_fn, example_params)")
    # None until checked, so that one given with --model (which would ignore it) is told from the default
    parser.add_argument("--size", choices=("tiny", "full"), help="size of --arch (default tiny)")
    parser.add_argument("--dtype", help="params and compute dtype of --arch (default float32)")
    out = parser.add_mutually_exclusive_group(required=True)
    out.add_argument("--output-dir", help="write one <output>.npz per entry here (array y, or one array per output leaf, e.g. logits)")
    out.add_argument("--output-file", help="write one .npz keyed by entry output name (<output>, or <output>/<leaf> per output leaf)")
    parser.add_argument("--summary", help="summary JSON path (default <output-dir>/summary.json or <output-file>.summary.json)")
    parser.add_argument("--max-tenants", type=_positive_int, default=16, help="tenants per step: the largest tenant bucket (default 16)")
    parser.add_argument("--max-rows", type=_positive_int, default=64, help="rows per tenant per step: the largest row bucket (default 64)")
    parser.add_argument("--skip-errors", action="store_true", help="record bad manifest lines in the summary instead of stopping")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")


def _architecture(args: argparse.Namespace) -> tuple[Any, Any, dict[str, Any]]:
    if args.arch:
        import models

        dtype = args.dtype or "float32"
        spec = models.make(args.arch, args.size or "tiny", dtype=dtype)
        example = jax.eval_shape(lambda: spec.init(0, dtype))
        return spec.apply_fn, example, {"row_shape": spec.input_shape, "row_dtype": spec.input_dtype}
    if args.size is not None or args.dtype is not None:  # refused rather than silently dropped
        raise ValueError("--size and --dtype apply to --arch only; the --model function's example params set the model")
    module_name, _, function_name = args.model.partition(":")
    if not module_name or not function_name:
        raise ValueError(f"--model must be MODULE:FUNCTION, got {args.model!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    made = getattr(importlib.import_module(module_name), function_name)()
    if not isinstance(made, (tuple, list)) or len(made) != 2:  # else unpacking it says only "cannot unpack"
        raise TypeError(f"--model {args.model} returned {type(made).__name__}, expected (apply_fn, example_params)")
    apply_fn, example = made
    return apply_fn, example, {}


def _write_summary(path: pathlib.Path, summary: dict) -> None:
    """Writes the summary whole or not at all (a temporary file renamed over it; removed if
    that fails, or every failed run would leave one behind)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path.parent, {path.name})
    tmp = _temporary(path)
    try:
        tmp.write_text(json.dumps(summary, indent=1))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _summary_clash(summary_path: pathlib.Path, args: argparse.Namespace) -> str | None:
    """What the summary would overwrite, if anything: the manifest, the output file (or its
    parts), or an entry's output in the output directory."""
    summary = summary_path.resolve()
    if summary == pathlib.Path(args.manifest).resolve():
        return "the manifest"
    if args.output_file:
        output = pathlib.Path(args.output_file).resolve()
        if summary == output or output.with_name(output.name + ".parts") in summary.parents:
            return "the output file"
    if args.output_dir and summary.parent == pathlib.Path(args.output_dir).resolve() and summary.suffix == ".npz":
        return "an output of the output directory"
    return None


def run(args: argparse.Namespace) -> int:
    """Runs ``python -m jaxmt batch``; returns the exit code (Ctrl-C keeps finished outputs for a rerun)."""
    try:
        return _command(args)
    except KeyboardInterrupt:  # Ctrl-C: every output is written whole or not at all, so a rerun goes on from here
        print("interrupted: the outputs finished so far are kept; run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED


def _command(args: argparse.Namespace) -> int:
    from jaxmt.buckets import BucketPolicy
    from jaxmt.checkpoint import restore_model

    for option in ("output_dir", "output_file", "summary", "arch", "model", "dtype"):  # e.g. "$OUT" of an unset variable
        if getattr(args, option) == "":
            print(f"error: --{option.replace('_', '-')} is empty", file=sys.stderr)
            return 1
    summary_path = pathlib.Path(args.summary or (pathlib.Path(args.output_dir) / "summary.json" if args.output_dir else args.output_file + ".summary.json"))
    clash = _summary_clash(summary_path, args)
    if clash:
        print(f"error: --summary {summary_path} would overwrite {clash}", file=sys.stderr)
        return 1
    if summary_path.is_dir():  # refused now, not once every output is written
        remedy = "" if args.summary else "; give --summary a file"
        print(f"error: {'--' if args.summary else 'the default '}summary {summary_path} is a folder, not a file{remedy}", file=sys.stderr)
        return 1
    try:
        apply_fn, example, rows = _architecture(args)
        buckets = BucketPolicy.powers_of_two(args.max_tenants, args.max_rows)
        model = restore_model(args.checkpoint, apply_fn, example, buckets=buckets, **rows)
        summary = predict_manifest(
            model, args.manifest, args.output_dir, output_file=args.output_file, skip_errors=args.skip_errors, progress=not args.no_progress
        )
    except (JaxmtError, ValueError, TypeError, ImportError, AttributeError, OSError) as exc:  # OSError: an output path it cannot write
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        _write_summary(summary_path, summary)
    except OSError as exc:
        print(f"error: the outputs are written, but not the summary: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"{summary['computed']} entries computed ({summary['rows']} rows, {summary['rows_per_second']:,.0f} rows/s, "
            f"{summary['steps']} steps, {summary['compiles']} compiles, padding {summary['padding_waste']:.0%}), "
            f"{summary['skipped_existing']} already done, {summary['failed']} failed; summary in {summary_path}"
        )
    return 1 if summary["failed"] else 0
