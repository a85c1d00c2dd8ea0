"""layercache on other torchvision architectures (random seeded weights, 3x32x32 inputs).

Three architectures run the whole user path with the real tools (archive -> wrap_mar -> record -> build_cache ->
serve the cached archive offline). The heavier ones (tens of MB of weights, which every archive step would zip
and unzip again) take the library path instead: candidates and a build on logged-style traffic, then the built
cache runs. Random weights predict nearly one class, so heads may be discarded as "no better than chance": these
tests require a working pipeline and candidates named by fx node names, not exits.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F
from torchvision.models.feature_extraction import get_graph_node_names

from layercache.archive import archive_classifier
from layercache.build import BuildConfig, build_cache
from layercache.config import CACHE_SPEC_FILE, EXIT_HEADER, CacheSpec
from layercache.datasets import load_fashion_mnist, write_image_folder
from layercache.offline import open_mar, run_offline
from layercache.runtime import CachedModel, heads_state_dict, weights_fingerprint
from layercache.trafficlog import act_nodes_of, encode_batch, make_schema, read_logs
from layercache.training import TrainConfig
from tests.helpers import tool

ROOT = Path(__file__).resolve().parents[2]
IMAGES = 64
SERVED = 16
VIT = (
    "torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, "
    "hidden_dim=32, mlp_dim=64, num_classes=10)"
)
# Whole tool chain: light weights.
CHAIN = {
    "mobilenet_v2": "torchvision.models.mobilenet_v2(num_classes=10)",
    "efficientnet_b0": "torchvision.models.efficientnet_b0(num_classes=10)",
    "vit_tiny": VIT,
}
# Library path: weights too large to zip three times in a unit test.
LIBRARY = {
    "resnet50": "torchvision.models.resnet50(num_classes=10)",
    "densenet121": "torchvision.models.densenet121(num_classes=10)",
    "convnext_tiny": "torchvision.models.convnext_tiny(num_classes=10)",
    "regnet_x_400mf": "torchvision.models.regnet_x_400mf(num_classes=10)",
}

MODEL = '''"""{arch} for layercache tests: one class, as TorchServe's model loader requires."""

import torch
import torchvision


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = {builder}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
'''

HANDLER = '''"""Any image -> 3x32x32 tensor in [0, 1]."""

from torchvision import transforms
from ts.torch_handler.image_classifier import ImageClassifier


class PngHandler(ImageClassifier):
    topk = 3
    image_processing = transforms.Compose(
        [transforms.Grayscale(3), transforms.Resize((32, 32)), transforms.ToTensor()]
    )
