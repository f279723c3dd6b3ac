"""A run directory is resumed only by a job started from the same inputs."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from turbotrain.utils.atomic import write_json
from turbotrain.utils.hashing import config_hash

log = logging.getLogger(__name__)


def claim_run_dir(run_dir: Path, inputs: dict) -> None:
    """Resume a run directory only if it was started from the same inputs; else move it aside.

    The engine resumes any ``last.pt`` it finds. After a change of data, pretrained weights or
    settings that Snakemake reruns a job for, resuming would silently return the old weights, so
    an attempt made from other inputs is kept as ``<dir>.stale-<digest>`` and training restarts.
    """
    digest = config_hash(inputs)
    marker = run_dir / "fingerprint.json"
    if marker.exists():
        previous = json.loads(marker.read_text())["digest"]
        if previous != digest:
            stale = run_dir.with_name(f"{run_dir.name}.stale-{previous}")
            if stale.exists():
                shutil.rmtree(stale)
            run_dir.rename(stale)
            log.warning("%s was started from other inputs; kept as %s, training from scratch", run_dir, stale)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(marker, {"digest": digest, "inputs": inputs})
