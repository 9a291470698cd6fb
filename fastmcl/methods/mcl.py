"""MCL (AAAI 2022): final-layer mutual contrastive learning over a cohort of n ≥ 2 (docs/official_mcl.md §1.2–§1.5).

Loss = Σ_i CE(z_i) + [logit KD] + α·VCL + γ·softVCL + β·ICL + λ·softICL with `mcl_plan(n)`: ICL over unordered pairs,
VCL once per network, soft VCL over ordered pairs. In-batch (τ=0.1) or memory bank (τ=0.07, K = 1 + pos_k + neg_k).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..losses import kd_kl, mcl_plan
from ..models.heads import EmbedHead
from .base import MethodContext, StepOutput, fp32, register, sum_ce
from .contrastive import ContrastiveObjective
from .weights import ContrastWeights


@register("mcl")
class MCL(ContrastiveObjective):

    @classmethod
    def create(cls, ctx: MethodContext) -> "MCL":
        return cls(ctx.feature_dims, logit_kd=ctx.logit_kd, detach_ensemble=not ctx.memory_bank,
                   **cls.contrast_settings(ctx))

    def __init__(self, feature_dims: list[int], *, weights: ContrastWeights, memory_bank: bool = False,
                 num_samples: int = 0, feat_dim: int = 128, pos_k: int = 1, nce_m: float = 0.5,
                 logit_kd: bool = False, detach_ensemble: bool = True, backend: str = "reference",
                 k_chunk: int | None = None):
        super().__init__(mcl_plan(len(feature_dims)), weights=weights, memory_bank=memory_bank,
                         num_samples=num_samples, feat_dim=feat_dim, pos_k=pos_k, nce_m=nce_m, backend=backend,
                         k_chunk=k_chunk)
        self.heads = nn.ModuleList(EmbedHead(d, feat_dim) for d in feature_dims)
        self.logit_kd, self.detach_ensemble = logit_kd, detach_ensemble

    def forward(self, outputs, labels: Tensor, contrast_idx: Tensor | None = None, *,
                ema_outputs=None) -> StepOutput:
        logits = [o.logits[-1] for o in outputs]
        terms = {"ce": sum_ce(logits, labels)}
        if self.logit_kd:
            # docs/official_mcl.md §1.4: mean-logit ensemble; n = 2 both distil, n > 2 only the last network does.
            ens = torch.stack(logits).mean(0)
            students = logits if len(logits) == 2 else logits[-1:]
            terms["logit_kd"] = torch.stack([kd_kl(z, ens, self.w.kd_T, detach_teacher=self.detach_ensemble)
                                             for z in students]).sum()
        emb = [fp32(head, o.features[-1]) for head, o in zip(self.heads, outputs)]
        terms.update(self.contrast(emb, labels, contrast_idx))
        loss = torch.stack(list(terms.values())).sum()
        return StepOutput(loss, {k: v.detach() for k, v in terms.items()}, {"final_embeddings": emb})
