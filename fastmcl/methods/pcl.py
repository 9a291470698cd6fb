"""PCL (Wu & Gong, "Peer Collaborative Learning for Online Knowledge Distillation", AAAI 2021),
docs/official_baselines.md §1: a shared trunk with m peers, one augmented view per peer, a peer ensemble teacher (one FC
over the concatenated pooled features) and peer mean teachers (an EMA copy of the whole cohort, kept by the trainer).

L = CE(z_e, y) + Σ_j CE(z_j, y) + w(t)·(Σ_j KL_T(sg z_e ‖ z_j) + Σ_j 1/(m−1) Σ_{l≠j} KL_T(z'_l ‖ z_j)),
z'_l = EMA peer l's logits (no gradient), T = 3, w = the 80-epoch sigmoid ramp-up (§1.3, the correct formula).
Each peer learns from the EMA of the *other* peers. The deployed model is the first peer's temporal mean (§1.5).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..losses import cross_entropy, kd_kl
from .base import MethodContext, MethodNeeds, Objective, StepOutput, register, sum_ce
from .rampup import sigmoid_rampup
from .teachers import ConcatClassifier, check_members, check_outputs, distill_each


@register("pcl")
class PCL(Objective):
    needs = MethodNeeds(shared_trunk=True, views=True, ema=True, min_members=2, default_members=3)
    deployed = "ema0"

    @classmethod
    def create(cls, ctx: MethodContext) -> "PCL":
        return cls(ctx.feature_dims, ctx.num_classes, kd_T=ctx.kd_T, rampup_epochs=ctx.rampup_epochs)

    def __init__(self, feature_dims: list[int], num_classes: int, *, kd_T: float = 3.0, rampup_epochs: int = 80):
        super().__init__()
        check_members("pcl", len(feature_dims), self.needs.min_members)
        self.num_members, self.kd_T, self.rampup_epochs = len(feature_dims), kd_T, rampup_epochs
        self.ensemble = ConcatClassifier(feature_dims, num_classes)

    def _ema_logits(self, ema_outputs) -> list[Tensor]:
        if ema_outputs is None:
            raise ValueError("method 'pcl' needs ema_outputs (the EMA cohort's outputs on the same views; "
                             "needs.ema asks the trainer to keep the EMA copy)")
        return [z.detach() for z in check_outputs("pcl", ema_outputs, self.num_members)]

    def forward(self, outputs, labels: Tensor, contrast_idx: Tensor | None = None, *,
                ema_outputs=None) -> StepOutput:
        logits = check_outputs("pcl", outputs, self.num_members)
        ema = self._ema_logits(ema_outputs)
        m = self.num_members
        z_e = self.ensemble([o.features[-1] for o in outputs])
        w = sigmoid_rampup(self.epoch, self.rampup_epochs)
        ce = sum_ce(logits, labels)
        ens_ce = cross_entropy(z_e, labels)
        kd = w * distill_each(logits, [z_e] * m, self.kd_T)                        # L_pe, teacher detached
        kd_mean = w * torch.stack([kd_kl(logits[j], ema[l], self.kd_T)              # L_pm, EMA of the others
                                   for j in range(m) for l in range(m) if l != j]).sum() / (m - 1)
        terms = {"ce": ce.detach(), "ens_ce": ens_ce.detach(), "kd": kd.detach(), "kd_mean": kd_mean.detach(),
                 "rampup": torch.tensor(w, device=ce.device)}
        return StepOutput(ens_ce + ce + kd + kd_mean, terms, {})

    def eval_logits(self, outputs, ema_outputs=None) -> dict[str, Tensor]:
        named = super().eval_logits(outputs)
        named["ens"] = self.ensemble([o.features[-1] for o in outputs])
        named.update({f"ema{i}": z for i, z in enumerate(self._ema_logits(ema_outputs))})
        return named
