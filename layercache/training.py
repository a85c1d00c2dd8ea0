"""Train one cache head by KL distillation of the backbone's output distribution.

The head learns ``B(i)`` (the backbone's probabilities) from ``B_L(i)`` (the activation at its
node), paper section 4.2.2 / Eq. 1: no ground-truth labels are used. Inputs are precomputed
activations, so the backbone and the other heads cannot be modified here; only ``head`` is.

Example::

    result = train_head(build_head(spec, (64, 8, 8), 10), x_tr, p_tr, x_va, p_va)
    result.val_agreement  # agreement with the backbone on the validation split
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from layercache.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["TrainConfig", "TrainResult", "Trainer", "predict_logits", "train_head"]


@dataclass(frozen=True)
class TrainConfig:
    """Settings of :func:`train_head`.

    Attributes:
        epochs: Maximum passes over the training split.
        batch_size: Rows per optimiser step.
        lr: Peak AdamW learning rate (cosine-annealed over ``epochs``).
        weight_decay: AdamW weight decay.
        patience: Stop after this many epochs without a lower validation KL.
        seed: Seeds the head's initialisation and the shuffling.
        reinit: Re-initialise the head's parameters from ``seed`` before training, so the
            result depends only on the inputs and the seed, not on how the head was built.
        num_threads: If set, torch's intra-op thread count while training (restored after).
            Small heads train much faster with 1 thread, above all on a busy machine, where
            idle-spinning worker threads slow tiny ops down by an order of magnitude.
    """

    epochs: int = 30
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 1e-4
    patience: int = 4
    seed: int = 0
    reinit: bool = True
    num_threads: int | None = None

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"TrainConfig.epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"TrainConfig.batch_size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise ConfigError(f"TrainConfig.lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"TrainConfig.weight_decay must be >= 0, got {self.weight_decay}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ConfigError(f"TrainConfig.num_threads must be >= 1 or None, got {self.num_threads}")
        if self.patience < 1:
            raise ConfigError(f"TrainConfig.patience must be >= 1, got {self.patience}")


@dataclass(frozen=True)
class TrainResult:
    """Outcome of :func:`train_head`.

    Attributes:
        state_dict: The best (lowest validation KL) weights, detached clones.
        val_kl: Validation KL divergence (batchmean, nats) of those weights.
        val_agreement: Fraction of validation rows whose head argmax equals the backbone's.
        epochs_run: Epochs actually trained (fewer than ``epochs`` after early stopping).
    """

    state_dict: dict[str, Tensor]
    val_kl: float
    val_agreement: float
    epochs_run: int


def predict_logits(head: nn.Module, x: Tensor, batch_size: int = 1024) -> Tensor:
    """Logits of ``head`` on ``x`` in eval mode without gradients, ``batch_size`` rows at a time.

    The head is left in eval mode. Inputs are moved to the head's device and computed in
    float32; the logits stay on that device.
    """
    head.eval()
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    device = _device(head)
    with torch.no_grad():
        if x.shape[0] == 0:
            return head(x.to(device).float())
        return torch.cat(
            [head(x[start : start + batch_size].to(device).float()) for start in range(0, x.shape[0], batch_size)]
        )


def _device(head: nn.Module) -> torch.device:
    param = next(head.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _validate(x: Tensor, p: Tensor, split: str) -> None:
    if x.shape[0] == 0:
        raise ConfigError(f"the {split} split is empty; log more traffic or lower the split fraction")
    if p.dim() != 2 or p.shape[0] != x.shape[0]:
        raise ConfigError(
            f"{split} targets have shape {tuple(p.shape)}; expected ({x.shape[0]}, num_classes) "
            f"to match {split} inputs of shape {tuple(x.shape)}"
        )


def _reinit(head: nn.Module) -> None:
    for module in head.modules():
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()


def _val_metrics(head: nn.Module, x: Tensor, p: Tensor) -> tuple[float, float]:
    logits = predict_logits(head, x)
    kl = F.kl_div(F.log_softmax(logits, 1), p, reduction="batchmean").item()
    agreement = (logits.argmax(1) == p.argmax(1)).float().mean().item()
    return kl, agreement


class Trainer:
    """KL distillation of one head that can be run a few epochs at a time (successive halving stops the weak ones
    early), with the same result as one :func:`train_head` call for the same total epochs.

    Binds the head, the data and the settings; :meth:`run` trains up to a number of epochs (early stopping on
    validation KL with ``config.patience``), :meth:`finish` restores the best weights. The cosine schedule spans
    ``config.epochs`` however the epochs are split into runs.
    """

    def __init__(
        self, head: nn.Module, x_train: Tensor, p_train: Tensor, x_val: Tensor, p_val: Tensor, config: TrainConfig
    ) -> None:
        _validate(x_train, p_train, "training")
        _validate(x_val, p_val, "validation")
        device = _device(head)
        self.head, self.config = head, config
        # Inputs keep their dtype (float16 activations stay half the size); each mini-batch becomes float32.
        self.x_train, self.p_train = x_train.to(device), p_train.to(device).float()
        self.x_val, self.p_val = x_val.to(device), p_val.to(device).float()
        if config.reinit:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed)
                _reinit(head)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.optimizer = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=config.epochs)
        n = self.x_train.shape[0]
        # A last batch of one row would break BatchNorm in train mode; fold it into the previous one.
        self.starts = list(range(0, n, config.batch_size))
        if len(self.starts) > 1 and n - self.starts[-1] < 2:
            self.starts.pop()
        self.best_kl, self.best_agreement = math.inf, 0.0
        self.best_state: dict[str, Tensor] | None = None
        self.stale = 0
        self.epochs_run = 0
        self.stopped = False

    def run(self, until: int) -> None:
        """Train until ``until`` epochs in all (at most ``config.epochs``), or until early stopping."""
        head, config = self.head, self.config
        n = self.x_train.shape[0]
        while not self.stopped and self.epochs_run < min(until, config.epochs):
            head.train()
            order = torch.randperm(n, generator=self.generator).to(self.x_train.device)
            # One gather per epoch, then contiguous slices: cheaper than a fancy-index gather per step.
            xs, ps = self.x_train[order], self.p_train[order]
            for i, start in enumerate(self.starts):
                stop = self.starts[i + 1] if i + 1 < len(self.starts) else n
                logits = head(xs[start:stop].float())
                loss = F.kl_div(F.log_softmax(logits, 1), ps[start:stop], reduction="batchmean")
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
            self.scheduler.step()
            self.epochs_run += 1
            val_kl, val_agreement = _val_metrics(head, self.x_val, self.p_val)
            logger.debug("epoch %d: val KL %.5f, agreement %.4f", self.epochs_run, val_kl, val_agreement)
            if val_kl < self.best_kl or self.best_state is None:
                self.best_kl, self.best_agreement, self.stale = val_kl, val_agreement, 0
                self.best_state = {k: v.detach().clone() for k, v in head.state_dict().items()}
            else:
                self.stale += 1
                self.stopped = self.stale >= config.patience
        head.eval()

    def finish(self) -> TrainResult:
        """Restore the best (lowest validation KL) weights, leave the head in eval mode, and say how it went."""
        if self.best_state is None:
            self.run(1)
        assert self.best_state is not None  # at least one epoch has run
        self.head.load_state_dict(self.best_state)
        self.head.eval()
        logger.info(
            "trained head: %d epochs, val KL %.4f, val agreement %.4f",
            self.epochs_run,
            self.best_kl,
            self.best_agreement,
        )
        return TrainResult(
            state_dict={k: v.clone() for k, v in self.best_state.items()},
            val_kl=float(self.best_kl),
            val_agreement=float(self.best_agreement),
            epochs_run=self.epochs_run,
        )


def train_head(
    head: nn.Module,
    x_train: Tensor,
    p_train: Tensor,
    x_val: Tensor,
    p_val: Tensor,
    config: TrainConfig = TrainConfig(),
) -> TrainResult:
    """Distil the backbone's distribution into ``head`` with a KL loss, in place.

    Loss: ``kl_div(log_softmax(head(x)), p, reduction="batchmean")``; AdamW with a per-epoch
    cosine learning-rate schedule; early stopping on validation KL with ``config.patience``;
    the best weights are restored and the head is left in eval mode. With the same inputs and
    config the resulting ``state_dict`` is bitwise identical (initialisation under
    ``torch.manual_seed(config.seed)`` inside a forked RNG, so the global RNG is untouched;
    shuffling with a seeded ``torch.Generator``).

    Args:
        head: A module mapping activations to logits (e.g. from ``build_head``).
        x_train: Training activations, ``(N, *in_shape)``; float16 stays float16 in memory and each
            mini-batch is converted to float32; all tensors are moved to the head's device.
        p_train: Backbone probabilities, ``(N, num_classes)``, rows summing to 1.
        x_val: Validation activations.
        p_val: Validation probabilities.
        config: Training settings.

    Returns:
        The best weights and their validation KL and agreement.

    Raises:
        ConfigError: on empty splits or mismatched shapes.
    """
    threads = torch.get_num_threads()
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    try:
        trainer = Trainer(head, x_train, p_train, x_val, p_val, config)
        trainer.run(config.epochs)
        return trainer.finish()
    finally:
        torch.set_num_threads(threads)
