"""Several datasets in one pipeline: per-dataset configs, and the union pretraining reads.

Two tiny synthetic datasets go through the real data stages (generate, fuse) the way
`turbotrain <verb> --dataset NAME` runs them: the primary one, and `synthetic_b` of the config,
which writes its labels in another vocabulary (vehicle / bus / walker) that its `class_map` reads
back onto our classes.
"""
import copy
from pathlib import Path

import numpy as np
import pytest
import yaml

from test_config import merged
from test_fusion import CLASSES as TOY_CLASSES
from test_fusion import fuse as fuse_toy
from test_fusion import write_toy_world
from turbotrain.cli import main as cli_main
from turbotrain.config import validate_config
from turbotrain.data.dataset import FusedDataset, UnionDataset
from turbotrain.data.opencood import index_split, read_trajectories
from turbotrain import contract
from turbotrain.stages import data
from turbotrain.utils.errors import ConfigError

TINY = {"splits": {"train": 1}, "frames": 12, "workers": 1}
RENAMED = {"car": "vehicle", "truck": "bus", "pedestrian": "walker"}


def two_dataset_config(tmp: Path) -> dict:
    """The smoke config with both datasets shrunk to one 12-frame scenario, writing under ``tmp``.

    `synthetic_b` keeps its own sensors, names and class_map from config/config.yaml but uses the
    primary's seed, so both datasets hold the same scene and traffic (the generator draws traffic
    and sensor noise from separate streams) and their labels can be compared box by box.
    """
    cfg = merged("config/smoke.yaml")
    cfg["dataset"].update(root=str(tmp / "raw"), synthetic_overrides=dict(TINY))
    b = cfg["extra_datasets"]["synthetic_b"]
    b.update(root=str(tmp / "raw"), seed=cfg["seed"])
    b["synthetic_overrides"].update(TINY)
    cfg["cache"].update(root=str(tmp / "cache"), sample_stride=2)
    return validate_config(cfg)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Both datasets generated and their train split fused, each on its own `with_dataset` config."""
    tmp = tmp_path_factory.mktemp("datasets")
    cfg = two_dataset_config(tmp)
    for name in contract.dataset_names(cfg):
        mine = contract.with_dataset(cfg, name)
        data.generate(mine, contract.raw_dir(mine))
        data.fuse(mine, contract.raw_dir(mine), "train", Path(cfg["cache"]["root"]) / name)
    return cfg


def cache_of(cfg: dict, name: str) -> Path:
    return Path(cfg["cache"]["root"]) / name


def track_types(raw: str, sample_id: str) -> dict[int, str]:
    """obj_type of every track at the sample's time, as the dataset's own files name it."""
    split, scenario, _, timestamp = sample_id.split("/")
    (index,) = [i for i in index_split(raw, split) if i.name == scenario]
    tracks = read_trajectories(index)
    now = tracks[tracks.timestamp == timestamp]
    return dict(zip(now.track_id.astype(int), now.obj_type))


def test_the_config_names_both_datasets_primary_first(built):
    assert contract.dataset_names(built) == ["synthetic_smoke", "synthetic_b"]
    b = contract.with_dataset(built, "synthetic_b")
    assert b["dataset"]["name"] == "synthetic_b" and b["dataset"]["preset"] == "smoke"
    assert b["dataset"]["synthetic_overrides"]["obj_type_names"] == RENAMED
    assert Path(contract.raw_dir(b)) == Path(built["dataset"]["root"]) / "synthetic_b"


def test_union_concatenates_the_sources_with_their_class_maps_applied(built):
    a = FusedDataset(cache_of(built, "synthetic_smoke"), "train")
    b = FusedDataset(cache_of(built, "synthetic_b"), "train")
    union = UnionDataset([a, b])
    assert union.sources == ["synthetic_smoke", "synthetic_b"] and union.classes == built["classes"]
    assert len(a) > 0 and len(union) == len(a) + len(b)
    assert [union.source_of(i) for i in (0, len(a) - 1, len(a), -1)] == ["synthetic_smoke"] * 2 + ["synthetic_b"] * 2
    assert union.locate(len(a)) == (1, 0) and union.locate(-1) == (1, len(b) - 1)
    with pytest.raises(IndexError):
        union[len(union)]

    # B's files speak vehicle / bus / walker only; its class_map brought them back onto `classes`.
    b_raw = contract.raw_dir(contract.with_dataset(built, "synthetic_b"))
    (b_index,) = index_split(b_raw, "train")
    assert set(read_trajectories(b_index).obj_type) <= set(RENAMED.values())
    class_map = built["extra_datasets"]["synthetic_b"]["class_map"]
    seen = set()
    for i in range(len(a), len(union)):
        sample = union[i]
        types = track_types(b_raw, sample.sample_id)
        for track, cls in zip(sample.track_ids.tolist(), sample.classes.tolist()):
            assert union.classes[cls] == class_map[types[track]]  # e.g. a bus is a truck
            seen.add(types[track])
    assert {"vehicle", "walker"} <= seen

    # Same seed, same traffic: every sample of B carries exactly A's boxes and class indices.
    assert [union.sample_id(i) for i in range(len(a))] == [union.sample_id(len(a) + i) for i in range(len(b))]
    for i in range(len(a)):
        sa, sb = union[i], union[len(a) + i]
        np.testing.assert_array_equal(sa.track_ids, sb.track_ids)
        np.testing.assert_array_equal(sa.classes, sb.classes)
        np.testing.assert_allclose(sa.boxes, sb.boxes)
    a_classes = np.concatenate([union[i].classes for i in range(len(a))])
    assert set(a_classes.tolist()) >= {built["classes"].index("car"), built["classes"].index("pedestrian")}


def test_a_name_the_class_map_leaves_out_is_dropped_and_counted(built, tmp_path):
    """As in the fusion stage: a type neither mapped nor in `classes` is dropped, per sample counted."""
    cfg = copy.deepcopy(built)
    cfg["extra_datasets"]["synthetic_b"]["class_map"] = {"vehicle": "car", "bus": "truck"}  # no walker
    b = contract.with_dataset(cfg, "synthetic_b")
    summary = data.fuse(b, contract.raw_dir(b), "train", tmp_path)
    assert summary["skipped"]["unknown_object_types"].get("walker", 0) > 0
    assert set(summary["skipped"]["unknown_object_types"]) == {"walker"}
    pedestrian = cfg["classes"].index("pedestrian")
    partial = FusedDataset(tmp_path, "train")
    full = FusedDataset(cache_of(built, "synthetic_b"), "train")
    assert len(partial) == len(full)
    dropped = 0
    for i in range(len(full)):
        kept, every = partial[i].classes, full[i].classes
        assert pedestrian not in kept.tolist()
        np.testing.assert_array_equal(kept, every[every != pedestrian])
        dropped += int((every == pedestrian).sum())
    assert dropped > 0


def test_union_refuses_caches_fused_with_other_class_lists(tmp_path):
    raw = write_toy_world(tmp_path / "raw")
    fuse_toy(raw, tmp_path / "one")
    fuse_toy(raw, tmp_path / "two", classes=tuple(reversed(TOY_CLASSES)))
    one, two = FusedDataset(tmp_path / "one", "train"), FusedDataset(tmp_path / "two", "train")
    with pytest.raises(ConfigError) as err:
        UnionDataset([one, two])
    msg = str(err.value)
    assert str(one.split_dir) in msg and str(two.split_dir) in msg
    assert str(list(TOY_CLASSES)) in msg and str(list(reversed(TOY_CLASSES))) in msg
    with pytest.raises(ConfigError, match="unique"):
        UnionDataset([one, FusedDataset(tmp_path / "one", "train")], sources=["a", "a"])
    with pytest.raises(ConfigError, match="history"):
        UnionDataset([one, FusedDataset(tmp_path / "one", "train", history=1)], sources=["a", "b"])
    assert len(UnionDataset([one, one], sources=["a", "b"])) == 2 * len(one)


def test_verbs_take_dataset_and_name_the_known_ones(built, tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(built))
    code = cli_main(["fuse", "--config", str(config), "--dataset", "nope", "--raw", str(tmp_path),
                     "--split", "train", "--out", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert code == 2 and "'nope'" in err and "synthetic_smoke" in err and "synthetic_b" in err
    # `show --dataset synthetic_b` draws B's sample with the config of B
    png = tmp_path / "b.png"
    assert cli_main(["show", "--config", str(config), "--dataset", "synthetic_b", "--cache",
                     str(cache_of(built, "synthetic_b")), "--split", "train", "--out", str(png)]) == 0
    assert png.stat().st_size > 0
