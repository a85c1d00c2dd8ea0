"""Tests for layercache.heads: specs, building, pre-pooling, search space, FLOPs."""

from __future__ import annotations

import json

import pytest
import torch

from layercache.errors import ConfigError
from layercache.heads import (
    HeadSpec,
    _analytic_flops,
    _counted_flops,
    build_head,
    head_flops,
    head_num_params,
    prepool,
    prepool_size,
    prepool_size_for,
    search_space,
)


def test_spec_id_and_json_round_trip() -> None:
    spec = HeadSpec(pool=8, convs=((64, 3, 2),), hidden=(128,))
    assert spec.id() == "p8-c64k3s2-h128"
    assert HeadSpec(pool=1).id() == "p1"
    back = HeadSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert back == spec and hash(back) == hash(spec)
    assert HeadSpec(pool=4, convs=[[32, 1, 1]], hidden=[]) == HeadSpec(4, ((32, 1, 1),), ())


def test_spec_errors() -> None:
    with pytest.raises(ConfigError, match="at most 2"):
        HeadSpec(pool=4, convs=((8, 1, 1),) * 3)
    with pytest.raises(ConfigError, match="two linear layers"):
        HeadSpec(pool=1, hidden=(8, 8))
    with pytest.raises(ConfigError, match="out_channels, kernel, stride"):
        HeadSpec(pool=4, convs=((8, 0, 1),))
    with pytest.raises(ConfigError, match=r"unknown HeadSpec keys \['depth'\]"):
        HeadSpec.from_dict({"pool": 1, "depth": 2})
    with pytest.raises(ConfigError, match="missing 'pool'"):
        HeadSpec.from_dict({"convs": []})


@pytest.mark.parametrize(
    ("native", "expected"),
    [(32, 8), (56, 8), (28, 7), (14, 7), (7, 7), (4, 4), (12, 6), (13, 1)],
)
def test_prepool_size(native: int, expected: int) -> None:
    assert prepool_size(native) == expected


def test_prepool_size_for_shapes() -> None:
    assert prepool_size_for((64, 32, 32)) == 8
    assert prepool_size_for((64, 24, 16)) == 8
    assert prepool_size_for((64, 12, 18)) == 6
    assert prepool_size_for((512,)) == 0
    assert prepool_size_for((49, 384)) == 0


def test_prepool() -> None:
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    assert prepool(x, 2).tolist() == [[[[2.5, 4.5], [10.5, 12.5]]]]
    assert prepool(x, 4) is x
    tokens = torch.randn(2, 3, 5)
    assert prepool(tokens, 2) is tokens


@pytest.mark.parametrize(
    ("spec", "in_shape"),
    [
        (HeadSpec(pool=4, convs=((32, 3, 2), (64, 1, 1)), hidden=(128,)), (16, 32, 32)),
        (HeadSpec(pool=1), (16, 8, 8)),
        (HeadSpec(pool=0, hidden=(64,)), (49, 32)),
        (HeadSpec(pool=0), (256,)),
    ],
)
def test_build_head_shapes(spec: HeadSpec, in_shape: tuple[int, ...]) -> None:
    head = build_head(spec, in_shape, 10).eval()
    assert head(torch.randn(3, *in_shape)).shape == (3, 10)


def test_build_head_rejects_pooling_non_maps() -> None:
    with pytest.raises(ConfigError, match=r"needs a \(C, H, W\) input"):
        build_head(HeadSpec(pool=2), (64,), 10)
    with pytest.raises(ConfigError, match="per-sample"):
        build_head(HeadSpec(pool=2), (1, 3, 8, 8), 10)


def _randomise_bn(head: torch.nn.Module) -> None:
    gen = torch.Generator().manual_seed(1)
    for m in head.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen))
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)


