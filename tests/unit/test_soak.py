"""The soak's memory measure: each worker is judged from the end of its own warm-up."""

from __future__ import annotations

from layercache.testing.soak import Sample, SoakResult

MB = 2**20


def _result(series: dict[int, list[tuple[float, int]]], warmup_s: float = 10.0) -> SoakResult:
    times = sorted({t for points in series.values() for t, _ in points})
    samples = []
    for t in times:
        rss = {pid: v * MB for pid, points in series.items() for tt, v in points if tt == t}
        samples.append(Sample(t, 0, rss, {pid: 20 for pid in rss}, 0))
    return SoakResult(samples=samples, warmup_s=warmup_s)


def test_a_worker_started_by_a_scale_up_is_watched_from_the_end_of_its_own_warm_up() -> None:
    # Worker 1 is flat after the soak's warm-up; worker 2 starts at 50 s at 300 MB and grows to 500 MB while it
    # warms up (50-60 s), then stays flat: no growth after warm-up for either.
    first = [(t, 500 if t >= 10 else 300) for t in range(0, 120, 2)]
    late = [(t, 300 + min(t - 50, 10) * 20) for t in range(50, 120, 2)]
    result = _result({1: first, 2: late})
    assert result.rss_growth == 0.0
    assert [w["pid"] for w in result.workers()] == [1, 2]
    assert result.workers()[1]["warm_at_s"] == 60


def test_growth_after_a_workers_warm_up_is_counted() -> None:
    first = [(t, 500) for t in range(0, 120, 2)]
    late = [(t, 400 + max(t - 60, 0) * 2) for t in range(50, 120, 2)]  # warm at 60 s, then +2 MB a second
    result = _result({1: first, 2: late})
    assert abs(result.rss_growth - (400 + 58 * 2) / 400 + 1.0) < 1e-9
    assert result.summary()["workers"][1]["growth"] == round(116 / 400, 4)
