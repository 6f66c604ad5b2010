"""Timing in rounds (``jaxmt.timing``, which the autotuner and benchmarks/common.py use): each
method's sample is one call, or as many back-to-back calls as fill the asked minimum, and times
are reported per call. Checked with a clock that moves only when a call says so, so nothing
here depends on this machine's speed."""

from __future__ import annotations

import pytest

from benchmarks import common
from jaxmt import timing


class _SteppedClock:
    """``time.perf_counter`` stand-in: each call of a timed function advances it by that
    function's cost."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def function(self, cost_s: float, calls: list[str], name: str):
        def call():
            self.now += cost_s
            calls.append(name)
            return cost_s
        return call


@pytest.mark.parametrize(
    "call_s, min_sample_s, expected",
    [(1e-3, 0.0, 1), (1e-3, 20e-3, 20), (1e-3, 20.5e-3, 21), (30e-3, 20e-3, 1), (0.0, 20e-3, 1), (1e-6, 1.0, 200)],
)
def test_a_sample_holds_enough_calls_to_last_the_minimum(call_s, min_sample_s, expected):
    assert timing.calls_per_sample(call_s, min_sample_s) == expected


@pytest.mark.parametrize("min_sample_s", [0.0, 10e-3])
def test_rounds_time_each_method_per_call_and_in_turn(monkeypatch, min_sample_s):
    clock = _SteppedClock()
    monkeypatch.setattr(timing.time, "perf_counter", clock)
    calls: list[str] = []
    costs = {"short": 1e-3, "long": 25e-3}
    fns = {name: clock.function(cost, calls, name) for name, cost in costs.items()}
    timings = common.time_calls_interleaved(fns, warmup=2, repeats=3, min_sample_s=min_sample_s)
    per_sample = {"short": 10 if min_sample_s else 1, "long": 1}
    for name, cost in costs.items():
        assert timings[name]["median_s"] == pytest.approx(cost)
        assert timings[name]["calls_per_sample"] == per_sample[name]
        assert timings[name]["repeats"] == 3
    timed = calls[2 * len(costs):]  # after each method's warm-up calls
    round_calls = per_sample["short"] + per_sample["long"]
    for r in range(3):  # every round: the short method's sample, then the long one's
        assert timed[r * round_calls:(r + 1) * round_calls] == ["short"] * per_sample["short"] + ["long"]
