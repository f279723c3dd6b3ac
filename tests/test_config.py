import copy

import pytest
import yaml

from turbotrain.config import load_config, validate_config
from turbotrain.contract import expand_runs
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
    from turbotrain.contract import Run
    from turbotrain.build import train_config
    from turbotrain.train.recipes import recipe_stages

    cfg = merged("config/paper.yaml")
    assert cfg["pretrain"]["train"]["max_steps"] is None and cfg["finetune"]["joint"]["max_steps"] is None
    pre = train_config(cfg["pretrain"]["train"], 4000, 0, "cpu")
    assert pre.max_steps == 15 * 4000 // 1 and pre.warmup_steps == 10 * 4000  # CooPre: batch 1, warm-up 10 epochs
    joint = recipe_stages(cfg, Run("v2xpnp", "attfuse", "spatiotemporal", "joint", "turbotrain", 1.0, 0))[0]
    assert joint.max_steps is None
    steps = train_config({**cfg["train"], "max_steps": joint.max_steps}, 8000, 0, "cpu", epochs=joint.epochs).max_steps
    assert steps == 20 * 8000 // 8
    multistage = recipe_stages(cfg, Run("v2xpnp", "attfuse", "none", "multistage", "fixed", 1.0, 0))
    assert [s.epochs for s in multistage] == [20, 10, 10, 20]


def test_paper_grid_pretrains_trajectory_variants_with_smartpretrains_recipe():
    from turbotrain.build import train_config

    cfg = merged("config/paper.yaml")
    section = {**cfg["pretrain"]["train"], **cfg["pretrain"]["variants"]["trajectory"]["train"]}
    engine = train_config(section, 3200, 0, "cpu")
    # train_ssl.sh: 32 epochs of batch 4 x 8 GPUs, warm-up 1e-4 -> 1.5e-3 over 15 epochs, cosine to 1e-6
    assert engine.max_steps == 32 * 3200 // 32 and engine.warmup_steps == 15 * 3200 // 32
    assert engine.optimizer == "adamw" and engine.lr == 1.5e-3
    assert abs(engine.lr * engine.warmup_start_ratio - 1e-4) < 1e-9 and abs(engine.min_lr - 1e-6) < 1e-9
    assert (engine.weight_decay_start, engine.weight_decay) == (0.01, 0.1)
    for name in ("trajectory_b", "trajectory_ab"):
        assert cfg["pretrain"]["variants"][name]["train"] == cfg["pretrain"]["variants"]["trajectory"]["train"]
    # CooPre's recipe stays the LiDAR variants' (and lidar_trajectory's, which sets no recipe of its own)
    assert cfg["pretrain"]["variants"]["lidar_trajectory"]["train"] == {}
    assert cfg["pretrain"]["train"]["optimizer"] == "adam"


def test_smoke_config_keeps_every_job_seconds_long():
    cfg = merged("config/smoke.yaml")
    assert cfg["finetune"]["joint"]["max_steps"] == 3 and cfg["pretrain"]["train"]["max_steps"] == 3
    assert cfg["train"]["max_steps"] == 3 and cfg["resources"]["use_gpu"] is False


# ----------------------------------------------------------------------------- several datasets


def test_extra_datasets_default_to_none_and_reuse_the_dataset_keys():
    assert validate_config({})["extra_datasets"] == {}
    cfg = load_config("config/config.yaml")
    b = cfg["extra_datasets"]["synthetic_b"]
    # the shared $defs entry filled its defaults; `seed` is the extra key, `name` is the mapping key
    assert b["root"] == "data/raw" and b["on_bad_frame"] == "error" and b["urls"] == [] and b["seed"] == 1
    assert "name" not in b and "seed" not in cfg["dataset"]
    overrides = b["synthetic_overrides"]
    assert overrides["vehicle_lidar"]["beams"] == 32 and overrides["obj_type_names"]["truck"] == "bus"
    assert b["class_map"] == {"vehicle": "car", "bus": "truck", "walker": "pedestrian"}


def test_extra_dataset_sensor_overrides_are_real_generator_settings():
    from turbotrain.data.synth import resolve_config

    b = load_config("config/config.yaml")["extra_datasets"]["synthetic_b"]
    gen = resolve_config(b["preset"], b["synthetic_overrides"])
    assert gen.vehicle_lidar.beams == 32 and gen.vehicle_lidar.vertical_fov == (-25.0, 10.0)
    assert gen.infrastructure_lidar.beams == 16 and gen.written_type("pedestrian") == "walker"


@pytest.mark.parametrize("entry, key, words", [
    ({"sorce": "synthetic"}, "extra_datasets.b", ["sorce", "allowed keys", "seed", "class_map"]),
    ({"name": "b"}, "extra_datasets.b", ["'name' was unexpected"]),
    ({"seed": -1}, "extra_datasets.b.seed", ["minimum"]),
    ({"source": "ftp"}, "extra_datasets.b.source", ["'ftp' is not one of"]),
    ({"class_map": {"bus": 3}}, "extra_datasets.b.class_map.bus", ["expected string"]),
])
def test_a_bad_extra_dataset_names_its_key(entry, key, words):
    with pytest.raises(ConfigError) as err:
        validate_config({"extra_datasets": {"b": entry}})
    msg = str(err.value)
    assert f"  - {key}: " in msg and all(w in msg for w in words), msg


def test_typo_in_the_primary_dataset_still_lists_its_keys():
    with pytest.raises(ConfigError) as err:
        validate_config({"dataset": {"seed": 3}})
    msg = str(err.value)
    assert "dataset: Additional properties are not allowed ('seed' was unexpected)" in msg and "name" in msg


