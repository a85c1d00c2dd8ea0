"""Tests for layercache.torchserve_adapter: the layercache handlers driven through a real ts.context.Context.

Archives are built from the tiny classifier of conftest.py, whose custom handler turns a grayscale image into a
``(1, H, W)`` tensor without resizing, so an image of another size is a wrong-shape input.
"""

from __future__ import annotations

import io
import json
import logging
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from captum.attr import IntegratedGradients

from layercache.archive import wrap_for_recording
from layercache.config import EXIT_HEADER, SAMPLE_FILE, HandlerConfig
from layercache.errors import ArchiveError
from layercache.graph import split
from layercache.offline import LoadedMar, open_mar, run_offline
from layercache.runtime import weights_fingerprint
from layercache.serving import CachedService, RecordingService
from layercache.torchserve_adapter import ServiceHandler, load_inner_handler, set_requests
from layercache.trafficlog import act_nodes_of, bodies_of, decode_top, read_logs
from tests.helpers import cached_archive

MarFactory = Callable[..., Path]
PngFactory = Callable[..., bytes]
SHAPE = (1, 28, 28)
EXIT_NODE = "block1.1"  # a candidate layer of the tiny classifier


@pytest.fixture
def mar(tiny_mar: MarFactory) -> Path:
    return tiny_mar("tiny")


@pytest.fixture
def rec_mar(mar: Path, tmp_path: Path) -> Path:
    cfg = HandlerConfig(input_shape=SHAPE, log_dir=str(tmp_path / "logs"), record_activations=True)
    return wrap_for_recording(mar, tmp_path / "tiny_rec.mar", handler_config=cfg)


@pytest.fixture
def original(mar: Path, tmp_path: Path) -> LoadedMar:
    return open_mar(mar, tmp_path / "original")


def original_answers(loaded: LoadedMar, rows: list[dict]) -> tuple[list, torch.Tensor, torch.Tensor]:
    """The original handler's answers, preprocessed inputs and logits for ``rows`` (one batch)."""
    h = loaded.handler
    x = h.preprocess(rows)
    logits = h.inference(x)
    return h.postprocess(logits), x, logits


def test_open_mar_loads_the_original_or_the_served_handler(mar: Path, rec_mar: Path, tmp_path: Path) -> None:
    plain = open_mar(mar, tmp_path / "a")
    assert type(plain.handler).__name__ == "TinyHandler"
    served = open_mar(rec_mar, tmp_path / "b", as_served=True)
    assert isinstance(served.handler, ServiceHandler) and served.handler.initialized
    assert type(served.handler).__name__ == "LayercacheRecordingHandler"
    assert isinstance(served.handler.service, RecordingService)
    # The build's view of a recording archive: its original handler and backbone.
    build_view = open_mar(rec_mar, tmp_path / "c")
    assert type(build_view.handler).__name__ == "TinyHandler"
    assert weights_fingerprint(build_view.backbone) == weights_fingerprint(plain.backbone)
    assert weights_fingerprint(served.backbone) == weights_fingerprint(plain.backbone)
    info = json.loads(served.handler.describe_handle())
    assert info["mode"] == "record" and info["candidates"] == ["stem.1", "block1.1"]


