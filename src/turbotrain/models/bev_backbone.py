"""2D BEV backbones: downsampling stages, each upsampled back and concatenated (FPN-style).

``resnet_fpn`` follows OpenCOOD's ResNetBEVBackbone layout (stage i has ``layer_nums[i]`` residual
blocks after a strided entry block; a transposed conv brings it back to the input resolution).
``second_bev`` is OpenCOOD's BaseBEVBackbone, what its SECOND configs use: plain 3x3 conv + BN +
ReLU layers (BN eps 1e-3, momentum 0.01), a strided entry conv per stage, transposed-conv
upsampling. Both pad the input to a multiple of the total stride and crop the output, so any BEV
shape works.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from turbotrain.models.registry import BEV_BACKBONES


def conv_bn_relu(in_ch: int, out_ch: int, stride: int = 1) -> nn.Sequential:
    """3x3 conv + BatchNorm + ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


class ResidualBlock(nn.Module):
    """ResNet basic block (two 3x3 convs); a 1x1 projection matches shapes when they change."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_ch),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


def _stage(in_ch: int, out_ch: int, stride: int, num_blocks: int) -> nn.Sequential:
    blocks = [ResidualBlock(in_ch, out_ch, stride)]
    blocks += [ResidualBlock(out_ch, out_ch) for _ in range(num_blocks)]
    return nn.Sequential(*blocks)


def _upsample(in_ch: int, out_ch: int, stride: int) -> nn.Sequential:
    if stride == 1:
        up: nn.Module = nn.Conv2d(in_ch, out_ch, 1, bias=False)
    else:
        up = nn.ConvTranspose2d(in_ch, out_ch, stride, stride=stride, bias=False)
    return nn.Sequential(up, nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True))


class MultiScaleBackbone(nn.Module):
    """Strided ``stages`` whose outputs ``ups`` bring back to the input resolution and concatenate.

    ``scales`` and ``merge`` split the forward so that a per-scale fuser (OpenCOOD's AttFusion in
    ``AttBEVBackbone``) can fuse each stage's output between them; ``forward`` is the unfused path.
    """

    stages: nn.ModuleList
    ups: nn.ModuleList
    total_stride: int

    def scales(self, bev: torch.Tensor) -> list[torch.Tensor]:
        """Each stage's output, the input zero-padded bottom/right to a multiple of ``total_stride``."""
        x = _pad_to_multiple(bev, self.total_stride)
        outputs = []
        for stage in self.stages:
            x = stage(x)
            outputs.append(x)
        return outputs

    def merge(self, scales: list[torch.Tensor], height: int, width: int) -> torch.Tensor:
        """Upsample every scale, concatenate and crop the padding: ``(N, out_channels, height, width)``."""
        return torch.cat([up(x) for up, x in zip(self.ups, scales)], dim=1)[..., :height, :width]

    def forward(self, bev: torch.Tensor) -> torch.Tensor:
        return self.merge(self.scales(bev), *bev.shape[-2:])


@BEV_BACKBONES.register("resnet_fpn")
class ResNetFPNBackbone(MultiScaleBackbone):
    """Multi-scale residual BEV backbone; output ``(N, out_channels, H, W)`` at the input resolution."""

    def __init__(
        self,
        in_channels: int,
        layer_nums: list[int],
        layer_strides: list[int],
        num_filters: list[int],
        upsample_strides: list[int],
        num_upsample_filters: list[int],
    ):
        super().__init__()
        lengths = {len(layer_nums), len(layer_strides), len(num_filters), len(upsample_strides), len(num_upsample_filters)}
        if len(lengths) != 1:
            raise ValueError("bev_backbone: layer_nums, layer_strides, num_filters, upsample_* must have equal length")
        cumulative = list(_cumulative_product(layer_strides))
        if cumulative != list(upsample_strides):
            raise ValueError(
                f"bev_backbone: upsample_strides {upsample_strides} must equal the cumulative strides {cumulative} "
                "so every scale returns to the input resolution"
            )
        channels = [in_channels] + list(num_filters)
        self.stages = nn.ModuleList(
            _stage(channels[i], channels[i + 1], layer_strides[i], layer_nums[i]) for i in range(len(layer_nums))
        )
        self.ups = nn.ModuleList(
            _upsample(num_filters[i], num_upsample_filters[i], upsample_strides[i]) for i in range(len(layer_nums))
        )
        self.total_stride = cumulative[-1]
        self.out_channels = int(sum(num_upsample_filters))



@BEV_BACKBONES.register("second_bev")
class SecondBEVBackbone(MultiScaleBackbone):
    """OpenCOOD's BaseBEVBackbone (plain convs); output ``(N, sum(num_upsample_filters), H, W)``."""

    def __init__(
        self,
        in_channels: int,
        layer_nums: list[int],
        layer_strides: list[int],
        num_filters: list[int],
        upsample_strides: list[int],
        num_upsample_filters: list[int],
    ):
        super().__init__()
        # the same shape rules as resnet_fpn: every scale must come back to the input resolution
        lengths = {len(layer_nums), len(layer_strides), len(num_filters), len(upsample_strides), len(num_upsample_filters)}
        cumulative = list(_cumulative_product(layer_strides))
        if len(lengths) != 1 or cumulative != list(upsample_strides):
            raise ValueError(f"bev_backbone second_bev: one entry per stage, and upsample_strides {upsample_strides} "
                             f"must equal the cumulative strides {cumulative}")
        channels = [in_channels] + list(num_filters)
        self.stages = nn.ModuleList(
            _plain_stage(channels[i], channels[i + 1], layer_strides[i], layer_nums[i]) for i in range(len(layer_nums))
        )
        self.ups = nn.ModuleList(
            nn.Sequential(
                nn.ConvTranspose2d(num_filters[i], num_upsample_filters[i], upsample_strides[i], stride=upsample_strides[i],
                                   bias=False),
                nn.BatchNorm2d(num_upsample_filters[i], **_OPENCOOD_BN),
                nn.ReLU(),
            )
            for i in range(len(layer_nums))
        )
        self.total_stride = cumulative[-1]
        self.out_channels = int(sum(num_upsample_filters))



_OPENCOOD_BN = dict(eps=1e-3, momentum=0.01)


def _plain_conv(in_ch: int, out_ch: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(out_ch, **_OPENCOOD_BN),
            nn.ReLU()]


def _plain_stage(in_ch: int, out_ch: int, stride: int, num_layers: int) -> nn.Sequential:
    """A strided entry conv, then ``num_layers`` 3x3 convs (BaseBEVBackbone's ``blocks[i]``).

    OpenCOOD pads with ``ZeroPad2d(1)`` and convolves unpadded; ``padding=1`` is the same operation.
    """
    layers = _plain_conv(in_ch, out_ch, stride)
    for _ in range(num_layers):
        layers += _plain_conv(out_ch, out_ch)
    return nn.Sequential(*layers)


def _cumulative_product(values: list[int]):
    product = 1
    for v in values:
        product *= int(v)
        yield product


def _pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad the bottom/right so both spatial sizes divide ``multiple``."""
    height, width = x.shape[-2:]
    pad_h = math.ceil(height / multiple) * multiple - height
    pad_w = math.ceil(width / multiple) * multiple - width
    if pad_h == 0 and pad_w == 0:
        return x
    return F.pad(x, (0, pad_w, 0, pad_h))