def test_extra_dataset_names_are_folder_names_and_differ_from_the_primary():
    with pytest.raises(ConfigError, match="extra_datasets: 'b/c' does not match"):
        validate_config({"extra_datasets": {"b/c": {}}})
    with pytest.raises(ConfigError) as err:
        validate_config({"dataset": {"name": "v2x"}, "extra_datasets": {"v2x": {"source": "local", "local_path": "/x"}}})
    assert "extra_datasets.v2x: this name is the primary dataset's (dataset.name)" in str(err.value)


def test_datasets_built_by_one_rule_share_a_root():
    with pytest.raises(ConfigError, match=r"extra_datasets.b.root: '/elsewhere' differs from dataset.root 'data/raw'"):
        validate_config({"extra_datasets": {"b": {"root": "/elsewhere"}}})
    # a local dataset's root is unused, and each source may have its own
    validate_config({"extra_datasets": {"b": {"root": "/elsewhere", "source": "local", "local_path": "/x"},
                                         "c": {"root": "/downloads", "source": "download"}}})


def test_with_dataset_swaps_in_the_named_dataset_and_its_seed():
    from turbotrain.contract import dataset_names, with_dataset

    cfg = validate_config({"seed": 5, "extra_datasets": {"b": {"preset": "mini", "seed": 2}, "c": {"preset": "smoke"}}})
    assert dataset_names(cfg) == ["synthetic", "b", "c"]
    primary = with_dataset(cfg, "synthetic")
    assert primary == cfg and primary is not cfg and primary["dataset"] is not cfg["dataset"]
    b = with_dataset(cfg, "b")
    assert b["dataset"]["name"] == "b" and b["dataset"]["preset"] == "mini" and "seed" not in b["dataset"]
    assert b["seed"] == 2  # generation and label-fraction subsets of b use its own seed
    assert with_dataset(cfg, "c")["seed"] == 5  # default: the top-level seed
    # the copy names the same datasets (the primary moved to extra_datasets with its seed) and validates
    assert sorted(dataset_names(b)) == sorted(dataset_names(cfg))
    assert b["extra_datasets"]["synthetic"]["seed"] == 5 and b["extra_datasets"]["synthetic"]["preset"] == "default"
    assert validate_config(copy.deepcopy(b)) == b
    assert with_dataset(b, "synthetic") == cfg  # and back
    assert cfg["dataset"]["name"] == "synthetic" and cfg["seed"] == 5  # the original is untouched
    with pytest.raises(ConfigError) as err:
        with_dataset(cfg, "v2xreal")
    assert "'v2xreal'" in str(err.value) and "synthetic, b, c" in str(err.value)


def test_smoke_and_paper_configs_merge_their_extra_datasets():
    smoke = merged("config/smoke.yaml")["extra_datasets"]["synthetic_b"]
    assert smoke["preset"] == "smoke" and smoke["synthetic_overrides"]["obj_type_names"]["car"] == "vehicle"
    paper = merged("config/paper.yaml")
    assert paper["dataset"]["name"] == "v2xpnp" and set(paper["extra_datasets"]) == {"synthetic_b"}


def test_each_dataset_hashes_only_what_its_own_data_depends_on():
    """The `depends` params of the data jobs (workflow/rules/common.smk): no dataset's jobs rerun for
    another dataset's change; the primary's hashes are those of the single-dataset pipeline."""
    from turbotrain.contract import cache_depends, depends_hash, download_depends, raw_depends

    def hashes(cfg, name):
        return tuple(depends_hash(f(cfg, name)) for f in (raw_depends, cache_depends, download_depends))

    alone = load_config("config/config.yaml", ["extra_datasets={}", "experiments.groups=[]"])  # no grid using synthetic_b
    cfg = load_config("config/config.yaml")
    before = hashes(alone, "synthetic")
    assert hashes(cfg, "synthetic") == before  # the primary's data does not depend on the extra datasets

    b = hashes(cfg, "synthetic_b")
    assert len(set(b) | set(before)) == 6

    def changed(**entry):
        new = copy.deepcopy(cfg)
        new["extra_datasets"]["synthetic_b"].update(entry)
        return hashes(new, "synthetic"), hashes(new, "synthetic_b")

    ours, theirs = changed(class_map={"vehicle": "car"})
    assert ours == before and theirs[0] == b[0] and theirs[1] != b[1]  # read differently, same raw data
    overrides = {**cfg["extra_datasets"]["synthetic_b"]["synthetic_overrides"], "workers": 7}
    ours, theirs = changed(synthetic_overrides=overrides)
    assert ours == before and theirs[:2] == b[:2]  # workers: how fast, not what (a download hashes it all)
    ours, theirs = changed(seed=4)
    assert ours == before and theirs[0] != b[0] and theirs[1] != b[1]
    # without a seed of its own, a dataset follows the top-level one
    new = copy.deepcopy(cfg)
    del new["extra_datasets"]["synthetic_b"]["seed"]
    new["seed"] = 1
    assert hashes(new, "synthetic_b")[:2] == b[:2]


def test_a_pretraining_variant_in_the_grid_must_name_configured_datasets():
    from turbotrain.config import check_config

    config = load_config("config/config.yaml")
    config["experiments"]["groups"].append({"tables": ["transfer"], "pretrain": ["typo"]})
    config["pretrain"]["variants"]["typo"] = {"type": "trajectory", "datasets": ["synthetic", "synthtic_b"]}
    with pytest.raises(ConfigError, match=r"pretrain.variants.typo.datasets: 'synthtic_b' is not a configured dataset"):
        check_config(config)
    config["experiments"]["groups"].pop()  # an unused variant is not checked (merged configs inherit them)
    check_config(config)
