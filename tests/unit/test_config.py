"""Tests for layercache.config: the handler's YAML section, the cache spec JSON, exit validation."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

from layercache.config import LOG_DIR_ENV, CacheSpec, ExitSpec, HandlerConfig, from_mapping
from layercache.errors import ConfigError


def _exit(node: str = "layer1.0.relu_1", **change: object) -> ExitSpec:
    fields: dict[str, object] = {
        "node": node,
        "head": {"pool": 1, "convs": [], "hidden": []},
        "in_shape": [16, 28, 28],
        "temperature": 1.5,
        "threshold": 0.9,
    }
    fields.update(change)
    return ExitSpec(**fields)  # type: ignore[arg-type]


def test_defaults_without_a_layercache_section() -> None:
    for yaml_config in (None, {}, {"batchSize": 8}, {"layercache": None}):
        cfg = HandlerConfig.from_yaml_config(yaml_config)
        assert cfg == HandlerConfig()
    cfg = HandlerConfig()
    assert (cfg.inner_handler, cfg.mode, cfg.log_dir, cfg.record, cfg.record_activations) == (
        "image_classifier",
        "record",
        None,
        True,
        False,  # the build replays inputs and never reads activations
    )
    # Safe defaults: bodies, not tensors, are recorded; clients cannot write labels; 2% of hits are verified;
    # a head that breaks its promise is disabled; the log is readable by the worker's user only.
    assert (cfg.record_inputs, cfg.record_labels, cfg.verify_fraction, cfg.guard) == (False, False, 0.02, "disable")
    assert (cfg.log_dir_mode, cfg.log_file_mode, cfg.max_pixels) == ("700", "600", 40_000_000)
    assert (cfg.candidates, cfg.segment_mb, cfg.max_log_gb, cfg.input_shape, cfg.explain_steps) == (
        None,
        64.0,
        10.0,
        None,
        15,
    )


def test_section_values_are_read_and_coerced() -> None:
    cfg = HandlerConfig.from_yaml_config(
        {
            "batchSize": 4,  # TorchServe's own keys live beside the section and are not ours to check
            "layercache": {
                "mode": "cached",
                "inner_handler": "h.py",
                "candidates": ["a", "b.1"],
                "input_shape": [3, "32", 32],
                "max_log_gb": None,
                "record": False,
            },
        }
    )
    assert cfg.mode == "cached" and cfg.inner_handler == "h.py" and cfg.record is False
    assert cfg.candidates == ("a", "b.1")
    assert cfg.input_shape == (3, 32, 32)
    assert cfg.max_log_gb is None


def test_unknown_keys_are_named_with_the_allowed_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['candidate', 'modes'\] in model-config.yaml") as info:
        HandlerConfig.from_yaml_config({"layercache": {"candidate": ["x"], "modes": "record", "mode": "record"}})
    assert "'inner_handler'" in str(info.value)  # the allowed keys are listed
    assert "Hint" in str(info.value)


def test_section_must_be_a_mapping() -> None:
    with pytest.raises(ConfigError, match="'layercache:' must be a mapping, got list"):
        HandlerConfig.from_yaml_config({"layercache": ["mode", "record"]})


@pytest.mark.parametrize(
    ("section", "match"),
    [
        ({"mode": "caching"}, r"layercache.mode='caching' is not one of \('record', 'cached'\)"),
        ({"segment_mb": 0}, "segment_mb=0 must be > 0"),
        ({"max_log_gb": -1}, "max_log_gb=-1 must be > 0 or null"),
        ({"policy_source": "x"}, r"layercache.policy_source='x' is not one of \('auto', 'startup', 'stored'\)"),
        ({"policy": "fastest"}, r"layercache.policy_source='fastest' is not one of"),  # the old name is read
        ({"policy": "auto", "policy_source": "auto"}, r"has both 'policy' and its new name 'policy_source'"),
    ],
)
def test_bad_values(section: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        HandlerConfig.from_yaml_config({"layercache": section})


def test_yaml_dict_round_trip() -> None:
    cfg = HandlerConfig(mode="cached", candidates=("a", "b"), input_shape=(1, 28, 28), log_dir="/x")
    data = cfg.to_yaml_dict()
    assert data["candidates"] == ["a", "b"] and data["input_shape"] == [1, 28, 28]
    assert json.loads(json.dumps(data)) == data  # plain data only
    assert HandlerConfig.from_yaml_config({"layercache": data}) == cfg


def test_resolved_log_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv(LOG_DIR_ENV, raising=False)
    assert HandlerConfig().resolved_log_dir("fashion") == tmp_path / "home" / ".layercache" / "logs" / "fashion"
    monkeypatch.setenv(LOG_DIR_ENV, str(tmp_path / "env"))
    assert HandlerConfig().resolved_log_dir("fashion") == tmp_path / "env" / "fashion"
    monkeypatch.setenv(LOG_DIR_ENV, "~/logs")
    assert HandlerConfig().resolved_log_dir("m") == tmp_path / "home" / "logs" / "m"
    # An explicit log_dir wins over the environment and is not suffixed with the model name.
    assert HandlerConfig(log_dir="~/mine").resolved_log_dir("m") == tmp_path / "home" / "mine"


def test_from_mapping_wraps_missing_required_fields() -> None:
    with pytest.raises(ConfigError, match="invalid cache exit: .*missing .*'threshold'"):
        from_mapping(ExitSpec, {"node": "a", "head": {}, "in_shape": [1], "temperature": 1.0}, where="cache exit")


def test_cache_spec_json_round_trip(tmp_path: Path) -> None:
    spec = CacheSpec(
        num_classes=10,
        input_shape=[1, 28, 28],
        exits=[_exit(), _exit("layer2.1.relu_1", threshold=0.75)],
        weights_fingerprint="0123456789abcdef",
        candidates=["layer1.0.relu_1", "layer2.1.relu_1", "layer3.0.relu_1"],
        tolerance=0.02,
        extra={"note": "x"},
    )
    assert spec.input_shape == (1, 28, 28) and spec.candidates[2] == "layer3.0.relu_1"
    assert spec.nodes == ("layer1.0.relu_1", "layer2.1.relu_1")
    assert all(isinstance(e, ExitSpec) and isinstance(e.in_shape, tuple) for e in spec.exits)
    text = spec.to_json()
    back = CacheSpec.from_json(text)
    assert back == spec
    assert back.exits[1].threshold == 0.75 and back.exits[0].in_shape == (16, 28, 28)
    path = tmp_path / "layercache_cache.json"
    path.write_text(text)
    assert CacheSpec.load(path) == spec


def test_cache_spec_keeps_infinite_thresholds() -> None:
    spec = CacheSpec(num_classes=3, input_shape=(2,), exits=(_exit(threshold=math.inf),))
    assert CacheSpec.from_json(spec.to_json()).exits[0].threshold == math.inf


def test_cache_spec_json_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cache.json is not valid JSON"):
        CacheSpec.from_json("{", where="cache.json")
    data = json.loads(CacheSpec(num_classes=3, input_shape=(2,), exits=()).to_json())
    data["thresholds"] = [0.5]
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['thresholds'\] in spec.json"):
        CacheSpec.from_json(json.dumps(data), where="spec.json")
    data = json.loads(CacheSpec(num_classes=3, input_shape=(2,), exits=(_exit(),)).to_json())
    data["exits"][0]["temp"] = 2.0
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['temp'\] in cache exit"):
        CacheSpec.from_json(json.dumps(data))
    bad = tmp_path / "bad.json"
    bad.write_text("[")
    with pytest.raises(ConfigError, match="bad.json is not valid JSON"):
        CacheSpec.load(bad)


@pytest.mark.parametrize("temperature", [0.0, -1.0, math.nan])
def test_exit_spec_rejects_non_positive_temperature(temperature: float) -> None:
    with pytest.raises(ConfigError, match=r"exit layer1.0.relu_1: temperature .* must be > 0"):
        _exit(temperature=temperature)


def test_configs_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        HandlerConfig().mode = "cached"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        _exit().threshold = 0.1  # type: ignore[misc]


def test_the_renamed_policy_key_still_loads() -> None:
    # Archives built before the rename carry "policy:"; it means policy_source.
    assert HandlerConfig.from_yaml_config({"layercache": {"policy": "startup"}}).policy_source == "startup"
