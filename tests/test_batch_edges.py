"""Batch jobs at their edges: rows fixed by the inputs, output names, unreadable manifests, failures mid-job."""

from __future__ import annotations

import collections
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import jaxmt
import jaxmt.batch
from jaxmt import BucketPolicy, ManifestError, MultiTenantModel


def _apply(params, x):
    return x @ params["w"]


def _model(rows_known: bool = True, **kwargs) -> tuple[MultiTenantModel, dict]:
    """Tenants p and q of x @ w over rows of 6 floats (row shape given, or left to the inputs)."""
    rng = np.random.default_rng(0)
    params = {t: {"w": rng.normal(size=(6, 3)).astype(np.float32)} for t in "pq"}
    rows = {"row_shape": (6,), "row_dtype": np.float32} if rows_known else {}
    model = MultiTenantModel(_apply, params["p"], capacity=2, **rows, **kwargs)
    for tenant, p in params.items():
        model.add_tenant(tenant, p)
    return model, params


def _save(directory: pathlib.Path, name: str, rows: int, width: int = 6) -> np.ndarray:
    x = np.random.default_rng(len(name) + rows).normal(size=(rows, width)).astype(np.float32)
    np.save(directory / name, x)
    return x


def _line_2_fails_then_is_skipped(model, manifest, out, match: str) -> dict:
    """The job stops at manifest line 2 with a ManifestError naming it; with skip_errors it
    records that line and goes on. Returns the second run's summary."""
    with pytest.raises(ManifestError, match="line 2: " + match) as caught:
        jaxmt.predict_manifest(model, manifest, out)
    assert caught.value.line == 2
    return jaxmt.predict_manifest(model, manifest, out, skip_errors=True)


def test_an_input_the_model_cannot_take_fails_its_own_line_not_the_lines_after_it(tmp_path):
    """Without rows fixed by the model, the first input the model can take fixes them: a first
    input of the wrong width is its own bad line, and the good lines after it run."""
    model, params = _model(rows_known=False)
    _save(tmp_path, "wide.npy", 4, width=7)
    good = _save(tmp_path, "good.npy", 4)
    manifest = tmp_path / "m.csv"
    manifest.write_text("tenant,input,output\np,wide.npy,w\nq,good.npy,g\n")
    summary = _line_2_fails_then_is_skipped(model, manifest, tmp_path / "out", r"input wide.npy has rows of shape \[7\]")
    assert summary["computed"] == 1 and [e["line"] for e in summary["errors"]] == [2]
    np.testing.assert_allclose(np.load(tmp_path / "out" / "g.npz")["y"], good @ params["q"]["w"], rtol=1e-5)


def test_an_unknown_tenant_of_a_live_model_is_not_said_to_be_missing_from_a_checkpoint(tmp_path):
    """predict_manifest serves any model, not only one restored from a checkpoint."""
    model, _ = _model()
    _save(tmp_path, "x.npy", 2)
    (tmp_path / "m.csv").write_text("tenant,input\nzz,x.npy\np,x.npy\n")
    summary = _line_2_fails_then_is_skipped(model, tmp_path / "m.csv", tmp_path / "out", r"unknown tenant 'zz' \(2 tenants are resident\)")
    assert summary["computed"] == 1


@pytest.mark.parametrize("name", ["file", "allow_pickle"])
def test_outputs_named_like_savez_keywords_are_kept_in_one_output_file(tmp_path, name):
    model, params = _model()
    x = _save(tmp_path, "x.npy", 3)
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"tenant,input,output\np,x.npy,{name}\nq,x.npy,other\n")
    summary = jaxmt.predict_manifest(model, manifest, output_file=tmp_path / "all.npz")
    assert summary["computed"] == 2
    with np.load(tmp_path / "all.npz") as outputs:
        assert sorted(outputs.files) == sorted([name, "other"])
        np.testing.assert_allclose(outputs[name], x @ params["p"]["w"], rtol=1e-5)


