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


def merged(*files):
    """The config Snakemake builds from config/config.yaml plus --configfile files (dicts merge)."""
    from snakemake.utils import update_config

    config = yaml.safe_load(open("config/config.yaml"))
    for path in files:
        update_config(config, yaml.safe_load(open(path)))
    return validate_config(config)


def test_paper_grid_trains_in_epochs_not_the_cpu_step_budget():
    from turbotrain.experiments import Run
    from turbotrain.stages.common import train_config
    from turbotrain.stages.finetune import recipe_stages

    cfg = merged("config/paper.yaml")
    assert cfg["pretrain"]["train"]["max_steps"] is None and cfg["finetune"]["joint"]["max_steps"] is None
    pre = train_config(cfg["pretrain"]["train"], 4000, 0, "cpu")
    assert pre.max_steps == 15 * 4000 // 4
    joint = recipe_stages(cfg, Run("v2xpnp", "attfuse", "spatiotemporal", "joint", "turbotrain", 1.0, 0))[0]
    assert joint.max_steps is None
    steps = train_config({**cfg["train"], "max_steps": joint.max_steps}, 8000, 0, "cpu", epochs=joint.epochs).max_steps
    assert steps == 20 * 8000 // 8
    multistage = recipe_stages(cfg, Run("v2xpnp", "attfuse", "none", "multistage", "fixed", 1.0, 0))
    assert [s.epochs for s in multistage] == [20, 10, 10, 20]


def test_smoke_config_keeps_every_job_seconds_long():
    cfg = merged("config/smoke.yaml")
    assert cfg["finetune"]["joint"]["max_steps"] == 3 and cfg["pretrain"]["train"]["max_steps"] == 3
    assert cfg["train"]["max_steps"] == 3 and cfg["resources"]["use_gpu"] is False
