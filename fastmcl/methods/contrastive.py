"""What MCL and L-MCL share: the projection heads' contrastive terms from a `ContrastPlan`, in-batch or against the
memory banks (docs/official_mcl.md §1.2, §1.3), and the banks' momentum update after the optimizer step."""
from __future__ import annotations

import torch
from torch import Tensor

from ..losses import ContrastPlan, MemoryBank, cohort_bank_contrastive_terms, cohort_contrastive_terms
from .base import MethodContext, MethodNeeds, Objective, StepOutput
from .weights import ContrastWeights


class ContrastiveObjective(Objective):
    supports_memory_bank = True
    #: auxiliary branches on every member (L-MCL)
    aux: bool = False

    @classmethod
    def needs_for(cls, memory_bank: bool = False) -> MethodNeeds:
        """In-batch contrast needs 2 samples per class in every batch; the bank needs the negative sampler."""
        return MethodNeeds(aux=cls.aux, memory_bank=memory_bank, m_per_class=0 if memory_bank else 2)

    @classmethod
    def default_weights(cls, memory_bank: bool) -> ContrastWeights:
        return ContrastWeights.defaults(cls.name, memory_bank)

    @classmethod
    def contrast_settings(cls, ctx: MethodContext) -> dict:
        """The keyword arguments MCL and L-MCL share, from the build context."""
        return dict(weights=ctx.weights,
                    memory_bank=ctx.memory_bank, num_samples=ctx.num_samples, feat_dim=ctx.feat_dim, pos_k=ctx.pos_k,
                    nce_m=ctx.nce_m, backend=ctx.backend, k_chunk=ctx.k_chunk)

    def __init__(self, plan: ContrastPlan, *, weights: ContrastWeights, memory_bank: bool,
                 num_samples: int, feat_dim: int, pos_k: int, nce_m: float, backend: str, k_chunk: int | None):
        super().__init__()
        self.w, self.plan = weights, plan
        num_nets = max(plan.net_of) + 1
        self.memory = MemoryBank(num_nets, num_samples, feat_dim, nce_m) if memory_bank else None
        self.pos_k, self.backend, self.k_chunk = pos_k, backend, k_chunk

    def contrast(self, emb: list[Tensor], labels: Tensor, contrast_idx: Tensor | None,
                 weights: Tensor | None = None, student_out: list | None = None) -> dict[str, Tensor]:
        """α·VCL, γ·soft VCL, β·ICL, λ·soft ICL of the plan over the flat embeddings `emb`."""
        if self.memory is None and self.gather is not None:
            # DDP: in-batch negatives span the global batch. Every rank computes the same global loss; the gather's
            # backward sums the ranks' gradients and DDP averages them, which gives the 1-process gradient.
            emb = [self.gather(e) for e in emb]
            labels = self.gather(labels)
            if weights is not None:
                weights = self.gather(weights.t().contiguous()).t()
        if self.memory is None:
            c = cohort_contrastive_terms(emb, labels, self.plan, weights=weights, tau=self.w.tau, kd_T=self.w.kd_T,
                                         backend=self.backend, student_out=student_out)
        else:
            c = cohort_bank_contrastive_terms(emb, self.memory.memory, contrast_idx, self.plan, weights=weights,
                                              tau=self.w.tau, kd_T=self.w.kd_T, pos_k=self.pos_k,
                                              k_chunk=self.k_chunk, backend=self.backend, student_out=student_out)
        return self.w.weighted(c)

    @torch.no_grad()
    def after_step(self, out: StepOutput, index: Tensor | None) -> None:
        """The banks store each network's final-stage embedding (docs/official_mcl.md §1.3)."""
        if self.memory is not None:
            if self.gather is not None:       # DDP: every rank's bank takes the whole global batch
                index = self.gather(index)
            for i, e in enumerate(out.state["final_embeddings"]):
                self.memory.update(i, index, e if self.gather is None else self.gather(e.detach()))
