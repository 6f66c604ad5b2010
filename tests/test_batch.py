"""``python -m jaxmt batch``: outputs equal each tenant's own apply, resume skips finished work, bad lines fail clearly."""

from __future__ import annotations

import csv
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from conftest import reference_predict, rel_error, tiny_spec

import jaxmt
from jaxmt import BucketPolicy, ManifestError, MultiTenantModel
from jaxmt.cli import main as cli_main

ROOT = pathlib.Path(__file__).resolve().parents[1]
TENANTS = ["a", "b", "c", 12]


@pytest.fixture(scope="module")
def store(request, tmp_path_factory):
    """A store checkpoint of a tiny model (mlp unless parametrized): (arch, spec, params by tenant, dir)."""
    arch = getattr(request, "param", "mlp")
    spec = tiny_spec(arch)
    params = {t: spec.init(500 + i) for i, t in enumerate(TENANTS)}
    mt = MultiTenantModel(spec.apply_fn, params["a"], capacity=4)
    for t, p in params.items():
        mt.add_tenant(t, p)
    directory = tmp_path_factory.mktemp(f"{arch}-store") / "ckpt"
    jaxmt.save_store(mt, directory)
    return arch, spec, params, directory


def _inputs(tmp_path: pathlib.Path, spec, rng) -> list[dict]:
    """Manifest records over every tenant: .npy files, a two-array .npz and a float64 input."""
    (tmp_path / "in").mkdir()
    records = []
    for i, tenant in enumerate(TENANTS * 2):
        n = int(rng.choice([3, 8, 13]))  # few distinct sizes: few reference compiles
        np.save(tmp_path / "in" / f"x{i}.npy", spec.random_input(rng, n))
        records.append({"tenant": tenant, "input": f"in/x{i}.npy"})
    np.savez(tmp_path / "in" / "pair.npz", first=spec.random_input(rng, 3), second=spec.random_input(rng, 13).astype(np.float64))
    records += [{"tenant": "b", "input": "in/pair.npz", "key": "first", "output": "b-first"},
                {"tenant": 12, "input": "in/pair.npz", "key": "second"}]
    return records


def _write_manifest(path: pathlib.Path, records: list[dict]) -> pathlib.Path:
    if path.suffix == ".csv":
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["tenant", "input", "key", "output"])
            writer.writeheader()
            writer.writerows(records)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _run(store, manifest: pathlib.Path, out: pathlib.Path, *extra: str) -> tuple[int, dict]:
    arch, _, _, directory = store
    summary = out.parent / f"{out.name}.summary.json"
    flag = "--output-file" if out.suffix == ".npz" else "--output-dir"
    code = cli_main(["batch", str(manifest), "--checkpoint", str(directory), "--arch", arch, flag, str(out),
                     "--summary", str(summary), "--max-tenants", "4", "--max-rows", "8", "--no-progress", *extra])
    return code, json.loads(summary.read_text()) if summary.exists() else {}


def _expected(tmp_path: pathlib.Path, spec, params, record: dict) -> np.ndarray:
    path = tmp_path / record["input"]
    x = np.load(path) if path.suffix == ".npy" else np.load(path)[record["key"]]
    x = x.astype(spec.input_dtype)
    return reference_predict(spec.apply_fn, params, [record["tenant"]] * len(x), x)


def _output_name(record: dict) -> str:
    if record.get("output"):
        return record["output"]
    return "__".join(str(p) for p in (record["tenant"], pathlib.Path(record["input"]).stem, record.get("key")) if p not in (None, ""))


@pytest.mark.parametrize(("store", "manifest_name"), [("mlp", "m.csv"), ("mlp", "m.jsonl"), ("resnet18", "m.jsonl")], indirect=["store"])
def test_outputs_equal_the_per_tenant_reference(tmp_path, rng, store, manifest_name):
    arch, spec, params, _ = store
    records = _inputs(tmp_path, spec, rng)
    manifest = _write_manifest(tmp_path / manifest_name, records)
    code, summary = _run(store, manifest, tmp_path / "out")
    assert code == 0
    for record in records:
        got = np.load(tmp_path / "out" / f"{_output_name(record)}.npz")["y"]
        want = _expected(tmp_path, spec, params, record)
        assert got.shape == want.shape and rel_error(got, want) < 1e-5, record
    total = sum(len(_expected(tmp_path, spec, params, r)) for r in records)
    assert summary["rows"] == total and summary["computed"] == summary["entries"] == len(records)
    assert summary["failed"] == 0 and summary["skipped_existing"] == 0
    assert summary["steps"] >= total / 32 and summary["compiles"] >= 1 and 0 <= summary["padding_waste"] < 1
    assert summary["rows_per_second"] > 0 and summary["seconds"] > 0


