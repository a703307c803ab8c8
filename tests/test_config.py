"""Config loading: precedence, typed errors that name the key, and the resolved dump."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from plait.errors import ConfigError
from plait.runtime.config import JobConfig, dump_config, load_config

DEMO = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


def test_defaults_then_file_then_overrides(tmp_path):
    path = write(tmp_path, "train:\n  steps: 7\n  lr: 1.0e-3\nmodel:\n  layers: 3\n")
    config = load_config(path, ["train.steps=9", "model.kind=moe", "train.lr=3e-4"])
    assert config.train.steps == 9  # --set beats the file
    assert config.model.layers == 3  # the file beats the default
    assert config.model.kind == "moe"
    assert config.train.lr == pytest.approx(3e-4)  # "3e-4" (a YAML string) is taken as a float
    assert config.train.micro_batch == JobConfig().train.micro_batch  # default kept


def test_nproc_sets_the_world_and_dp_is_derived(tmp_path):
    config = load_config(write(tmp_path, ""), ["train.global_batch=16", "train.micro_batch=2"], nproc=4)
    assert config.launch.nproc == 4
    assert config.parallel.resolved_dp(4) == 4
    assert config.accumulation() == 2


def test_dump_round_trips(tmp_path):
    config = load_config(DEMO, ["train.steps=3"])
    again = load_config(write(tmp_path, dump_config(config)))
    assert again == config


@pytest.mark.parametrize(
    "override, key, fragment",
    [
        ("train.stpes=3", "train.stpes", "did you mean 'train.steps'"),
        ("modle.dim=3", "modle", "did you mean 'model'"),
        ("train.steps=many", "train.steps", "accepted: an integer"),
        ("train.steps=2.5", "train.steps", "accepted: an integer"),
        ("train.steps=true", "train.steps", "accepted: an integer"),
        ("train.lr=fast", "train.lr", "accepted: a number"),
        ("model.kind=mo", "model.kind", "did you mean 'moe'"),
        ("train.dtype=fp8", "train.dtype", "float32 | bfloat16"),
        ("metrics.enabled=maybe", "metrics.enabled", "true or false"),
        ("train.steps=0", "train.steps", "positive"),
        ("model.heads=3", "model.heads", "model.dim"),
        ("train.global_batch=30", "train.global_batch", "multiple of train.micro_batch"),
        ("parallel.dp=3", "parallel.dp", "world size"),
        ("metrics.port=70000", "metrics.port", "1..65535"),
        ("train=3", "train", "mapping"),
        ("parallel.zero=maybe", "parallel.zero", "true or false"),
    ],
)
def test_bad_values_name_the_key(override, key, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(DEMO, [override])
    message = str(info.value)
    assert f"'{key}'" in message
    assert fragment in message
    assert "\n" not in message


def test_replicated_optimizer_state_excludes_co2():
    with pytest.raises(ConfigError) as info:
        load_config(DEMO, ["parallel.zero=false", "parallel.dp_mode=co2"])
    assert "'parallel.zero'" in str(info.value) and "parallel.dp_mode=sync" in str(info.value)


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(DEMO, ["train.steps"])
    with pytest.raises(ConfigError, match="existing YAML file"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML at line 3"):
        load_config(write(tmp_path, "train:\n  steps: [1,\n"))
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def test_demo_config_is_valid_and_is_a_small_moe():
    config = load_config(DEMO)
    raw = yaml.safe_load(DEMO.read_text())
    assert config.model.kind == "moe" and raw["launch"]["nproc"] == 4