'''


def write_model(arch: str, builder: str, out: Path) -> tuple[Path, torch.nn.Module]:
    """The model file (module name unique per architecture) and an instance of its class."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"net_{arch}.py"
    path.write_text(MODEL.format(arch=arch, builder=builder))
    spec = importlib.util.spec_from_file_location(f"_layercache_test_net_{arch}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return path, module.Net().eval()


def fx_names(model: torch.nn.Module) -> set[str]:
    return set(get_graph_node_names(model)[1])  # eval-mode names, torchvision's feature_extraction scheme


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("images")
    pixels, labels = load_fashion_mnist("test")
    write_image_folder(pixels[:IMAGES], labels[:IMAGES], out)
    return out


@pytest.mark.parametrize("arch", list(CHAIN))
def test_tool_chain(arch: str, images: Path, tmp_path: Path) -> None:
    model_file, model = write_model(arch, CHAIN[arch], tmp_path / "src")
    weights = tmp_path / "src" / "weights.pt"
    torch.save(model.state_dict(), weights)
    handler = tmp_path / "src" / "png_handler.py"
    handler.write_text(HANDLER)
    mar = archive_classifier(
        model_name=arch,
        version="1.0",
        model_file=model_file,
        weights=weights,
        handler=handler,
        output=tmp_path / f"{arch}.mar",
    )
    rec, cached, logs, report_dir = (
        tmp_path / "rec.mar",
        tmp_path / "cached.mar",
        tmp_path / "logs",
        tmp_path / "report",
    )
    assert tool("archiver/wrap_mar.py")([str(mar), "-o", str(rec), "--input-shape", "3,32,32", "--quiet"]) == 0
    assert (
        tool("tools/record.py")(
            ["--mar", str(rec), "--images", str(images), "--log-dir", str(logs), "--batch-size", "32", "--quiet"]
        )
        == 0
    )
    assert (
        tool("tools/build_cache.py")(
            [
                "--mar",
                str(rec),
                "--logs",
                str(logs),
                "-o",
                str(cached),
                "--report",
                str(report_dir),
                "--trials",
                "1",
                "--epochs",
                "2",
                "--quiet",
            ]
        )
        == 0
    )

    table = read_logs(logs)
    assert table.num_rows == IMAGES
    assert table.column("input_shape").to_pylist()[0] == [3, 32, 32]
    report = json.loads((report_dir / "report.json").read_text())
    nodes = [c["node"] for c in report["candidates"]]
    assert nodes, f"no candidate layer found in {arch}"
    # The recording handler and the build find the same candidates, named as torchvision names fx nodes.
    assert nodes == act_nodes_of(table.schema)
    assert set(nodes) <= fx_names(model)
    assert all(n.startswith("net.") for n in nodes)
    assert all((c["head"] is None) == (c["discarded"] is not None) for c in report["candidates"])
    assert report["mean_flops_cached"] <= report["mean_flops_original"]

    served = open_mar(cached, tmp_path / "served", as_served=True, handler_overrides={"log_dir": str(logs)})
    spec = CacheSpec.load(tmp_path / "served" / CACHE_SPEC_FILE)
    assert spec.candidates == tuple(nodes)
    files = sorted(images.rglob("*.png"))[:SERVED]
    answers, codes = run_offline(served, [{"data": f.read_bytes()} for f in files])
    assert codes == [200] * SERVED
    assert all(isinstance(a, dict) and len(a) == 3 for a in answers)
    exits = {served.context.get_response_headers(i)[EXIT_HEADER] for i in range(SERVED)}
    assert exits <= {"backbone", *spec.nodes}


@pytest.mark.parametrize("arch", list(LIBRARY))
def test_library_build(arch: str, tmp_path: Path) -> None:
    _, model = write_model(arch, LIBRARY[arch], tmp_path)
    x = torch.rand(IMAGES, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        probs = F.softmax(model(x.half().float()), dim=1).numpy()  # the log stores float16 inputs
    batch = encode_batch(
        make_schema([]),
        request_ids=[str(i) for i in range(IMAGES)],
        model_name=arch,
        model_version="1.0",
        weights_fingerprint=weights_fingerprint(model),
        inputs=x.numpy(),
        probs=probs,
        exits=["backbone"] * IMAGES,
    )
    result = build_cache(model, pa.Table.from_batches([batch]), BuildConfig(trials=1, train=TrainConfig(epochs=2)))
    nodes = [c["node"] for c in result.report["candidates"]]
    assert nodes, f"no candidate layer found in {arch}"
    assert set(nodes) <= fx_names(model)
    assert result.spec.candidates == tuple(nodes)
    assert result.report["replay"]["prediction_agreement"] == 1.0
    assert result.report["mean_flops_cached"] <= result.report["mean_flops_original"]

    cached = CachedModel.from_spec(model, result.spec, heads_state_dict(result.heads))
    with torch.no_grad():
        out = cached.run(x[:SERVED])
        reference = model(x[:SERVED])
    assert out.logits.shape == (SERVED, 10)
    backbone_rows = out.exit_index == -1
    assert torch.allclose(out.logits[backbone_rows], reference[backbone_rows], atol=1e-5)
    assert np.isfinite(out.logits.numpy()).all()
