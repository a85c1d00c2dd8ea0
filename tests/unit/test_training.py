"""Tests for layercache.training: KL distillation of a head, determinism, early stopping."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from layercache.errors import ConfigError
from layercache.heads import HeadSpec, build_head
from layercache.training import TrainConfig, predict_logits, train_head

IN_SHAPE = (8, 4, 4)


def _problem(n: int = 800, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations whose channel means decide a 4-class 'backbone' distribution."""
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(n, IN_SHAPE[0], generator=gen)
    x = means[:, :, None, None] + 0.5 * torch.randn(n, *IN_SHAPE, generator=gen)
    w = torch.randn(IN_SHAPE[0], 4, generator=gen)
    p = torch.softmax(x.mean((2, 3)) @ w, dim=1)
    return x, p


def _split(x: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return x[:600], p[:600], x[600:], p[600:]


def test_train_head_learns_the_backbone() -> None:
    x, p = _problem()
    head = build_head(HeadSpec(pool=1), IN_SHAPE, 4)
    x_tr, p_tr, x_va, p_va = _split(x, p)
    before = F.kl_div(F.log_softmax(predict_logits(head, x_va), 1), p_va, reduction="batchmean")
    result = train_head(head, x_tr, p_tr, x_va, p_va, TrainConfig(epochs=20, batch_size=32, lr=1e-2))
    assert result.val_agreement > 0.9
    assert result.val_kl < 0.5 * before.item()
    assert not head.training
    logits = predict_logits(head, x_va)
    kl = F.kl_div(F.log_softmax(logits, 1), p_va, reduction="batchmean").item()
    assert kl == pytest.approx(result.val_kl, rel=1e-5)  # the best weights are the head's
    agreement = (logits.argmax(1) == p_va.argmax(1)).float().mean().item()
    assert agreement == pytest.approx(result.val_agreement)


def test_train_head_is_deterministic_and_keeps_global_rng() -> None:
    x, p = _problem(seed=1)
    spec = HeadSpec(pool=4, convs=((8, 3, 2),), hidden=(16,))
    config = TrainConfig(epochs=3, batch_size=50, seed=7)
    torch.manual_seed(123)
    head = build_head(spec, IN_SHAPE, 4)
    rng_before = torch.get_rng_state()
    first = train_head(head, *_split(x, p), config)
    assert torch.equal(torch.get_rng_state(), rng_before)
    torch.manual_seed(999)  # a different init outside must not matter
    second = train_head(build_head(spec, IN_SHAPE, 4), *_split(x, p), config)
    assert first.state_dict.keys() == second.state_dict.keys()
    for key, value in first.state_dict.items():
        assert torch.equal(value, second.state_dict[key]), key
    assert first.val_kl == second.val_kl and first.epochs_run == second.epochs_run
    other = train_head(build_head(spec, IN_SHAPE, 4), *_split(x, p), TrainConfig(epochs=3, seed=8))
    assert not torch.equal(other.state_dict["1.weight"], first.state_dict["1.weight"])


def test_train_head_early_stopping_restores_best() -> None:
    x, p = _problem(n=700, seed=2)
    # Validation targets unrelated to the inputs: val KL stops improving early.
    gen = torch.Generator().manual_seed(3)
    p_va = torch.softmax(torch.randn(100, 4, generator=gen) * 3, 1)
    head = build_head(HeadSpec(pool=1, hidden=(32,)), IN_SHAPE, 4)
    result = train_head(head, x[:600], p[:600], x[600:], p_va, TrainConfig(epochs=30, patience=2))
    assert result.epochs_run < 30
    kl = F.kl_div(F.log_softmax(predict_logits(head, x[600:]), 1), p_va, reduction="batchmean")
    assert kl.item() == pytest.approx(result.val_kl, rel=1e-5)


def test_train_head_accepts_half_precision_and_odd_batches() -> None:
    x, p = _problem(n=701)
    head = build_head(HeadSpec(pool=2, convs=((8, 1, 1),)), IN_SHAPE, 4)
    # 601 training rows with batch 100: the single leftover row joins the last batch (BatchNorm).
    result = train_head(
        head,
        x[:601].half(),
        p[:601],
        x[601:].half(),
        p[601:],
        TrainConfig(epochs=2, batch_size=100),
    )
    assert result.epochs_run == 2


def test_predict_logits_batches() -> None:
    x, _ = _problem(n=50)
    head = build_head(HeadSpec(pool=1, hidden=(16,)), IN_SHAPE, 4)
    assert torch.allclose(predict_logits(head, x, batch_size=7), predict_logits(head, x), atol=1e-6)
    assert predict_logits(head, x[:0]).shape == (0, 4)


def test_train_head_errors() -> None:
    x, p = _problem(n=100)
    head = build_head(HeadSpec(pool=1), IN_SHAPE, 4)
    with pytest.raises(ConfigError, match="validation split is empty"):
        train_head(head, x, p, x[:0], p[:0])
    with pytest.raises(ConfigError, match="training targets have shape"):
        train_head(head, x, p[:10], x, p)
    with pytest.raises(ConfigError, match="epochs"):
        TrainConfig(epochs=0)
    with pytest.raises(ConfigError, match="num_threads"):
        TrainConfig(num_threads=0)


def test_train_head_num_threads_is_restored() -> None:
    x, p = _problem(n=700)
    torch.set_num_threads(2)
    head = build_head(HeadSpec(pool=1), IN_SHAPE, 4)
    result = train_head(head, *_split(x, p), TrainConfig(epochs=1, num_threads=1))
    assert result.epochs_run == 1
    assert torch.get_num_threads() == 2
