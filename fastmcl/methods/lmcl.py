"""L-MCL (TPAMI 2023): layer-wise mutual contrastive learning with meta-learned layer matching (docs/official_mcl.md §1.4,
§1.5, §2).

Per network: S stage classifiers (backbone + auxiliary branches), an aggregator, one projection head per stage.
Loss = Σ_i Σ_s CE(z_{i,s}) + Σ_i CE(agg_i) + Σ_i Σ_j KL_T(z_{i,last} ‖ sg agg_j)
       + α·ΣVCL + γ·ΣsoftVCL + β·ΣICL + λ·ΣsoftICL over every ordered cross-network stage pair (`lmcl_plan`),
with per-sample weights w = MetaWeightNet(raw stage features) computed without gradient in the regular step.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..losses import compute_dtype, kd_kl, layer_pairs, lmcl_plan
from ..models.heads import Aggregator, EmbedHead
from ..models.meta_network import MetaWeightNet
from .base import MethodContext, StepOutput, fp32, register, sum_ce
from .contrastive import ContrastiveObjective
from .weights import ContrastWeights


@register("lmcl")
class LMCL(ContrastiveObjective):
    aux = True

    @classmethod
    def create(cls, ctx: MethodContext) -> "LMCL":
        return cls(ctx.feature_dims, ctx.num_stages, ctx.num_classes, **cls.contrast_settings(ctx))

    def __init__(self, feature_dims: list[int], num_stages: list[int], num_classes: int, *,
                 weights: ContrastWeights, memory_bank: bool = False, num_samples: int = 0, feat_dim: int = 128,
                 pos_k: int = 1, nce_m: float = 0.5, backend: str = "reference", k_chunk: int | None = None,
                 meta_proj_dim: int = 128):
        super().__init__(lmcl_plan(list(num_stages)), weights=weights, memory_bank=memory_bank,
                         num_samples=num_samples, feat_dim=feat_dim, pos_k=pos_k, nce_m=nce_m, backend=backend,
                         k_chunk=k_chunk)
        n = len(feature_dims)
        self.num_stages = list(num_stages)
        # flat position of each network's final-stage embedding (what the memory banks store)
        self.final_flat = [sum(self.num_stages[:i + 1]) - 1 for i in range(n)]
        self.heads = nn.ModuleList(nn.ModuleList(EmbedHead(feature_dims[i], feat_dim) for _ in range(num_stages[i]))
                                   for i in range(n))
        self.aggregators = nn.ModuleList(Aggregator(num_stages[i], feature_dims[i], num_classes) for i in range(n))
        self.meta_net = MetaWeightNet([[feature_dims[i]] * num_stages[i] for i in range(n)], meta_proj_dim)
        self.pairs = layer_pairs(self.num_stages)

    def meta_parameters(self) -> list[nn.Parameter]:
        return list(self.meta_net.parameters())

    # -- the meta phase's objectives (docs/official_mcl.md §2.4) ---------------------------------------------------------------------
    supports_meta = True

    def virtual_parameter_prefixes(self) -> list[str]:
        """Besides the networks, the meta phase's virtual SGD steps move the projection heads (MetaSGD wraps
        net + criterion_mcl, docs/official_mcl.md §2.4)."""
        return ["heads."]

    def inner_loss(self, outputs, labels: Tensor, contrast_idx: Tensor | None,
                   student_out: list | None = None) -> Tensor:
        """Weighted contrastive loss with the matching weights WITH gradient to the meta-network. With
        `student_out`, the student logits are handed out and the KL teachers stay attached (`fastmcl.meta`)."""
        weights = self.matching_weights(outputs)
        if student_out is not None:
            student_out.append(weights)
        contrast, _ = self.contrastive(outputs, labels, contrast_idx, weights, student_out)
        return torch.stack(list(contrast.values())).sum()

    def outer_loss(self, outputs, labels: Tensor) -> Tensor:
        """Σ stage CE (no aggregator, no KD)."""
        return sum_ce([z for o in outputs for z in o.logits], labels)

    def matching_weights(self, outputs) -> Tensor:
        """[P, B] per-pair per-sample weights from the raw stage features (docs/official_mcl.md §2.3)."""
        first = outputs[0].features[0]
        dtype = compute_dtype(first)
        with torch.autocast(first.device.type, enabled=False):  # fp32 like the heads (see `fp32`)
            return self.meta_net([[f.to(dtype) for f in o.features] for o in outputs], self.pairs)

    def contrastive(self, outputs, labels: Tensor, contrast_idx: Tensor | None, weights: Tensor,
                    student_out: list | None = None):
        """(weighted α/γ/β/λ terms, per-network final embeddings) — also the meta phase's inner objective."""
        emb = [fp32(head, f) for heads, o in zip(self.heads, outputs) for head, f in zip(heads, o.features)]
        terms = self.contrast(emb, labels, contrast_idx, weights, student_out)
        return terms, [emb[u] for u in self.final_flat]

    def forward(self, outputs, labels: Tensor, contrast_idx: Tensor | None = None, *,
                ema_outputs=None) -> StepOutput:
        with torch.no_grad():
            weights = self.matching_weights(outputs)
        stage_ce = self.outer_loss(outputs, labels)
        aggs = [agg(list(o.features), list(o.logits)) for agg, o in zip(self.aggregators, outputs)]
        agg_ce = sum_ce(aggs, labels)
        logit_kd = torch.stack([kd_kl(o.logits[-1], a, self.w.kd_T) for o in outputs for a in aggs]).sum()
        terms = {"stage_ce": stage_ce, "agg_ce": agg_ce, "logit_kd": logit_kd}
        contrast, finals = self.contrastive(outputs, labels, contrast_idx, weights)
        terms.update(contrast)
        loss = torch.stack(list(terms.values())).sum()
        return StepOutput(loss, {k: v.detach() for k, v in terms.items()}, {"final_embeddings": finals})

    def eval_logits(self, outputs, ema_outputs=None) -> dict[str, Tensor]:
        named = super().eval_logits(outputs)
        for i, o in enumerate(outputs):
            for s, z in enumerate(o.logits[:-1]):
                named[f"net{i}.stage{s}"] = z
            named[f"net{i}.agg"] = self.aggregators[i](list(o.features), list(o.logits))
        return named
