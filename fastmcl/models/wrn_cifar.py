"""CIFAR Wide ResNets WRN-d-k (Zagoruyko & Komodakis), as [L] models/lmcl_wrn_cifar.py.

Pre-activation blocks, widths 16 / 16k / 32k / 64k, n = (d-4)/6 blocks per group, final BN+ReLU before pooling,
dropout 0 by default. With `aux=True`: taps after group1/group2, aux branch 1 = fresh group2+group3, aux branch 2 =
fresh group3, each with its own final BN+ReLU, pool and fc; outputs [aux1, aux2, final] (docs/official_mcl.md §2.1).
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .base import StagedBackbone


class WideBasicBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3 with identity or 1x1-conv shortcut.

    As the reference WRN code, when the width changes the shortcut conv takes the *pre-activated* input.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, kernel_size=3, stride=1, padding=1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.drop_rate = drop_rate
        self.equal_in_out = in_ch == out_ch and stride == 1
        self.shortcut = None if self.equal_in_out else nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride,
                                                                 bias=False)

    def forward(self, x: Tensor) -> Tensor:
        act = self.relu(self.bn1(x))
        out = self.relu(self.bn2(self.conv1(act)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        return out + (x if self.shortcut is None else self.shortcut(act))


def _post(ch: int) -> nn.Module:
    return nn.Sequential(nn.BatchNorm2d(ch), nn.ReLU(inplace=True))


class WideResNet(StagedBackbone):
    def __init__(self, depth: int, widen_factor: int, num_classes: int, *, aux: bool = False,
                 drop_rate: float = 0.0):
        if depth < 4 or (depth - 4) % 6 != 0:
            raise ValueError(f"depth: a WRN needs depth = 6n+4, got {depth}")
        if widen_factor < 1:
            raise ValueError(f"widen_factor: must be >= 1, got {widen_factor}")
        n = (depth - 4) // 6
        widths = (16 * widen_factor, 32 * widen_factor, 64 * widen_factor)

        def make_stage(s: int, in_ch: int, num_blocks: int):
            stride = 1 if s == 0 else 2
            layers = [WideBasicBlock(in_ch if b == 0 else widths[s], widths[s], stride if b == 0 else 1, drop_rate)
                      for b in range(num_blocks)]
            return nn.Sequential(*layers), widths[s]

        stem = nn.Conv2d(3, 16, kernel_size=3, stride=1, padding=1, bias=False)
        # official WRN init zeroes the classifier biases
        super().__init__(stem=stem, stem_channels=16, make_stage=make_stage, blocks=[n, n, n],
                         num_classes=num_classes, make_post=_post, aux=aux, zero_linear_bias=True)
        self.depth = depth
        self.widen_factor = widen_factor


def wrn_16_2(num_classes: int, *, aux: bool = False) -> WideResNet:
    return WideResNet(16, 2, num_classes, aux=aux)


def wrn_40_2(num_classes: int, *, aux: bool = False) -> WideResNet:
    return WideResNet(40, 2, num_classes, aux=aux)
