"""Tests for layercache.runtime: Algorithm 1 with hand-set heads, batch shrinking, specs, recording model.

The backbone is a small conv net whose first two channels pass the two input channels through unchanged
(hand-set 3x3 kernels with a single 1 in the centre), so the pooled activation of channel ``c`` at either cut
is the mean of ``relu(input channel c)``. Head 0 answers from channel 0, head 1 from channel 1, with known
logits, so which row exits where is known exactly.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from layercache.config import CacheSpec, ExitSpec
from layercache.errors import ConfigError
from layercache.graph import split
from layercache.heads import HeadSpec, build_head
from layercache.runtime import (
    BACKBONE,
    CachedModel,
    RecordingModel,
    exit_names,
    heads_state_dict,
    pool_activation,
    weights_fingerprint,
)

NODES = ("1", "3")  # fx names of the two ReLUs of the nn.Sequential below
IN_SHAPE = (4, 6, 6)  # activation shape at both cuts
HEAD = HeadSpec(pool=1)  # AdaptiveAvgPool2d(1) twice -> Flatten -> Linear(4, 3) (module "3")
TEMPERATURES = (2.0, 1.0)
# Rows: (channel 0 value, channel 1 value) of a constant 6x6 input.
ROWS = [(-1.0, -1.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0), (0.05, 0.05)]


def _passthrough(conv: nn.Conv2d, channels: int) -> None:
    with torch.no_grad():
        for c in range(channels):
            conv.weight[c].zero_()
            conv.weight[c, c, 1, 1] = 1.0
            conv.bias[c] = 0.0


def make_backbone() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )
    _passthrough(model[0], 2)
    _passthrough(model[2], 2)
    return model.eval()


def make_heads() -> list[nn.Module]:
    """Head 0: logits ``[20 f0, 0, 0]``; head 1: ``[0, 20 f1, 0]`` (``f`` = pooled activation)."""
    heads = []
    for feature in range(2):
        head = build_head(HEAD, IN_SHAPE, 3)
        linear = head[-1]
        with torch.no_grad():
            linear.weight.zero_()
            linear.bias.zero_()
            linear.weight[feature, feature] = 20.0
        heads.append(head.eval())
    return heads


def make_inputs() -> torch.Tensor:
    x = torch.empty(len(ROWS), 2, 6, 6)
    for i, (a, b) in enumerate(ROWS):
        x[i, 0] = a
        x[i, 1] = b
    return x


def cached(thresholds: tuple[float, float] = (0.9, 0.9), *, shrink: bool = True) -> CachedModel:
    backbone = make_backbone()
    return CachedModel(split(backbone, list(NODES)), make_heads(), NODES, TEMPERATURES, thresholds, shrink=shrink)


def head_logp(logits: list[float], temperature: float) -> torch.Tensor:
    return F.log_softmax(torch.tensor([logits]) / temperature, dim=1)[0]


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return make_inputs()


@pytest.fixture(scope="module")
def reference(x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return make_backbone()(x)


def test_passthrough_backbone_is_what_the_heads_assume(x: torch.Tensor) -> None:
    first = split(make_backbone(), list(NODES))[0]
    with torch.no_grad():
        pooled = pool_activation(first(x))
    assert pooled[:, 0].tolist() == pytest.approx([0.0, 1.0, 0.0, 1.0, 0.05])
    assert pooled[:, 1].tolist() == pytest.approx([0.0, 0.0, 1.0, 1.0, 0.05])


def test_disabled_heads_give_the_backbone_exactly(x: torch.Tensor, reference: torch.Tensor) -> None:
    out = cached((math.inf, math.inf)).run(x)
    assert torch.equal(out.logits, reference)
    assert out.exit_index.tolist() == [-1] * len(ROWS)
    assert out.batch_sizes == (5, 5, 5)


def test_confident_rows_exit_at_the_right_head_in_request_order(x: torch.Tensor, reference: torch.Tensor) -> None:
    model = cached()
    with torch.no_grad():
        out = model.run(x)
    assert out.exit_index.tolist() == [-1, 0, 1, 0, -1]
    # 5 rows enter, rows 1 and 3 leave at head 0, row 2 at head 1: the batch shrinks 5 -> 3 -> 2.
    assert out.batch_sizes == (5, 3, 2)
    assert out.logits.shape == (5, 3)
    # Answered rows get the calibrated log-probabilities of their head (head 0 at temperature 2).
    assert torch.equal(out.logits[1], head_logp([20.0, 0.0, 0.0], 2.0))
    assert torch.equal(out.logits[3], head_logp([20.0, 0.0, 0.0], 2.0))
    assert torch.equal(out.logits[2], head_logp([0.0, 20.0, 0.0], 1.0))
    # Rows no head answered get the backbone's logits, computed on the shrunk batch.
    for row in (0, 4):
        assert torch.allclose(out.logits[row], reference[row], rtol=0, atol=1e-6)
        assert out.logits[row].argmax() == reference[row].argmax()
    assert out.logits[1].argmax() == 0 and out.logits[2].argmax() == 1
    assert torch.equal(model(x), out.logits)  # forward() is run().logits
    assert exit_names(model.nodes, out.exit_index) == [BACKBONE, "1", "3", "1", BACKBONE]


def test_thresholds_decide_who_exits(x: torch.Tensor) -> None:
    # Row 4's head-0 confidence is softmax([0.5, 0, 0])[0] at temperature 2.
    conf = math.exp(0.5) / (math.exp(0.5) + 2)
    out = cached((conf - 1e-4, math.inf)).run(x)
    assert out.exit_index.tolist() == [-1, 0, -1, 0, 0]
    out = cached((conf + 1e-4, math.inf)).run(x)
    assert out.exit_index.tolist() == [-1, 0, -1, 0, -1]


def test_a_disabled_first_head_lets_the_second_answer(x: torch.Tensor, reference: torch.Tensor) -> None:
    out = cached((math.inf, 0.9)).run(x)
    assert out.exit_index.tolist() == [-1, -1, 1, 1, -1]
    assert out.batch_sizes == (5, 5, 3)
    for row in (0, 1, 4):
        assert torch.allclose(out.logits[row], reference[row], rtol=0, atol=1e-6)
    assert torch.equal(out.logits[3], head_logp([0.0, 20.0, 0.0], 1.0))


@pytest.mark.parametrize("thresholds", [(0.9, 0.9), (math.inf, 0.9), (0.0, 0.9), (math.inf, math.inf)])
def test_no_shrinking_gives_the_same_answers(x: torch.Tensor, thresholds: tuple[float, float]) -> None:
    shrunk = cached(thresholds, shrink=True).run(x)
    full = cached(thresholds, shrink=False).run(x)
    assert torch.equal(full.exit_index, shrunk.exit_index)
    assert torch.allclose(full.logits, shrunk.logits, rtol=0, atol=1e-6)
    assert torch.equal(full.logits.argmax(1), shrunk.logits.argmax(1))
    assert full.batch_sizes == (5, 5, 5)  # every row runs the whole backbone


def test_every_row_exits_at_the_first_head(x: torch.Tensor) -> None:
    out = cached((0.0, 0.9)).run(x)  # any confidence reaches 0
    assert out.exit_index.tolist() == [0] * 5
    assert out.batch_sizes == (5, 0, 0)
    expected = F.log_softmax(make_heads()[0](split(make_backbone(), list(NODES))[0](x)) / 2.0, dim=1)
    assert torch.allclose(out.logits, expected, rtol=0, atol=1e-6)
    assert out.logits[2].tolist() == pytest.approx([-math.log(3)] * 3)  # f0 = 0: uniform


def test_batch_of_one_and_empty_shrink(x: torch.Tensor, reference: torch.Tensor) -> None:
    model = cached()
    one = model.run(x[2:3])
    assert one.exit_index.tolist() == [1] and one.batch_sizes == (1, 1, 0)
    miss = model.run(x[:1])
    assert miss.exit_index.tolist() == [-1] and miss.batch_sizes == (1, 1, 1)
    assert torch.allclose(miss.logits, reference[:1], rtol=0, atol=1e-6)


def test_constructor_checks_lengths() -> None:
    backbone = make_backbone()
    with pytest.raises(ConfigError, match=r"got 3 segments, 2 heads, 1 nodes"):
        CachedModel(split(backbone, list(NODES)), make_heads(), NODES[:1], TEMPERATURES, (0.9, 0.9))
    with pytest.raises(ConfigError, match=r"needs len\(segments\) == len\(heads\) \+ 1"):
        CachedModel([backbone], make_heads(), NODES, TEMPERATURES, (0.9, 0.9))


def _spec(thresholds: tuple[float, float] = (0.9, 0.9), *, shrink: bool = True) -> CacheSpec:
    return CacheSpec(
        num_classes=3,
        input_shape=(2, 6, 6),
        shrink=shrink,
        exits=tuple(
            ExitSpec(node=n, head=HEAD.to_dict(), in_shape=IN_SHAPE, temperature=t, threshold=thr)
            for n, t, thr in zip(NODES, TEMPERATURES, thresholds)
        ),
    )


def test_from_spec_and_heads_file_round_trip(tmp_path: Path, x: torch.Tensor) -> None:
    path = tmp_path / "heads.pt"
    torch.save(heads_state_dict(make_heads()), path)
    state = torch.load(path, weights_only=True)
    assert sorted(state) == ["0.3.bias", "0.3.weight", "1.3.bias", "1.3.weight"]
    spec = CacheSpec.from_json(_spec().to_json())
    model = CachedModel.from_spec(make_backbone(), spec, state)
    assert not model.training
    assert model.nodes == NODES and model.temperatures == TEMPERATURES and model.thresholds == (0.9, 0.9)
    out, expected = model.run(x), cached().run(x)
    assert torch.equal(out.exit_index, expected.exit_index)
    assert torch.equal(out.logits, expected.logits)
    assert out.batch_sizes == expected.batch_sizes
    assert CachedModel.from_spec(make_backbone(), _spec(shrink=False), state).run(x).batch_sizes == (5, 5, 5)


def test_from_spec_without_exits_is_the_backbone(x: torch.Tensor, reference: torch.Tensor) -> None:
    model = CachedModel.from_spec(make_backbone(), CacheSpec(num_classes=3, input_shape=(2, 6, 6), exits=()), {})
    out = model.run(x)
    assert torch.equal(out.logits, reference)
    assert out.exit_index.tolist() == [-1] * 5 and out.batch_sizes == (5,)


def test_heads_file_that_does_not_match_the_spec() -> None:
    state = heads_state_dict(make_heads())
    only_first = {k: v for k, v in state.items() if k.startswith("0.")}
    with pytest.raises(ConfigError, match=r"head 1 \(3\) has no weights for \['3.bias', '3.weight'\].*Hint: rebuild"):
        CachedModel.from_spec(make_backbone(), _spec(), only_first)
    # Same keys, other shapes: the heads of another build (a hidden layer of 8 at the first exit).
    other = heads_state_dict([build_head(HeadSpec(pool=1, hidden=(8,)), IN_SHAPE, 3), make_heads()[1]])
    with pytest.raises(ConfigError, match=r"head 0 \(1\).*does not match.*Hint: rebuild"):
        CachedModel.from_spec(make_backbone(), _spec(), other)


def test_recording_model_answers_like_the_backbone(x: torch.Tensor, reference: torch.Tensor) -> None:
    model = RecordingModel(make_backbone(), NODES)
    with torch.no_grad():
        out, acts = model(x)
    assert torch.equal(out, reference)
    assert list(acts) == list(NODES)
    assert all(a.shape == (5, 4) for a in acts.values())
    # Channels 0 and 1 pass the input through: their pooled values are the input constants (clipped at 0).
    assert torch.allclose(acts["3"][:, :2], torch.tensor([[0.0, 0.0], [1, 0], [0, 1], [1, 1], [0.05, 0.05]]))
    out, acts = RecordingModel(make_backbone(), ())(x)
    assert torch.equal(out, reference) and acts == {}


def test_pool_activation_shapes() -> None:
    t = torch.arange(24.0).reshape(1, 2, 3, 4)
    assert pool_activation(t).tolist() == [[5.5, 17.5]]
    tokens = torch.arange(12.0).reshape(2, 3, 2)
    assert pool_activation(tokens).tolist() == [[2.0, 3.0], [8.0, 9.0]]
    vec = torch.randn(2, 5)
    assert pool_activation(vec) is vec
    assert pool_activation(torch.zeros(2, 1, 1, 1, 3)).shape == (2, 3)


def test_weights_fingerprint_tracks_every_weight() -> None:
    model = make_backbone()
    fp = weights_fingerprint(model)
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert weights_fingerprint(copy.deepcopy(model)) == fp
    assert weights_fingerprint(make_backbone()) == fp
    changed = copy.deepcopy(model)
    with torch.no_grad():
        w = changed[2].weight
        w[3, 3, 2, 2] = torch.nextafter(w[3, 3, 2, 2], torch.tensor(math.inf))
    assert weights_fingerprint(changed) != fp
    # Same values under a different dtype are other weights too.
    assert weights_fingerprint(copy.deepcopy(model).double()) != fp


def test_exit_names() -> None:
    assert exit_names(["a.1", "b"], torch.tensor([-1, 0, 1, 0])) == ["backbone", "a.1", "b", "a.1"]
    assert exit_names([], torch.tensor([-1])) == ["backbone"]


# --- per-batch-size policy -----------------------------------------------------------------------------------
def test_policy_picks_mode_by_batch_size_and_backbone_mode_skips_heads() -> None:
    from layercache.runtime import validate_policy

    torch.manual_seed(0)
    backbone = _policy_backbone()
    segments = split(backbone, ["1"])
    head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 4 * 4, 3))
    with torch.no_grad():
        head[1].weight.zero_()
        head[1].bias.copy_(torch.tensor([10.0, 0.0, 0.0]))  # always confident: every row exits at the head
    model = CachedModel(segments, [head], ["1"], [1.0], [0.5], policy={"1": "shrink", "4": "backbone"}).eval()
    assert model.mode_for(1) == "shrink" and model.mode_for(3) == "shrink"
    assert model.mode_for(4) == "backbone" and model.mode_for(100) == "backbone"
    x = torch.randn(5, 3, 4, 4)
    with torch.inference_mode():
        small = model.run(x[:2])
        big = model.run(x)
        expected = backbone(x)
    assert small.exit_index.tolist() == [0, 0]
    assert big.exit_index.tolist() == [-1] * 5
    assert torch.equal(big.logits, expected)
    with pytest.raises(ConfigError, match="policy mode 'fast'"):
        validate_policy({"8": "fast"})
    with pytest.raises(ConfigError, match="batch size"):
        validate_policy({"zero": "shrink"})


def test_measure_policy_returns_a_valid_mode_per_batch_size() -> None:
    from layercache.runtime import RUN_MODES, measure_policy

    torch.manual_seed(0)
    backbone = _policy_backbone()
    head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 4 * 4, 3))
    model = CachedModel(split(backbone, ["1"]), [head], ["1"], [1.0], [0.9]).eval()
    policy = measure_policy(model, torch.randn(16, 3, 4, 4), batch_sizes=(1, 4), repeats=1)
    assert set(policy) == {"1", "4"} and set(policy.values()) <= set(RUN_MODES)
    timed = model.with_policy(policy)
    assert timed.mode_for(4) == policy["4"] and model.policy == {}  # a new model; the old one is unchanged
    assert timed.segments[0] is model.segments[0] and timed.heads[0] is model.heads[0]


def test_measure_policy_skips_heads_that_cost_more_than_they_save_unless_within_the_margin() -> None:
    from layercache.runtime import measure_policy

    torch.manual_seed(0)
    backbone = _policy_backbone()
    # A head far costlier than the tiny backbone that never fires: running it can only lose time.
    head = nn.Sequential(nn.Flatten(), nn.Linear(128, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.Linear(2048, 3))
    model = CachedModel(split(backbone, ["1"]), [head], ["1"], [1.0], [1.01]).eval()
    inputs = torch.randn(16, 3, 4, 4)
    assert measure_policy(model, inputs, batch_sizes=(8,), repeats=3) == {"8": "backbone"}
    # A margin no mode can beat keeps the model's own mode.
    assert measure_policy(model, inputs, batch_sizes=(8,), repeats=1, margin=0.999) == {"8": "shrink"}
    with pytest.raises(ConfigError, match="margin"):
        measure_policy(model, inputs, margin=1.0)


def test_with_thresholds_shares_the_modules_and_keeps_mode_and_policy() -> None:
    torch.manual_seed(0)
    backbone = _policy_backbone()
    head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 4 * 4, 3))
    with torch.no_grad():
        head[1].weight.zero_()
        head[1].bias.copy_(torch.tensor([10.0, 0.0, 0.0]))  # always confident
    model = CachedModel(split(backbone, ["1"]), [head], ["1"], [1.0], [0.5], policy={"4": "noshrink"}).eval()
    never = model.with_thresholds([1.01])
    assert never.heads[0] is head and never.segments[0] is model.segments[0]
    assert (never.thresholds, never.policy, never.shrink, never.training) == ((1.01,), {"4": "noshrink"}, True, False)
    x = torch.randn(3, 3, 4, 4)
    with torch.inference_mode():
        assert model.run(x).exit_index.tolist() == [0, 0, 0]
        out = never.run(x)
        assert out.exit_index.tolist() == [-1, -1, -1] and torch.equal(out.logits, backbone(x))
    assert model.thresholds == (0.5,)  # the original is unchanged


def _policy_backbone() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.Flatten(), nn.Linear(128, 3)
    ).eval()


class _HostSyncs(torch.overrides.TorchFunctionMode):
    """Counts the calls that make a CUDA host wait for the device (a CUDA-free proxy for syncs on the request
    path): nonzero, item, bool/int/float of a tensor, tolist, and boolean-mask indexing."""

    NAMES = {"nonzero", "item", "__bool__", "__int__", "__float__", "tolist", "masked_select"}

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's protocol
        name = getattr(func, "__name__", str(func))
        if name in self.NAMES:
            self.calls.append(name)
        if (
            name == "__getitem__"
            and len(args) > 1
            and isinstance(args[1], torch.Tensor)
            and args[1].dtype == torch.bool
        ):
            self.calls.append("bool-mask index")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(("mode", "syncs"), [("shrink", ["nonzero", "nonzero"]), ("noshrink", [])])
def test_the_request_path_syncs_once_per_head_when_shrinking_and_never_without(
    x: torch.Tensor, mode: str, syncs: list[str]
) -> None:
    model = cached((0.99, 0.99))
    with torch.inference_mode(), _HostSyncs() as counter:
        model.run(x, mode, verify=0.5)
    assert counter.calls == syncs


def test_verified_hits_run_the_backbone_and_keep_the_head_answer(x: torch.Tensor, reference: torch.Tensor) -> None:
    model = cached((0.9, 0.9))
    with torch.inference_mode():
        plain = model.run(x)
        every = model.run(x, verify=1.0)
        none = model.run(x, verify=0.0)
    hits = plain.exit_index >= 0
    assert hits.any()
    # Verification never changes an answer or an exit; it adds the backbone's answer for every hit.
    assert torch.equal(every.logits, plain.logits) and torch.equal(every.exit_index, plain.exit_index)
    assert torch.equal(every.verified, hits) and not none.verified.any()
    assert torch.equal(every.backbone_pred, reference.argmax(1))
    assert torch.equal(none.backbone_pred[~hits], reference.argmax(1)[~hits])
    assert (none.backbone_pred[hits] == -1).all()
    assert torch.isnan(every.confidence[~hits]).all() and (every.confidence[hits] >= 0.9).all()
    # Rows that keep going for verification do not change how many rows the later segments see for the others.
    assert every.batch_sizes[1] >= plain.batch_sizes[1]


def test_verification_shares_can_differ_per_head(x: torch.Tensor) -> None:
    model = cached((0.9, 0.9))
    with torch.inference_mode():
        plain = model.run(x)
        first_only = model.run(x, verify=[1.0, 0.0])
    hits = plain.exit_index
    # Every hit of the first head is verified, none of the second's.
    assert torch.equal(first_only.verified, hits == 0) and torch.equal(first_only.logits, plain.logits)
    with pytest.raises(ConfigError, match="one per head"):
        model.run(x, verify=[1.0])
    with pytest.raises(ConfigError, match="fraction"):
        model.run(x, verify=[1.0, 2.0])


class _DictOutput(nn.Module):
    """The test backbone returning ``{"logits": ..., "features": ...}`` and, optionally, probabilities."""

    def __init__(self, softmax: bool) -> None:
        super().__init__()
        self.net = make_backbone()
        self.softmax = softmax

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = x
        for layer in list(self.net)[:6]:
            feats = layer(feats)
        logits = self.net[6](feats)
        return {"logits": logits.softmax(1) if self.softmax else logits, "features": feats}


@pytest.mark.parametrize("softmax", [False, True])
def test_head_answers_come_back_in_the_backbones_own_form(x: torch.Tensor, softmax: bool) -> None:
    from layercache.outputs import detect

    backbone = _DictOutput(softmax).eval()
    with torch.no_grad():
        expected = backbone(x)
    spec = detect(expected)
    assert (spec.key, spec.kind) == ("logits", "probs" if softmax else "logits")
    model = CachedModel(
        split(backbone, ["net.1", "net.3"]), make_heads(), ["net.1", "net.3"], TEMPERATURES, (0.9, 0.9), output=spec
    )
    with torch.inference_mode():
        out = model.run(x)
    hit = out.exit_index >= 0
    assert hit.any() and (~hit).any()
    assert isinstance(out.output, dict) and set(out.output) == {"logits", "features"}
    # Backbone rows keep everything the backbone returned; head rows get the head's distribution in its kind and
    # zeros elsewhere.
    assert torch.equal(out.output["logits"][~hit], expected["logits"][~hit])
    assert torch.equal(out.output["features"][~hit], expected["features"][~hit])
    assert (out.output["features"][hit] == 0).all()
    if softmax:
        assert torch.allclose(out.output["logits"][hit].sum(1), torch.ones(int(hit.sum())))
    assert torch.equal(out.logits, out.output["logits"])
