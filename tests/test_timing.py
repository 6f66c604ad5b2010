"""Timing in rounds (``jaxmt.timing``; the autotuner and benchmarks/common.py time with it):
each method's sample is one call, or a burst of back-to-back calls sized from the fastest
warm-up call to fill the asked minimum, closed by a wait for its last answer; times are per
call. Checked with a clock that moves only when a call or a wait says so, so nothing here
depends on this machine's speed."""

from __future__ import annotations

import numpy as np
import pytest

from jaxmt import autotune, timing


class _Clock:
    """A clock that the fake calls and answers below move."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _Answer:
    """A fake answer whose wait costs ``wait_s`` of the clock (``jax.block_until_ready``
    calls ``block_until_ready`` on each leaf)."""

    def __init__(self, clock: _Clock, wait_s: float) -> None:
        self.clock, self.wait_s = clock, wait_s

    def block_until_ready(self) -> _Answer:
        self.clock.now += self.wait_s
        return self


def _fn(clock: _Clock, launch_s: float, wait_s: float, log: list[str], name: str, first_s: float | None = None):
    """A call that takes ``launch_s`` of the clock to launch (``first_s`` the first time, as a
    compile would) and returns an answer whose wait takes ``wait_s``."""
    def call(*args):
        clock.now += first_s if first_s is not None and name not in log else launch_s
        log.append(name)
        return _Answer(clock, wait_s)
    return call


@pytest.mark.parametrize(
    "call_s, min_sample_s, expected",
    [(1e-3, 0.0, 1), (1e-3, 20e-3, 20), (1e-3, 20.5e-3, 21), (30e-3, 20e-3, 1), (0.0, 20e-3, 1),
     (1e-6, 1.0, timing.MOST_CALLS)],
)
def test_a_burst_holds_enough_calls_to_last_the_minimum(call_s, min_sample_s, expected):
    assert timing.calls_per_sample(call_s, min_sample_s) == expected


@pytest.mark.parametrize("min_sample_s", [0.0, 10e-3])
def test_rounds_time_each_method_per_call_in_turn_waits_included(min_sample_s):
    clock, log = _Clock(), []
    # (launch, wait) seconds: a call alone costs their sum; the first call costs 1 s more.
    costs = {"short": (0.6e-3, 0.4e-3), "long": (20e-3, 5e-3)}
    fns = {name: _fn(clock, launch, wait, log, name, first_s=1.0 + launch) for name, (launch, wait) in costs.items()}
    timings = timing.time_in_rounds(fns, warmup=2, repeats=3, min_sample_s=min_sample_s, clock=clock)
    # Sized from the fastest warm-up call (1 ms alone), not the first (1 s).
    per_sample = {"short": 10 if min_sample_s else 1, "long": 1}
    for name, (launch, wait) in costs.items():
        calls = per_sample[name]
        assert timings[name]["calls_per_sample"] == calls
        assert timings[name]["median_s"] == pytest.approx(launch + wait / calls)  # one wait per burst
        assert timings[name]["repeats"] == 3
    timed = log[2 * len(costs):]  # after each method's warm-up calls
    round_calls = per_sample["short"] + per_sample["long"]
    for r in range(3):  # every round: the short method's burst, then the long one's
        assert timed[r * round_calls:(r + 1) * round_calls] == ["short"] * per_sample["short"] + ["long"]


def test_without_warm_up_a_burst_is_still_sized_by_one_timed_call():
    clock, log = _Clock(), []
    timings = timing.time_in_rounds({"f": _fn(clock, 1e-3, 0.0, log, "f")}, warmup=0, repeats=2, min_sample_s=5e-3, clock=clock)
    assert timings["f"]["calls_per_sample"] == 5
    assert len(log) == 1 + 2 * 5


def test_an_answer_with_nothing_to_wait_for_is_timed_one_call_a_sample():
    clock = _Clock()

    def returns_none():
        clock.now += 1e-3

    timings = timing.time_in_rounds({"f": returns_none}, warmup=2, repeats=2, min_sample_s=10e-3, clock=clock)
    assert timings["f"]["calls_per_sample"] == 1


def test_the_autotuner_takes_the_median_of_bursts_of_its_compiled_calls(monkeypatch):
    clock, log = _Clock(), []
    monkeypatch.setattr(timing.time, "perf_counter", clock)  # the autotuner times with the default clock
    seen_args = []

    def program(x, w):
        seen_args.append((x, w))
        return _fn(clock, 0.5e-3, 0.5e-3, log, "p")()

    seconds = autotune.interleaved_seconds({"p": program}, ("x", "w"), warmup=2, repeats=3, min_burst_s=4e-3)
    assert seconds == {"p": pytest.approx(0.5e-3 + 0.5e-3 / 4)}  # bursts of 4 calls, one wait each
    assert set(seen_args) == {("x", "w")}


@pytest.mark.parametrize("q", [0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("values", [[1.0, 10.0], [1.0, 2.0, 3.0], [5.0] * 7, list(map(float, range(1, 11))), "random 13", "random 100"])
def test_a_percentile_is_the_nearest_rank_sample(values, q, rng):
    """The smallest sample with at least a fraction q of the samples at or below it (NumPy's
    "inverted_cdf"): a sample, never below the median for q > 0.5, the largest for q = 1."""
    if isinstance(values, str):
        values = list(rng.exponential(5.0, size=int(values.split()[1])))
    got = timing.percentile(sorted(values), q)
    assert got == np.percentile(values, 100 * q, method="inverted_cdf")
    assert got in values
    if q > 0.5:
        assert got >= sorted(values)[(len(values) - 1) // 2]
    if q == 1.0:
        assert got == max(values)


def test_timing_without_repeats_is_refused():
    with pytest.raises(ValueError, match="repeats"):
        timing.time_in_rounds({"f": lambda: None}, repeats=0)
