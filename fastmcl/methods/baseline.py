"""Baseline: every member trained alone with cross-entropy, no term between members — the "Baseline" row that the
papers' tables start from (e.g. PCL, Wu & Gong, AAAI 2021, Table 1). The loss is Σ_k CE(z_k, y); each member's
gradient comes from its own CE only, so the cohort is n independent runs on the same batches and schedule."""
from __future__ import annotations

from torch import Tensor

from ..losses import cross_entropy
from .base import MethodContext, MethodNeeds, Objective, StepOutput, register


@register("baseline")
class Baseline(Objective):
    needs = MethodNeeds()

    @classmethod
    def create(cls, ctx: MethodContext) -> "Baseline":
        return cls()

    def forward(self, outputs, labels: Tensor, contrast_idx: Tensor | None = None, *,
                ema_outputs=None) -> StepOutput:
        ce = [cross_entropy(o.logits[-1], labels) for o in outputs]
        loss = sum(ce[1:], ce[0])
        return StepOutput(loss, {f"ce{k}": c.detach() for k, c in enumerate(ce)}, {})
