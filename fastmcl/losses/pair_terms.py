"""The contrastive terms of one official pair call, written plainly: the oracle the cohort engine and the kernels are
checked against (docs/official_mcl.md §1.2 in-batch, §1.3 memory bank).

Each returns `ContrastiveTerms(vcl, soft_vcl, icl, soft_icl)` over both directions of the call; e_a, e_b [B, D]
L2-normalised, weight [B] or None (= 1). A fused backend runs the call as a one-pair plan through the cohort engine.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from . import checks
from .backend import resolve_backend
from .cohort_terms import cohort_bank_contrastive_terms, cohort_contrastive_terms
from .plan import pair_plan
from .rows import ContrastiveTerms, compute_dtype, inbatch_masks, kl_rows, leading_positive_rows, supcon_rows, \
    weighted_mean


def contrastive_terms(e_a: Tensor, e_b: Tensor, labels: Tensor, *, tau: float = 0.1, kd_T: float = 3.0,
                      weight: Tensor | None = None, backend: str = "reference") -> ContrastiveTerms:
    """In-batch pair call, labels [B] int. Q1 kept: the same-instance cross-network pair is neither a positive nor in
    the denominator."""
    checks.check_embedding_pair(e_a, e_b)
    checks.check_labels(labels, e_a.shape[0], e_a.device)
    checks.check_positive("tau", tau)
    checks.check_positive("kd_T", kd_T)
    checks.check_weight(weight, (e_a.shape[0],))
    if resolve_backend(backend, e_a.device, e_a.dtype) != "reference":
        return cohort_contrastive_terms([e_a, e_b], labels, pair_plan(), weights=_rows_of(weight), tau=tau,
                                        kd_T=kd_T, backend=backend)

    dtype = compute_dtype(e_a)
    a, b = e_a.to(dtype), e_b.to(dtype)
    pos, denom = inbatch_masks(labels)
    s_ab = a @ b.T / tau
    s_ba = b @ a.T / tau
    s_aa = a @ a.T / tau
    s_bb = b @ b.T / tau
    T2 = kd_T * kd_T
    mean = functools.partial(weighted_mean, weight=weight)
    icl = mean(supcon_rows(s_ab, pos, denom)) + mean(supcon_rows(s_ba, pos, denom))
    vcl = mean(supcon_rows(s_aa, pos, denom)) + mean(supcon_rows(s_bb, pos, denom))
    soft_icl = T2 * (mean(kl_rows(s_ab, s_ba, kd_T)) + mean(kl_rows(s_ba, s_ab, kd_T)))
    soft_vcl = T2 * (mean(kl_rows(s_aa, s_bb, kd_T)) + mean(kl_rows(s_bb, s_aa, kd_T)))
    return ContrastiveTerms(vcl, soft_vcl, icl, soft_icl)


def bank_logits(bank: Tensor, idx: Tensor, e: Tensor, tau: float) -> Tensor:
    """Mem[idx_b] · e_b / τ → [B, K]; the gathered rows carry no gradient into the bank."""
    gathered = bank.detach()[idx].to(e.dtype)          # [B, K, D]
    return torch.bmm(gathered, e.unsqueeze(-1)).squeeze(-1) / tau


def bank_contrastive_terms(e_a: Tensor, e_b: Tensor, bank_a: Tensor, bank_b: Tensor, idx: Tensor, *,
                           tau: float = 0.07, kd_T: float = 3.0, pos_k: int = 1, weight: Tensor | None = None,
                           backend: str = "reference") -> ContrastiveTerms:
    """Memory-bank pair call: bank_a, bank_b [N, D] are the momentum memories of networks a and b (never
    differentiated); idx [B, K] = [own, pos_k positives, negatives] per anchor.

    ICL scores Mem_a[idx]·e_b and Mem_b[idx]·e_a over all K columns, the first 1 + pos_k positive; VCL drops the own
    column and scores each embedding against its own network's bank (Q2 in docs/fidelity.md: the official ImageNet code
    scores e_b against network a's bank).
    """
    checks.check_embedding_pair(e_a, e_b)
    n_rows = checks.check_banks([bank_a, bank_b], e_a.shape[1], ["bank_a", "bank_b"])
    checks.check_index(idx, e_a.shape[0], pos_k, n_rows)
    checks.check_positive("tau", tau)
    checks.check_positive("kd_T", kd_T)
    checks.check_weight(weight, (e_a.shape[0],))
    if resolve_backend(backend, e_a.device, e_a.dtype) != "reference":
        return cohort_bank_contrastive_terms([e_a, e_b], [bank_a, bank_b], idx, pair_plan(),
                                             weights=_rows_of(weight), tau=tau, kd_T=kd_T, pos_k=pos_k,
                                             backend=backend)

    dtype = compute_dtype(e_a)
    a, b = e_a.to(dtype), e_b.to(dtype)
    idx = idx.long()
    s_ab = bank_logits(bank_a, idx, b, tau)
    s_ba = bank_logits(bank_b, idx, a, tau)
    v_a = bank_logits(bank_a, idx[:, 1:], a, tau)
    v_b = bank_logits(bank_b, idx[:, 1:], b, tau)
    T2 = kd_T * kd_T
    n_pos = 1 + pos_k
    mean = functools.partial(weighted_mean, weight=weight)
    icl = mean(leading_positive_rows(s_ab, n_pos)) + mean(leading_positive_rows(s_ba, n_pos))
    vcl = mean(leading_positive_rows(v_a, pos_k)) + mean(leading_positive_rows(v_b, pos_k))
    soft_icl = T2 * (mean(kl_rows(s_ab, s_ba, kd_T)) + mean(kl_rows(s_ba, s_ab, kd_T)))
    soft_vcl = T2 * (mean(kl_rows(v_a, v_b, kd_T)) + mean(kl_rows(v_b, v_a, kd_T)))
    return ContrastiveTerms(vcl, soft_vcl, icl, soft_icl)


def _rows_of(weight: Tensor | None) -> Tensor | None:
    """A pair call's weight [B] as the one-pair plan's weights [1, B]."""
    return None if weight is None else weight[None]
