"""layercache.serving through the tiny archive: size limits before decoding, client-facing errors, explanations row
by row, online verification and the guard, and what gets recorded.

Each test drives a real handler with a real ``ts.context.Context`` (layercache.offline), as a worker would.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from layercache.archive import wrap_for_recording
from layercache.config import EXIT_HEADER, HandlerConfig
from layercache.offline import LoadedMar, open_mar, run_offline
from layercache.runtime import weights_fingerprint
from layercache.torchserve_adapter import set_requests
from layercache.trafficlog import read_logs
from tests.helpers import EXIT_NODE, SHAPE, cached_archive

MarFactory = Callable[..., Path]
PngFactory = Callable[..., bytes]


@pytest.fixture
def mar(tiny_mar: MarFactory) -> Path:
    return tiny_mar("tiny")


@pytest.fixture
def rec_mar(mar: Path, tmp_path: Path) -> Path:
    cfg = HandlerConfig(input_shape=SHAPE, log_dir=str(tmp_path / "logs"))
    return wrap_for_recording(mar, tmp_path / "tiny_rec.mar", handler_config=cfg)


@pytest.fixture
def original(mar: Path, tmp_path: Path) -> LoadedMar:
    return open_mar(mar, tmp_path / "original")


def _png(size: tuple[int, int], value: int = 128) -> bytes:
    buf = io.BytesIO()
    Image.new("L", size, value).save(buf, format="PNG")
    return buf.getvalue()


def test_oversized_images_and_bodies_get_413_before_decoding_and_batch_mates_are_answered(
    rec_mar: Path, tmp_path: Path, make_png: PngFactory
) -> None:
    # A 8000 x 6000 PNG of one grey is a few KB, and 48 megapixels once decoded: the default limit is 40.
    bomb = _png((8000, 6000))
    assert len(bomb) < 200_000
    loaded = open_mar(rec_mar, tmp_path / "a", as_served=True)
    answers, codes = run_offline(loaded, [{"data": make_png(seed=1)}, {"data": bomb}, {"data": make_png(seed=2)}])
    assert codes == [200, 413, 200]
    assert answers[1] == "The image is 8000x6000 pixels (48 megapixels); this service accepts at most 40 megapixels."
    small = open_mar(rec_mar, tmp_path / "b", as_served=True, handler_overrides={"max_body_mb": 0.0005})
    answers, codes = run_offline(small, [{"data": make_png(seed=1)}, {"data": _png((28, 28)) + b"\0" * 2000}])
    assert codes[1] == 413 and answers[1].startswith("The request body is 0.0 MB; this service accepts at most")


def test_a_form_field_of_another_name_says_which_one_is_expected(rec_mar: Path, tmp_path: Path, make_png: PngFactory):
    loaded = open_mar(rec_mar, tmp_path / "a", as_served=True)
    answers, codes = run_offline(loaded, [{"file": make_png(), "label": b"3"}, {"data": make_png()}])
    assert codes == [400, 200]
    assert answers[0] == (
        "Send the input as the request body or as a form field named 'data' (this request has fields: file, label)."
    )


def test_one_bad_explanation_target_fails_only_its_row(
    rec_mar: Path, original: LoadedMar, tmp_path: Path, make_png: PngFactory
) -> None:
    loaded = open_mar(rec_mar, tmp_path / "a", as_served=True)
    rows = [{"data": make_png(seed=i)} for i in range(5)]
    rows[1]["target"], rows[3]["target"], rows[4]["target"] = "99", b"abc", "4"
    ctx = loaded.context
    set_requests(ctx, 5, [{"explain": "True"}] * 5)
    answers = loaded.handler.handle(rows, ctx)
    codes = [ctx.get_response_status(i)[0] for i in range(5)]
    assert codes == [200, 400, 200, 400, 200]
    assert answers[1] == "target must be a class index from 0 to 9, got 99."
    assert answers[3] == "target must be a class index from 0 to 9, got 'abc'."
    assert np.asarray(answers[4]).shape == SHAPE and np.asarray(answers[0]).shape == SHAPE


def test_record_fraction_records_a_random_share(rec_mar: Path, tmp_path: Path, make_png: PngFactory) -> None:
    loaded = open_mar(rec_mar, tmp_path / "a", as_served=True, handler_overrides={"record_fraction": 0.5})
    for b in range(10):
        run_offline(loaded, [{"data": make_png(seed=10 * b + i)} for i in range(20)])
    loaded.close()
    assert 60 < read_logs(tmp_path / "logs").num_rows < 140  # 100 expected of 200


def _cached(rec_mar: Path, original: LoadedMar, tmp_path: Path, **overrides) -> LoadedMar:
    fp = weights_fingerprint(original.backbone)
    # Threshold 0: the untrained head answers every row, and mostly disagrees with the backbone. Certified for a
    # disagreement of at most 10% among its hits, which it does not keep.
    mar = cached_archive(rec_mar, tmp_path, original.backbone, threshold=0.0, fingerprint=fp, certified={"bound": 0.1})
    return open_mar(mar, tmp_path / "cached", as_served=True, handler_overrides=overrides)


def test_verified_hits_are_answered_by_the_head_and_recorded_with_the_backbone_answer(
    rec_mar: Path, original: LoadedMar, tmp_path: Path, make_png: PngFactory
) -> None:
    loaded = _cached(rec_mar, original, tmp_path, verify_fraction=1.0, guard="off")
    rows = [{"data": make_png(seed=i)} for i in range(8)]
    answers, codes = run_offline(loaded, rows)
    assert codes == [200] * 8
    assert [loaded.context.get_response_headers(i).get(EXIT_HEADER) for i in range(8)] == [EXIT_NODE] * 8
    expected = original.handler.postprocess(original.handler.inference(original.handler.preprocess(rows)))
    info = json.loads(loaded.handler.describe_handle())
    head = info["verification"]["heads"][0]
    assert (head["hits"], head["verified"]) == (8, 8)
    assert info["verification"]["shares"] == [1.0]  # what each head's hits are verified at now
    agreed = sum(max(a, key=a.get) == max(e, key=e.get) for a, e in zip(answers, expected, strict=True))
    assert head["agreement"] == pytest.approx(agreed / 8)
    assert 0 <= head["agreement_lower_bound"] <= head["agreement"]
    assert info["verification"]["estimated_disagreement"] == pytest.approx(1 - agreed / 8)
    loaded.close()
    table = read_logs(tmp_path / "clogs")
    backbone_top = [int(original.handler.inference(original.handler.preprocess([r])).argmax()) for r in rows]
    assert table.column("backbone_prediction").to_pylist() == backbone_top
    assert all(c is not None and c > 0 for c in table.column("confidence").to_pylist())
    assert table.column("exit").to_pylist() == [EXIT_NODE] * 8


def test_the_guard_disables_a_head_that_breaks_its_promise_and_no_request_fails(
    rec_mar: Path, original: LoadedMar, tmp_path: Path, make_png: PngFactory, caplog: pytest.LogCaptureFixture
) -> None:
    loaded = _cached(rec_mar, original, tmp_path, verify_fraction=1.0)
    exits = []
    with caplog.at_level(logging.WARNING, logger="layercache.monitor"):
        for b in range(10):
            rows = [{"data": make_png(seed=100 + 10 * b + i)} for i in range(10)]
            _, codes = run_offline(loaded, rows)
            assert codes == [200] * 10
            exits += [loaded.context.get_response_headers(i).get(EXIT_HEADER) for i in range(10)]
    # The guard's sequential test acts on a handful of verified answers (most of the first batch's 10 wrong): from
    # the second batch on at the latest, the head answers nothing more, the backbone does.
    assert exits[:10] == [EXIT_NODE] * 10 and exits[20:] == ["backbone"] * 80
    head = json.loads(loaded.handler.describe_handle())["verification"]["heads"][0]
    assert head["state"] == "disabled" and "more than the 10.00% it was certified for" in head["reason"]
    assert head["verified"] <= 20  # it decided on at most two batches' verified answers
    assert caplog.text.count("disabled") == 1  # logged once


def test_the_guard_in_raise_mode_raises_the_threshold(
    rec_mar: Path, original: LoadedMar, tmp_path: Path, make_png: PngFactory
) -> None:
    loaded = _cached(rec_mar, original, tmp_path, verify_fraction=1.0, guard="raise")
    for b in range(6):
        run_offline(loaded, [{"data": make_png(seed=200 + 10 * b + i)} for i in range(10)])
    head = json.loads(loaded.handler.describe_handle())["verification"]["heads"][0]
    # An untrained head has no confidence above which it agrees often enough: raising ends in disabling it.
    assert head["state"] in ("raised", "disabled") and head["threshold"] > 0.0


DICT_MODEL = '''"""TinyNet answering a dict whose scores are already probabilities, as some real checkpoints do."""

import torch
from torch import nn


class DictNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.block1 = nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> dict:
        feats = self.block2(self.block1(self.stem(x))).mean(dim=(2, 3))
        return {"probs": self.fc(feats).softmax(dim=1), "embedding": feats}
'''

DICT_HANDLER = '''"""Grayscale tensors in; the answer is the bare class index, read from the model's own dict."""

