"""Data stages: generate / download the raw dataset, build the fusion cache, draw a sample.

Every stage reads ``config["dataset"]``. The config may name more datasets under ``extra_datasets``
(pretraining data); :func:`turbotrain.contract.with_dataset` gives the config in which one of them is
``dataset``, which is what ``turbotrain <verb> --dataset NAME`` (and so every data job) runs on.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

from turbotrain.grid import Grid
from turbotrain.utils.atomic import sync_tree
from turbotrain.utils.errors import ConfigError

log = logging.getLogger(__name__)


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
    # Files inside the temporary folder skip their own fsync: the folder is synced once, then renamed.
    summary = generate_dataset(tmp, preset=ds["preset"], seed=config["seed"], overrides=ds["synthetic_overrides"],
                               fsync=False)
    sync_tree(tmp)
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


def gt_range_rule(config: dict) -> str:
    """The ground-truth range rule of ``config["dataset"]`` (``auto``: that dataset's own)."""
    from turbotrain.data.cache.labels import resolve_gt_range_rule

    ds = config["dataset"]
    return resolve_gt_range_rule(ds["name"], ds["source"], ds["gt_range_rule"])


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
        seed=config["seed"], gt_range_rule=gt_range_rule(config), target_points_per_cell=c["target_points_per_cell"],
        workers=c["workers"],
    )


def show(config: dict, cache_root: str | Path, split: str, index: int, out_png: str | Path) -> None:
    from turbotrain.data.dataset import FusedDataset
    from turbotrain.viz.bev import plot_sample_bev

    dataset = FusedDataset(cache_root, split, fusion_mode="intermediate", grid=cache_grid(config))
    sample = dataset[index]
    plot_sample_bev(sample, out_png, cache_grid(config), config["classes"], title=sample.sample_id)
