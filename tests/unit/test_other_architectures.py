"""layercache on other torchvision architectures (seeded weights, 3x32x32 inputs).

Three architectures run the whole user path with the real tools (archive -> wrap_mar -> record -> build_cache ->
serve the cached archive offline) on random weights and Fashion-MNIST images: that path must work and name its
candidates by fx node names (random weights predict nearly one class, so their heads may be discarded).

The library path proves early exits: each architecture gets an answer that carries signal cheaply. Synthetic
images whose class is their colour go through the random-weight backbone, and only its final linear layer is fit
(ridge regression on the frozen features it reads); the backbone then answers the colour, which the pooled
activations of early layers show too. A build on those answers must keep exits, and the served cache must answer
most held-out rows early and agree with the backbone. (With random weights and unit batch-norm variances the
activations of deep layers shrink, by 1e-10 in MobileNet, so the heads that learn the answer are mostly the
first candidates'; ConvNeXt and ViT, with layer norms, keep theirs.)
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

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
# Library path, with signal: every architecture must keep exits.
LIBRARY = {
    "resnet50": "torchvision.models.resnet50(num_classes=10)",
    "convnext_tiny": "torchvision.models.convnext_tiny(num_classes=10)",
    "mobilenet_v2": "torchvision.models.mobilenet_v2(num_classes=10)",
    "efficientnet_b0": "torchvision.models.efficientnet_b0(num_classes=10)",
    "vit_tiny": VIT,
    "densenet121": "torchvision.models.densenet121(num_classes=10)",
    "regnet_x_400mf": "torchvision.models.regnet_x_400mf(num_classes=10)",
}
ROWS = 160
HELD_OUT = 64
#: Class = colour (RGB); pixel noise on top.
COLOURS = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.8, 0.2], [0.15, 0.2, 0.9], [0.9, 0.85, 0.1]])
# Pooled-linear heads only (max_spatial=1): the search space of an 8x8 map is 446 heads whose FLOPs are counted
# one by one, seconds per candidate; these tests are about exits on each architecture, not the head search.
LIBRARY_CONFIG = BuildConfig(
    tolerance=0.15, trials=1, max_candidates=4, max_spatial=1,
    train=TrainConfig(epochs=20, batch_size=32, lr=0.05, seed=0),
)  # fmt: skip

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
    assert (
        tool("archiver/wrap_mar.py")([str(mar), "-o", str(rec), "--input-shape", "3,32,32", "--activations", "--quiet"])
        == 0
    )
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


def colour_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images whose class is their colour, as the log stores them (float16 values), and the classes."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, len(COLOURS), (n,), generator=g)
    x = COLOURS[labels][:, :, None, None] + 0.1 * torch.randn(n, 3, 32, 32, generator=g)
    return x.clamp(0, 1).half().float(), labels


@torch.no_grad()
def fit_classifier(model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Fit the model's last linear layer to ``labels`` (ridge regression on the standardized features it reads,
    targets +-4), the rest keeping its random weights; returns the model's logits on ``x``.

    The features are tiny in some models (random weights with unit batch-norm variances shrink MobileNet's by
    1e-10) but still carry the colour; hence the relative epsilon. Setting batch-norm statistics from the images
    instead makes the last features of MobileNet and EfficientNet fit noise (held-out agreement 0.4-0.7).
    """
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    seen: list[torch.Tensor] = []
    hook = last.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    try:
        model(x)
    finally:
        hook.remove()
    feats = seen[0]
    mean, std = feats.mean(0), feats.std(0)
    std = std + 1e-6 * std.max()
    z = torch.cat([(feats - mean) / std, torch.ones(len(feats), 1)], 1)
    target = F.one_hot(labels, last.out_features).float() * 8 - 4
    w = torch.linalg.solve(z.T @ z + torch.eye(z.shape[1]), z.T @ target)
    last.weight.copy_((w[:-1] / std[:, None]).T)
    last.bias.copy_(w[-1] - (mean / std) @ w[:-1])
    return F.linear(feats, last.weight, last.bias)


@pytest.mark.parametrize("arch", list(LIBRARY))
def test_library_build_exits_early(arch: str, tmp_path: Path) -> None:
    _, model = write_model(arch, LIBRARY[arch], tmp_path)
    x, labels = colour_images(ROWS, seed=0)
    logits = fit_classifier(model, x, labels)
    assert (logits.argmax(1) == labels).float().mean() > 0.95  # the backbone's answer carries the signal
    batch = encode_batch(
        make_schema([]),
        request_ids=[str(i) for i in range(ROWS)],
        model_name=arch,
        model_version="1.0",
        weights_fingerprint=weights_fingerprint(model),
        inputs=x.numpy(),
        probs=F.softmax(logits, dim=1).numpy(),
        exits=["backbone"] * ROWS,
    )
    result = build_cache(model, pa.Table.from_batches([batch]), LIBRARY_CONFIG)
    nodes = [c["node"] for c in result.report["candidates"]]
    assert nodes, f"no candidate layer found in {arch}"
    assert set(nodes) <= fx_names(model)
    assert result.spec.candidates == tuple(nodes)
    assert result.report["replay"]["prediction_agreement"] == 1.0
    assert result.spec.exits, (
        f"{arch}: no exit kept; candidates {[(c['node'], c['discarded']) for c in result.report['candidates']]}"
    )
    assert result.report["mean_flops_cached"] < result.report["mean_flops_original"]

    cached = CachedModel.from_spec(model, result.spec, heads_state_dict(result.heads))
    held_out, _ = colour_images(HELD_OUT, seed=1)
    with torch.no_grad():
        out = cached.run(held_out)
        reference = model(held_out)
    assert out.logits.shape == (HELD_OUT, 10)
    early = out.exit_index >= 0
    assert early.float().mean() > 0.5, f"{arch}: {int(early.sum())} of {HELD_OUT} held-out rows exited early"
    agreement = (out.logits.argmax(1) == reference.argmax(1)).float().mean().item()
    assert agreement >= 1 - LIBRARY_CONFIG.tolerance, f"{arch}: agreement {agreement:.3f} with the backbone"
    assert torch.allclose(out.logits[~early], reference[~early], atol=1e-5)