@pytest.mark.parametrize("manifest_name", ["m.jsonl", "m.csv", "m-with-bom.csv"])
def test_a_tenant_id_of_zero_names_its_outputs_alike_in_every_manifest_format(tmp_path, rng, manifest_name):
    """Output names are <tenant>__<stem> whichever format lists the entry (a resumed job
    finds them), also for a falsy id such as 0; a CSV may start with a byte-order mark."""
    spec = tiny_spec("mlp")
    params = {0: spec.init(1), "b": spec.init(2)}
    model = MultiTenantModel(spec.apply_fn, params[0], capacity=2)
    for tenant, p in params.items():
        model.add_tenant(tenant, p)
    (tmp_path / "in").mkdir()
    x = spec.random_input(rng, 3)
    np.save(tmp_path / "in" / "x0.npy", x)
    records = [{"tenant": 0, "input": "in/x0.npy"}, {"tenant": "b", "input": "in/x0.npy"}]
    manifest = _write_manifest(tmp_path / manifest_name, records)
    if "bom" in manifest_name:
        manifest.write_bytes(b"\xef\xbb\xbf" + manifest.read_bytes())
    summary = jaxmt.predict_manifest(model, manifest, tmp_path / "out")
    assert summary["computed"] == 2 and summary["failed"] == 0
    assert sorted(p.name for p in (tmp_path / "out").glob("*.npz")) == ["0__x0.npz", "b__x0.npz"]
    got = np.load(tmp_path / "out" / "0__x0.npz")["y"]
    assert rel_error(got, reference_predict(spec.apply_fn, params, [0] * 3, x)) < 1e-5


def test_one_output_file_keyed_by_entry(tmp_path, rng, store):
    arch, spec, params, _ = store
    records = _inputs(tmp_path, spec, rng)
    code, summary = _run(store, _write_manifest(tmp_path / "m.jsonl", records), tmp_path / "all.npz")
    assert code == 0 and summary["computed"] == len(records)
    with np.load(tmp_path / "all.npz") as outputs:
        assert sorted(outputs.files) == sorted(_output_name(r) for r in records)
        for record in records:
            assert rel_error(outputs[_output_name(record)], _expected(tmp_path, spec, params, record)) < 1e-5
    assert not (tmp_path / "all.npz.parts").exists()


def test_rows_of_many_tenants_share_a_step(tmp_path, rng, store):
    arch, spec, params, _ = store
    (tmp_path / "in").mkdir()
    records = []
    for i, tenant in enumerate(TENANTS):  # 4 tenants x 8 rows = one K=4, B=8 step
        np.save(tmp_path / "in" / f"x{i}.npy", spec.random_input(rng, 8))
        records.append({"tenant": tenant, "input": f"in/x{i}.npy"})
    code, summary = _run(store, _write_manifest(tmp_path / "m.csv", records), tmp_path / "out")
    assert code == 0 and summary["steps"] == 1 and summary["padding_waste"] == 0.0 and summary["rows"] == 32


def test_a_rerun_skips_finished_entries(tmp_path, rng, store, monkeypatch):
    arch, spec, params, _ = store
    records = _inputs(tmp_path, spec, rng)
    manifest = _write_manifest(tmp_path / "m.csv", records)
    rows = {_output_name(r): len(_expected(tmp_path, spec, params, r)) for r in records}

    writes = []
    real_write = jaxmt.batch._Outputs.write

    def crash_after_three(self, name, arrays):
        if len(writes) == 3:
            raise KeyboardInterrupt  # the job dies mid-way
        writes.append(name)
        real_write(self, name, arrays)

    monkeypatch.setattr(jaxmt.batch._Outputs, "write", crash_after_three)
    assert _run(store, manifest, tmp_path / "out")[0] == 130
    monkeypatch.setattr(jaxmt.batch._Outputs, "write", real_write)
    assert sorted(p.stem for p in (tmp_path / "out").glob("*.npz")) == sorted(writes)  # no partial files

    code, summary = _run(store, manifest, tmp_path / "out")
    assert code == 0 and summary["skipped_existing"] == 3 and summary["computed"] == len(records) - 3
    assert summary["rows"] == sum(rows.values()) - sum(rows[name] for name in writes)
    first = {name: np.load(tmp_path / "out" / f"{name}.npz")["y"] for name in rows}

    for name in list(rows)[:2]:
        (tmp_path / "out" / f"{name}.npz").unlink()
    code, summary = _run(store, manifest, tmp_path / "out")
    assert summary["computed"] == 2 and summary["rows"] == sum(list(rows.values())[:2])
    for name, y in first.items():
        assert rel_error(np.load(tmp_path / "out" / f"{name}.npz")["y"], y) < 1e-5  # recomputed in other buckets

    code, summary = _run(store, manifest, tmp_path / "out")
    assert code == 0 and summary["rows"] == summary["steps"] == summary["compiles"] == summary["computed"] == 0
    assert summary["skipped_existing"] == len(records)