@pytest.mark.parametrize("in_shape", [(8, 32, 32), (8, 14, 14), (8, 24, 16), (8, 4, 4)])
def test_native_and_prepooled_inputs_agree(in_shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    x = torch.randn(4, *in_shape)
    pooled = prepool(x, prepool_size_for(in_shape))
    for spec in search_space(in_shape, 10)[::7]:
        head = build_head(spec, in_shape, 10).eval()
        _randomise_bn(head)
        with torch.no_grad():
            assert torch.allclose(head(x), head(pooled), atol=1e-5), spec.id()


def test_search_space_rules() -> None:
    for in_shape in [(64, 32, 32), (512, 4, 4), (16, 7, 7), (24, 12, 18)]:
        size = prepool_size_for(in_shape)
        space = search_space(in_shape, 10)
        assert len(space) == len(set(space))
        assert space == search_space(in_shape, 10)
        assert space[0] == HeadSpec(pool=1)
        assert HeadSpec(pool=1, hidden=(128,)) in space
        for spec in space:
            assert len(spec.convs) <= 2 and len(spec.hidden) <= 1
            assert spec.pool >= 1 and size % spec.pool == 0
            assert spec.convs or spec.pool == 1
        flops = [_analytic_flops(s, in_shape, 10) for s in space]
        assert flops == sorted(flops)
    space = search_space((64, 32, 32), 10)
    assert {k for s in space for _, k, _ in s.convs} == {1, 3}
    assert {st for s in space for _, _, st in s.convs} == {1, 2}
    assert {w for s in space for w, _, _ in s.convs} == {32, 64, 128}
    assert any(len(s.convs) == 2 for s in space)
    assert {w for s in search_space((16, 8, 8), 10) for w, _, _ in s.convs} == {32}
    vector = search_space((512,), 10)
    assert [s.id() for s in vector] == ["p0", "p0-h64", "p0-h128", "p0-h256"]
    assert [s.id() for s in search_space((49, 16), 10)] == ["p0", "p0-h64"]


def test_head_flops_by_hand() -> None:
    # pool read 64*8*8 + final 1x1 pool 64 + linear 2*64*10
    assert head_flops(HeadSpec(pool=1), (64, 8, 8), 10) == 4096 + 64 + 1280
    # token mean 49*32 + linear 2*32*64 + 2*64*10
    assert head_flops(HeadSpec(pool=0, hidden=(64,)), (49, 32), 10) == 1568 + 4096 + 1280
    # pool read 16*8*8, conv 2*16*32*9*2*2, final pool 32*2*2, linear 2*32*10
    spec = HeadSpec(pool=4, convs=((32, 3, 2),))
    assert head_flops(spec, (16, 8, 8), 10) == 1024 + 36864 + 128 + 640


def test_head_flops_positive_and_grow_with_width() -> None:
    in_shape = (32, 16, 16)
    widths = [head_flops(HeadSpec(pool=8, convs=((w, 3, 1),), hidden=(128,)), in_shape, 10) for w in (32, 64, 128)]
    assert 0 < widths[0] < widths[1] < widths[2]
    assert head_flops(HeadSpec(1, (), (256,)), in_shape, 10) > head_flops(HeadSpec(1), in_shape, 10)


def test_head_flops_is_what_the_flop_counter_counts() -> None:
    """head_flops is a closed form (the build costs every head of a search space with it); FlopCounterMode on the
    built head, plus the pooling reads it ignores, is the reference."""
    for in_shape in [(16, 12, 12), (32, 7, 7), (8, 24, 16), (64, 32, 32)]:
        space = search_space(in_shape, 10)
        for spec in space[:: max(1, len(space) // 40)]:
            assert head_flops(spec, in_shape, 10) == _counted_flops(spec, in_shape, 10), (in_shape, spec.id())
    for spec, in_shape in [(HeadSpec(0, (), (64,)), (256,)), (HeadSpec(0, (), (64,)), (49, 32))]:
        assert head_flops(spec, in_shape, 10) == _counted_flops(spec, in_shape, 10)


def test_head_num_params() -> None:
    assert head_num_params(build_head(HeadSpec(pool=1), (64, 8, 8), 10)) == 650
    # conv 16*32*9 (no bias) + BN 2*32 + linear 33*10
    spec = HeadSpec(pool=4, convs=((32, 3, 1),))
    assert head_num_params(build_head(spec, (16, 8, 8), 10)) == 4608 + 64 + 330
