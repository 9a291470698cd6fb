"""Temporal mean (EMA) copy of a cohort: PCL's peer mean teachers (docs/official_baselines.md §1.1, §1.4).

After every optimizer step: θ' ← α·θ' + (1 − α)·θ with α = min(1 − 1/(step + 1), α_max) — a true running average at
the start (α = 0 at step 0 makes the copy exact), then α_max = 0.999 (mean teacher).

BN-buffer policy (docs/official_baselines.md §1.4): the EMA copy's running mean/var follow the student's with the
same α (θ' buffers ← α·θ' + (1 − α)·θ), and `num_batches_tracked` is copied. In training the EMA copy runs in train
mode (batch statistics, as the PCL reproduction), but its BN momentum is 0, so those forwards never move the running
statistics: evaluation of an EMA member reads only the averaged ones.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def ema_alpha(step: int, alpha_max: float) -> float:
    """α for the update after optimizer step `step` (0-based)."""
    return min(1.0 - 1.0 / (step + 1), alpha_max)


class EmaCohort(nn.Module):
    """`EmaCohort(cohort)`: a deep copy with no gradients; `update(cohort, step)` after each optimizer step;
    `forward` = the copy's forward (call under no_grad)."""

    def __init__(self, cohort: nn.Module, alpha_max: float = 0.999):
        super().__init__()
        if not 0.0 <= alpha_max < 1.0:
            raise ValueError(f"alpha_max must be in [0, 1), got {alpha_max}")
        self.alpha_max = alpha_max
        self.module = copy.deepcopy(cohort)
        for p in self.module.parameters():
            p.requires_grad_(False)
        for m in self.module.modules():
            if isinstance(m, _BatchNorm):
                m.momentum = 0.0      # train-mode forwards use batch statistics but never update running ones

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @torch.no_grad()
    def update(self, cohort: nn.Module, step: int) -> float:
        """Average `cohort` (the student, same structure) into the copy; returns the α used."""
        alpha = ema_alpha(step, self.alpha_max)
        ema_p = list(self.module.parameters())
        src_p = [p.detach() for p in cohort.parameters()]
        if len(ema_p) != len(src_p):
            raise ValueError("update: the cohort does not have the EMA copy's structure")
        torch._foreach_lerp_(ema_p, src_p, 1.0 - alpha)
        pairs = list(zip(self.module.buffers(), cohort.buffers()))
        floats = [(b, s) for b, s in pairs if b.dtype.is_floating_point]
        if floats:
            torch._foreach_lerp_([b for b, _ in floats], [s for _, s in floats], 1.0 - alpha)
        for b, s in pairs:
            if not b.dtype.is_floating_point:
                b.copy_(s)                                   # num_batches_tracked
        return alpha
