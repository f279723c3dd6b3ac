"""The DAG itself: lint-clean, the paper grid plans >= 200 jobs, one product plans only its subgraph."""
import re

from pipeline_helpers import REPO_ROOT, SMOKE_CONFIG, run_command


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
