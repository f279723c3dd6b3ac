"""The experiment grid: config ``experiments.groups`` -> concrete runs with stable ids and paths.

The Snakefile and the table builders both read runs from here, so a run id means the same thing in
the DAG, on disk and in a table.
"""
from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

# fusion wildcard -> (what the data loader feeds, which model fuser); late fusion reuses the ego-only
# model and fuses boxes at evaluation time.
FUSION_MODES = {
    "none": ("none", "ego"),
    "early": ("early", "ego"),
    "late": ("none", "ego"),
    "fcooper": ("intermediate", "fcooper"),
    "attfuse": ("intermediate", "attfuse"),
    "v2xvit": ("intermediate", "v2xvit"),
}

# Pretraining types (`pretrain.variants.<name>.type`) that mask LiDAR, and those that read tracks.
LIDAR_TYPES = ("ego_only", "multi_agent", "spatiotemporal", "lidar_trajectory")
TRAJECTORY_TYPES = ("trajectory", "lidar_trajectory")


@dataclass(frozen=True, order=True)
class Run:
    dataset: str
    fusion: str
    pretrain: str
    recipe: str
    balancer: str
    label_fraction: float
    seed: int

    @property
    def trained_fusion(self) -> str:
        """Late fusion evaluates the checkpoint trained without fusion."""
        return "none" if self.fusion == "late" else self.fusion

    @property
    def train_dir(self) -> str:
        return (f"runs/finetune/{self.dataset}/{self.trained_fusion}/{self.pretrain}/{self.recipe}-{self.balancer}/"
                f"lf{self.label_fraction:g}/seed{self.seed}")

    @property
    def metrics_path(self) -> str:
        return (f"results/metrics/{self.dataset}/{self.fusion}/{self.pretrain}/{self.recipe}-{self.balancer}/"
                f"lf{self.label_fraction:g}/seed{self.seed}.json")

    def as_dict(self) -> dict:
        return asdict(self)


def expand_runs(config: dict, table: str | None = None) -> list[Run]:
    """All runs of the grid (or of the groups that feed ``table``), sorted and de-duplicated."""
    dataset = config["dataset"]["name"]
    seeds = config["experiments"]["seeds"]
    runs = set()
    for group in config["experiments"]["groups"]:
        if table is not None and table not in group["tables"]:
            continue
        axes = [group["fusion"], group["pretrain"], group["recipe"], group["balancer"], group["label_fraction"],
                group.get("seeds", seeds)]
        for fusion, pretrain, recipe, balancer, fraction, seed in itertools.product(*axes):
            # the manual recipe weights its joint stage by hand: its balancer is always `fixed`
            balancer = "fixed" if recipe == "multistage" else balancer
            runs.add(Run(dataset, fusion, pretrain, recipe, balancer, float(fraction), int(seed)))
    unknown = {r.pretrain for r in runs} - set(config["pretrain"]["variants"])
    if unknown:
        raise ValueError(f"experiments.groups name pretraining variants {sorted(unknown)} that "
                         f"pretrain.variants does not define ({sorted(config['pretrain']['variants'])})")
    return sorted(runs)


def pretrain_path(dataset: str, fusion: str, pretrain: str) -> str:
    return f"runs/pretrain/{dataset}/{fusion}/{pretrain}/pretrained.pt"


def variant_datasets(config: dict, pretrain: str) -> list[str]:
    """The datasets pretraining variant ``pretrain`` reads (default: the fine-tuning dataset)."""
    return list(config["pretrain"]["variants"][pretrain].get("datasets") or [config["dataset"]["name"]])


def pretraining_sources(config: dict, pretrain: str) -> str:
    """``A+B`` for a variant pretrained on datasets A and B; ``–`` for no pretraining."""
    if config["pretrain"]["variants"][pretrain]["type"] == "none":
        return "–"
    return "+".join(variant_datasets(config, pretrain))


def pretrain_settings(config: dict, pretrain: str) -> dict:
    """Everything one pretraining job's result depends on in the config: its own variant (not the
    other variants), the shared pretraining settings, its datasets, the model and the data layout.

    Snakemake hashes it into the job's ``depends`` param and the stage into the run folder's
    fingerprint, so adding or editing another variant reruns and restarts nothing.
    """
    shared = {k: v for k, v in config["pretrain"].items() if k != "variants"}
    return {"variant": config["pretrain"]["variants"][pretrain], "pretrain": shared,
            "datasets": variant_datasets(config, pretrain),
            **{k: config[k] for k in ("model", "grid", "classes", "seed")}}
