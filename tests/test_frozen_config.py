"""A running pipeline's jobs read the config it was started with, whatever else runs in the folder.

Reproduction of the bug this guards against: `snakemake all --configfile smoke.yaml miss5.yaml`
running while `snakemake --report/--summary/--dag --configfile smoke.yaml` parse the same workflow.
They used to rewrite the one effective config file the running pipeline's later jobs read.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline_helpers import SMOKE_CONFIG, Pipeline, copy_repo, run_command, wait_until, write_yaml


def miss_thresholds(document) -> set[float]:
    """Every `miss_threshold` value anywhere in a metrics document."""
    if isinstance(document, dict):
        found = {float(v) for k, v in document.items() if k == "miss_threshold" and isinstance(v, (int, float))}
        return found.union(*(miss_thresholds(v) for v in document.values()))
    if isinstance(document, list):
        return set().union(*(miss_thresholds(v) for v in document))
    return set()


TARGET = "results/tables/main.csv"


@pytest.mark.slow
def test_other_commands_beside_a_running_pipeline_change_nothing_it_reads(tmp_path):
    repo = copy_repo(tmp_path / "repo")
    miss5 = write_yaml(repo / "miss5.yaml", {"evaluation": {"miss_threshold": 5.0}})
    # One table's subgraph (data, pretraining, fine-tuning, evaluation) on both cores: every kind of
    # job that reads the frozen config, without the figures and the second dataset of `all`.
    pipe = Pipeline(repo, [SMOKE_CONFIG, miss5], cores=2)
    proc = pipe.start(TARGET)
    # once training jobs were planned and started, parse the workflow with another config
    wait_until(lambda: any((repo / "logs" / "finetune").rglob("*.log")), proc, timeout_s=900)
    for flags in (["--report", "report.html"], ["--summary"], ["--dag"]):
        run_command(["snakemake", *flags, "--configfile", SMOKE_CONFIG], repo)
    assert proc.wait(timeout=1800) == 0, (repo / "snakemake.out").read_text()[-4000:]

    metrics = sorted((repo / "results" / "metrics").rglob("*.json"))
    assert metrics
    for path in metrics:
        document = json.loads(path.read_text())
        assert miss_thresholds(document) == {5.0}, path
        # every metrics file carries the same test-scene replicates (claims pair differences by them)
        assert document["bootstrap"]["scenes"] and len(document["bootstrap"]["draws"]["epa"]) == 200, path
    dry = pipe.run(TARGET, extra=["-n"])
    assert dry.returncode == 0 and "Nothing to be done" in dry.output, dry.output[-3000:]

    # A changed scoring threshold of the training curve reruns fine-tuning from scratch, not from
    # the old run's last.pt (whose curve points were scored with the old threshold).
    run_dir = next((repo / "runs" / "finetune").rglob("summary.json")).parent
    target = str((run_dir / "final.pt").relative_to(repo))
    rethreshold = write_yaml(repo / "score3.yaml", {"evaluation": {"miss_threshold": 5.0, "score_threshold": 0.3}})
    done = Pipeline(repo, [SMOKE_CONFIG, rethreshold]).run(target)
    assert done.returncode == 0, done.output[-3000:]
    log = Path(repo / "logs" / "finetune" / Path(target).relative_to("runs/finetune").parent).with_suffix(".log")
    text = log.read_text()
    assert "training from scratch" in text and "resumed from step" not in text, text[-3000:]
