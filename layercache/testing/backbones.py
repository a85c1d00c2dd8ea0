"""Training the example backbones and describing the machine: support for the demo and the benchmarks.

The product never trains a backbone (it learns heads from logs); the demo's classifier and the second benchmark
workload are trained here on Fashion-MNIST, seeded, on CPU or GPU.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from layercache.progress import progress

__all__ = ["accuracy", "archive_fashion_classifier", "fit", "machine", "to_input_32"]

#: Fashion-MNIST normalisation of every example model.
MEAN, STD = 0.2860, 0.3530


def to_input_32(images: np.ndarray) -> torch.Tensor:
    """uint8 ``(N, 28, 28)`` -> float ``(N, 3, 32, 32)``: the benchmark handler's preprocessing, batched
    (``examples/resnet18_fmnist/fmnist_resnet_handler.py`` does the same per image)."""
    t = torch.tensor(images, dtype=torch.float32).div(255).unsqueeze(1)
    t = F.interpolate(t, size=(32, 32), mode="bilinear", align_corners=False)
    return ((t - MEAN) / STD).expand(-1, 3, -1, -1).contiguous()


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
    """Top-1 accuracy of ``model`` on ``x`` (batches of 500)."""
    pred = torch.cat([model(x[i : i + 500].to(device)).argmax(1).cpu() for i in range(0, len(x), 500)])
    return float((pred.numpy() == labels).mean())


def machine(device: torch.device | str | None = None) -> str:
    """The machine the numbers come from: CPU model and cores, the GPU when ``device`` is CUDA, torch, Python."""
    device = torch.device(device or "cpu")
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    if device.type == "cuda":
        accel = f"GPU {torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    else:
        accel = "no GPU used" if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}, {os.cpu_count()} cores, {accel}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"Python {platform.python_version()}"
    )


def archive_fashion_classifier(
    example: Path,
    output: Path,
    *,
    weights: Path | None = None,
    name: str = "fashion",
    version: str = "1.0",
    force: bool = False,
) -> Path:
    """The demo's classifier as the plain archive a user already has: model file, state_dict, its own handler.

    Args:
        example: the example folder (``examples/fashion_cnn``: model file, weights, handler, class names).
        weights: a state_dict to archive instead of the shipped one.
    """
    from layercache.archive import archive_classifier

    return archive_classifier(
        model_name=name,
        version=version,
        model_file=example / "fashion_cnn.py",
        weights=weights or example / "fashion_cnn.pt",
        handler=example / "fashion_handler.py",
        output=output,
        extra_files=[example / "index_to_name.json"],
        config={"batchSize": 8, "maxBatchDelay": 20, "minWorkers": 1, "maxWorkers": 1},
        force=force,
    )