def _named_leaves(params, x):
    return {"file": x @ params["w"], "allow_pickle": x.sum(axis=-1)}


def _one_output_file(tmp_path, apply_fn) -> tuple[dict, np.ndarray]:
    """The leaves saved for one manifest line of three rows of tenant "p" (weights all ones), and x."""
    model = MultiTenantModel(apply_fn, {"w": np.ones((6, 3), np.float32)}, capacity=1, row_shape=(6,), row_dtype=np.float32)
    model.add_tenant("p", {"w": np.ones((6, 3), np.float32)})
    x = _save(tmp_path, "x.npy", 3)
    (tmp_path / "m.csv").write_text("tenant,input,output\np,x.npy,out\n")
    jaxmt.predict_manifest(model, tmp_path / "m.csv", tmp_path / "out")
    with np.load(tmp_path / "out" / "out.npz") as got:
        return dict(got), x


_Fields = collections.namedtuple("_Fields", "logits norm")


@pytest.mark.parametrize("apply_fn, names, row_sums", [
    (_named_leaves, ["allow_pickle", "file"], "allow_pickle"),  # savez's own keywords are kept as leaf names
    (lambda p, x: _Fields(x @ p["w"], x.sum(axis=-1)), ["logits", "norm"], "norm"),  # a namedtuple's fields, not '.logits'
], ids=["savez-keywords", "namedtuple-fields"])
def test_output_leaves_are_saved_under_their_path_names(tmp_path, apply_fn, names, row_sums):
    """Each output leaf is saved under its path's name (``row_sums``: the leaf holding x.sum(-1))."""
    got, x = _one_output_file(tmp_path, apply_fn)
    assert sorted(got) == names
    np.testing.assert_allclose(got[row_sums], x.sum(axis=-1), rtol=1e-5)


def _leaves_by_mode(tmp_path, apply_fn) -> tuple[list[str], list[str]]:
    """The array names one manifest line (output "out") gets in an output directory's out.npz
    and in one output file."""
    model = MultiTenantModel(apply_fn, {"w": np.ones((6, 3), np.float32)}, capacity=1, row_shape=(6,), row_dtype=np.float32)
    model.add_tenant("p", {"w": np.ones((6, 3), np.float32)})
    _save(tmp_path, "x.npy", 3)
    (tmp_path / "m.csv").write_text("tenant,input,output\np,x.npy,out\n")
    jaxmt.predict_manifest(model, tmp_path / "m.csv", tmp_path / "out")
    jaxmt.predict_manifest(model, tmp_path / "m.csv", output_file=tmp_path / "all.npz")
    with np.load(tmp_path / "out" / "out.npz") as in_dir, np.load(tmp_path / "all.npz") as in_file:
        return sorted(in_dir.files), sorted(in_file.files)


@pytest.mark.parametrize("apply_fn, in_dir, in_file", [
    (_apply, ["y"], ["out"]),  # a plain array: the entry's name, as before
    (lambda p, x: {"logits": x @ p["w"]}, ["logits"], ["out/logits"]),  # was "out": the leaf's name was lost
    (lambda p, x: (x @ p["w"],), ["0"], ["out/0"]),
    (_named_leaves, ["allow_pickle", "file"], ["out/allow_pickle", "out/file"]),
], ids=["array", "one named leaf", "one-tuple", "two leaves"])
def test_one_output_file_names_leaves_as_the_output_directory_does(tmp_path, apply_fn, in_dir, in_file):
    """A pytree output's leaves are "<output>/<leaf>" in one output file, however many there
    are; only a plain array is stored under the output name alone."""
    assert _leaves_by_mode(tmp_path, apply_fn) == (in_dir, in_file)


def test_a_manifest_that_is_not_utf8_raises_manifest_error_naming_it(tmp_path):
    model, _ = _model()
    manifest = tmp_path / "latin1.csv"
    manifest.write_bytes("tenant,input\np,caf\xe9.npy\n".encode("latin-1"))
    with pytest.raises(ManifestError, match="latin1.csv cannot be read as UTF-8"):
        jaxmt.predict_manifest(model, manifest, tmp_path / "out")


