"""README.md's Python examples run as written, in order, in one namespace (the scheduler example
uses the model the API example built), and say what is true of their answers."""

from __future__ import annotations

import re
from pathlib import Path

import jax
import numpy as np
from conftest import rel_error

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[str]:
    """The bodies of the ```python fenced blocks of a Markdown text, in order."""
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_the_readme_has_the_api_and_scheduler_examples():
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 2
    assert "MultiTenantModel" in blocks[0] and "Scheduler" in blocks[1]


def test_the_readme_examples_run_and_answer_as_their_comments_say(capsys):
    namespace: dict = {"__name__": "readme"}
    api, scheduler, *rest = python_blocks(README.read_text())
    exec(compile(api, str(README), "exec"), namespace)
    mt, spec, x, y = (namespace[name] for name in ("mt", "spec", "x", "y"))

    # "row i of y == spec.apply_fn(params of that customer, x[i:i+1])[0]"
    ids = ["customer-3", "customer-7", "customer-3", "customer-0", "customer-9"]
    apply = jax.jit(spec.apply_fn)
    want = np.concatenate([np.asarray(apply(mt.get_params(t), x[i : i + 1])) for i, t in enumerate(ids)])
    assert rel_error(np.asarray(y), want) < 1e-5
    # The customers were added with spec.init(i): the store holds those weights.
    for leaf, expected in zip(jax.tree_util.tree_leaves(mt.get_params("customer-7")),
                              jax.tree_util.tree_leaves(spec.init(7))):
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(expected))
    # warmup compiled the four programs it was asked for (and predict its own), stats printed.
    assert mt.stats()["compiles"] >= 4
    assert "compiles" in capsys.readouterr().out

    exec(compile(scheduler, str(README), "exec"), namespace)
    # The scheduler's answer is customer-3's own model on that row; its metrics were printed.
    assert rel_error(np.asarray(namespace["y"]), want[:1]) < 1e-5
    assert "customer-3" in capsys.readouterr().out
    for block in rest:
        exec(compile(block, str(README), "exec"), namespace)
