"""Data stages: generate / download the raw dataset, build the fusion cache, draw a sample.

Every stage reads ``config["dataset"]``. The config may name more datasets under ``extra_datasets``
(pretraining data); :func:`with_dataset` gives the config in which one of them is ``dataset``, which
is what ``turbotrain <verb> --dataset NAME`` and the per-dataset Snakemake jobs run on.
"""
from __future__ import annotations

import copy
import logging
import shutil
from pathlib import Path

from turbotrain.utils.hashing import config_hash
from turbotrain.grid import Grid
from turbotrain.utils.errors import ConfigError

log = logging.getLogger(__name__)


def dataset_names(config: dict) -> list[str]:
    """Every configured dataset: the primary ``dataset.name`` first, then ``extra_datasets`` in config order."""
    return [config["dataset"]["name"], *config.get("extra_datasets", {})]


def with_dataset(config: dict, name: str) -> dict:
    """A deep copy of ``config`` in which the dataset called ``name`` is ``dataset``.

    For an extra dataset, its entry (with ``name`` filled in) becomes ``dataset`` and its ``seed``
    (default: the top-level seed) becomes the copy's top-level ``seed``: the data stages seed
    generation and the fusion cache's label-fraction subsets with it, so one dataset's data never
    depends on which dataset is primary. The primary moves to ``extra_datasets`` (with the seed it
    was built with), so the copy names the same datasets and validates again. The primary's own
    copy is an unchanged deep copy.
    """
    primary = config["dataset"]["name"]
    out = copy.deepcopy(config)
    if name == primary:
        return out
    extras = out.get("extra_datasets", {})
    if name not in extras:
        raise ConfigError(f"dataset {name!r}: no such dataset; configured: {', '.join(dataset_names(config))} "
                          "(dataset.name and the keys of extra_datasets)")
    entry = extras.pop(name)
    seed = entry.pop("seed", config["seed"])
    demoted = {k: v for k, v in out["dataset"].items() if k != "name"}
    out["dataset"] = {"name": name, **entry}
    out["extra_datasets"] = {primary: {**demoted, "seed": config["seed"]}, **extras}
    out["seed"] = seed
    return out


# Dataset keys the raw data depends on (class_map and on_bad_frame only matter when it is read).
GENERATION_KEYS = ("name", "source", "preset", "synthetic_overrides", "urls", "local_path")


def raw_data_hash(config: dict) -> str:
    """What the raw data of ``config["dataset"]`` depends on: its generation keys and the top-level
    seed (a :func:`with_dataset` copy carries the dataset's own); the generator's process count
    changes how fast, not what."""
    section = {k: config["dataset"][k] for k in GENERATION_KEYS}
    section["synthetic_overrides"] = {k: v for k, v in section["synthetic_overrides"].items() if k != "workers"}
    return config_hash({"dataset": section, "seed": config["seed"]})


def download_data_hash(config: dict) -> str:
    """A download depends on the whole dataset section (urls, checksums, names)."""
    return config_hash({"dataset": config["dataset"]})


def cache_data_hash(config: dict) -> str:
    """What the fusion cache of ``config["dataset"]`` depends on besides its raw data (the seed draws
    the label-fraction subsets)."""
    reading = {k: config["dataset"][k] for k in ("class_map", "on_bad_frame")}
    return config_hash({"reading": reading, **{k: config[k] for k in ("cache", "grid", "classes", "seed")}})


def raw_root(config: dict) -> str:
    """Folder holding the OpenCOOD-layout data the fusion stage reads."""
    ds = config["dataset"]
    if ds["source"] == "local":
        if not ds["local_path"]:
            raise ConfigError(f"dataset.local_path: expected the unpacked dataset folder when dataset.source is 'local' "
                              f"(dataset {ds['name']!r})")
        return ds["local_path"]
    return str(Path(ds["root"]) / ds["name"])


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished folder into place; an old one is removed only once the new one is complete."""
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def generate(config: dict, out_dir: str | Path) -> dict:
    from turbotrain.data.synth import generate_dataset

    out = Path(out_dir)
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    ds = config["dataset"]
    summary = generate_dataset(tmp, preset=ds["preset"], seed=config["seed"], overrides=ds["synthetic_overrides"])
    _replace_dir(tmp, out)
    return summary


def download(config: dict, out_dir: str | Path) -> Path:
    from turbotrain.data.download import download_all

    urls = config["dataset"]["urls"]
    if not urls:
        raise ConfigError(f"dataset.urls: expected at least one {{url, sha256}} entry when dataset.source is 'download' "
                          f"(dataset {config['dataset']['name']!r}; V2XPnP-Seq sits behind a registration page: "
                          "paste the links you received, see README)")
    return download_all(urls, out_dir)


def cache_grid(config: dict) -> Grid:
    return Grid.from_config(config["grid"])


def fuse(config: dict, raw: str | Path, split: str, out_dir: str | Path) -> dict:
    from turbotrain.data.cache.builder import build_cache

    if config["dataset"]["source"] == "download":  # data from `dvc pull` or a copy: was it the pinned archive?
        from turbotrain.data.download import check_downloaded

        check_downloaded(raw, config["dataset"]["urls"])
    c, g = config["cache"], config["grid"]
    return build_cache(
        raw, split, out_dir,
        history=c["history"], future=c["future"], comm_range=c["comm_range"], grid=cache_grid(config),
        classes=config["classes"], class_map=config["dataset"]["class_map"], max_agents=c["max_agents"],
        max_points_per_voxel=g["max_points_per_voxel"], max_voxels=g["max_voxels"],
        sample_stride=c["sample_stride"], ego_types=tuple(c["ego_types"]),
        on_bad_frame=config["dataset"]["on_bad_frame"], label_fractions=tuple(c["label_fractions"]),
        seed=config["seed"],
    )


def show(config: dict, cache_root: str | Path, split: str, index: int, out_png: str | Path) -> None:
    from turbotrain.data.dataset import FusedDataset
    from turbotrain.viz.bev import plot_sample_bev

    dataset = FusedDataset(cache_root, split, fusion_mode="intermediate", grid=cache_grid(config))
    sample = dataset[index]
    plot_sample_bev(sample, out_png, cache_grid(config), config["classes"], title=sample.sample_id)
