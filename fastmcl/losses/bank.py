"""Memory-bank contrastive terms of one embedding pair (spec/lmcl.md §1.3), written plainly: the reference oracle.

Shapes: e_a, e_b [B, D]; bank_a, bank_b [N, D] (the momentum memories of networks a and b, never differentiated);
idx [B, K] int = [own, pos_k positives, negatives] per anchor (K = 1 + pos_k + neg_k); weight [B] or None.

ICL: s_ab = Mem_a[idx]·e_b/τ and s_ba = Mem_b[idx]·e_a/τ over all K columns, the first 1+pos_k are positives.
VCL: the own column is dropped (K−1 columns, first pos_k positive); v_a = Mem_a·e_a, v_b = Mem_b·e_b.
Q2 fixed (DESIGN.md): the official L-MCL ImageNet code scores e_b against network a's bank; we use network b's.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import checks
from .backend import resolve_backend
from .contrastive import ContrastiveTerms, compute_dtype
from .rows import kl_rows, leading_positive_rows, weighted_mean


def bank_logits(bank: Tensor, idx: Tensor, e: Tensor, tau: float) -> Tensor:
    """Mem[idx_b] · e_b / τ → [B, K]; the gathered rows carry no gradient into the bank."""
    gathered = bank.detach()[idx].to(e.dtype)          # [B, K, D]
    return torch.bmm(gathered, e.unsqueeze(-1)).squeeze(-1) / tau


def bank_contrastive_terms(e_a: Tensor, e_b: Tensor, bank_a: Tensor, bank_b: Tensor, idx: Tensor, *,
                           tau: float = 0.07, kd_T: float = 3.0, pos_k: int = 1, weight: Tensor | None = None,
                           backend: str = "reference") -> ContrastiveTerms:
    checks.check_embedding_pair(e_a, e_b)
    n_rows = checks.check_banks([bank_a, bank_b], e_a.shape[1], ["bank_a", "bank_b"])
    checks.check_index(idx, e_a.shape[0], pos_k, n_rows)
    checks.check_positive("tau", tau)
    checks.check_positive("kd_T", kd_T)
    checks.check_weight(weight, (e_a.shape[0],))
    if resolve_backend(backend, e_a.device, e_a.dtype) != "reference":  # fused kernels: the cohort engine with one pair
        from .cohort_terms import cohort_bank_contrastive_terms
        from .plan import pair_plan
        w = None if weight is None else weight[None]
        return cohort_bank_contrastive_terms([e_a, e_b], [bank_a, bank_b], idx, pair_plan(), weights=w, tau=tau,
                                             kd_T=kd_T, pos_k=pos_k, backend=backend)

    dtype = compute_dtype(e_a)
    a, b = e_a.to(dtype), e_b.to(dtype)
    idx = idx.long()
    s_ab = bank_logits(bank_a, idx, b, tau)
    s_ba = bank_logits(bank_b, idx, a, tau)
    v_a = bank_logits(bank_a, idx[:, 1:], a, tau)
    v_b = bank_logits(bank_b, idx[:, 1:], b, tau)
    T2 = kd_T * kd_T
    n_pos = 1 + pos_k
    icl = weighted_mean(leading_positive_rows(s_ab, n_pos), weight) + weighted_mean(leading_positive_rows(s_ba, n_pos), weight)
    vcl = weighted_mean(leading_positive_rows(v_a, pos_k), weight) + weighted_mean(leading_positive_rows(v_b, pos_k), weight)
    soft_icl = T2 * (weighted_mean(kl_rows(s_ab, s_ba, kd_T), weight) + weighted_mean(kl_rows(s_ba, s_ab, kd_T), weight))
    soft_vcl = T2 * (weighted_mean(kl_rows(v_a, v_b, kd_T), weight) + weighted_mean(kl_rows(v_b, v_a, kd_T), weight))
    return ContrastiveTerms(vcl, soft_vcl, icl, soft_icl)
