"""benchmarks/lowering.py end to end on the CPU: every method is checked against the
per-tenant reference before it is timed, all in the same rounds, and where jaxmt lowers convs
with the Pallas kernel, exclusive access with the same kernels is timed beside it. Nothing
here checks speed."""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import benchmark_script

from jaxmt import autotune
from jaxmt.lowering import describe_lowering


@pytest.fixture(scope="module")
def bench():
    with benchmark_script("lowering.py", "jaxmt_lowering_bench") as module:
        yield module


def _args(cache: str, overrides: dict | None = None, autotuned_cache: str | None = None) -> argparse.Namespace:
    return argparse.Namespace(autotune=0, cache=cache, size="tiny", seed=0, warmup=1, repeats=2, overrides=overrides,
                              autotuned_cache=autotuned_cache, min_sample_ms=0.0)


def test_kernel_convs_are_timed_against_exclusive_access_with_the_same_kernels(bench, tmp_path):
    spec = bench.models.make("resnet18", "tiny", dtype=jnp.bfloat16)
    stacked = bench.stacked_variables(spec, 2, jnp.bfloat16, 0)
    x = jnp.asarray(spec.random_input(np.random.default_rng(0), 4).reshape(2, 2, *spec.input_shape))
    cache = autotune.LoweringCache(tmp_path / "choices.json")
    planted = 0
    for conv in describe_lowering(spec.apply_fn, stacked, x, "rule"):
        if autotune.applicable("implicit_gemm", conv.signature):  # the stem and the 3x3s
            cache.put(autotune.cache_key(conv.signature), {"choice": "implicit_gemm"})
            planted += 1
    assert planted
    row = bench.bench_end_to_end("resnet18", 2, 2, jnp.bfloat16, _args(str(tmp_path / "choices.json")))
    assert row["check"] == "ok" and row["choices"]["kxk:implicit_gemm"] == planted
    assert set(row["images_per_s"]) == {"exclusive", "vmap", "time_only", "jaxmt", "exclusive_kernels"}
    assert row["rel_error"]["exclusive_kernels"] < 5e-2 and all(v > 0 for v in row["images_per_s"].values())
    assert row["vs_exclusive"]["exclusive"] == 1.0


def test_without_kernel_convs_there_is_no_second_exclusive_form(bench, tmp_path):
    row = bench.bench_end_to_end("resnet18", 2, 1, jnp.float32, _args(str(tmp_path / "none.json")))
    assert row["check"] == "ok" and "exclusive_kernels" not in row["images_per_s"]


def test_forced_layers_are_checked_and_timed_beside_the_policy(bench, tmp_path):
    """--overrides: jaxmt with every kxk conv on the kernel (in Pallas's interpreter here), a
    column of its own, checked against the per-tenant reference like every other method."""
    row = bench.bench_end_to_end("resnet18", 2, 1, jnp.bfloat16, _args(str(tmp_path / "none.json"), {"kxk": "implicit_gemm"}))
    assert row["check"] == "ok" and row["rel_error"]["jaxmt_overrides"] < 5e-2
    assert set(row["images_per_s"]) == {"exclusive", "vmap", "time_only", "jaxmt", "jaxmt_overrides"}


def test_one_file_for_the_rule_and_the_autotuned_column_is_refused(bench, tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--no-readme", "--cache", str(tmp_path / "c.json"), "--autotuned-cache", str(tmp_path / "c.json")])
    assert "--autotuned-cache" in capsys.readouterr().err


@pytest.mark.parametrize("overrides", ['["kxk"]', '{"kxk": "no_such_lowering"}', '{"conv 9": "im2col"}x'])
def test_bad_overrides_are_refused_before_anything_runs(bench, overrides, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--no-readme", "--overrides", overrides])
    assert "--overrides" in capsys.readouterr().err


def test_methods_are_timed_in_rounds(bench):
    import common

    order = []
    fns = {name: (lambda name=name: order.append(name) or jax.numpy.zeros(())) for name in ("a", "b", "c")}
    timings = common.time_calls_interleaved(fns, warmup=1, repeats=3)
    assert order == ["a", "b", "c"] + ["a", "b", "c"] * 3  # one warm-up each, then one call of each per round
    assert all(t["repeats"] == 3 and t["median_s"] >= t["min_s"] > 0 for t in timings.values())


def test_the_autotuned_planner_is_checked_and_timed_beside_the_rule(bench, tmp_path):
    """--autotuned-cache: jaxmt with every layer measured, a column of its own, its choices
    written to its own file, which the rule's column never reads."""
    tuned, rule = tmp_path / "tuned.json", tmp_path / "rule.json"
    row = bench.bench_end_to_end("resnet18", 2, 1, jnp.float32, _args(str(rule), autotuned_cache=str(tuned)))
    assert row["check"] == "ok" and row["rel_error"]["jaxmt_autotuned"] < 1e-2
    assert set(row["images_per_s"]) == {"exclusive", "vmap", "time_only", "jaxmt", "jaxmt_autotuned"}
    assert sum(row["choices_autotuned"].values()) == sum(row["choices"].values())
    assert row["choice_sources_autotuned"].get("autotune", 0) > 0
    measured = autotune.LoweringCache(tuned)
    assert len(measured.entries()) > 0
    assert not rule.exists() or not autotune.LoweringCache(rule).entries()


def test_the_time_only_baseline_times_only_its_k_program_calls(bench, tmp_path, monkeypatch):
    """The time-only column is K calls of the one-tenant program on inputs already in place,
    like every other column's one call: no slicing of the stacked input inside the timed call."""
    from jax._src.array import ArrayImpl

    lowering = bench

    captured = {}

    def fake_rounds(fns, **kwargs):
        captured.update(fns)
        return {name: {"median_s": 1.0, "calls_per_sample": 1} for name in fns}

    monkeypatch.setattr(lowering, "time_calls_interleaved", fake_rounds)
    args = argparse.Namespace(autotune=0, cache=str(tmp_path / "c.json"), size="tiny", seed=0, warmup=1, repeats=2,
                              overrides=None, autotuned_cache=None, min_sample_ms=0.0)
    lowering.bench_end_to_end("mlp", 3, 2, jnp.float32, args)
    slices = []
    getitem = ArrayImpl.__getitem__
    monkeypatch.setattr(ArrayImpl, "__getitem__", lambda self, index: slices.append(index) or getitem(self, index))
    captured["time_only"]()
    assert slices == []  # each x_kb[i] is another program dispatched per tenant, timed as the baseline's work
