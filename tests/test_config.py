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
    with pytest.raises(ConfigError, match=r"train\.loss_impl"):
        load_config(empty, overrides=["train.loss_impl=fast"])
    assert load_config(empty, overrides=["train.loss_impl=triton"]).train.loss_impl == "triton"
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


def test_derived_sizes_are_resolved_once_and_written_resolved(tmp_path):
    """ffn_dim and longvq.hidden_dim left null take the arch's default when the config is built; the dumped
    config holds the numbers, and an explicit value is kept."""
    cfg = load_config(write(tmp_path / "a.yaml", {"model": {"d_model": 48}}))
    assert (cfg.model.ffn_dim, cfg.model.longvq.hidden_dim) == (96, 96)
    tf = load_config(write(tmp_path / "t.yaml", {"model": {"arch": "transformer", "d_model": 48}}))
    assert tf.model.ffn_dim == 128  # SwiGLU: 8/3 d
    dump_config(cfg, tmp_path / "resolved.yaml")
    written = yaml.safe_load((tmp_path / "resolved.yaml").read_text())["model"]
    assert (written["ffn_dim"], written["longvq"]["hidden_dim"]) == (96, 96)
    explicit = load_config(tmp_path / "a.yaml", overrides=["model.ffn_dim=40", "model.longvq.hidden_dim=64"])
    assert (explicit.model.ffn_dim, explicit.model.longvq.hidden_dim) == (40, 64)


def test_a_config_saved_with_null_sizes_equals_the_resolved_one(tmp_path):
    """Checkpoints written before the sizes were resolved hold `null`; they must load to the resolved config
    and pass the key-by-key compatibility check against a run that states the same sizes (or leaves them null)."""
    from lm.checkpoint import CheckpointError, check_compatible

    cfg = load_config(ROOT / "launch/configs/quickstart.yaml")
    old = to_dict(cfg)
    old["model"]["ffn_dim"] = None
    old["model"]["longvq"]["hidden_dim"] = None
    saved = config_from_dict(yaml.safe_load(yaml.safe_dump(old)))
    assert to_dict(saved) == to_dict(cfg)
    check_compatible(saved, cfg, tmp_path)
    stated = load_config(ROOT / "launch/configs/quickstart.yaml",
                         overrides=[f"model.ffn_dim={2 * cfg.model.d_model}", f"model.longvq.hidden_dim={2 * cfg.model.d_model}"])
    check_compatible(saved, stated, tmp_path)
    other = load_config(ROOT / "launch/configs/quickstart.yaml", overrides=[f"model.ffn_dim={cfg.model.d_model}"])
    with pytest.raises(CheckpointError, match="model.ffn_dim"):
        check_compatible(saved, other, tmp_path)


def test_each_arch_owns_its_accounting():
    """The model config delegates shape, FLOPs and validation to the config of `arch` (one class per arch)."""
    from lm.config import ARCH_CONFIGS, ModelConfig
    from lm.metrics import FLOPS_FORMULA

    assert set(FLOPS_FORMULA) == set(ARCH_CONFIGS) == {"longvq", "transformer"}
    for arch, cls in ARCH_CONFIGS.items():
        m = ModelConfig(arch=arch, d_model=64, n_layers=2)
        assert isinstance(m.mixer, cls) and FLOPS_FORMULA[arch] == cls.FLOPS_FORMULA
        H, dk, dv = m.head_dims()
        K = m.mixer.mean_keys_per_query(256)
        assert m.flops_per_token(1000, 256) == pytest.approx(6000 + 6 * 2 * H * K * (dk + dv))
    lv = ModelConfig(arch="longvq", d_model=64)
    lv.longvq.n_heads = 3  # 128 = hidden_dim is not divisible by 3
    with pytest.raises(ConfigError, match="model.longvq.z_dim=64 must be divisible"):
        lv.validate()
    with pytest.raises(ConfigError, match="model.arch"):
        ModelConfig(arch="mamba")
