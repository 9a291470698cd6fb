"""CIFAR ResNets (3x3 stem, 3 stages of 16/32/64 planes, no max-pool), as [L] models/lmcl_resnet_cifar.py.

ResNet-32/56 use BasicBlock with n = (depth-2)/6 blocks per stage (64-d final feature). ResNet-110 is the
**bottleneck** ResNet of the L-MCL/MCL repos: n = (110-2)/9 = 12 blocks per stage, expansion 4 → 256-d final
feature (docs/official_mcl.md §2.1). With `aux=True`: taps after layer1/layer2, aux branch 1 = fresh layer2+layer3 (same
depth), aux branch 2 = fresh layer3; S = 3 outputs ordered [aux1, aux2, final] (docs/official_mcl.md §2.1).
"""
from __future__ import annotations

from torch import nn

from .base import StagedBackbone
from .blocks import BasicBlock, Bottleneck, conv3x3, make_res_stage

CIFAR_PLANES = (16, 32, 64)


class CifarResNet(StagedBackbone):
    """ResNet for 32x32 inputs. `block` is "basic" (depth = 6n+2) or "bottleneck" (depth = 9n+2)."""

    def __init__(self, depth: int, num_classes: int, *, block: str = "basic", aux: bool = False,
                 zero_init_residual: bool = False):
        if block == "basic":
            block_cls, per_block = BasicBlock, 2
        elif block == "bottleneck":
            block_cls, per_block = Bottleneck, 3
        else:
            raise ValueError(f"block: expected 'basic' or 'bottleneck', got {block!r}")
        if depth < 2 or (depth - 2) % (3 * per_block) != 0:
            raise ValueError(f"depth: a {block} CIFAR ResNet needs depth = {3 * per_block}n+2, got {depth}")
        n = (depth - 2) // (3 * per_block)

        def make_stage(s: int, in_ch: int, num_blocks: int):
            return make_res_stage(block_cls, in_ch, CIFAR_PLANES[s], num_blocks, stride=1 if s == 0 else 2)

        stem = nn.Sequential(conv3x3(3, 16), nn.BatchNorm2d(16), nn.ReLU(inplace=True))
        super().__init__(stem=stem, stem_channels=16, make_stage=make_stage, blocks=[n, n, n],
                         num_classes=num_classes, aux=aux, zero_init_residual=zero_init_residual)
        self.depth = depth


def resnet32(num_classes: int, *, aux: bool = False) -> CifarResNet:
    return CifarResNet(32, num_classes, block="basic", aux=aux)


def resnet56(num_classes: int, *, aux: bool = False) -> CifarResNet:
    return CifarResNet(56, num_classes, block="basic", aux=aux)


def resnet110(num_classes: int, *, aux: bool = False) -> CifarResNet:
    return CifarResNet(110, num_classes, block="bottleneck", aux=aux)
