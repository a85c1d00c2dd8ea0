"""layercache.offline: test-running an archive's handler on one request body before it is wrapped."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from layercache.archive import wrap_for_recording
from layercache.config import HandlerConfig
from layercache.errors import ArchiveError
from layercache.offline import open_mar, run_offline, try_sample
from tests.helpers import SHAPE, tiny_archive

PngFactory = Callable[..., bytes]

PAIR_HANDLER = '''"""A preprocess giving (image, size) pairs: a contract layercache cannot serve."""

from torchvision import transforms
from ts.torch_handler.image_classifier import ImageClassifier


class PairHandler(ImageClassifier):
    image_processing = transforms.Compose([transforms.Grayscale(1), transforms.ToTensor()])

    def preprocess(self, data):
        x = super().preprocess(data)
        return x, x.shape[-1]
'''


def test_a_good_sample_reports_shape_classes_and_output_kind(tiny_mar: Callable[..., Path], make_png: PngFactory):
    run = try_sample(tiny_mar("tiny"), make_png())
    assert run.input_shape == SHAPE and run.num_classes == 10 and run.output.kind == "logits"


def test_a_preprocess_giving_a_tuple_is_refused_at_wrap_time(tmp_path: Path, make_png: PngFactory) -> None:
    handler = tmp_path / "pair_handler.py"
    handler.write_text(PAIR_HANDLER)
    mar = tiny_archive(tmp_path, "pair", handler=str(handler))
    with pytest.raises(ArchiveError, match=r"preprocess gives tuple for one request.*one tensor with one row"):
        wrap_for_recording(mar, tmp_path / "rec.mar", sample=make_png())
    assert not (tmp_path / "rec.mar").exists()
    # Without a sample the archive is wrapped; each request of its first batch then gets a 400 saying why.
    rec = wrap_for_recording(mar, tmp_path / "rec.mar", handler_config=HandlerConfig(log_dir=str(tmp_path / "l")))
    with open_mar(rec, tmp_path / "served", as_served=True) as served:
        answers, codes = run_offline(served, [{"data": make_png(seed=i)} for i in range(3)])
    assert codes == [400] * 3
    assert all("preprocess gives tuple, not one tensor" in str(a) for a in answers)


def test_a_body_the_handler_cannot_read_names_the_fix(tiny_mar: Callable[..., Path]) -> None:
    with pytest.raises(ArchiveError, match=r"preprocess failed on the sample .*request body this model answers"):
        try_sample(tiny_mar("tiny"), b"not an image")
