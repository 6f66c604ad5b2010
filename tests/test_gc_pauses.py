"""GcPauses and freeze_heap: the collector's pauses, seen and kept out of serving."""

from __future__ import annotations

import gc

import pytest

import jaxmt


@pytest.fixture
def thawed():
    gc.unfreeze()
    yield
    gc.unfreeze()


def _cycles(count: int) -> None:
    for _ in range(count):
        a: list = []
        a.append(a)


def test_pauses_are_recorded_by_generation_while_active(thawed):
    with jaxmt.GcPauses() as pauses:
        _cycles(10)
        gc.collect()
        gc.collect(0)
        seen = pauses.snapshot()
    assert seen["collections"][2] >= 1 and seen["collections"][0] >= 1
    assert 0.0 <= seen["gen2_max_ms"] <= seen["max_ms"] <= seen["total_ms"]
    gc.collect()  # no longer recorded
    assert pauses.snapshot() == seen


def test_a_recorder_left_by_an_exception_is_removed():
    with pytest.raises(RuntimeError), jaxmt.GcPauses() as pauses:
        raise RuntimeError("boom")
    assert pauses._callback not in gc.callbacks


def test_freeze_heap_keeps_live_objects_out_of_later_collections(thawed):
    kept = [object() for _ in range(1000)]
    frozen = jaxmt.freeze_heap()
    assert frozen == gc.get_freeze_count() > len(kept)
    _cycles(100)
    assert gc.collect() >= 100  # what was allocated since is still collected
    assert kept
