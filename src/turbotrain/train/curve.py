"""The training curve: AP@0.5 and EPA on a few validation samples at each checkpoint, against
training time (what ``efficiency.csv``'s time-to-target reads), and precise BatchNorm."""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch
from torch.optim.swa_utils import update_bn
from torch.utils.data import DataLoader, Subset

from turbotrain.data.sample import collate
from turbotrain.evaluate.inference import Predictor, collect
from turbotrain.evaluate.scoring import score_split
from turbotrain.contract import Run
from turbotrain.train.checkpoint import load_checkpoint
from turbotrain.train.distributed import unwrap_model
from turbotrain.utils.atomic import write_json


# Precise BatchNorm's sample: 4 batches of 4 training samples, for every curve point and the final
# weights alike, so that the curve's last point is the final model (and its recalibration is reused).
PRECISE_BN_BATCHES = 4


class TrainingCurve:
    """Scores a few validation samples at each checkpoint: AP@0.5 and EPA against training time.

    Each point scores a copy of the model whose BatchNorm statistics were recomputed on a few
    training batches, as the final model's are: stale running averages would make a curve measure
    how fast BN statistics settle rather than how fast the model learns. Scoring time is excluded.
    """

    POINTS_FILE = "curve.json"  # per stage directory, next to the stage's last.pt

    def __init__(self, config: dict, run: Run, val_data, device: torch.device):
        """``val_data``: the validation split as the run's fusion method reads it (None: no curve)."""
        self.config, self.run, self.device = config, run, device
        self.train_data = None
        self.limit = config["evaluation"]["curve_samples"] if val_data is not None else 0
        self.data = val_data
        self.points: list[dict] = []
        self.stage_dir, self.stage_first, self.offset, self.started, self.hook_s = None, 0, 0.0, time.time(), 0.0
        self.recalibrated: tuple[Path, int, dict] | None = None  # (stage_dir, step, weights) of the last point

    def __call__(self, step: int, model) -> None:
        if not self.limit:
            return
        began = time.time()
        self._score(step, unwrap_model(model), self.offset + began - self.started - self.hook_s)
        self.hook_s += time.time() - began

    def _score(self, step: int, model, wall_s: float) -> None:
        scored = copy.deepcopy(model)
        recalibrate_batchnorm(scored, self.train_data, self.run.seed)
        self.recalibrated = (self.stage_dir, int(step), scored.state_dict())
        predictor = Predictor(scored, self.config["evaluation"], self.device)
        det, pred = score_split(*collect(predictor, self.data, self.run.fusion, self.config["evaluation"], self.limit),
                          self.config)
        self.points.append({"step": int(step), "wall_s": wall_s, "ap50": det["map"].get("0.5"), "epa": pred["epa"]})
        write_json(self.stage_dir / self.POINTS_FILE, self.points[self.stage_first:])

    def recalibrated_weights(self, stage_dir: Path, step: int) -> dict | None:
        """The BatchNorm-recalibrated weights the last point scored, if it was ``step`` of ``stage_dir``
        (recalibrated on that stage's training data)."""
        if self.recalibrated is None or self.recalibrated[:2] != (stage_dir, step):
            return None
        return self.recalibrated[2]

    def start_stage(self, offset_s: float, stage_dir: Path, train_data, model) -> None:
        """Continue the time axis after ``offset_s`` of earlier training, with the stage in ``stage_dir``.

        The points live in memory only until the job ends, so each stage also keeps its own on disk:
        a stage resuming from last.pt (a killed or requeued job) takes back the points scored up to
        that checkpoint, scores that checkpoint itself if the kill came while it was being scored,
        and its clock continues from the checkpoint's training time.
        """
        self.stage_dir, self.stage_first, self.train_data = stage_dir, len(self.points), train_data
        self.offset, self.started, self.hook_s = offset_s, time.time(), 0.0
        if not (self.limit and (stage_dir / "last.pt").exists()):
            return
        checkpoint = load_checkpoint(stage_dir / "last.pt")
        progress = checkpoint["progress"]
        self.offset += progress["wall_s"]
        self.points += [p for p in self._saved_points() if p["step"] <= progress["step"]]
        if progress["step"] and not any(p["step"] == progress["step"] for p in self.points[self.stage_first:]):
            resumed = copy.deepcopy(model)
            resumed.load_state_dict(checkpoint["model"])
            self._score(progress["step"], resumed, self.offset)
        self.started = time.time()

    def _saved_points(self) -> list[dict]:
        """This stage's points on disk; none when a kill came between last.pt and the first point."""
        path = self.stage_dir / self.POINTS_FILE
        return json.loads(path.read_text()) if path.exists() else []


def recalibrate_batchnorm(model, data, seed: int, batches: int = PRECISE_BN_BATCHES, batch_size: int = 4) -> None:
    """Precise BatchNorm: recompute running statistics with the final weights on training samples.

    The encoders keep OpenPCDet's BN momentum (0.01), tuned for 80-epoch runs; after a short run the
    running averages still mix early weights' statistics and eval-mode inference finds nothing.
    """
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data), generator=generator)[: batches * batch_size].tolist()
    loader = DataLoader(Subset(data, order), batch_size=batch_size, collate_fn=collate)
    update_bn(loader, model, device=next(model.parameters()).device)
