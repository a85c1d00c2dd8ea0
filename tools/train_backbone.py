"""Train a benchmark backbone on Fashion-MNIST (a second workload for ``tools/bench.py``), seeded, on CPU or GPU.

The inputs are the benchmark ResNet-18's: 28x28 grayscale resized to 32x32 (bilinear), normalised with
(0.2860, 0.3530), repeated to three channels, exactly what ``examples/resnet18_fmnist/fmnist_resnet_handler.py``
serves. Writes the model's ``state_dict``; ``tools/bench.py --workload`` archives it with that handler.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from layercache.cli import progress, setup_logging  # noqa: E402
from layercache.datasets import load_fashion_mnist  # noqa: E402

logger = logging.getLogger("train_backbone")
ROOT = Path(__file__).resolve().parents[1]
MEAN, STD = 0.2860, 0.3530
#: architecture -> (model file, class name)
ARCHS = {"mobilenet_v2": (ROOT / "examples" / "mobilenet_v2_fmnist" / "mobilenet_v2_fmnist.py", "MobileNetV2FMNIST")}

EPILOG = """examples:
  python tools/train_backbone.py --arch mobilenet_v2 -o bench-out/mobilenet_v2/backbone.pt
  python tools/train_backbone.py --arch mobilenet_v2 -o /tmp/m.pt --samples 2000 --epochs 1 --device cpu
"""


def to_input(images: np.ndarray) -> torch.Tensor:
    """uint8 ``(N, 28, 28)`` -> float ``(N, 3, 32, 32)``, the benchmark handler's preprocessing, batched."""
    t = torch.tensor(images, dtype=torch.float32).div(255).unsqueeze(1)
    t = F.interpolate(t, size=(32, 32), mode="bilinear", align_corners=False)
    return ((t - MEAN) / STD).expand(-1, 3, -1, -1).contiguous()


def load_model(arch: str) -> torch.nn.Module:
    """A fresh model of ``arch`` from its example model file."""
    from layercache.entry import tool_module

    if arch not in ARCHS:
        raise SystemExit(f"unknown --arch {arch!r}; choose from {sorted(ARCHS)}")
    path, cls = ARCHS[arch]
    return tool_module("tools/bench_device.py").load_model_class(path, cls)()


def fit(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    seed: int,
    batch: int = 128,
    lr: float = 3e-3,
    device: str = "cpu",
) -> torch.nn.Module:
    """AdamW + one-cycle schedule, random horizontal flips per batch; seeded. Returns the model in eval mode."""
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(x) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in progress(range(epochs), "epochs"):
        perm = torch.randperm(len(x), generator=gen)
        for s in range(0, len(x), batch):
            i = perm[s : s + batch]
            xb = x[i]
            if torch.rand(1, generator=gen).item() < 0.5:
                xb = xb.flip(3)
            loss = F.cross_entropy(model(xb.to(device)), y[i].to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.inference_mode()
def accuracy(model: torch.nn.Module, x: torch.Tensor, labels: np.ndarray, device: str = "cpu") -> float:
    pred = torch.cat([model(x[i : i + 500].to(device)).argmax(1).cpu() for i in range(0, len(x), 500)])
    return float((pred.numpy() == labels).mean())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train_backbone.py",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--arch", default="mobilenet_v2", help=f"one of {sorted(ARCHS)} (default: mobilenet_v2)")
    p.add_argument("-o", "--output", type=Path, required=True, help="state_dict file to write")
    p.add_argument("--samples", type=int, default=60000, help="training images used (default: all 60000)")
    p.add_argument("--epochs", type=int, default=2, help="training epochs (default: 2)")
    p.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--force", action="store_true", help="overwrite the output (default: refuse)")
    p.add_argument("--quiet", action="store_true", help="warnings only (default: off)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.quiet)
    if args.output.exists() and not args.force:
        parser.error(f"{args.output} exists; pass --force to overwrite it")
    if args.samples < 1 or args.epochs < 1:
        parser.error(f"--samples and --epochs must be >= 1, got {args.samples} and {args.epochs}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    model = load_model(args.arch)
    images, labels = load_fashion_mnist("train")
    x, y = to_input(images[: args.samples]), torch.from_numpy(labels[: args.samples].astype(np.int64))
    t0 = time.perf_counter()
    fit(model, x, y, args.epochs, args.seed, device=device)
    test_images, test_labels = load_fashion_mnist("test")
    acc = accuracy(model, to_input(test_images), test_labels, device)
    logger.info(
        "%s trained in %.0f s on %s; top-1 on the 10,000 test images: %.2f%%",
        args.arch,
        time.perf_counter() - t0,
        device,
        100 * acc,
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, args.output)
    logger.info("wrote %s", args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
