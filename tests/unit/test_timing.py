"""Tests for layercache.timing: what is timed, in which order, and the argument checks."""

from __future__ import annotations

import time

import pytest

from layercache.errors import ConfigError
from layercache.timing import interleaved, median_seconds, seconds


def test_seconds_times_the_call() -> None:
    assert 0.02 <= seconds(lambda: time.sleep(0.02)) < 1.0
    assert seconds(lambda: None, "cpu") < 0.02


def test_interleaved_times_each_call_once_per_round_in_turn_after_the_warmup() -> None:
    order: list[str] = []
    times = interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, rounds=3, warmup=2)
    assert order == ["a", "b"] * 5  # 2 warm-up rounds, then 3 timed ones
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}
    assert all(t >= 0 for v in times.values() for t in v)


def test_median_seconds_warms_up_then_takes_the_median() -> None:
    calls: list[float] = []
    delays = iter([0.5, 0.0, 0.03, 0.0])  # the slow first call is the untimed warm-up

    def fn() -> None:
        calls.append(1)
        time.sleep(next(delays))

    assert median_seconds(fn, repeats=3, warmup=1) < 0.5 and len(calls) == 4


@pytest.mark.parametrize("kwargs", [{"rounds": 0}, {"rounds": 1, "warmup": -1}])
def test_interleaved_rejects_bad_counts(kwargs: dict) -> None:
    with pytest.raises(ConfigError, match="rounds="):
        interleaved({"a": lambda: None}, **kwargs)


def test_median_seconds_rejects_bad_counts() -> None:
    with pytest.raises(ConfigError, match="repeats=0"):
        median_seconds(lambda: None, repeats=0)