def test_a_csv_row_with_more_fields_than_the_header_is_a_bad_line(tmp_path):
    """The extra fields (here a key and an output under a two-column header) are not dropped silently."""
    model, _ = _model()
    np.savez(tmp_path / "x.npz", first=np.zeros((2, 6), np.float32))
    _save(tmp_path, "y.npy", 2)
    manifest = tmp_path / "m.csv"
    manifest.write_text("tenant,input\np,x.npz,first,out-p\nq,y.npy\n")
    summary = _line_2_fails_then_is_skipped(model, manifest, tmp_path / "out", r".*4 fields, but the header names 2 columns")
    assert summary["computed"] == 1 and [p.name for p in (tmp_path / "out").glob("*.npz")] == ["q__y.npz"]


def test_entries_finished_by_the_step_in_flight_are_written_when_a_later_input_fails(tmp_path, monkeypatch):
    """One tenant per step: entry A's step is in flight when B's input turns out to be gone; A's
    output is written, so the rerun computes only B."""
    model, params = _model(buckets=BucketPolicy.powers_of_two(1, 8))
    a = _save(tmp_path, "a.npy", 4)
    _save(tmp_path, "b.npy", 4)
    manifest = tmp_path / "m.csv"
    manifest.write_text("tenant,input,output\np,a.npy,A\nq,b.npy,B\n")
    read_entries = jaxmt.batch.read_entries

    def read_then_lose_b(*args):
        entries = read_entries(*args)
        (tmp_path / "b.npy").unlink()  # removed while the job runs
        return entries

    monkeypatch.setattr(jaxmt.batch, "read_entries", read_then_lose_b)
    with pytest.raises(ManifestError, match="line 3: reading b.npy failed"):
        jaxmt.predict_manifest(model, manifest, tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").glob("*.npz")] == ["A.npz"]
    np.testing.assert_allclose(np.load(tmp_path / "out" / "A.npz")["y"], a @ params["p"]["w"], rtol=1e-5)


def test_an_existing_output_file_that_is_not_an_npz_is_named(tmp_path):
    model, _ = _model()
    _save(tmp_path, "x.npy", 2)
    (tmp_path / "m.csv").write_text("tenant,input\np,x.npy\n")
    (tmp_path / "all.npz").write_bytes(b"not a zip archive")
    with pytest.raises(ValueError, match=r"output file .*all.npz exists but is not a .npz archive"):
        jaxmt.predict_manifest(model, tmp_path / "m.csv", output_file=tmp_path / "all.npz")
    assert (tmp_path / "all.npz").read_bytes() == b"not a zip archive"


def test_a_scalar_first_input_is_its_own_bad_line_when_the_model_has_no_rows_yet(tmp_path):
    model, params = _model(rows_known=False)
    np.save(tmp_path / "scalar.npy", np.float32(1))
    good = _save(tmp_path, "good.npy", 2)
    (tmp_path / "m.csv").write_text("tenant,input,output\np,scalar.npy,s\nq,good.npy,g\n")
    summary = jaxmt.predict_manifest(model, tmp_path / "m.csv", tmp_path / "out", skip_errors=True)
    assert summary["errors"] == [{"line": 2, "error": "input scalar.npy has shape [], expected [rows, ...]"}]
    np.testing.assert_allclose(np.load(tmp_path / "out" / "g.npz")["y"], good @ params["q"]["w"], rtol=1e-5)


def test_an_input_that_changed_while_the_job_ran_is_skipped_and_let_go(tmp_path):
    """With errors skipped, an input whose row count changed since the manifest was read is
    reported on its line and not held (a .npy stays memory-mapped while referenced); the
    other entries' rows are batched as before."""
    from jaxmt.manifest import Entry

    good = _save(tmp_path, "good", rows=3)
    _save(tmp_path, "changed", rows=5)
    entries = [Entry(2, "a", tmp_path / "changed.npy", None, "c", rows=4), Entry(3, "b", tmp_path / "good.npy", None, "g", rows=3)]
    failures = []
    batches = list(jaxmt.batch._batches(entries, 4, 4, np.dtype(np.float32), lambda line, message: failures.append((line, message))))
    assert failures == [(2, "reading changed.npy failed: input changed.npy changed while the job ran")]
    assert entries[0].x is None
    assert [ids for ids, _, _ in batches] == [["b"] * 3]
    np.testing.assert_array_equal(batches[0][1], good)


# ------------------------------------------------------------------ outputs, names and the command line
def test_bfloat16_outputs_are_written_as_numbers(tmp_path):
    """.npy cannot describe bfloat16 (it would store raw bytes): such outputs are float32."""
    import jax.numpy as jnp
    from conftest import tiny_spec

    from jaxmt.cli import main as cli_main

    spec = tiny_spec("mlp")
    mt = MultiTenantModel(spec.apply_fn, spec.init(0, jnp.bfloat16), capacity=2)
    mt.add_tenant("a", spec.init(1, jnp.bfloat16))
    jaxmt.save_store(mt, tmp_path / "ckpt")
    x = spec.random_input(np.random.default_rng(0), 5)
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "m.csv").write_text("tenant,input,output\na,x.npy,o\n")
    assert cli_main(["batch", str(tmp_path / "m.csv"), "--checkpoint", str(tmp_path / "ckpt"), "--arch", "mlp", "--dtype", "bfloat16",
                     "--no-progress", "--output-dir", str(tmp_path / "out")]) == 0
    y = np.load(tmp_path / "out" / "o.npz")["y"]
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, np.asarray(mt.predict(["a"] * 5, x), np.float32), rtol=2e-2, atol=2e-2)  # bfloat16 rounding


