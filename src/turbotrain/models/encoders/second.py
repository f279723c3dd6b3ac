"""SECOND (Yan et al. 2018): mean VFE + sparse 3D conv backbone + height compression to BEV.

The layer layout follows OpenPCDet / OpenCOOD's ``VoxelBackBone8x``: an input submanifold conv, a
submanifold stage at full resolution, then one stage per factor 2 of ``grid.bev_stride``, each a
strided sparse conv (stride 2 in z, y, x) followed by submanifold convs, and a last sparse conv that
only shrinks z before the (C, D) -> C*D height compression.

Two small departures from OpenPCDet, both so that any grid works: the sparse grid depth is ``nz``
(OpenPCDet pads it to ``nz + 1``) and every strided stage pads z by 1 (OpenPCDet's last one pads 0);
the z conv's kernel is clipped to the depth left. With OpenCOOD's z range of 4 m at 0.1 m this still
gives 2 remaining z cells and 128 * 2 = 256 BEV channels, as OpenCOOD's SECOND.

``second_res`` is CooPre's ``VoxelResBackBone8x`` (16-32-64-128): the same stages, each a strided
sparse conv followed by residual ``SparseBasicBlock``s (two submanifold convs with bias, BN, the
identity added before the last ReLU), two per stage, on the same grid as ``second``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
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
    residual: bool = False  # blocks are SparseBasicBlocks (second_res) instead of single subm convs

    def stage(self, i: int) -> tuple[int, int]:
        last = len(self.stage_channels) - 1
        return self.stage_channels[min(i, last)], self.subm_blocks[min(i, last)]


SECOND_SIZES = {
    # CPU-friendly: one submanifold block per stage, narrow channels
    "tiny": SecondSize(stage_channels=(16, 16, 32, 32), subm_blocks=(1, 1, 1, 1), out_conv_channels=32),
    # OpenCOOD's SECOND (VoxelBackBone8x): 16-32-64-64, two submanifold blocks per strided stage
    "paper": SecondSize(stage_channels=(16, 32, 64, 64), subm_blocks=(1, 2, 2, 2), out_conv_channels=128),
}
SECOND_RES_SIZES = {
    "tiny": SecondSize(stage_channels=(16, 16, 32, 32), subm_blocks=(1, 1, 1, 1), out_conv_channels=32, residual=True),
    # CooPre's VoxelResBackBone8x: 16-32-64-128, two residual blocks per stage, 128-channel conv_out
    "paper": SecondSize(stage_channels=(16, 32, 64, 128), subm_blocks=(2, 2, 2, 2), out_conv_channels=128, residual=True),
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

    SIZES = SECOND_SIZES

    def __init__(self, grid: Grid, size: str = "tiny", backend: str = "auto", in_channels: int = 4):
        super().__init__(grid)
        if size not in self.SIZES:
            raise ValueError(f"unknown SECOND size {size!r}; expected one of {sorted(self.SIZES)}")
        spec = self.SIZES[size]
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
    stages = [_ResidualStage(None, _res_blocks(sparse, channels, blocks, "res0")) if spec.residual
              else _subm_stage(sparse, channels, channels, blocks, key="subm0")]
    for i in range(1, strided + 1):
        out_channels, blocks = spec.stage(i)
        if spec.residual:
            down = _strided_stage(sparse, channels, out_channels, 0, key=f"res{i}")
            stages.append(_ResidualStage(down, _res_blocks(sparse, out_channels, blocks, f"res{i}")))
        else:
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


class SparseBasicBlock(nn.Module):
    """OpenPCDet's residual sparse block: subm conv, BN, ReLU, subm conv, BN, + input, ReLU.

    Called with the sparse tensor directly (never inside a sparse Sequential, which would hand a
    non-conv module only the features), so one definition serves spconv and the PyTorch backend.
    """

    def __init__(self, sparse: SparseBackend, channels: int, key: str):
        super().__init__()
        # OpenPCDet builds these convs with bias=True (``bias = norm_fn is not None``)
        self.conv1 = sparse.subm_conv(channels, channels, 3, padding=1, bias=True, indice_key=key)
        self.bn1 = nn.BatchNorm1d(channels, **_BN)
        self.conv2 = sparse.subm_conv(channels, channels, 3, padding=1, bias=True, indice_key=key)
        self.bn2 = nn.BatchNorm1d(channels, **_BN)

    def forward(self, x):
        out = self.conv1(x)
        out = out.replace_feature(torch.relu(self.bn1(out.features)))
        out = self.conv2(out)
        return out.replace_feature(torch.relu(self.bn2(out.features) + x.features))


class _ResidualStage(nn.Module):
    """An optional strided entry (a sparse Sequential) followed by residual blocks."""

    def __init__(self, down: nn.Module | None, blocks: list[nn.Module]):
        super().__init__()
        self.down = down
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x):
        if self.down is not None:
            x = self.down(x)
        for block in self.blocks:
            x = block(x)
        return x


def _res_blocks(sparse: SparseBackend, channels: int, blocks: int, key: str) -> list[nn.Module]:
    return [SparseBasicBlock(sparse, channels, key) for _ in range(blocks)]


class SecondResEncoder(SecondEncoder):
    """SECOND with CooPre's residual sparse backbone (``VoxelResBackBone8x``); see the module docstring."""

    SIZES = SECOND_RES_SIZES


ENCODERS.register("second")(SecondEncoder)
ENCODERS.register("second_res")(SecondResEncoder)
