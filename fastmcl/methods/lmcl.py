"""L-MCL (TPAMI 2023): layer-wise mutual contrastive learning with meta-learned layer matching (spec/lmcl.md §1.4,
§1.5, §2).

Per network: S stage classifiers (backbone + auxiliary branches), an aggregator, one projection head per stage.
Loss = Σ_i Σ_s CE(z_{i,s}) + Σ_i CE(agg_i) + Σ_i Σ_j KL_T(z_{i,last} ‖ sg agg_j)
       + α·ΣVCL + γ·ΣsoftVCL + β·ΣICL + λ·ΣsoftICL over every ordered cross-network stage pair (`lmcl_plan`),
with per-sample weights w = MetaWeightNet(raw stage features) computed without gradient in the regular step.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..losses import (MemoryBank, cohort_bank_contrastive_terms, cohort_contrastive_terms, cross_entropy, kd_kl,
                      layer_pairs, lmcl_plan)
from ..models.heads import Aggregator, EmbedHead
from ..models.meta_network import MetaWeightNet
from .base import MethodNeeds, Objective, StepOutput, fp32, sum_ce
from .weights import ContrastWeights


class LMCL(Objective):
    def __init__(self, feature_dims: list[int], num_stages: list[int], num_classes: int, *,
                 weights: ContrastWeights, memory_bank: bool = False, num_samples: int = 0, feat_dim: int = 128,
                 pos_k: int = 1, nce_m: float = 0.5, backend: str = "reference", k_chunk: int | None = None,
                 meta_proj_dim: int = 128):
        super().__init__()
        n = len(feature_dims)
        self.needs = MethodNeeds(aux=True, memory_bank=memory_bank, m_per_class=0 if memory_bank else 2)
        self.w = weights
        self.num_stages = list(num_stages)
        self.heads = nn.ModuleList(nn.ModuleList(EmbedHead(feature_dims[i], feat_dim) for _ in range(num_stages[i]))
                                   for i in range(n))
        self.aggregators = nn.ModuleList(Aggregator(num_stages[i], feature_dims[i], num_classes) for i in range(n))
        self.meta_net = MetaWeightNet([[feature_dims[i]] * num_stages[i] for i in range(n)], meta_proj_dim)
        self.pairs = layer_pairs(self.num_stages)
        self.plan = lmcl_plan(self.num_stages)
        self.memory = MemoryBank(n, num_samples, feat_dim, nce_m) if memory_bank else None
        self.pos_k, self.backend, self.k_chunk = pos_k, backend, k_chunk

    def meta_parameters(self) -> list[nn.Parameter]:
        return list(self.meta_net.parameters())

    # -- the meta phase's objectives (spec §2.4) ---------------------------------------------------------------------
    supports_meta = True

    def virtual_parameter_prefixes(self) -> list[str]:
        """Besides the networks, the meta phase's virtual SGD steps move the projection heads (MetaSGD wraps
        net + criterion_mcl, spec §2.4)."""
        return ["heads."]

    def inner_loss(self, outputs, labels: Tensor, contrast_idx: Tensor | None,
                   student_out: list | None = None) -> Tensor:
        """Weighted contrastive loss with the matching weights WITH gradient to the meta-network. With
        `student_out`, the student logits are handed out and the KL teachers stay attached (fastmcl/meta.py)."""
        weights = self.matching_weights(outputs)
        if student_out is not None:
            student_out.append(weights)
        contrast, _ = self.contrastive(outputs, labels, contrast_idx, weights, student_out)
        return torch.stack(list(contrast.values())).sum()

    def outer_loss(self, outputs, labels: Tensor) -> Tensor:
        """Σ stage CE (no aggregator, no KD)."""
        return sum_ce([z for o in outputs for z in o.logits], labels, cross_entropy)

    def matching_weights(self, outputs) -> Tensor:
        """[P, B] per-pair per-sample weights from the raw stage features (spec §2.3)."""
        feats = [list(o.features) for o in outputs]
        dtype = torch.float64 if feats[0][0].dtype == torch.float64 else torch.float32
        with torch.autocast(feats[0][0].device.type, enabled=False):
            return self.meta_net([[f.to(dtype) for f in fs] for fs in feats], self.pairs)

    def contrastive(self, outputs, labels: Tensor, contrast_idx: Tensor | None, weights: Tensor,
                    student_out: list | None = None):
        """(weighted α/γ/β/λ terms, per-network final embeddings) — also the meta phase's inner objective."""
        emb = [fp32(head, f) for heads, o in zip(self.heads, outputs) for head, f in zip(heads, o.features)]
        if self.memory is None:
            c = cohort_contrastive_terms(emb, labels, self.plan, weights=weights, tau=self.w.tau, kd_T=self.w.kd_T,
                                         backend=self.backend, student_out=student_out)
        else:
            c = cohort_bank_contrastive_terms(emb, self.memory.memory, contrast_idx, self.plan, weights=weights,
                                              tau=self.w.tau, kd_T=self.w.kd_T, pos_k=self.pos_k,
                                              k_chunk=self.k_chunk, backend=self.backend, student_out=student_out)
        ends = torch.tensor(self.num_stages).cumsum(0) - 1
        return self.w.weighted(c), [emb[int(e)] for e in ends]

    def forward(self, outputs, labels: Tensor, contrast_idx: Tensor | None = None) -> StepOutput:
        with torch.no_grad():
            weights = self.matching_weights(outputs)
        stage_ce = sum_ce([z for o in outputs for z in o.logits], labels, cross_entropy)
        aggs = [agg(list(o.features), list(o.logits)) for agg, o in zip(self.aggregators, outputs)]
        agg_ce = sum_ce(aggs, labels, cross_entropy)
        logit_kd = torch.stack([kd_kl(o.logits[-1], a, self.w.kd_T) for o in outputs for a in aggs]).sum()
        terms = {"stage_ce": stage_ce, "agg_ce": agg_ce, "logit_kd": logit_kd}
        contrast, finals = self.contrastive(outputs, labels, contrast_idx, weights)
        terms.update(contrast)
        loss = torch.stack(list(terms.values())).sum()
        return StepOutput(loss, {k: v.detach() for k, v in terms.items()}, {"final_embeddings": finals})

    @torch.no_grad()
    def after_step(self, out: StepOutput, index: Tensor | None) -> None:
        if self.memory is not None:  # only the final-stage embedding is stored (spec §1.3)
            for i, e in enumerate(out.state["final_embeddings"]):
                self.memory.update(i, index, e)

    def eval_logits(self, outputs) -> dict[str, Tensor]:
        named = super().eval_logits(outputs)
        for i, o in enumerate(outputs):
            for s, z in enumerate(o.logits[:-1]):
                named[f"net{i}.stage{s}"] = z
            named[f"net{i}.agg"] = self.aggregators[i](list(o.features), list(o.logits))
        return named