def test_bad_rows_get_400_and_the_others_are_answered_and_recorded(
    rec_mar: Path, original: LoadedMar, tmp_path: Path, make_png: PngFactory
) -> None:
    loaded = open_mar(rec_mar, tmp_path / "served", as_served=True)
    rows = [
        {"data": b"this is not an image"},
        {"data": make_png(seed=1), "label": "3"},
        {"data": make_png((20, 20), seed=2), "label": "5"},
        {"data": make_png(seed=3), "label": b"7"},
    ]
    answers, codes = run_offline(loaded, rows)
    ctx = loaded.context
    assert codes == [400, 200, 400, 200]
    # One sentence the client can act on; no batch position, no exception type (those go to the worker log).
    assert answers[0] == (
        "The request body could not be read as an input for this model (an image classifier takes a PNG or JPEG image)."
    )
    assert (
        answers[2] == "This model takes inputs of shape [1, 28, 28] after preprocessing; this request gave [1, 20, 20]."
    )
    assert ctx.get_response_status(0) == (400, answers[0])
    assert ctx.get_response_status(2) == (400, answers[2])
    expected, x, logits = original_answers(original, [rows[1], rows[3]])
    assert answers[1] == expected[0] and answers[3] == expected[1]
    assert len(answers[1]) == 3  # the handler's topk
    assert [ctx.get_response_headers(i).get(EXIT_HEADER) for i in range(4)] == [None, "backbone", None, "backbone"]

    loaded.close()
    table = read_logs(tmp_path / "logs")
    ids = [ctx.get_request_id(i) for i in range(4)]
    assert table.column("request_id").to_pylist() == [ids[1], ids[3]]
    # A client's "label" field is not recorded: only the operator's offline recording writes labels.
    assert table.column("label").to_pylist() == [None, None]
    assert table.column("exit").to_pylist() == ["backbone", "backbone"]
    assert table.column("model_name").to_pylist() == ["tiny", "tiny"]
    assert table.column("model_version").to_pylist() == ["1.0", "1.0"]
    assert set(table.column("weights_fingerprint").to_pylist()) == {weights_fingerprint(original.backbone)}
    # Each row keeps its request body as received (not the bigger tensor); the build replays the preprocess.
    assert [b.request()["data"] for b in bodies_of(table)] == [rows[1]["data"], rows[3]["data"]]
    assert table.column("input").null_count == 2
    probs = F.softmax(logits, dim=1).numpy()
    classes, top = decode_top(table)
    assert np.array_equal(classes, np.argsort(-probs, axis=1, kind="stable")[:, :5])
    assert np.allclose(top, np.take_along_axis(probs, classes, axis=1), atol=1e-6)
    assert table.column("prediction").to_pylist() == probs.argmax(1).tolist()
    assert table.column("backbone_prediction").to_pylist() == probs.argmax(1).tolist()
    assert act_nodes_of(table.schema) == ["stem.1", "block1.1"]


def test_the_first_batch_sets_the_shape_without_input_shape(mar: Path, tmp_path: Path, make_png: PngFactory) -> None:
    rec = wrap_for_recording(mar, tmp_path / "r.mar", handler_config=HandlerConfig(log_dir=str(tmp_path / "logs")))
    loaded = open_mar(rec, tmp_path / "served", as_served=True)
    rows = [{"data": make_png((20, 20))}, {"data": make_png()}, {"data": make_png((20, 20), seed=4)}]
    answers, codes = run_offline(loaded, rows)
    assert codes == [200, 400, 200]
    assert (
        answers[1] == "This model takes inputs of shape [1, 20, 20] after preprocessing; this request gave [1, 28, 28]."
    )
    # The shape stays fixed for the worker's lifetime, not just for one batch.
    _, codes = run_offline(loaded, [{"data": make_png()}, {"data": make_png((20, 20), seed=5)}])
    assert codes == [400, 200]
    # Without input_shape nothing is traced (no candidates): inputs and answers are recorded, no activations.
    loaded.close()
    assert act_nodes_of(read_logs(tmp_path / "logs").schema) == []


def test_explanations_and_predictions_are_routed_per_row(
    rec_mar: Path, original: LoadedMar, tmp_path: Path, make_png: PngFactory
) -> None:
    loaded = open_mar(rec_mar, tmp_path / "served", as_served=True)
    rows = [{"data": make_png(seed=i)} for i in range(4)]
    rows[2]["target"] = "4"
    ctx = loaded.context
    # The frontend sends "explain: False" with every prediction and "True" for /explanations.
    ids = set_requests(ctx, 4, [{"explain": "True"}, {"explain": "False"}, {"explain": "true"}, {}])
    answers = loaded.handler.handle(rows, ctx)
    assert [ctx.get_response_status(i)[0] for i in range(4)] == [200] * 4
    expected, x, logits = original_answers(original, rows)
    assert answers[1] == expected[1] and answers[3] == expected[3]
    assert [ctx.get_response_headers(i).get(EXIT_HEADER) for i in range(4)] == [None, "backbone", None, "backbone"]
    # Row 0 is explained for its predicted class, row 2 for the target it asked for.
    attr = np.asarray([answers[0], answers[2]])
    assert attr.shape == (2, *SHAPE)
    ig = IntegratedGradients(original.backbone)
    want = ig.attribute(x[[0, 2]], target=[int(logits[0].argmax()), 4], n_steps=15)
    assert np.allclose(attr, want.detach().numpy(), atol=1e-5)
    loaded.close()
    assert read_logs(tmp_path / "logs").column("request_id").to_pylist() == [ids[1], ids[3]]


