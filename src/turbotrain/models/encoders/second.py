"""SECOND (Yan et al. 2018): mean VFE + sparse 3D conv backbone + height compression to BEV.

The layer layout follows OpenPCDet / OpenCOOD's ``VoxelBackBone8x``: an input submanifold conv, a
submanifold stage at full resolution, then one stage per factor 2 of ``grid.bev_stride``, each a
strided sparse conv (stride 2 in z, y, x) followed by submanifold convs, and a last sparse conv that
only shrinks z before the (C, D) -> C*D height compression.

Two small departures from OpenPCDet, both so that any grid works: the sparse grid depth is ``nz``
(OpenPCDet pads it to ``nz + 1``) and every strided stage pads z by 1 (OpenPCDet's last one pads 0);
the z conv's kernel is clipped to the depth left. With OpenCOOD's z range of 4 m at 0.1 m this still
gives 2 remaining z cells and 128 * 2 = 256 BEV channels, as OpenCOOD's SECOND.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from turbotrain.grid import Grid
from turbotrain.models.encoders.backends import SparseBackend, get_backend
from turbotrain.models.encoders.base import VoxelEncoder, height_compression, scatter_to_dense
from turbotrain.models.encoders.sparse_torch import conv_output_shape
from turbotrain.models.encoders.vfe import MeanVFE
from turbotrain.models.registry import ENCODERS


@dataclass(frozen=True)
class SecondSize:
    """Channels of stage 0 (full resolution) and of each strided stage; the last repeats if needed."""

    stage_channels: tuple[int, ...]
    subm_blocks: tuple[int, ...]  # submanifold blocks per stage (after the stage's strided conv)
    out_conv_channels: int  # channels of the z-shrinking conv; BEV channels = this * remaining depth

    def stage(self, i: int) -> tuple[int, int]:
        last = len(self.stage_channels) - 1
        return self.stage_channels[min(i, last)], self.subm_blocks[min(i, last)]


SECOND_SIZES = {
    # CPU-friendly: one submanifold block per stage, narrow channels
    "tiny": SecondSize(stage_channels=(16, 16, 32, 32), subm_blocks=(1, 1, 1, 1), out_conv_channels=32),
    # OpenCOOD's SECOND (VoxelBackBone8x): 16-32-64-64, two submanifold blocks per strided stage
    "paper": SecondSize(stage_channels=(16, 32, 64, 64), subm_blocks=(1, 2, 2, 2), out_conv_channels=128),
}

# OpenPCDet's BatchNorm settings for sparse backbones
_BN = dict(eps=1e-3, momentum=0.01)
_Z_KERNEL = 3


def _num_strided_stages(bev_stride: int) -> int:
    """log2(bev_stride): each strided stage halves x and y."""
    if bev_stride < 1 or bev_stride & (bev_stride - 1):
        raise ValueError(f"SECOND halves x/y per strided stage, so bev_stride must be a power of 2, got {bev_stride}")
    return bev_stride.bit_length() - 1


class SecondEncoder(VoxelEncoder):
    """SECOND encoder; ``backend`` picks spconv or the pure-PyTorch sparse conv (same parameters)."""

    def __init__(self, grid: Grid, size: str = "tiny", backend: str = "auto", in_channels: int = 4):
        super().__init__(grid)
        if size not in SECOND_SIZES:
            raise ValueError(f"unknown SECOND size {size!r}; expected one of {sorted(SECOND_SIZES)}")
        spec = SECOND_SIZES[size]
        sparse = get_backend(backend)
        self.backend_name = sparse.name
        nx, ny, nz = grid.grid_size
        self.sparse_shape = (nz, ny, nx)
        self.vfe = MeanVFE(in_channels)

        self.conv_input = _subm_block(sparse, in_channels, spec.stage(0)[0], "subm0")
        self.stages, channels, shape = _build_stages(sparse, spec, _num_strided_stages(grid.bev_stride), self.sparse_shape)

        # shrink z like OpenPCDet's conv_out (kernel 3, stride 2, no padding), but never past one cell
        z_kernel = min(_Z_KERNEL, shape[0])
        self.conv_out = sparse.sequential(
            sparse.sparse_conv(
                channels, spec.out_conv_channels, (z_kernel, 1, 1), stride=(2, 1, 1), padding=0, bias=False, indice_key="z_down"
            ),
            nn.BatchNorm1d(spec.out_conv_channels, **_BN),
            nn.ReLU(),
        )
        self.out_shape = conv_output_shape(shape, (z_kernel, 1, 1), (2, 1, 1), (0, 0, 0), (1, 1, 1))
        self.out_channels = spec.out_conv_channels * self.out_shape[0]
        if self.out_shape[1:] != grid.bev_shape:
            raise ValueError(f"SECOND output {self.out_shape[1:]} does not match grid.bev_shape {grid.bev_shape}")
        self._sparse = sparse

    def voxel_features(self, voxels: Tensor, num_points: Tensor) -> Tensor:
        return self.vfe(voxels, num_points)

    def forward_features(self, features: Tensor, coords: Tensor, num_frames: int) -> Tensor:
        self.check_coords(coords, num_frames)
        if len(coords) == 0:
            return self.empty_bev(num_frames, features)
        x = self._sparse.make_tensor(features, coords, self.sparse_shape, num_frames)
        x = self.conv_input(x)
        for stage in self.stages:
            x = stage(x)
        x = self.conv_out(x)
        dense = scatter_to_dense(x.features, x.indices, self.out_shape, num_frames)
        return height_compression(dense)


def _build_stages(
    sparse: SparseBackend, spec: SecondSize, strided: int, shape: tuple[int, int, int]
) -> tuple[nn.ModuleList, int, tuple[int, int, int]]:
    """Full-resolution stage + ``strided`` downsampling stages; returns them, final channels and grid."""
    channels, blocks = spec.stage(0)
    stages = [_subm_stage(sparse, channels, channels, blocks, key="subm0")]
    for i in range(1, strided + 1):
        out_channels, blocks = spec.stage(i)
        stages.append(_strided_stage(sparse, channels, out_channels, blocks, key=f"subm{i}"))
        shape = conv_output_shape(shape, (3, 3, 3), (2, 2, 2), (1, 1, 1), (1, 1, 1))
        channels = out_channels
    return nn.ModuleList(stages), channels, shape


def _subm_block(sparse: SparseBackend, in_channels: int, out_channels: int, key: str) -> nn.Module:
    conv = sparse.subm_conv(in_channels, out_channels, 3, padding=1, bias=False, indice_key=key)
    return sparse.sequential(conv, nn.BatchNorm1d(out_channels, **_BN), nn.ReLU())


def _subm_stage(sparse: SparseBackend, in_channels: int, out_channels: int, blocks: int, key: str) -> nn.Module:
    layers = [_subm_block(sparse, in_channels if b == 0 else out_channels, out_channels, key) for b in range(blocks)]
    return sparse.sequential(*layers)


def _strided_stage(sparse: SparseBackend, in_channels: int, out_channels: int, blocks: int, key: str) -> nn.Module:
    down = sparse.sparse_conv(in_channels, out_channels, 3, stride=2, padding=1, bias=False, indice_key=f"down_{key}")
    layers = [sparse.sequential(down, nn.BatchNorm1d(out_channels, **_BN), nn.ReLU())]
    layers += [_subm_block(sparse, out_channels, out_channels, key) for _ in range(blocks)]
    return sparse.sequential(*layers)


ENCODERS.register("second")(SecondEncoder)
