"""The DAG itself: lint-clean, the paper grid plans >= 200 jobs, one product plans only its subgraph."""
import json
import re

import yaml
from pipeline_helpers import REPO_ROOT, SMOKE_CONFIG, run_command, smoke_merged_config

from turbotrain.contract import FROZEN_CONFIG_DIR, with_dataset

FROZEN = re.compile(re.escape(FROZEN_CONFIG_DIR) + r"/[0-9a-f]{16}\.yaml")


def planned(targets, configfile):
    done = run_command(["snakemake", "-n", *targets, "--forceall", "--configfile", configfile], REPO_ROOT)
    assert done.returncode == 0, done.output[-3000:]
    section = done.output[done.output.index("Job stats:"):]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", section, re.MULTILINE)}


def test_workflow_is_lint_clean():
    done = run_command(["snakemake", "--lint"], REPO_ROOT)
    assert done.returncode == 0 and "Congratulations, your workflow is in a good condition" in done.output, done.output[-3000:]


def test_paper_grid_plans_at_least_200_jobs_with_every_stage():
    jobs = planned(["all"], "config/paper.yaml")
    assert jobs["total"] >= 200
    assert {"download", "fuse", "pretrain", "finetune", "evaluate", "table", "figure"} <= set(jobs)
    assert jobs["fuse"] == 3 and jobs["table"] == 4


def test_one_table_plans_only_its_own_subgraph():
    jobs = planned(["results/tables/ablation.csv"], SMOKE_CONFIG)
    full = planned(["all"], SMOKE_CONFIG)
    assert jobs["table"] == 1 and "figure" not in jobs and "show_sample" not in jobs
    # the ablation runs of the smoke grid need one fine-tuning job, not the multistage ones
    assert jobs["finetune"] < full["finetune"]


def test_an_extra_dataset_is_generated_and_fused_on_demand_with_its_own_config():
    done = run_command(["snakemake", "-n", "-p", "data/cache/synthetic_b/train", "--forceall",
                        "--configfile", SMOKE_CONFIG], REPO_ROOT)
    assert done.returncode == 0, done.output[-3000:]
    jobs = planned(["data/cache/synthetic_b/train"], SMOKE_CONFIG)
    assert jobs == {"generate": 1, "fuse": 1, "total": 2}
    out = done.output
    frozen = FROZEN.search(out).group(0)
    assert f"turbotrain generate --config {frozen} --dataset synthetic_b --out data/raw/synthetic_b" in out
    assert (f"turbotrain fuse --config {frozen} --dataset synthetic_b --raw data/raw/synthetic_b "
            "--split train --out data/cache/synthetic_b") in out
    assert "logs/fuse/synthetic_b_train.log" in out and "benchmarks/fuse/synthetic_b_train.tsv" in out
    assert "synthetic_smoke" not in out  # nothing of the primary dataset
    # the job's config is the pipeline config with synthetic_b as `dataset` and its seed on top
    cfg = with_dataset(smoke_merged_config(), "synthetic_b")
    assert cfg["dataset"]["name"] == "synthetic_b" and cfg["dataset"]["preset"] == "smoke" and cfg["seed"] == 1
    assert cfg["dataset"]["synthetic_overrides"]["obj_type_names"]["truck"] == "bus"


def test_the_primary_dataset_keeps_its_paths_and_commands():
    done = run_command(["snakemake", "-n", "-p", "all", "--forceall", "--configfile", SMOKE_CONFIG], REPO_ROOT)
    assert done.returncode == 0, done.output[-3000:]
    out = done.output
    frozen = FROZEN.search(out).group(0)
    assert f"turbotrain generate --config {frozen} --dataset synthetic_smoke --out data/raw/synthetic_smoke" in out
    for split in ("train", "val", "test"):
        assert (f"turbotrain fuse --config {frozen} --dataset synthetic_smoke --raw data/raw/synthetic_smoke "
                f"--split {split} --out data/cache/synthetic_smoke") in out
    assert "logs/generate/synthetic_smoke.log" in out and "results/figures/synthetic_smoke_sample_bev.png" in out


def test_unknown_and_duplicate_dataset_names_fail_before_any_job():
    done = run_command(["snakemake", "-n", "data/cache/nope/train", "--configfile", SMOKE_CONFIG], REPO_ROOT)
    assert done.returncode != 0 and "No rule to produce data/cache/nope/train" in done.output
    done = run_command(["snakemake", "-n", "all", "--configfile", SMOKE_CONFIG,
                        "--config", "extra_datasets={synthetic_smoke: {preset: smoke}}"], REPO_ROOT)
    assert done.returncode != 0 and "extra_datasets.synthetic_smoke: this name is the primary dataset's" in done.output


def test_every_job_reads_a_frozen_config_named_by_its_content():
    """Jobs read `.turbotrain/configs/<digest>.yaml`: another config gets another file, and a file,
    once written, is never rewritten (so no later command can change what a queued job reads)."""
    outputs = [run_command(["snakemake", "-n", "-p", "all", "--forceall", "--configfile", SMOKE_CONFIG, *extra],
                           REPO_ROOT).output for extra in ([], ["--config", "seed=123"], [])]
    first, other, again = (set(FROZEN.findall(out)) for out in outputs)
    assert len(first) == 1 and first == again and first != other
    (path,) = first
    frozen = yaml.safe_load((REPO_ROOT / path).read_text())
    assert frozen == json.loads(json.dumps(smoke_merged_config()))