@pytest.mark.parametrize("target", ["the output file", "the manifest", "a part of the output file"])
def test_a_summary_that_would_overwrite_the_job_is_refused(tmp_path, capsys, target):
    from jaxmt.cli import main as cli_main

    model, _ = _model()
    jaxmt.save_store(model, tmp_path / "ckpt")
    _save(tmp_path, "x.npy", 3)
    manifest = tmp_path / "m.csv"
    manifest.write_text("tenant,input\np,x.npy\n")
    out = tmp_path / "r.npz"
    summary = {"the output file": out, "the manifest": manifest, "a part of the output file": tmp_path / "r.npz.parts" / "s.json"}[target]
    before = manifest.read_text()
    code = cli_main(["batch", str(manifest), "--checkpoint", str(tmp_path / "ckpt"), "--model", f"{__name__}:_example_model",
                     "--no-progress", "--output-file", str(out), "--summary", str(summary)])
    assert code == 1 and "would overwrite" in capsys.readouterr().err
    assert manifest.read_text() == before and not out.exists()


def _example_model():
    return _apply, {"w": np.ones((6, 3), np.float32)}


def _not_a_model():
    return _apply


def test_a_model_function_that_returns_no_pair_is_named(tmp_path, capsys):
    from jaxmt.cli import main as cli_main

    model, _ = _model()
    jaxmt.save_store(model, tmp_path / "ckpt")
    (tmp_path / "m.csv").write_text("tenant,input\n")
    code = cli_main(["batch", str(tmp_path / "m.csv"), "--checkpoint", str(tmp_path / "ckpt"), "--model", f"{__name__}:_not_a_model",
                     "--no-progress", "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1 and f"--model {__name__}:_not_a_model returned function" in err and "(apply_fn, example_params)" in err


def test_a_dtype_that_is_no_dtype_is_an_error_exit(tmp_path, capsys):
    from jaxmt.cli import main as cli_main

    (tmp_path / "m.csv").write_text("tenant,input\n")
    code = cli_main(["batch", str(tmp_path / "m.csv"), "--checkpoint", str(tmp_path / "none"), "--arch", "mlp", "--dtype", "nonsense",
                     "--output-dir", str(tmp_path / "out")])
    assert code == 1 and "error: expected a floating dtype" in capsys.readouterr().err


def test_an_input_whose_name_leaves_no_output_name_needs_an_output_column(tmp_path):
    mt = MultiTenantModel(_apply, {"w": np.ones((6, 3), np.float32)}, capacity=2, row_shape=(6,), row_dtype=np.float32)
    mt.add_tenant("é", {"w": np.ones((6, 3), np.float32)})
    _save(tmp_path, "é.npy", 3)
    (tmp_path / "m.csv").write_text("tenant,input\né,é.npy\n", encoding="utf-8")
    summary = _line_2_fails_then_is_skipped(mt, tmp_path / "m.csv", tmp_path / "out", "no output name can be made from tenant 'é' and input 'é.npy'")
    assert summary["failed"] == 1 and not list((tmp_path / "out").glob(".*"))


def test_json_manifests_name_nested_tuple_ids_and_zero_outputs_and_keys(tmp_path):
    import json

    mt = MultiTenantModel(_apply, {"w": np.ones((6, 3), np.float32)}, capacity=2, row_shape=(6,), row_dtype=np.float32)
    mt.add_tenant((1, (2, 3)), {"w": np.full((6, 3), 2, np.float32)})
    x = _save(tmp_path, "x.npy", 3)
    np.savez(tmp_path / "xs.npz", **{"0": x})
    lines = [{"tenant": [1, [2, 3]], "input": "x.npy", "output": 0}, {"tenant": [1, [2, 3]], "input": "xs.npz", "key": 0, "output": "k"}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    summary = jaxmt.predict_manifest(mt, tmp_path / "m.jsonl", tmp_path / "out")
    assert summary["failed"] == 0 and summary["computed"] == 2
    for name in ("0", "k"):
        np.testing.assert_allclose(np.load(tmp_path / "out" / f"{name}.npz")["y"], x @ np.full((6, 3), 2, np.float32), rtol=1e-6)


@pytest.mark.parametrize("raw", ["+1", "1_0", "01"])
def test_a_csv_tenant_names_a_number_only_as_its_plain_digits(tmp_path, raw):
    mt = MultiTenantModel(_apply, {"w": np.ones((6, 3), np.float32)}, capacity=2, row_shape=(6,), row_dtype=np.float32)
    for tenant in (1, 10):
        mt.add_tenant(tenant, {"w": np.ones((6, 3), np.float32)})
    _save(tmp_path, "x.npy", 3)
    (tmp_path / "m.csv").write_text(f"tenant,input\n{raw},x.npy\n")
    _line_2_fails_then_is_skipped(mt, tmp_path / "m.csv", tmp_path / "out", "unknown tenant")


# ------------------------------------------------------------------ found in review
def test_an_empty_input_file_is_a_bad_line_not_a_crash(tmp_path):
    """A zero-byte .npy (a copy cut short) makes np.load raise EOFError: it is its line's error."""
    model, params = _model()
    (tmp_path / "empty.npy").write_bytes(b"")
    good = _save(tmp_path, "good.npy", 2)
    (tmp_path / "m.csv").write_text("tenant,input,output\np,empty.npy,e\nq,good.npy,g\n")
    summary = _line_2_fails_then_is_skipped(model, tmp_path / "m.csv", tmp_path / "out", ".*empty.npy|No data left")
    assert summary["computed"] == 1 and [e["line"] for e in summary["errors"]] == [2]
    np.testing.assert_allclose(np.load(tmp_path / "out" / "g.npz")["y"], good @ params["q"]["w"], rtol=1e-5)


@pytest.mark.parametrize("name, content", [
    ("text.npy", b"rows,of,text\n1,2,3\n"),  # np.load took it for a pickle: "load it unsafely using allow_pickle"
    ("cut.npy", None),  # its header, half its data: "mmap length is greater than file size"
    ("text.npz", b"rows,of,text\n"),  # "File is not a zip file"
], ids=["not npy", "truncated npy", "not npz"])
def test_an_input_that_is_no_npy_or_npz_names_itself_and_is_not_taken_for_a_pickle(tmp_path, name, content):
    model, _ = _model()
    if content is None:
        _save(tmp_path, name, 50)
        (tmp_path / name).write_bytes((tmp_path / name).read_bytes()[:300])
    else:
        (tmp_path / name).write_bytes(content)
    _save(tmp_path, "good.npy", 2)
    (tmp_path / "m.csv").write_text(f"tenant,input,output\np,{name},e\nq,good.npy,g\n")
    summary = _line_2_fails_then_is_skipped(model, tmp_path / "m.csv", tmp_path / "out", f"input {name} is not a readable")
    assert "pickle" not in summary["errors"][0]["error"] and summary["computed"] == 1


def test_a_nonfinite_input_under_reject_is_its_lines_error(tmp_path):
    """With nonfinite_inputs="reject", an input holding NaN is a bad line: named, or skipped with
    skip_errors while the other lines (even of the same step) are written."""
    model, params = _model(nonfinite_inputs="reject")
    x = _save(tmp_path, "nan.npy", 3)
    x[1, 2] = np.nan
    np.save(tmp_path / "nan.npy", x)
    good = _save(tmp_path, "good.npy", 2)
    (tmp_path / "m.csv").write_text("tenant,input,output\np,nan.npy,n\nq,good.npy,g\n")
    summary = _line_2_fails_then_is_skipped(model, tmp_path / "m.csv", tmp_path / "out", ".*nan.npy")
    assert summary["computed"] == 1 and [e["line"] for e in summary["errors"]] == [2]
    np.testing.assert_allclose(np.load(tmp_path / "out" / "g.npz")["y"], good @ params["q"]["w"], rtol=1e-5)


@pytest.mark.parametrize("raw", ["true", "1.0"])
def test_a_json_true_or_float_does_not_name_tenant_1(tmp_path, raw):
    """JSON true == 1 == 1.0 in Python, but names no tenant (a CSV "01" or "+1" names none either)."""
    mt = MultiTenantModel(_apply, {"w": np.ones((6, 3), np.float32)}, capacity=2, row_shape=(6,), row_dtype=np.float32)
    for tenant in (0, 1):
        mt.add_tenant(tenant, {"w": np.full((6, 3), tenant, np.float32)})
    _save(tmp_path, "x.npy", 3)
    (tmp_path / "m.jsonl").write_text(f'{{"tenant": {raw}, "input": "x.npy"}}\n')
    with pytest.raises(ManifestError, match="line 1: unknown tenant"):
        jaxmt.predict_manifest(mt, tmp_path / "m.jsonl", tmp_path / "out")


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\x85"])
@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_unicode_line_separators_inside_a_field_do_not_split_its_line(tmp_path, kind, separator):
    """Only a newline ends a manifest line: U+2028, U+2029 and U+0085 are text inside a JSON
    string or a CSV field (a note pasted from a web page). str.splitlines() split the line
    there: a good line became unreadable and every later line's error named the line before it."""
    model, params = _model()
    good = _save(tmp_path, "good.npy", 3)
    _save(tmp_path, "other.npy", 2)
    manifest = tmp_path / f"m.{kind}"
    if kind == "jsonl":
        manifest.write_text(f'{{"tenant": "p", "input": "good.npy", "note": "see{separator}below"}}\n'
                            '{"tenant": "nobody", "input": "other.npy"}\n', encoding="utf-8")
        bad_line = 2
    else:
        manifest.write_text(f'tenant,input,note\np,good.npy,"see{separator}below"\nnobody,other.npy,\n', encoding="utf-8")
        bad_line = 3
    with pytest.raises(ManifestError, match=f"line {bad_line}: unknown tenant 'nobody'") as caught:
        jaxmt.predict_manifest(model, manifest, tmp_path / "out")
    assert caught.value.line == bad_line
    summary = jaxmt.predict_manifest(model, manifest, tmp_path / "out", skip_errors=True)
    assert summary["computed"] == 1 and [e["line"] for e in summary["errors"]] == [bad_line]
    np.testing.assert_allclose(np.load(tmp_path / "out" / "p__good.npz")["y"], good @ params["p"]["w"], rtol=1e-5)


def test_a_summary_that_cannot_be_written_leaves_no_temporary_file_behind(tmp_path):
    """A job rerun while its summary cannot land (here: a directory holds its name) must not
    pile up one temporary file a run beside it."""
    summary = tmp_path / "summary.json"
    summary.mkdir()
    for _ in range(2):
        with pytest.raises(OSError):
            jaxmt.batch._write_summary(summary, {"entries": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_a_resumed_job_removes_the_temporaries_a_killed_write_left_and_no_others(tmp_path):
    """A write killed outright (SIGKILL, power loss) leaves its ``.<name>.tmp-<hex>`` behind: the
    rerun removes those of its own outputs, so the parts folder goes once the file is merged;
    a temporary of an output it does not write, and any other file, are not its to remove."""
    model, _ = _model()
    _save(tmp_path, "x.npy", 3)
    (tmp_path / "m.csv").write_text("tenant,input,output\np,x.npy,a\nq,x.npy,b\n")
    parts, out = tmp_path / "all.npz.parts", tmp_path / "out"
    parts.mkdir()
    out.mkdir()
    stale = [parts / ".a.npz.tmp-0123abcd", parts / ".b.npz.tmp-89ef4567", tmp_path / ".all.npz.tmp-deadbeef", out / ".a.npz.tmp-0123abcd"]
    others = [out / ".c.npz.tmp-0123abcd", out / "notes.tmp-0123abcd", out / ".a.npz.tmp-draft"]
    for path in stale + others:
        path.write_bytes(b"cut short")
    jaxmt.predict_manifest(model, tmp_path / "m.csv", output_file=tmp_path / "all.npz")
    jaxmt.predict_manifest(model, tmp_path / "m.csv", out)
    assert not parts.exists() and not any(path.exists() for path in stale)
    assert sorted(p.name for p in out.iterdir()) == sorted(["a.npz", "b.npz", *(p.name for p in others)])


def test_writing_the_summary_removes_the_temporaries_a_killed_write_of_it_left(tmp_path):
    (tmp_path / ".summary.json.tmp-0123abcd").write_text("{")
    (tmp_path / ".other.json.tmp-0123abcd").write_text("{")
    jaxmt.batch._write_summary(tmp_path / "summary.json", {"entries": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.json.tmp-0123abcd", "summary.json"]


def _ended_pid() -> int:
    """The id of a process of this host that has run and ended."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_job_leaves_the_temporaries_of_a_write_that_may_be_in_flight(tmp_path):
    """Two jobs writing the same output names side by side: one must not remove the other's
    temporary mid-write. Only a temporary whose writer has ended on this host is stale."""
    host = jaxmt.batch._HOST
    writer = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:  # a process of this host that runs until the check is over (not the parent: pid 0 in some containers)
        ended = f".summary.json.tmp-{host}-{_ended_pid()}-0123abcd"
        running = f".summary.json.tmp-{host}-{writer.pid}-89ef4567"
        own = f".summary.json.tmp-{host}-{os.getpid()}-deadbeef"
        elsewhere = f".summary.json.tmp-another-host-{_ended_pid()}-01234567"
        for name in (ended, running, own, elsewhere):
            (tmp_path / name).write_text("{")
        jaxmt.batch._write_summary(tmp_path / "summary.json", {"entries": 1})
    finally:
        writer.communicate(b"")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([running, own, elsewhere, "summary.json"])


@pytest.mark.parametrize("hostname", ["gpu07.cluster", "node-1", "node_1", "ноут", "тест", "", "h" * 200])
def test_a_host_tag_is_one_field_of_the_name_short_and_never_shared_by_another_host(hostname):
    """A job takes a temporary whose tag is its own host's, with a pid that is not running,
    for a killed write and removes it: two hosts must never share a tag."""
    tag = jaxmt.batch._host_tag(hostname)
    assert 0 < len(tag) <= 32
    assert jaxmt.batch._TEMPORARY.fullmatch(f".a.npz.tmp-{tag}-123-0123abcd")["host"] == tag
    others = {"gpu07.cluster", "node-1", "node_1", "ноут", "тест", "", "h" * 200, "h" * 201} - {hostname}
    assert tag not in {jaxmt.batch._host_tag(other) for other in others}


def test_a_temporary_of_another_host_whose_name_reads_alike_is_left(tmp_path, monkeypatch):
    """Host names of other letters than ASCII's (or with "-" where the other has "_") must not
    read as this host's: its writer's pid says nothing here."""
    monkeypatch.setattr(jaxmt.batch, "_HOST", jaxmt.batch._host_tag("тест"))
    elsewhere = f".summary.json.tmp-{jaxmt.batch._host_tag('ноут')}-{_ended_pid()}-01234567"
    (tmp_path / elsewhere).write_text("{")
    jaxmt.batch._write_summary(tmp_path / "summary.json", {"entries": 1})
    assert (tmp_path / elsewhere).exists()


def test_a_temporary_names_its_writer_so_that_the_next_job_can_tell_it_is_stale(tmp_path):
    match = jaxmt.batch._TEMPORARY.fullmatch(jaxmt.batch._temporary(tmp_path / "a.npz").name)
    assert match is not None
    assert (match["name"], match["host"], int(match["pid"])) == ("a.npz", jaxmt.batch._HOST, os.getpid())


@pytest.mark.parametrize("option, value", [("--max-rows", "0"), ("--max-tenants", "-2"), ("--max-rows", "many")])
def test_bucket_options_that_are_not_positive_counts_are_refused_by_name(tmp_path, capsys, option, value):
    from jaxmt.cli import main as cli_main

    with pytest.raises(SystemExit) as exit_info:
        cli_main(["batch", str(tmp_path / "m.csv"), "--checkpoint", str(tmp_path / "ckpt"), "--arch", "mlp",
                  "--output-dir", str(tmp_path / "out"), option, value])
    assert exit_info.value.code == 2
    assert f"argument {option}: expected a positive integer" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_on_windows_no_writer_is_asked_after_and_only_the_legacy_temporaries_go(tmp_path, monkeypatch):
    """os.kill(pid, 0) ends the process on Windows instead of asking after it: never called there."""
    ended = f".summary.json.tmp-{jaxmt.batch._HOST}-{_ended_pid()}-0123abcd"
    for name in (ended, ".summary.json.tmp-89ef4567"):
        (tmp_path / name).write_text("{")
    monkeypatch.setattr(os, "kill", lambda *args: pytest.fail(f"os.kill{args} on Windows"))
    monkeypatch.setattr(os, "name", "nt")
    jaxmt.batch._remove_stale_temporaries(tmp_path, {"summary.json"})
    assert sorted(p.name for p in tmp_path.iterdir()) == [ended]


def test_an_empty_column_is_named_with_the_line_it_is_on(tmp_path):
    mt = MultiTenantModel(_apply, {"w": np.ones((6, 3), np.float32)}, capacity=2, row_shape=(6,), row_dtype=np.float32)
    mt.add_tenant("a", {"w": np.ones((6, 3), np.float32)})
    _save(tmp_path, "x.npy", 3)
    (tmp_path / "m.csv").write_text("tenant,input\n,x.npy\na,x.npy\n")
    summary = _line_2_fails_then_is_skipped(mt, tmp_path / "m.csv", tmp_path / "out",
                                            "the tenant column must not be empty \\(got tenant '', input 'x.npy'\\)")
    assert summary["failed"] == 1 and summary["computed"] == 1