def test_single_file_mode_resumes_from_its_parts(tmp_path, rng, store, monkeypatch):
    arch, spec, params, _ = store
    records = _inputs(tmp_path, spec, rng)
    manifest = _write_manifest(tmp_path / "m.csv", records)
    real_write, writes = jaxmt.batch._Outputs.write, []

    def crash_after_two(self, name, arrays):
        if len(writes) == 2:
            raise KeyboardInterrupt
        writes.append(name)
        real_write(self, name, arrays)

    monkeypatch.setattr(jaxmt.batch._Outputs, "write", crash_after_two)
    assert _run(store, manifest, tmp_path / "all.npz")[0] == 130
    monkeypatch.setattr(jaxmt.batch._Outputs, "write", real_write)
    code, summary = _run(store, manifest, tmp_path / "all.npz")
    assert code == 0 and summary["skipped_existing"] == 2 and summary["computed"] == len(records) - 2
    with np.load(tmp_path / "all.npz") as outputs:
        assert len(outputs.files) == len(records)
        for record in records:
            assert rel_error(outputs[_output_name(record)], _expected(tmp_path, spec, params, record)) < 1e-5
    code, summary = _run(store, manifest, tmp_path / "all.npz")
    assert summary["computed"] == 0 and summary["skipped_existing"] == len(records)


def test_ctrl_c_is_exit_code_130_and_one_line_saying_the_rerun_resumes(tmp_path, rng, store, monkeypatch, capsys):
    """Not a traceback: one line, the code a shell gives a job stopped by SIGINT, the outputs
    finished so far kept whole (no temporary left) for the rerun to skip."""
    _, spec, _, _ = store
    records = _inputs(tmp_path, spec, rng)
    manifest = _write_manifest(tmp_path / "m.csv", records)
    real_write = jaxmt.batch._Outputs.write

    def interrupted_at_the_third(self, name, arrays):
        if len(list(self.dir.glob("*.npz"))) == 2:
            jaxmt.batch._atomic_savez(self.dir / f"{name}.npz", {"y": _Interrupting()})
        real_write(self, name, arrays)

    monkeypatch.setattr(jaxmt.batch._Outputs, "write", interrupted_at_the_third)
    code, _ = _run(store, manifest, tmp_path / "out")
    err = capsys.readouterr().err
    assert code == 130 and "Traceback" not in err
    assert err.count("\n") == 1 and "interrupted" in err and "resume" in err
    assert len(list((tmp_path / "out").iterdir())) == 2  # two whole outputs, no temporary
    monkeypatch.setattr(jaxmt.batch._Outputs, "write", real_write)
    code, summary = _run(store, manifest, tmp_path / "out")
    assert code == 0 and summary["skipped_existing"] == 2 and summary["computed"] == len(records) - 2


class _Interrupting:
    """An array whose writing is cut short by Ctrl-C."""

    def __array__(self, dtype=None, copy=None):
        raise KeyboardInterrupt


def _bad(tmp_path: pathlib.Path, spec, kind: str) -> dict:
    rng = np.random.default_rng(1)
    if kind == "unknown tenant":
        return {"tenant": "nobody", "input": "in/x0.npy"}
    if kind == "missing file":
        return {"tenant": "a", "input": "in/absent.npy"}
    if kind == "not an array file":
        (tmp_path / "in" / "notes.txt").write_text("1,2,3")
        return {"tenant": "a", "input": "in/notes.txt"}
    if kind == "npz without that key":
        return {"tenant": "a", "input": "in/pair.npz", "key": "third"}
    if kind == "npz needs a key":
        return {"tenant": "a", "input": "in/pair.npz"}
    if kind == "wrong row shape":
        np.save(tmp_path / "in" / "wide.npy", rng.normal(size=(4, *[d + 1 for d in spec.input_shape])).astype(np.float32))
        return {"tenant": "a", "input": "in/wide.npy"}
    if kind == "wrong dtype":
        np.save(tmp_path / "in" / "complex.npy", spec.random_input(rng, 3).astype(np.complex64))
        return {"tenant": "a", "input": "in/complex.npy"}
    if kind == "corrupt file":
        (tmp_path / "in" / "broken.npy").write_bytes(b"\x93NUMPY garbage")
        return {"tenant": "a", "input": "in/broken.npy"}
    if kind == "duplicate output":
        return {"tenant": "c", "input": "in/x1.npy", "output": "a__x0"}  # the output of line 2
    if kind == "empty tenant":
        return {"tenant": "", "input": "in/x0.npy"}
    raise AssertionError(kind)


