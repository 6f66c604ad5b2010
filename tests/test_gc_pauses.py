"""GcPauses and freeze_heap: the collector's pauses, seen and kept out of serving."""

from __future__ import annotations

import gc
import threading

import pytest

import jaxmt


@pytest.fixture
def thawed():
    """A heap not frozen, and no automatic collections while the test counts them."""
    gc.unfreeze()
    gc.disable()
    yield
    gc.enable()
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
        during = pauses.snapshot()  # a snapshot may be taken while recording
    seen = pauses.snapshot()
    assert seen == during
    assert seen["collections"] == [1, 0, 1]
    assert 0.0 <= seen["gen2_max_ms"] <= seen["max_ms"] <= seen["total_ms"]
    gc.collect()  # no longer recorded
    assert pauses.snapshot() == seen


def test_a_snapshot_taken_while_a_collection_records_does_not_deadlock():
    """The snapshot allocates, which can start a collection on the same thread; its callback
    then takes the recorder's lock again."""
    threshold = gc.get_threshold()

    def snapshots():
        with jaxmt.GcPauses() as pauses:
            for _ in range(200):
                pauses.snapshot()

    worker = threading.Thread(target=snapshots, daemon=True)
    gc.set_threshold(1)  # a collection at almost every allocation
    try:
        worker.start()
        worker.join(30)
    finally:
        gc.set_threshold(*threshold)
    assert not worker.is_alive()


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
