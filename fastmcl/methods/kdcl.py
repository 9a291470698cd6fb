"""KDCL-MinLogit (Guo et al., "Online Knowledge Distillation via Collaborative Learning", CVPR 2020),
docs/official_baselines.md §2.4: independent networks, each on its own random augmentation of the image.

The teacher is parameter-free and detached: z_t = min_k (z_k − z_k[y]) element-wise (`min_logit`).
L = Σ_k CE(z_k, y) + λ·Σ_k KL_T(z_t ‖ z_k), λ = 1, T = kd_T (3). No ramp-up (none is described for KDCL).
"""
from __future__ import annotations

from torch import Tensor

from .base import MethodContext, MethodNeeds, Objective, StepOutput, register, sum_ce
from .teachers import check_members, check_outputs, distill_each, mean_logits, min_logit


@register("kdcl")
class KDCL(Objective):
    needs = MethodNeeds(views=True, min_members=2, default_members=2)

    @classmethod
    def create(cls, ctx: MethodContext) -> "KDCL":
        return cls(ctx.members, kd_T=ctx.kd_T)

    def __init__(self, num_members: int, *, kd_T: float = 3.0, lam: float = 1.0):
        super().__init__()
        check_members("kdcl", num_members, self.needs.min_members)
        self.num_members, self.kd_T, self.lam = num_members, kd_T, lam

    def forward(self, outputs, labels: Tensor, contrast_idx: Tensor | None = None, *,
                ema_outputs=None) -> StepOutput:
        logits = check_outputs("kdcl", outputs, self.num_members)
        z_t = min_logit(logits, labels)
        ce = sum_ce(logits, labels)
        kd = self.lam * distill_each(logits, [z_t] * len(logits), self.kd_T)
        return StepOutput(ce + kd, {"ce": ce.detach(), "kd": kd.detach()}, {})

    def eval_logits(self, outputs, ema_outputs=None) -> dict[str, Tensor]:
        named = super().eval_logits(outputs)
        named["ens"] = mean_logits(list(named.values()))
        return named
