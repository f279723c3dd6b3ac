"""Global point-cloud augmentation of pretraining samples (CooPre's recipe), drawn per sample and epoch.

CooPre (ucla-mobility/CooPre@2254e89 `hypes_yaml/second_coopre.yaml`, OpenCOOD's
`data_utils/augmentor/augment_utils.py`) augments the fused cloud with a flip along x (y -> -y, with
probability 0.5), a rotation about z drawn uniformly in +-45 degrees and a scaling drawn uniformly in
[0.95, 1.05]. Here the three make one 4x4 matrix ``A`` of the ego frame. A sample whose agents keep
their own frames is augmented consistently: each agent's points get ``A`` and its pose to the ego
becomes ``A P A^-1``, which is rigid again (a flip conjugates a rotation into a rotation), so
``A P p = (A P A^-1)(A p)`` is the augmented ego cloud.

The draw is a pure function of (seed, epoch, sample index): the engine's reproducibility contract
(``train/engine.py``) holds with any number of loader workers and across a resume.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class GlobalAugmentation:
    flip_x: bool = False          # mirror y with probability 0.5 (OpenCOOD's random_flip_along_x)
    rotation_deg: float = 0.0     # rotation about z, uniform in [-rotation_deg, rotation_deg]
    scale: tuple[float, float] = (1.0, 1.0)  # uniform scaling range

    @classmethod
    def from_config(cls, cfg: dict | None) -> "GlobalAugmentation | None":
        """``pretrain.augmentation`` -> an augmentation, or None when it changes nothing."""
        if not cfg:
            return None
        augmentation = cls(bool(cfg.get("flip_x", False)), float(cfg.get("rotation_deg", 0.0)),
                           tuple(float(s) for s in cfg.get("scale", (1.0, 1.0))))
        return None if augmentation.is_identity else augmentation

    @property
    def is_identity(self) -> bool:
        return not self.flip_x and self.rotation_deg == 0.0 and self.scale == (1.0, 1.0)

    def draw(self, seed: int, epoch: int, index: int) -> np.ndarray:
        """The 4x4 ego-frame transform of sample ``index`` in ``epoch``."""
        rng = np.random.default_rng([seed, epoch, index])
        flip = np.diag([1.0, -1.0, 1.0, 1.0]) if self.flip_x and rng.random() < 0.5 else np.eye(4)
        angle = math.radians(rng.uniform(-self.rotation_deg, self.rotation_deg))
        c, s = math.cos(angle), math.sin(angle)
        rotation = np.array([[c, -s, 0, 0], [s, c, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=np.float64)
        factor = rng.uniform(*self.scale)
        scaling = np.diag([factor, factor, factor, 1.0])
        # OpenCOOD's order: flip, then rotation, then scaling
        return scaling @ rotation @ flip


def conjugate_pose(augmentation: np.ndarray, pose_to_ego: np.ndarray) -> np.ndarray:
    """``A P A^-1``: the agent's pose once both its own frame and the ego frame are augmented by ``A``."""
    return augmentation @ pose_to_ego @ np.linalg.inv(augmentation)
