"""Per-agent 3D encoders (voxelised point cloud -> BEV features); importing registers them in ENCODERS."""
from turbotrain.models.encoders.base import VoxelEncoder
from turbotrain.models.encoders.pointpillars import PointPillarsEncoder
from turbotrain.models.encoders.second import SECOND_SIZES, SecondEncoder

__all__ = ["VoxelEncoder", "SecondEncoder", "PointPillarsEncoder", "SECOND_SIZES"]
