"""MultiTenantModel(compiler_options=...): every step program is compiled with them, however it
is built (a miss in predict, warmup on worker threads), answers are unchanged, and options XLA
does not take are refused when the model is built."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from conftest import reference_predict, rel_error, tiny_spec

from jaxmt import BucketPolicy, MultiTenantModel

# An option of every backend's DebugOptions; on a GPU it lets XLA capture small programs as
# CUDA graphs, on a CPU it changes nothing.
GRAPH_OPTION = {"xla_gpu_graph_min_graph_size": 1}


@pytest.fixture
def compiles(monkeypatch):
    """The compiler_options of every jax.stages.Lowered.compile call, in order."""
    seen = []
    original = jax.stages.Lowered.compile

    def spy(self, compiler_options=None, **kwargs):
        seen.append(compiler_options)
        return original(self, compiler_options=compiler_options, **kwargs)

    monkeypatch.setattr(jax.stages.Lowered, "compile", spy)
    return seen


def _model(spec, params: dict, **kwargs) -> MultiTenantModel:
    mt = MultiTenantModel(spec.apply_fn, next(iter(params.values())), capacity=len(params),
                          buckets=BucketPolicy.powers_of_two(4, 2), row_shape=spec.input_shape,
                          row_dtype=spec.input_dtype, **kwargs)
    for tenant, p in params.items():
        mt.add_tenant(tenant, p)
    return mt


@pytest.mark.parametrize("name", ["mlp", "resnet18"])
def test_every_step_program_gets_the_options_and_answers_are_unchanged(name, rng, compiles):
    spec = tiny_spec(name)
    params = {f"t{i}": spec.init(int(rng.integers(1 << 30))) for i in range(3)}
    mt = _model(spec, params, compiler_options=GRAPH_OPTION)
    assert mt.compiler_options == GRAPH_OPTION
    ids = list(rng.choice(list(params), size=5))
    x = spec.random_input(rng, 5)
    got = mt.predict(ids, x)  # a miss: built on this thread
    assert rel_error(got, reference_predict(spec.apply_fn, params, ids, x)) < 1e-5
    built = mt.warmup(workers=2, execute=False)  # the rest of the ladder, on worker threads
    assert built >= 2
    step_compiles = compiles[1:]  # the first compile checked the options on a trivial program
    assert len(step_compiles) == mt.stats()["compiles"] and all(o == GRAPH_OPTION for o in step_compiles)


def test_without_options_programs_compile_as_xla_defaults(rng, compiles):
    spec = tiny_spec("mlp")
    params = {"a": spec.init(1), "b": spec.init(2)}
    mt = _model(spec, params)
    mt.predict(["a", "b"], spec.random_input(rng, 2))
    assert mt.compiler_options == {} and compiles == [None] * mt.stats()["compiles"]


def test_numpy_scalars_are_taken_as_python_ones_and_the_options_are_read_only():
    spec = tiny_spec("mlp")
    mt = MultiTenantModel(spec.apply_fn, spec.init(0), compiler_options={"xla_gpu_graph_min_graph_size": np.int64(1)})
    assert mt.compiler_options == GRAPH_OPTION and type(mt.compiler_options["xla_gpu_graph_min_graph_size"]) is int
    with pytest.raises(TypeError):
        mt.compiler_options["xla_gpu_graph_min_graph_size"] = 2  # not part of a program's key: fixed for the model


def test_the_baselines_compile_with_the_models_options(monkeypatch):
    """Time-only and exclusive access run one-model programs built with the model's options,
    so that a comparison with jaxmt's steps compares batching, not compilers."""
    from jaxmt import baselines

    spec = tiny_spec("mlp")
    params = {"a": spec.init(1), "b": spec.init(2)}
    mt = _model(spec, params, compiler_options=GRAPH_OPTION)
    seen = []
    jit = jax.jit
    monkeypatch.setattr(jax, "jit", lambda fn, **kwargs: seen.append(kwargs.get("compiler_options")) or jit(fn, **kwargs))
    baselines._program_for.cache_clear()
    x = spec.random_input(np.random.default_rng(0), 3)
    got = baselines.time_only_predict(mt, ["a", "b", "a"], x)
    assert seen and all(o == GRAPH_OPTION for o in seen)
    assert rel_error(got, reference_predict(spec.apply_fn, params, ["a", "b", "a"], x)) < 1e-5


def test_an_option_xla_does_not_take_is_refused_when_the_model_is_built():
    spec = tiny_spec("mlp")
    with pytest.raises(ValueError, match="xla_no_such_option"):
        MultiTenantModel(spec.apply_fn, spec.init(0), compiler_options={"xla_no_such_option": 1})


@pytest.mark.parametrize("options", [[("xla_gpu_graph_min_graph_size", 1)], {"xla_gpu_graph_min_graph_size": [1]},
                                     {1: True}])
def test_options_that_are_not_a_mapping_of_names_to_scalars_are_refused(options):
    spec = tiny_spec("mlp")
    with pytest.raises(TypeError, match="compiler_options"):
        MultiTenantModel(spec.apply_fn, spec.init(0), compiler_options=options)
