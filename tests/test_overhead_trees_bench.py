"""benchmarks/overhead_trees.py: each tree is measured in its own process, from its own jaxmt.

Nothing here checks speed: only that the trees take turns, import their own code and are
written out.
"""

from __future__ import annotations

import json
import os

import pytest
from conftest import ROOT, benchmark_script


@pytest.fixture(scope="module")
def overhead_trees():
    with benchmark_script("overhead_trees.py", "jaxmt_overhead_trees_bench") as module:
        yield module


def test_two_trees_take_turns_and_each_imports_its_own_jaxmt(overhead_trees, results_dir):
    assert overhead_trees.main(["--trees", f"{ROOT},{ROOT}", "--labels", "a,b", "--pairs", "1", "--repeats", "5"]) == 0
    data = json.loads((results_dir / "overhead_trees.json").read_text())
    assert [(r["round"], r["tree"]) for r in data["runs"]] == [(0, "a"), (0, "b")]
    for run in data["runs"]:
        assert run["jaxmt"] == str(ROOT / "jaxmt") and run["relative_error"] < 1e-5
        assert run["commit"] == data["environment"]["commit"] or "JAXMT_COMMIT" in os.environ  # each tree's own commit
        assert run["overhead_us"] == pytest.approx(run["predict_us"] - run["bare_us"])
    assert set(data["median_overhead_us"]) == {"a", "b"}


def test_a_tree_without_the_library_is_refused(overhead_trees, tmp_path):
    with pytest.raises(SystemExit):
        overhead_trees.main(["--trees", str(tmp_path)])


def test_a_tree_unpacked_inside_another_checkout_is_not_given_that_checkouts_commit(overhead_trees, tmp_path):
    """A tree exported (``git archive``) into a folder of another checkout is no checkout of its
    own: git would name the enclosing one's HEAD, a commit the tree need not hold."""
    import subprocess

    def git(*args):
        return subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                              capture_output=True, text=True, check=True).stdout.strip()

    git("init", "-q")
    git("commit", "-q", "--allow-empty", "-m", "enclosing")
    (tmp_path / "before" / "jaxmt").mkdir(parents=True)
    assert overhead_trees._commit_of(tmp_path) == git("rev-parse", "--short", "HEAD")
    assert overhead_trees._commit_of(tmp_path / "before") == "unknown"
