"""ONE (Lan, Zhu & Gong, "Knowledge Distillation by On-the-Fly Native Ensemble", NeurIPS 2018), docs/official_baselines.md
§2.2: a shared trunk with m branches and a gated logit ensemble z_e = Σ_j g_j z_j, the gate read from the trunk.

L = Σ_j CE(z_j, y) + CE(z_e, y) + w(t)·Σ_j KL_T(sg z_e ‖ z_j), T = 3, w = the 80-epoch sigmoid ramp-up.
The teacher is detached in the KD term (official `cifar_one.py` + `loss/kl_loss.py`), so the gate and the branches
learn the ensemble only through CE(z_e).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..losses import cross_entropy
from .base import MethodContext, MethodNeeds, Objective, StepOutput, register, sum_ce
from .rampup import sigmoid_rampup
from .teachers import GatedEnsemble, check_members, check_outputs, distill_each


@register("one")
class ONE(Objective):
    needs = MethodNeeds(shared_trunk=True, min_members=2, default_members=3)

    @classmethod
    def create(cls, ctx: MethodContext) -> "ONE":
        return cls(ctx.members, ctx.trunk_dim, kd_T=ctx.kd_T, rampup_epochs=ctx.rampup_epochs)

    def __init__(self, num_members: int, trunk_dim: int | None, *, kd_T: float = 3.0, rampup_epochs: int = 80):
        super().__init__()
        check_members("one", num_members, self.needs.min_members)
        if isinstance(trunk_dim, bool) or not isinstance(trunk_dim, int) or trunk_dim < 1:
            raise ValueError(f"method 'one' needs trunk_dim (the shared trunk's width, cohort.trunk_dim), "
                             f"got {trunk_dim!r}")
        self.num_members, self.kd_T, self.rampup_epochs = num_members, kd_T, rampup_epochs
        self.gate = GatedEnsemble(trunk_dim, num_members)

    def ensemble(self, outputs, logits: list[Tensor]) -> Tensor:
        trunk = outputs[0].trunk
        if trunk is None:
            raise ValueError("method 'one' needs a shared-trunk cohort (BackboneOutput.trunk is None)")
        return self.gate(trunk, logits)

    def forward(self, outputs, labels: Tensor, contrast_idx: Tensor | None = None, *,
                ema_outputs=None) -> StepOutput:
        logits = check_outputs("one", outputs, self.num_members)
        z_e = self.ensemble(outputs, logits)
        w = sigmoid_rampup(self.epoch, self.rampup_epochs)
        ce = sum_ce(logits, labels)
        ens_ce = cross_entropy(z_e, labels)
        kd = w * distill_each(logits, [z_e] * len(logits), self.kd_T)   # teacher detached
        terms = {"ce": ce.detach(), "ens_ce": ens_ce.detach(), "kd": kd.detach(),
                 "rampup": torch.tensor(w, device=ce.device)}
        return StepOutput(ce + ens_ce + kd, terms, {})

    def eval_logits(self, outputs, ema_outputs=None) -> dict[str, Tensor]:
        named = super().eval_logits(outputs)
        named["ens"] = self.ensemble(outputs, list(named.values()))
        return named