BAD = ["unknown tenant", "missing file", "not an array file", "npz without that key", "npz needs a key",
       "wrong row shape", "wrong dtype", "corrupt file", "duplicate output", "empty tenant"]


@pytest.mark.parametrize("kind", BAD)
def test_a_bad_line_is_named_and_stops_the_job_unless_skipped(tmp_path, rng, store, kind):
    arch, spec, params, _ = store
    records = _inputs(tmp_path, spec, rng)
    records.insert(3, _bad(tmp_path, spec, kind))
    manifest = _write_manifest(tmp_path / "m.csv", records)
    line = 5  # header, then records 0..2, then the bad one
    with pytest.raises(ManifestError, match=f"line {line}") as caught:
        jaxmt.predict_manifest(jaxmt.restore_model(store[3], spec.apply_fn), manifest, tmp_path / "out")
    assert caught.value.line == line
    assert not list((tmp_path / "out").glob("*.npz"))  # validated before anything ran
    code, summary = _run(store, manifest, tmp_path / "out", "--skip-errors")
    assert code == 1 and summary["failed"] == 1 and summary["errors"][0]["line"] == line
    assert summary["computed"] == len(records) - 1 and summary["entries"] == len(records)
    assert len(list((tmp_path / "out").glob("*.npz"))) == len(records) - 1


def test_unreadable_jsonl_line_and_missing_csv_columns(tmp_path, rng, store):
    arch, spec, params, _ = store
    records = _inputs(tmp_path, spec, rng)
    text = "".join(json.dumps(r) + "\n" for r in records[:2]) + "{not json\n\n" + json.dumps(records[2]) + "\n"
    (tmp_path / "m.jsonl").write_text(text)
    model = jaxmt.restore_model(store[3], spec.apply_fn)
    with pytest.raises(ManifestError, match="line 3: unreadable"):
        jaxmt.predict_manifest(model, tmp_path / "m.jsonl", tmp_path / "out")
    summary = jaxmt.predict_manifest(model, tmp_path / "m.jsonl", tmp_path / "out", skip_errors=True)
    assert summary["computed"] == 3 and summary["errors"][0]["line"] == 3
    (tmp_path / "m.csv").write_text("tenant,file\na,in/x0.npy\n")
    with pytest.raises(ManifestError, match="tenant and input"):
        jaxmt.predict_manifest(model, tmp_path / "m.csv", tmp_path / "out2")


def _plain_apply(params, x):
    return {"logits": x @ params["w"] + params["b"], "norm": (x * x).sum(axis=-1)}


def plain_model():
    return _plain_apply, {"w": np.zeros((6, 3), np.float32), "b": np.zeros((3,), np.float32)}


def test_model_from_an_import_path_with_pytree_outputs(tmp_path, rng, monkeypatch):
    monkeypatch.syspath_prepend(str(pathlib.Path(__file__).parent))
    params = {t: {"w": rng.normal(size=(6, 3)).astype(np.float32), "b": rng.normal(size=(3,)).astype(np.float32)} for t in ["p", "q"]}
    mt = MultiTenantModel(_plain_apply, plain_model()[1], buckets=BucketPolicy.powers_of_two(4, 8))
    for t, p in params.items():
        mt.add_tenant(t, p)
    jaxmt.save_store(mt, tmp_path / "ckpt")  # no predict yet: the inputs fix the row shape
    (tmp_path / "in").mkdir()
    x = {t: rng.normal(size=(n, 6)).astype(np.float32) for t, n in [("p", 7), ("q", 13)]}
    for t in x:
        np.save(tmp_path / "in" / f"{t}.npy", x[t])
    manifest = _write_manifest(tmp_path / "m.csv", [{"tenant": t, "input": f"in/{t}.npy", "output": t} for t in x])
    code = cli_main(["batch", str(manifest), "--checkpoint", str(tmp_path / "ckpt"), "--model", "test_batch:plain_model",
                     "--output-dir", str(tmp_path / "out"), "--no-progress"])
    assert code == 0
    for t in x:
        got = np.load(tmp_path / "out" / f"{t}.npz")
        want = _plain_apply(params[t], x[t])
        assert sorted(got.files) == ["logits", "norm"]
        assert rel_error(got["logits"], want["logits"]) < 1e-5 and rel_error(got["norm"], want["norm"]) < 1e-5


