"""benchmarks/pallas_conv.py: a CPU smoke run (the kernel in Pallas's interpreter) checks every
form against vmap before timing it and writes each layer's ratios; nothing here checks speed."""

from __future__ import annotations

import json

import pytest
from conftest import benchmark_script


@pytest.fixture(scope="module")
def bench():
    with benchmark_script("pallas_conv.py", "jaxmt_pallas_conv_bench") as module:
        yield module


def test_a_quick_run_checks_and_times_every_form_of_every_layer(bench, results_dir):
    assert bench.main(["--quick", "--no-readme"]) == 0
    data = json.loads((results_dir / "pallas_conv_quick.json").read_text())
    kernels = [bench.kernel_name(c) for c in bench.QUICK_KERNEL_CONFIGS]
    assert len(data["rows"]) == 2 * len(bench.QUICK_LAYERS)  # two K x B configs
    for row in data["rows"]:
        assert row["dense_us"] > 0 and set(row["forms"]) == {*bench.OTHER_FORMS, *kernels}
        for name, form in row["forms"].items():
            assert (form["us"] is None) == ("error" in form), name  # timed, or said why not
        for name in kernels:  # the kernel answers as vmap does, in the interpreter
            assert row["forms"][name]["us"] > 0 and row["forms"][name]["rel_err"] < 2e-2


def test_a_form_that_disagrees_or_fails_to_compile_is_reported_not_timed(bench):
    import jax

    sig = bench.signature(2, 1, 4, 16, 64, "bfloat16")
    x, w = bench.random_operands(sig, 0)
    params = bench.ConvParams.of(sig)
    reference = jax.jit(lambda a, b: bench.lowering_ops.lower_conv("vmap", a, b, params))(x, w)
    doubled = lambda a, b: bench.pallas_conv.conv_implicit_gemm(a, b, interpret=True, block_m=16) * 2  # noqa: E731
    odd_blocks = lambda a, b: bench.pallas_conv.conv_implicit_gemm(a, b, interpret=True, block_n=48)  # noqa: E731 (64 channels)
    fine = lambda a, b: bench.pallas_conv.conv_implicit_gemm(a, b, interpret=True, block_m=16)  # noqa: E731
    rows, programs = bench.compile_and_check({"doubled": doubled, "odd": odd_blocks, "fine": fine}, (x, w), reference, 2e-2)
    assert set(programs) == {"fine"} and all(rows[n]["us"] is None for n in rows)
    assert "differs from the vmap reference" in rows["doubled"]["error"]
    assert rows["odd"]["error"].startswith("ValueError: blocks must be powers of two")
    assert "error" not in rows["fine"] and rows["fine"]["rel_err"] < 2e-2


@pytest.mark.parametrize("dtype, depth", [("bfloat16", 64), ("float16", 64), ("float32", 32)])
def test_the_tile_configurations_timed_take_the_kernels_default_depth_for_the_dtype(bench, dtype, depth):
    configs = bench.kernel_configs_for(dtype)
    assert configs[0] == (bench.pallas_conv.BLOCK_M, bench.pallas_conv.BLOCK_N, depth, bench.pallas_conv.NUM_WARPS,
                          bench.pallas_conv.NUM_STAGES, dtype == "float32")  # the kernel as the lowering calls it first
    assert {c[2] for c in configs} == {depth} == {bench.pallas_conv.default_block_k(dtype)}
    # 4-byte inputs time each tile with the filter both ways; 16-bit ones only as [C, O]
    assert {c[5] for c in configs} == ({False, True} if dtype == "float32" else {False})
    assert len({bench.kernel_name(c) for c in configs}) == len(configs)


def test_kernel_configs_given_on_the_command_line_are_parsed_or_refused(bench):
    assert bench.parse_kernel_configs("128x128x32w4s4k, 256x64x64w8s2") == [(128, 128, 32, 4, 4, True), (256, 64, 64, 8, 2, False)]
    with pytest.raises(SystemExit, match="128x128w4s3"):
        bench.parse_kernel_configs("128x128x32w4s3k,128x128w4s3")


def test_a_quick_run_takes_the_layers_and_tiles_asked_for(bench, results_dir):
    assert bench.main(["--quick", "--no-readme", "--layers", "1", "--kernel-configs", "16x16x16w4s2k", "--out", "pallas_conv_pick"]) == 0
    data = json.loads((results_dir / "pallas_conv_pick.json").read_text())
    assert {row["layer"] for row in data["rows"]} == {"4x4, 32 -> 64"}
    assert {name for row in data["rows"] for name in row["forms"]} == {*bench.OTHER_FORMS, "kernel 16x16x16 w4 s2 K-major"}


def test_layer_indices_out_of_range_are_refused(bench):
    with pytest.raises(SystemExit, match="--layers"):
        bench.main(["--quick", "--no-readme", "--layers", "0,9"])
