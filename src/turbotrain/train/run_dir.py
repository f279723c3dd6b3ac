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
    """Resume a run directory only if it was started from the same inputs; else start it afresh.

    The engine resumes any ``last.pt`` it finds. After a change of data, pretrained weights or
    settings that Snakemake reruns a job for, resuming would silently return the old weights, so
    an attempt made from other inputs is removed and training restarts. (It is not kept beside the
    run: run folders are DVC outputs, and stale copies would pile up there and be pushed.)
    """
    digest = config_hash(inputs)
    marker = run_dir / "fingerprint.json"
    if marker.exists():
        previous = json.loads(marker.read_text())
        if previous["digest"] != digest:
            changed = _changed_keys(previous["inputs"], json.loads(json.dumps(inputs)))
            shutil.rmtree(run_dir)
            log.warning("%s was started from other inputs (%s changed): removed, training from scratch",
                        run_dir, ", ".join(changed))
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(marker, {"digest": digest, "inputs": inputs})


def _changed_keys(before: dict, after: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ, down to the second level (e.g. ``depends.evaluation.curve``)."""
    changed = []
    for key in sorted({*before, *after}):
        a, b = before.get(key), after.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict) and not prefix:
            changed += _changed_keys(a, b, f"{key}.")
        else:
            changed.append(prefix + key)
    return changed