def test_a_recording_failure_never_fails_a_request(
    rec_mar: Path, original: LoadedMar, tmp_path: Path, make_png: PngFactory
) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    loaded = open_mar(rec_mar, tmp_path / "served", as_served=True, handler_overrides={"log_dir": str(not_a_dir)})
    rows = [{"data": make_png(seed=i)} for i in range(3)]
    for _ in range(2):
        answers, codes = run_offline(loaded, rows)
        assert codes == [200, 200, 200]
        assert answers == original_answers(original, rows)[0]
    info = json.loads(loaded.handler.describe_handle())
    assert (info["recorded_rows"], info["record_failed_rows"]) == (0, 6)


def test_cached_worker_times_its_policy_at_startup_on_the_shipped_sample(
    rec_mar: Path, original: LoadedMar, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fp = weights_fingerprint(original.backbone)
    sample = torch.randn(6, *SHAPE).half()
    cached = cached_archive(rec_mar, tmp_path, original.backbone, threshold=0.5, fingerprint=fp, sample=sample)
    with zipfile.ZipFile(cached) as z:
        assert torch.equal(torch.load(io.BytesIO(z.read(SAMPLE_FILE)), weights_only=True), sample)

    measured = open_mar(cached, tmp_path / "startup", as_served=True, handler_overrides={"policy_source": "startup"})
    service = measured.handler.service
    # The context's batch size is 1, so the worker times batch 1 only.
    assert service.policy_source == "startup" and set(service.model.policy) == {"1"}
    assert service.describe()["policy"] == {"modes": service.model.policy, "source": "startup"}

    # auto on a CPU worker and stored keep the build's policy (none here: shrink everywhere).
    for policy in ("auto", "stored"):
        loaded = open_mar(cached, tmp_path / policy, as_served=True, handler_overrides={"policy_source": policy})
        assert loaded.handler.service.policy_source == "default" and loaded.handler.service.model.policy == {}

    # A sample the model cannot run (here: the wrong shape) leaves the stored policy; the worker still serves.
    bad = cached_archive(
        rec_mar, tmp_path, original.backbone, threshold=0.5, fingerprint=fp, sample=torch.zeros(2, 3, 5, 5).half()
    )
    with caplog.at_level(logging.ERROR):
        loaded = open_mar(bad, tmp_path / "bad", as_served=True, handler_overrides={"policy_source": "startup"})
    assert loaded.handler.service.policy_source == "default" and "timing the policy at startup failed" in caplog.text

    # An archive without a sample falls back to the stored policy and says why.
    old = cached_archive(rec_mar, tmp_path, original.backbone, threshold=0.5, fingerprint=fp)
    with caplog.at_level(logging.WARNING):
        loaded = open_mar(old, tmp_path / "old", as_served=True, handler_overrides={"policy_source": "startup"})
    assert loaded.handler.service.policy_source == "default"
    assert SAMPLE_FILE in caplog.text


def test_cached_archive_answers_from_the_head_with_the_exit_header(
    rec_mar: Path, original: LoadedMar, tmp_path: Path, make_png: PngFactory
) -> None:
    backbone = original.backbone
    cached = cached_archive(rec_mar, tmp_path, backbone, threshold=0.0, fingerprint=weights_fingerprint(backbone))
    loaded = open_mar(cached, tmp_path / "served", as_served=True)
    assert type(loaded.handler).__name__ == "LayercacheCachedHandler"
    rows = [{"data": make_png(seed=i)} for i in range(3)] + [{"data": b"junk"}]
    answers, codes = run_offline(loaded, rows)
    assert codes == [200, 200, 200, 400]
    assert [loaded.context.get_response_headers(i).get(EXIT_HEADER) for i in range(4)] == [EXIT_NODE] * 3 + [None]
    # Threshold 0: every row is answered by the head, at its temperature.
    _, x, _ = original_answers(original, rows[:3])
    head = loaded.handler.service.model.heads[0]
    with torch.no_grad():
        logp = F.log_softmax(head(split(backbone, [EXIT_NODE])[0](x)) / 2.0, dim=1)
    assert answers[:3] == original.handler.postprocess(logp)
    info = json.loads(loaded.handler.describe_handle())
    assert info["mode"] == "cached" and info["exits"] == [{"node": EXIT_NODE, "threshold": 0.0}]
    assert isinstance(loaded.handler.service, CachedService)
    loaded.close()
    assert read_logs(tmp_path / "clogs").column("exit").to_pylist() == [EXIT_NODE] * 3


def test_cached_archive_refuses_other_backbone_weights(rec_mar: Path, original: LoadedMar, tmp_path: Path) -> None:
    cached = cached_archive(rec_mar, tmp_path, original.backbone, threshold=0.5, fingerprint="0000000000000000")
    with pytest.raises(ArchiveError, match=r"built for backbone weights 0000000000000000.*Hint: rebuild the cache"):
        open_mar(cached, tmp_path / "served", as_served=True)


def test_load_inner_handler_errors(tmp_path: Path) -> None:
    with pytest.raises(ArchiveError, match="inner handler file missing.py is not in the archive"):
        load_inner_handler("missing.py", tmp_path)
    with pytest.raises(ArchiveError, match="'no_such_handler' is neither a file in the archive nor a stock"):
        load_inner_handler("no_such_handler", tmp_path)
    (tmp_path / "two_classes.py").write_text("class A:\n    pass\n\n\nclass B:\n    pass\n")
    with pytest.raises(ArchiveError, match=r"must define exactly one class .*found \['A', 'B'\]"):
        load_inner_handler("two_classes.py", tmp_path)
    assert type(load_inner_handler("image_classifier", tmp_path)).__name__ == "ImageClassifier"


def test_labels_are_recorded_only_when_the_settings_allow_it(
    rec_mar: Path, tmp_path: Path, make_png: PngFactory
) -> None:
    loaded = open_mar(
        rec_mar,
        tmp_path / "served",
        as_served=True,
        handler_overrides={"record_labels": True, "log_dir": str(tmp_path / "labelled")},
    )
    run_offline(loaded, [{"data": make_png(seed=1), "label": "3"}, {"data": make_png(seed=2), "label": b"7"}])
    loaded.close()
    assert read_logs(tmp_path / "labelled").column("label").to_pylist() == ["3", "7"]


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_a_damaged_cached_archive_fails_in_one_line_that_says_rebuild(
    rec_mar: Path, original: LoadedMar, tmp_path: Path, damage: str
) -> None:
    from layercache.config import HEADS_FILE

    fp = weights_fingerprint(original.backbone)
    good = cached_archive(rec_mar, tmp_path, original.backbone, threshold=0.5, fingerprint=fp)
    bad = tmp_path / f"{damage}.mar"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename == HEADS_FILE:
                if damage == "missing":
                    continue
                data = data[: len(data) // 2]
            dst.writestr(item, data)
    word = "is missing" if damage == "missing" else "differs from what the build wrote"
    with pytest.raises(
        ArchiveError, match=rf"^the cached archive is damaged \({HEADS_FILE} {word}\): rebuild the cache$"
    ):
        open_mar(bad, tmp_path / "served", as_served=True)
    open_mar(good, tmp_path / "fine", as_served=True)  # the intact archive loads
