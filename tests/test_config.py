import pytest
import yaml

from turbotrain.config import load_config, validate_config
from turbotrain.experiments import expand_runs
from turbotrain.utils.errors import ConfigError


def test_default_config_validates_and_fills_defaults():
    cfg = load_config("config/config.yaml")
    assert cfg["grid"]["bev_stride"] == 2
    assert cfg["pretrain"]["variants"]["spatiotemporal"]["mask_ratio"] == 0.7
    assert cfg["pretrain"]["variants"]["ego_only"]["temporal_masking"] == "shared"
    assert cfg["train"]["grad_accum_steps"] == 1


def test_typo_names_the_key_and_the_allowed_ones(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"grid": {"voxel_sise": [0.4, 0.4, 0.5]}}))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert str(path) in msg and "grid" in msg and "voxel_sise" in msg and "voxel_size" in msg


def test_wrong_type_and_enum_are_explained():
    with pytest.raises(ConfigError) as err:
        validate_config({"cache": {"history": "three"}, "model": {"fusion": {"name": "attfus"}}})
    msg = str(err.value)
    assert "cache.history: expected integer" in msg
    assert "model.fusion.name: 'attfus' is not one of" in msg


def test_overrides_are_parsed_as_yaml_and_validated():
    cfg = load_config("config/config.yaml", ["train.lr=0.01", "cache.history=2"])
    assert cfg["train"]["lr"] == 0.01 and cfg["cache"]["history"] == 2
    with pytest.raises(ConfigError):
        load_config("config/config.yaml", ["train.lr=-1"])


def test_grid_expansion_is_stable_and_checks_variants():
    cfg = load_config("config/config.yaml")
    runs = expand_runs(cfg)
    assert runs == sorted(set(runs))
    assert all(r.balancer == "fixed" for r in runs if r.recipe == "multistage")
    late = [r for r in runs if r.fusion == "late"]
    assert late and all(r.trained_fusion == "none" and "/none/" in r.train_dir for r in late)
    cfg["experiments"]["groups"].append({"tables": ["ablation"], "fusion": ["attfuse"], "pretrain": ["nope"],
                                         "recipe": ["joint"], "balancer": ["sum"], "label_fraction": [1.0]})
    with pytest.raises(ValueError, match="nope"):
        expand_runs(cfg)
