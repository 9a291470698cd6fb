"""DML (Zhang et al., CVPR 2018) as fixed in docs/official_baselines.md §2.1: simultaneous updates, detached peers, T=3
with T², L_k = CE(z_k, y) + 1/(K−1) Σ_{l≠k} KL_T(z_k ‖ sg z_l)."""
from __future__ import annotations

import torch
from torch import Tensor

from ..losses import kd_kl
from .base import MethodContext, MethodNeeds, Objective, StepOutput, register, sum_ce


@register("dml")
class DML(Objective):
    needs = MethodNeeds()

    @classmethod
    def create(cls, ctx: MethodContext) -> "DML":
        return cls(ctx.members, kd_T=ctx.kd_T)

    def __init__(self, num_members: int, *, kd_T: float = 3.0):
        super().__init__()
        self.num_members = num_members
        self.kd_T = kd_T

    def forward(self, outputs, labels: Tensor, contrast_idx: Tensor | None = None, *,
                ema_outputs=None) -> StepOutput:
        logits = [o.logits[-1] for o in outputs]
        K = len(logits)
        ce = sum_ce(logits, labels)
        kd = torch.stack([kd_kl(logits[k], logits[l], self.kd_T)
                          for k in range(K) for l in range(K) if l != k]).sum() / (K - 1)
        return StepOutput(ce + kd, {"ce": ce.detach(), "kd": kd.detach()}, {})
