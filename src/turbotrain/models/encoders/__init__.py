"""Per-agent 3D encoders (voxelised point cloud -> BEV features); importing registers them in ENCODERS."""
from turbotrain.models.encoders.base import VoxelEncoder
from turbotrain.models.encoders.pointpillars import PointPillarsEncoder
from turbotrain.models.encoders.second import SECOND_RES_SIZES, SECOND_SIZES, SecondEncoder, SecondResEncoder

__all__ = ["VoxelEncoder", "SecondEncoder", "SecondResEncoder", "PointPillarsEncoder", "SECOND_SIZES", "SECOND_RES_SIZES"]