from torchvision import transforms
from ts.torch_handler.base_handler import BaseHandler


class DictHandler(BaseHandler):
    image_processing = transforms.Compose([transforms.Grayscale(1), transforms.ToTensor()])

    def preprocess(self, data):
        import io

        import torch
        from PIL import Image

        return torch.stack([self.image_processing(Image.open(io.BytesIO(row.get("data")))) for row in data])

    def postprocess(self, data):
        assert set(data) == {"probs", "embedding"} and data["embedding"].shape[1] == 8
        return data["probs"].argmax(1).tolist()
'''


def test_any_postprocess_gets_the_backbones_own_output_form(tmp_path: Path, make_png: PngFactory) -> None:
    import torch

    from layercache.archive import archive_classifier
    from tests.helpers import load_class

    src = tmp_path / "src"
    src.mkdir()
    (src / "dict_model.py").write_text(DICT_MODEL)
    (src / "dict_handler.py").write_text(DICT_HANDLER)
    torch.manual_seed(0)
    torch.save(load_class(src / "dict_model.py", "DictNet")().state_dict(), src / "w.pt")
    plain = archive_classifier(
        model_name="tiny",
        version="1.0",
        model_file=src / "dict_model.py",
        weights=src / "w.pt",
        handler=src / "dict_handler.py",
        output=tmp_path / "d.mar",
    )
    cfg = HandlerConfig(input_shape=SHAPE, log_dir=str(tmp_path / "l"), output_key="probs")
    rec = wrap_for_recording(plain, tmp_path / "d_rec.mar", handler_config=cfg)
    rows = [{"data": make_png(seed=i)} for i in range(6)]
    recording = open_mar(rec, tmp_path / "rec", as_served=True)
    answers, codes = run_offline(recording, rows)
    assert codes == [200] * 6 and all(isinstance(a, int) for a in answers)
    recording.close()
    # The log keeps the answered distribution: the model's probabilities as they are (not softmaxed again).
    table = read_logs(tmp_path / "l")
    top = table.column("top_probs").to_pylist()
    original = open_mar(plain, tmp_path / "orig")
    with torch.no_grad():
        probs = original.handler.model(original.handler.preprocess(rows))["probs"]
    assert [t[0] for t in top] == pytest.approx(probs.max(1).values.tolist(), abs=1e-6)
    # A cached archive (its head answers every row): the handler still gets a dict of probabilities and embeddings.
    fp = weights_fingerprint(original.handler.model)
    mar = cached_archive(rec, tmp_path, None, threshold=0.0, fingerprint=fp)
    spec_dict = {"key": "probs", "kind": "probs"}
    import zipfile

    patched = tmp_path / "patched.mar"
    with zipfile.ZipFile(mar) as z, zipfile.ZipFile(patched, "w") as out:
        for item in z.infolist():
            data = z.read(item)
            if item.filename == "layercache_cache.json":
                spec = json.loads(data)
                spec["output"] = spec_dict
                data = json.dumps(spec).encode()
            elif item.filename == "layercache_manifest.json":
                continue
            out.writestr(item, data)
    served = open_mar(patched, tmp_path / "cached", as_served=True)
    answers, codes = run_offline(served, rows)
    assert codes == [200] * 6 and all(isinstance(a, int) for a in answers)
    assert [served.context.get_response_headers(i).get(EXIT_HEADER) for i in range(6)] == [EXIT_NODE] * 6
