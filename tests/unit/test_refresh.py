"""layercache.refresh.check_cache: a cache goes stale on new traffic, a changed backbone, or verified answers that
break its promise; hand-made logs with known times and answers."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from layercache.archive import wrap_for_recording
from layercache.config import HandlerConfig
from layercache.errors import ArchiveError
from layercache.recorder import Recorder, RecorderConfig
from layercache.refresh import check_cache
from layercache.trafficlog import encode_batch, make_schema
from tests.helpers import EXIT_NODE, SHAPE, cached_archive

BUILT = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
FP = "0123456789abcdef"


@pytest.fixture
def cached(tiny_mar: Callable[..., Path], tmp_path: Path) -> Path:
    rec = wrap_for_recording(tiny_mar("tiny"), tmp_path / "rec.mar", handler_config=HandlerConfig(input_shape=SHAPE))
    provenance = {"rows": 100, "time_min": (BUILT - timedelta(hours=1)).isoformat(), "time_max": BUILT.isoformat()}
    return cached_archive(rec, tmp_path, None, threshold=0.9, fingerprint=FP, provenance=provenance, tolerance=0.01)


def _log(log_dir: Path, rows: int, when: datetime, *, exits: list[str] | None = None, fp: str = FP,
         prediction: int = 1, backbone: list[int] | None = None) -> None:  # fmt: skip
    probs = np.zeros((rows, 10))
    probs[:, prediction] = 1.0
    batch = encode_batch(
        make_schema([]),
        request_ids=[f"{when.timestamp()}-{i}" for i in range(rows)],
        model_name="tiny",
        model_version="1.0-cached",
        weights_fingerprint=fp,
        inputs=np.zeros((rows, *SHAPE), dtype=np.float32),
        probs=probs,
        exits=exits or ["backbone"] * rows,
        backbone_prediction=np.asarray(backbone if backbone is not None else [prediction] * rows),
        time=when,
    )
    with Recorder(RecorderConfig(log_dir), batch.schema) as recorder:
        recorder.append(batch)


def test_a_cache_built_from_the_logged_traffic_is_fresh(cached: Path, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    _log(logs, 100, BUILT - timedelta(minutes=30))
    _log(logs, 10, BUILT + timedelta(minutes=5))  # 9% new: below the 20% trigger
    found = check_cache(cached, logs)
    assert not found.stale, found.reasons
    assert found.facts["new_rows"] == 10 and found.facts["new_share"] == pytest.approx(10 / 110, abs=1e-4)


def test_new_traffic_makes_it_stale_at_the_chosen_share(cached: Path, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    _log(logs, 100, BUILT - timedelta(minutes=30))
    _log(logs, 30, BUILT + timedelta(minutes=5))  # 23% new
    found = check_cache(cached, logs)
    assert found.stale and found.reasons == [
        "23% of the logged requests are newer than the build (at least 20% makes it stale)"
    ]
    assert not check_cache(cached, logs, new_fraction=0.5).stale


def test_a_changed_backbone_makes_it_stale(cached: Path, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    _log(logs, 100, BUILT - timedelta(minutes=30))
    _log(logs, 5, BUILT + timedelta(minutes=5), fp="ffffffffffffffff")
    found = check_cache(cached, logs)
    assert found.stale and any("the backbone changed" in r and "ffffffffffffffff" in r for r in found.reasons)


def test_verified_answers_below_the_promise_make_it_stale(cached: Path, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    _log(logs, 400, BUILT - timedelta(minutes=30))
    # After the build: 60 verified hits of the head, 6 of them disagreeing with the backbone (10% of a 100%
    # hit rate: far above the promised 1%).
    _log(logs, 60, BUILT + timedelta(minutes=5), exits=[EXIT_NODE] * 60, backbone=[1] * 54 + [2] * 6)
    found = check_cache(cached, logs, new_fraction=0.9)
    assert found.stale and found.facts["verified"] == 60
    assert found.facts["estimated_disagreement"] == pytest.approx(0.1)
    assert any("above the promised 1.00%" in r for r in found.reasons)
    # Too few verified hits to tell: not held against the cache.
    assert not check_cache(cached, logs, new_fraction=0.9, min_verified=100).stale


def test_check_refuses_an_archive_that_is_not_cached(tiny_mar: Callable[..., Path], tmp_path: Path) -> None:
    with pytest.raises(ArchiveError, match="is not a cached archive"):
        check_cache(tiny_mar("plain"), tmp_path)


def test_the_check_command_exits_3_when_stale_and_0_when_fresh(
    cached: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from layercache.cli.build import STALE, main

    logs = tmp_path / "logs"
    _log(logs, 100, BUILT - timedelta(minutes=30))
    assert main(["--check", "--mar", str(cached), "--logs", str(logs)]) == 0
    assert capsys.readouterr().out.startswith("cache is fresh")
    _log(logs, 40, BUILT + timedelta(minutes=5))
    assert main(["--check", "--mar", str(cached), "--logs", str(logs)]) == STALE == 3
    assert "newer than the build" in capsys.readouterr().out


def test_a_refresh_candidate_replaces_the_running_cache_only_when_it_is_better() -> None:
    from layercache.refresh import decide

    good = {"agreement": 0.995, "mean_flops": 80.0}
    base = {"candidate_promise": {"passed": True}, "eval_rows": 500, "running": {"agreement": 0.99, "mean_flops": 90.0}}
    assert decide({**base, "candidate": good}, 0.01, 200)[0]
    equal = {**base, "candidate": {"agreement": 0.995, "mean_flops": 90.0}}
    assert decide(equal, 0.01, 200)[0]  # costs no more: swapped
    costly = decide({**base, "candidate": {"agreement": 0.995, "mean_flops": 91.0}}, 0.01, 200)
    assert not costly[0] and "costs more (0.0M FLOPs per request" in costly[1]
    sloppy = decide({**base, "candidate": {"agreement": 0.98, "mean_flops": 10.0}}, 0.01, 200)
    assert not sloppy[0] and "agrees on only 98.00%" in sloppy[1]
    uncertified = decide({**base, "candidate_promise": {"passed": False}, "candidate": good}, 0.01, 200)
    assert not uncertified[0] and "could not certify" in uncertified[1]
    few = decide({**base, "eval_rows": 20, "candidate": good}, 0.01, 200)
    assert not few[0] and "only 20 recent logged requests" in few[1]


def test_refresh_cli_reads_the_management_key_as_swap_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """refresh.py had only --token, so with TorchServe's token authorization on (the default) it could not swap
    without putting the key on the command line; it now takes --key-file and ./key_file.json like swap_version.py."""
    import json

    from layercache.cli import refresh

    monkeypatch.chdir(tmp_path)
    expired = {"management": {"key": "m", "expiration time": "2020-01-01T00:00:00Z"}, "API": {"key": "a"}}
    (tmp_path / "key_file.json").write_text(json.dumps(expired), encoding="utf-8")
    argv = ["--model", "m", "--mar", str(tmp_path / "m.mar"), "--logs", str(tmp_path)]
    with pytest.raises(SystemExit) as info:
        refresh.main(argv)  # ./key_file.json is read (and its key has expired) before anything is built
    assert info.value.code == 2
    assert "the management key in 'key_file.json' expired" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        refresh.main([*argv, "--key-file", "k.json", "--token", "t"])
    assert "not allowed with argument" in capsys.readouterr().err
