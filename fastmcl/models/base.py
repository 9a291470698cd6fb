"""Shared pieces of every backbone: the output type, a staged backbone with optional L-MCL auxiliary branches, init.

Every backbone is `stem -> stage_1 -> ... -> stage_S -> post (final norm/act or identity) -> global pool -> fc`.
With `aux=True` (docs/official_mcl.md §2.1) the output of every stage but the last is tapped, and each tap feeds a fresh
branch made of copies of all the remaining stages (+ its own post, pool and fc), so every auxiliary feature has the
final stage's width. Outputs are ordered `[aux_1, ..., aux_{S-1}, final]` (docs/official_mcl.md §2.1, [L] lmcl_resnet_cifar.py:270-274).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# make_stage(stage_index, in_channels, num_blocks) -> (stage module, out_channels)
StageFactory = Callable[[int, int, int], "tuple[nn.Module, int]"]
# make_post(channels) -> module applied to the last stage's map before pooling (WRN: BN+ReLU; ResNet: identity)
PostFactory = Callable[[int], nn.Module]


class BackboneOutput(NamedTuple):
    """Per-stage pooled features `[B, feature_dim]` and logits `[B, num_classes]`, order `[aux..., final]`; with a
    shared trunk also the trunk's pooled output `[B, C_trunk]` (ONE's gate reads it), else None."""

    features: list[Tensor]
    logits: list[Tensor]
    trunk: Tensor | None = None


def global_pool(x: Tensor) -> Tensor:
    """Global average pool `[B, C, H, W] -> [B, C]` (works for NCHW and channels_last)."""
    return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


class Branch(nn.Module):
    """Stages after a split point + post + global pool + classifier; returns `(feature, logits)`.

    Used for the L-MCL auxiliary branches (docs/official_mcl.md §2.1) and for the per-member branches of a shared-trunk cohort
    (docs/fidelity.md Q3, docs/official_baselines.md §1.1).
    """

    def __init__(self, stages: nn.Module, post: nn.Module, fc: nn.Linear):
        super().__init__()
        self.stages = stages
        self.post = post
        self.fc = fc
        self.feature_dim: int = fc.in_features

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        f = global_pool(self.post(self.stages(h)))
        return f, self.fc(f)


def init_weights(module: nn.Module, *, zero_linear_bias: bool = False, zero_init_residual: bool = False) -> None:
    """Kaiming-normal (fan_out, ReLU) convs, BN γ=1/β=0, as the torchvision/official ResNet and WRN code.

    `zero_linear_bias` zeroes classifier biases (official WRN init); `zero_init_residual` zeroes the last BN γ of
    every residual block that exposes `last_bn` (Goyal et al.; off by default, as in L-MCL).
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and zero_linear_bias and m.bias is not None:
            nn.init.zeros_(m.bias)
    if zero_init_residual:
        for m in module.modules():
            last_bn = getattr(m, "last_bn", None)
            if isinstance(last_bn, nn.BatchNorm2d):
                nn.init.zeros_(last_bn.weight)


class StagedBackbone(nn.Module):
    """A staged CNN with optional auxiliary branches (docs/official_mcl.md §2.1).

    Attributes: `feature_dim` (width of every stage feature), `num_stages` (number of outputs: S with aux, 1
    without), `num_res_stages` (residual stages of the trunk). Stages are registered as `layer1..layerS`.
    """

    def __init__(
        self,
        *,
        stem: nn.Module,
        stem_channels: int,
        make_stage: StageFactory,
        blocks: list[int],
        num_classes: int,
        make_post: PostFactory | None = None,
        aux: bool = False,
        aux_blocks: list[int] | None = None,
        zero_linear_bias: bool = False,
        zero_init_residual: bool = False,
    ):
        super().__init__()
        make_post = make_post or (lambda ch: nn.Identity())
        self.stem = stem
        channels = stem_channels
        tap_channels: list[int] = []
        for s, n in enumerate(blocks):
            stage, channels = make_stage(s, channels, n)
            self.add_module(f"layer{s + 1}", stage)
            tap_channels.append(channels)
        self.post = make_post(channels)
        self.fc = nn.Linear(channels, num_classes)

        self.aux: nn.ModuleList | None = None
        if aux:
            # Aux branch t (tap after stage t) = fresh copies of stages t+1..S-1 (docs/official_mcl.md §2.1); CIFAR copies use the
            # backbone's depth, ImageNet copies one block per stage (`aux_blocks`).
            aux_blocks = list(blocks) if aux_blocks is None else list(aux_blocks)
            branches = []
            for t in range(len(blocks) - 1):
                ch = tap_channels[t]
                stages = []
                for s in range(t + 1, len(blocks)):
                    stage, ch = make_stage(s, ch, aux_blocks[s])
                    stages.append(stage)
                branches.append(Branch(nn.Sequential(*stages), make_post(ch), nn.Linear(ch, num_classes)))
            self.aux = nn.ModuleList(branches)

        self.feature_dim: int = channels
        self.num_res_stages: int = len(blocks)
        self.num_stages: int = len(blocks) if aux else 1
        self.num_classes: int = num_classes
        init_weights(self, zero_linear_bias=zero_linear_bias, zero_init_residual=zero_init_residual)

    def stage_modules(self) -> list[nn.Module]:
        """The residual stages `layer1..layerS`, in order."""
        return [getattr(self, f"layer{s + 1}") for s in range(self.num_res_stages)]

    def forward(self, x: Tensor) -> BackboneOutput:
        h = self.stem(x)
        taps = []
        for stage in self.stage_modules():
            h = stage(h)
            taps.append(h)
        features: list[Tensor] = []
        logits: list[Tensor] = []
        if self.aux is not None:
            for tap, branch in zip(taps, self.aux):
                f, z = branch(tap)
                features.append(f)
                logits.append(z)
        f = global_pool(self.post(h))
        features.append(f)
        logits.append(self.fc(f))
        return BackboneOutput(features, logits)
