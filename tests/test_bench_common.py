"""benchmarks/common.py: README sections replaced in place, the neighbours left as they were."""

from __future__ import annotations

import pytest


@pytest.fixture
def readme(tmp_path, monkeypatch):
    from benchmarks import common

    path = tmp_path / "README.md"
    monkeypatch.setattr(common, "README", path)
    return common, path


def test_a_section_is_added_replaced_in_place_and_rewritten_alike(readme):
    common, path = readme
    common.update_readme_section("A", "first")  # no README yet
    assert path.read_text() == "# Benchmarks\n\n## A\n\nfirst\n"
    common.update_readme_section("B", "bee")
    common.update_readme_section("A: more", "kept")  # a title that starts with another's
    common.update_readme_section("A", "second\n\n### detail\n\nx")
    want = "# Benchmarks\n\n## A\n\nsecond\n\n### detail\n\nx\n\n## B\n\nbee\n\n## A: more\n\nkept\n"
    assert path.read_text() == want
    common.update_readme_section("A", "second\n\n### detail\n\nx")
    assert path.read_text() == want


def test_a_heading_in_a_code_block_does_not_end_the_section(readme):
    """A ``## `` line inside a fenced block is code (a shell comment, a Markdown sample), not
    the next section: the whole old section goes, and no fence is left open."""
    common, path = readme
    path.write_text("# Benchmarks\n\n## A\n\nold\n\n```\n## a comment\n```\n\nold tail\n\n## B\n\nbee\n")
    common.update_readme_section("A", "new")
    assert path.read_text() == "# Benchmarks\n\n## A\n\nnew\n\n## B\n\nbee\n"
    path.write_text("# Benchmarks\n\n## B\n\n~~~\n## A\n~~~\n")
    common.update_readme_section("A", "new")  # the heading in B's code block is not section A
    assert path.read_text() == "# Benchmarks\n\n## B\n\n~~~\n## A\n~~~\n\n## A\n\nnew\n"


def test_a_section_ends_at_a_higher_heading_and_its_own_may_end_the_file(readme):
    common, path = readme
    path.write_text("# Benchmarks\n\n## A\n\nold\n\n# Appendix\n\nkept\n")
    common.update_readme_section("A", "new")
    assert path.read_text() == "# Benchmarks\n\n## A\n\nnew\n\n# Appendix\n\nkept\n"
    path.write_text("# Benchmarks\n\n## B\n\nbee\n\n## A")  # an empty last section, no newline after its heading
    common.update_readme_section("A", "new")
    assert path.read_text() == "# Benchmarks\n\n## B\n\nbee\n\n## A\n\nnew\n"