@pytest.mark.parametrize("option", [["--dtype", "bfloat16"], ["--size", "full"]])
def test_size_and_dtype_with_a_model_function_are_refused_not_ignored(tmp_path, monkeypatch, capsys, option):
    """They describe --arch; with --model the job ran in the function's float32 as if they were not given."""
    monkeypatch.syspath_prepend(str(pathlib.Path(__file__).parent))
    monkeypatch.setattr(jaxmt.checkpoint, "restore_model", lambda *args, **kwargs: pytest.fail("the checkpoint was read"))
    (tmp_path / "m.csv").write_text("tenant,input\n")
    code = cli_main(["batch", str(tmp_path / "m.csv"), "--checkpoint", str(tmp_path / "ckpt"), "--model", "test_batch:plain_model",
                     *option, "--output-dir", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "--size and --dtype apply to --arch only" in err and "Traceback" not in err


@pytest.mark.parametrize("where", ["output-dir", "summary"])
def test_an_output_path_that_cannot_be_written_is_an_error_exit_not_a_traceback(tmp_path, rng, store, where, capsys):
    arch, spec, _, directory = store
    records = _inputs(tmp_path, spec, rng)[:2]
    manifest = _write_manifest(tmp_path / "m.csv", records)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    out = tmp_path / "out"
    paths = ["--output-dir", str(blocker / "out")] if where == "output-dir" else ["--output-dir", str(out), "--summary", str(blocker / "s.json")]
    code = cli_main(["batch", str(manifest), "--checkpoint", str(directory), "--arch", arch, *paths, "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "a_file" in err and "Traceback" not in err
    if where == "summary":  # the outputs were written before the summary failed
        assert "not the summary" in err and sorted(p.stem for p in out.iterdir()) == sorted(_output_name(r) for r in records)


@pytest.mark.parametrize("given", [True, False], ids=["--summary", "default summary"])
def test_a_summary_path_that_is_a_folder_is_refused_before_anything_runs(tmp_path, rng, store, monkeypatch, capsys, given):
    """Writing the summary over a folder failed only once every output was written: refuse it up front."""
    arch, spec, _, directory = store
    manifest = _write_manifest(tmp_path / "m.csv", _inputs(tmp_path, spec, rng)[:1])
    (tmp_path / "out" / "summary.json").mkdir(parents=True)
    monkeypatch.setattr(jaxmt.batch, "predict_manifest", lambda *args, **kwargs: pytest.fail("the job ran"))
    summary = ["--summary", str(tmp_path / "out" / "summary.json")] if given else []
    code = cli_main(["batch", str(manifest), "--checkpoint", str(directory), "--arch", arch, "--output-dir", str(tmp_path / "out"),
                     *summary, "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and f"summary {tmp_path / 'out' / 'summary.json'} is a folder" in err


@pytest.mark.parametrize("option", ["--output-dir", "--output-file", "--summary", "--arch", "--dtype"])
def test_an_empty_option_is_an_error_exit_naming_it_not_a_traceback(tmp_path, rng, store, option, capsys):
    """As "$OUT" of an unset variable gives it: --output-dir "" raised a TypeError, --arch "" was
    taken for --model, --summary "" was dropped for the default, --dtype "" (beside --arch) ran
    in the default float32."""
    arch, spec, _, directory = store
    manifest = _write_manifest(tmp_path / "m.csv", _inputs(tmp_path, spec, rng)[:1])
    given = {"--output-file" if option == "--output-file" else "--output-dir": str(tmp_path / "out"), "--arch": arch, option: ""}
    code = cli_main(["batch", str(manifest), "--checkpoint", str(directory), *[v for kv in given.items() for v in kv], "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and f"error: {option} is empty" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", [[sys.executable, "-m", "jaxmt", "batch", "--help"],
                                     [sys.executable, str(ROOT / "scripts" / "batch_predict.py"), "--help"]])
def test_help(command):
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0, done.stderr
    assert "manifest" in done.stdout and "--skip-errors" in done.stdout and "--checkpoint" in done.stdout
    assert "exit codes:" in done.stdout and "130  interrupted" in done.stdout
