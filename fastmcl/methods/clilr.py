"""CL-ILR (Song & Chai, "Collaborative Learning for Deep Neural Networks", NeurIPS 2018), docs/official_baselines.md §2.5,
as re-implemented in DefangChen/OKDDip `train_one.py --avg --bpscale` (`models/model_cifar/resnet_one.py`):
a shared trunk whose gradient is rescaled by 1/m (`ILR` backward: `grad_output/num_branches`; the cohort applies it
via `needs.trunk_grad_scale`), and each branch distilled from the average of the other branches.

L = Σ_j CE(z_j, y) + w(t)·Σ_j KL_T(sg mean_{l≠j} z_l ‖ z_j), T = 3 with T², w = the 80-epoch sigmoid ramp-up
(OKDDip `train_one.py`: `loss = loss_true + args.alpha * consistency_weight * loss_group`, `--length 80`).
The target is detached as docs/official_baselines.md §2.5 describes (and as winycg/MCL-OKD `main_cifar_cl_ilr.py` does); OKDDip's `KL_Loss`
would not detach it.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .base import MethodContext, MethodNeeds, Objective, StepOutput, register, sum_ce
from .rampup import sigmoid_rampup
from .teachers import check_members, check_outputs, distill_each, mean_logits, mean_of_others


@register("clilr")
class CLILR(Objective):
    needs = MethodNeeds(shared_trunk=True, trunk_grad_scale=True, min_members=2, default_members=3)

    @classmethod
    def create(cls, ctx: MethodContext) -> "CLILR":
        return cls(ctx.members, kd_T=ctx.kd_T, rampup_epochs=ctx.rampup_epochs)

    def __init__(self, num_members: int, *, kd_T: float = 3.0, rampup_epochs: int = 80):
        super().__init__()
        check_members("clilr", num_members, self.needs.min_members)
        self.num_members, self.kd_T, self.rampup_epochs = num_members, kd_T, rampup_epochs

    def forward(self, outputs, labels: Tensor, contrast_idx: Tensor | None = None, *,
                ema_outputs=None) -> StepOutput:
        logits = check_outputs("clilr", outputs, self.num_members)
        w = sigmoid_rampup(self.epoch, self.rampup_epochs)
        ce = sum_ce(logits, labels)
        kd = w * distill_each(logits, mean_of_others(logits), self.kd_T)   # targets detached
        terms = {"ce": ce.detach(), "kd": kd.detach(), "rampup": torch.tensor(w, device=ce.device)}
        return StepOutput(ce + kd, terms, {})

    def eval_logits(self, outputs, ema_outputs=None) -> dict[str, Tensor]:
        named = super().eval_logits(outputs)
        named["ens"] = mean_logits(list(named.values()))          # OKDDip `train_one.py`: mean over all branches
        return named
