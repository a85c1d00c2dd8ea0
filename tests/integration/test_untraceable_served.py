"""A classifier torch.fx cannot trace, through a real TorchServe: TF-style "SAME" padding computed from ``x.shape``
inside its convolutions (as EfficientNet ports do) and ``bs = x.size(0)`` read at the top of ``forward``.

The recording handler and the build find the untraceable class and make it a leaf module on their own; the cached
archive then answers unseen requests early and agrees with the plain archive on them.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from layercache.archive import archive_classifier, wrap_for_recording
from layercache.build import BuildConfig
from layercache.certify import clopper_pearson_lower
from layercache.config import HandlerConfig
from layercache.datasets import load_fashion_mnist
from layercache.evaluation import BACKBONE
from layercache.pipeline import BuildRequest, build_cached_archive
from layercache.testing.load import Answer, predict
from layercache.testing.torchserve import TorchServeProcess, require_torchserve
from layercache.trafficlog import read_logs
from layercache.training import TrainConfig
from tests.helpers import ROOT

pytestmark = pytest.mark.integration
logger = logging.getLogger(__name__)

EXAMPLE = ROOT / "examples" / "fashion_cnn"
MODEL = "tfport"
TRAFFIC, UNSEEN = 2000, 600

SAME_PAD = '''"""TF "SAME" padding, computed from the input's size at run time (Python control flow on it)."""

import math

import torch.nn.functional as F
from torch import nn


class SamePadConv2d(nn.Conv2d):
    def forward(self, x):
        ih, iw = x.shape[-2:]
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        ph = max((math.ceil(ih / sh) - 1) * sh + (kh - 1) * dh + 1 - ih, 0)
        pw = max((math.ceil(iw / sw) - 1) * sw + (kw - 1) * dw + 1 - iw, 0)
        if ph > 0 or pw > 0:
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)
'''

TF_PORT = '''"""The demo classifier as a TF port: its stride-1 3x3 convolutions pad "SAME" at run time."""

from fashion_cnn import FashionCNN
from same_pad import SamePadConv2d
from torch import nn


class TfPortFashionCNN(FashionCNN):
    def __init__(self):
        super().__init__()
        for parent in list(self.modules()):
            for name, conv in list(parent.named_children()):
                if isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3) and conv.stride == (1, 1):
                    setattr(parent, name, SamePadConv2d(conv.in_channels, conv.out_channels, 3, 1, 0,
                                                        bias=conv.bias is not None))

    def forward(self, x):
        bs = x.size(0)
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(self.pool(x).view(bs, -1))
'''


def _png(image) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _send(server: TorchServeProcess, url: str, bodies: list[bytes], names: dict[str, int]) -> list[Answer]:
    token = server.inference_token
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda b: predict(url, b, names, timeout_s=120, token=token), bodies))


def test_a_same_padding_port_records_builds_and_serves_early_exits(tmp_path: Path) -> None:
    require_torchserve()
    src, store, logs = tmp_path / "src", tmp_path / "store", tmp_path / "logs"
    src.mkdir()
    store.mkdir()
    (src / "same_pad.py").write_text(SAME_PAD)
    (src / "tf_port.py").write_text(TF_PORT)
    shutil.copy(EXAMPLE / "fashion_cnn.py", src / "fashion_cnn.py")
    plain = archive_classifier(
        model_name=MODEL,
        version="1.0",
        model_file=src / "tf_port.py",
        weights=EXAMPLE / "fashion_cnn.pt",
        handler=EXAMPLE / "fashion_handler.py",
        output=store / "tfport.mar",
        extra_files=[src / "fashion_cnn.py", src / "same_pad.py", EXAMPLE / "index_to_name.json"],
        config={"batchSize": 8, "maxBatchDelay": 20, "minWorkers": 1, "maxWorkers": 1},
    )
    images, _ = load_fashion_mnist("test")
    pngs = [_png(image) for image in images[: TRAFFIC + UNSEEN]]
    rec = wrap_for_recording(plain, store / "tfport_rec.mar", handler_config=HandlerConfig(log_dir=str(logs)),
                             sample=pngs[0])  # fmt: skip
    names = {v: int(k) for k, v in json.loads((EXAMPLE / "index_to_name.json").read_text()).items()}

    with TorchServeProcess(store, workdir=tmp_path / "ts", env={"OMP_NUM_THREADS": "1"}) as server:
        client = server.client(timeout_s=120)
        base = f"{server.inference_url}/predictions/{MODEL}"
        for mar in (plain, rec):
            client.register(mar.name, MODEL if mar is rec else f"{MODEL}_plain", initial_workers=1, batch_size=8,
                            max_batch_delay_ms=20)  # fmt: skip
        client.wait_ready(MODEL, "1.0", timeout_s=60)
        client.wait_ready(f"{MODEL}_plain", "1.0", timeout_s=60)
        recorded = _send(server, f"{base}/1.0", pngs[:TRAFFIC], names)
        assert [a.status for a in recorded] == [200] * TRAFFIC
        assert read_logs(logs).num_rows == TRAFFIC

        config = BuildConfig(tolerance=0.01, trials=1, train=TrainConfig(epochs=8, patience=2, num_threads=1))
        built = build_cached_archive(
            BuildRequest(mar=rec, logs=logs, output=store / "tfport_cached.mar", config=config, version="1.0-c",
                         log_dir=logs),
        )  # fmt: skip
        assert "SamePadConv2d" in built.report["leaf_modules"], built.report["leaf_modules"]
        assert built.spec.exits and built.report["promise"]["passed"], built.report["promise"]

        client.register(built.output.name, MODEL, initial_workers=1, batch_size=8, max_batch_delay_ms=20)
        client.wait_ready(MODEL, "1.0-c", timeout_s=60)
        unseen = pngs[TRAFFIC:]
        original = _send(server, f"{server.inference_url}/predictions/{MODEL}_plain/1.0", unseen, names)
        cached = _send(server, f"{base}/1.0-c", unseen, names)
    assert [a.status for a in original + cached] == [200] * (2 * UNSEEN)
    wrong = sum(a.predicted != b.predicted for a, b in zip(original, cached, strict=True))
    agreement = 1 - wrong / UNSEEN
    early = sum(a.exit != BACKBONE for a in cached)
    logger.info("SAME-padding port: agreement %.4f, %d of %d unseen requests answered early, FLOPs %.3fx",
                agreement, early, UNSEEN, built.report["flops_ratio"])  # fmt: skip
    # The build promised disagreement <= tolerance on traffic like the log's; 600 unseen requests measure it with
    # binomial noise (7 of 600 = 1.17% happened in CI on a cache within its promise). The promise is broken only
    # when the unseen requests show, at 99.9% confidence, a rate above the tolerance (16 or more of 600 here).
    assert clopper_pearson_lower(wrong, UNSEEN, delta=0.001) <= config.tolerance, (wrong, UNSEEN)
    assert early > 0, [a.exit for a in cached[:20]]
