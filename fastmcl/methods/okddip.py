"""OKDDip (Chen et al., "Online Knowledge Distillation with Diverse Peers", AAAI 2020), docs/official_baselines.md §2.3:
a shared trunk with m−1 auxiliary peers and one group leader (the last member).

L = Σ_{j<m−1} CE(z_j, y) + CE(z_lead, y) + α·w(t)·[Σ_{j<m−1} KL_T(t_j ‖ z_j) + KL_T(mean_{j<m−1} z_j ‖ z_lead)],
t_j = Σ_l A_jl z_l from `PeerAttention`, α = 1, T = 3, w = the 80-epoch sigmoid ramp-up.

Followed from the official code (DefangChen/OKDDip):
- `train_GL.py` train(): `loss = loss_true + criterion(x_stu, labels) + args.alpha * consistency_weight *
  (loss_group + criterion_T(x_stu, torch.mean(output_batch, dim=2)))`, where `output_batch` holds the peers only.
- `utils.py` `KL_Loss` detaches nothing: neither the attention targets t_j (so Q/K learn) nor the leader's target
  (so the leader term also pulls the peers toward the leader). Its `+1e-7` on the teacher probabilities is not kept.
- `resnet_GL.py` forward: Q/K read each peer's pooled last-stage feature; no 1/√d scaling of QKᵀ.
- The reported ensemble is the mean of the peers' logits (`torch.mean(output_batch, dim=2)`); the leader is deployed.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..losses import cross_entropy
from .base import MethodContext, MethodNeeds, Objective, StepOutput, register, sum_ce
from .rampup import sigmoid_rampup
from .teachers import PeerAttention, check_members, check_outputs, distill_each, mean_logits


@register("okddip")
class OKDDip(Objective):
    needs = MethodNeeds(shared_trunk=True, min_members=3, default_members=4)

    @classmethod
    def create(cls, ctx: MethodContext) -> "OKDDip":
        if len(set(ctx.feature_dims[:-1])) != 1:
            raise ValueError(f"method 'okddip' shares Q/K over the peers: their feature dims must be equal, "
                             f"got {list(ctx.feature_dims[:-1])}")
        return cls(ctx.members, ctx.feature_dims[0], kd_T=ctx.kd_T, rampup_epochs=ctx.rampup_epochs)

    def __init__(self, num_members: int, feature_dim: int, *, kd_T: float = 3.0, alpha: float = 1.0,
                 rampup_epochs: int = 80):
        super().__init__()
        check_members("okddip", num_members, self.needs.min_members)
        self.num_members, self.kd_T, self.alpha, self.rampup_epochs = num_members, kd_T, alpha, rampup_epochs
        self.deployed = f"net{num_members - 1}"                    # the group leader
        self.attention = PeerAttention(feature_dim)

    def forward(self, outputs, labels: Tensor, contrast_idx: Tensor | None = None, *,
                ema_outputs=None) -> StepOutput:
        logits = check_outputs("okddip", outputs, self.num_members)
        peers, leader = logits[:-1], logits[-1]
        targets = self.attention([o.features[-1] for o in outputs[:-1]], peers)
        w = self.alpha * sigmoid_rampup(self.epoch, self.rampup_epochs)
        ce = sum_ce(peers, labels)
        leader_ce = cross_entropy(leader, labels)
        kd = w * distill_each(peers, targets, self.kd_T, detach_teacher=False)
        kd_leader = w * distill_each([leader], [mean_logits(peers)], self.kd_T, detach_teacher=False)
        terms = {"ce": ce.detach(), "leader_ce": leader_ce.detach(), "kd": kd.detach(),
                 "kd_leader": kd_leader.detach(), "rampup": torch.tensor(w, device=ce.device)}
        return StepOutput(ce + leader_ce + kd + kd_leader, terms, {})

    def eval_logits(self, outputs, ema_outputs=None) -> dict[str, Tensor]:
        named = super().eval_logits(outputs)
        named["ens"] = mean_logits([o.logits[-1] for o in outputs[:-1]])   # the peers' mean, as the official code
        return named
