"""Config: precedence defaults < YAML (with _base_) < overrides; strict keys and types; round trip."""

from pathlib import Path

import pytest
import yaml

from lm.config import ConfigError, RunConfig, config_from_dict, dump_config, load_config, to_dict

ROOT = Path(__file__).resolve().parents[1]


def write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_precedence_defaults_yaml_overrides(tmp_path):
    base = write(tmp_path / "base.yaml", {"model": {"d_model": 64, "n_layers": 3}, "optim": {"lr": 0.01}})
    top = write(tmp_path / "top.yaml", {"_base_": "base.yaml", "model": {"n_layers": 5}})
    cfg = load_config(top, overrides=["optim.lr=2e-4", "model.longvq.chunk_size=16"])
    assert cfg.model.d_model == 64  # from base
    assert cfg.model.n_layers == 5  # top overrides base
    assert cfg.optim.lr == 2e-4  # override beats YAML
    assert cfg.model.longvq.chunk_size == 16
    assert cfg.train.micro_batch_size == RunConfig().train.micro_batch_size  # default kept
    later = write(tmp_path / "later.yaml", {"model": {"n_layers": 7}})
    assert load_config(top, later).model.n_layers == 7  # files merge left to right


def test_unknown_key_fails_with_suggestion(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.longvq\.chunk_sise.*did you mean model\.longvq\.chunk_size"):
        load_config(write(tmp_path / "a.yaml", {"model": {"longvq": {"chunk_sise": 8}}}))
    with pytest.raises(ConfigError, match=r"train\.max_step.*did you mean train\.max_steps"):
        load_config(write(tmp_path / "b.yaml", {}), overrides=["train.max_step=3"])


def test_bad_values_fail_naming_the_key(tmp_path):
    empty = write(tmp_path / "e.yaml", {})
    with pytest.raises(ConfigError, match=r"model\.arch"):
        load_config(empty, overrides=["model.arch=mamba"])
    with pytest.raises(ConfigError, match=r"train\.max_steps: expected an integer"):
        load_config(empty, overrides=["train.max_steps=ten"])
    with pytest.raises(ConfigError, match=r"parallel\.pipeline_stages.*zero_stage"):
        load_config(empty, overrides=["parallel.pipeline_stages=2", "parallel.zero_stage=3"])
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(empty, overrides=["train.max_steps"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(ROOT / "launch/configs/quickstart.yaml", overrides=["train.max_steps=7"])
    dump_config(cfg, tmp_path / "resolved.yaml")
    again = config_from_dict(yaml.safe_load((tmp_path / "resolved.yaml").read_text()))
    assert to_dict(again) == to_dict(cfg)
    assert again.train.max_steps == 7


def test_every_recipe_loads():
    recipes = sorted((ROOT / "launch/configs").glob("*.yaml"))
    assert recipes
    for path in recipes:
        load_config(path)
