"""ImageNet ResNet-18/34/50 in the torchvision layout (7x7/2 stem + 3x3/2 max-pool, 4 stages of 64/128/256/512
planes, v1.5 bottleneck), as [L] models/lmcl_resnet_imagenet.py.

With `aux=True` (docs/official_mcl.md §2.1): taps after layer1/2/3; each aux branch copies the remaining stages with **one
block per stage** (`layers=[1,1,1,1]`, [L] lmcl_resnet_imagenet.py:225-242), ending in the last stage's width, so
S = 4 outputs [aux1, aux2, aux3, final], every feature 512-d (18/34) or 2048-d (50).
"""
from __future__ import annotations

from torch import nn

from .base import StagedBackbone
from .blocks import BasicBlock, Bottleneck, make_res_stage

IMAGENET_PLANES = (64, 128, 256, 512)


class ImageNetResNet(StagedBackbone):
    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: list[int], num_classes: int, *,
                 aux: bool = False, zero_init_residual: bool = False):
        if len(layers) != 4 or min(layers) < 1:
            raise ValueError(f"layers: expected 4 positive block counts, got {layers}")

        def make_stage(s: int, in_ch: int, num_blocks: int):
            return make_res_stage(block, in_ch, IMAGENET_PLANES[s], num_blocks, stride=1 if s == 0 else 2)

        stem = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        )
        super().__init__(stem=stem, stem_channels=64, make_stage=make_stage, blocks=list(layers),
                         num_classes=num_classes, aux=aux, aux_blocks=[1, 1, 1, 1],
                         zero_init_residual=zero_init_residual)


def resnet18(num_classes: int, *, aux: bool = False) -> ImageNetResNet:
    return ImageNetResNet(BasicBlock, [2, 2, 2, 2], num_classes, aux=aux)


def resnet34(num_classes: int, *, aux: bool = False) -> ImageNetResNet:
    return ImageNetResNet(BasicBlock, [3, 4, 6, 3], num_classes, aux=aux)


def resnet50(num_classes: int, *, aux: bool = False) -> ImageNetResNet:
    return ImageNetResNet(Bottleneck, [3, 4, 6, 3], num_classes, aux=aux)
