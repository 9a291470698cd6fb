"""In-batch contrastive terms of one embedding pair (spec/lmcl.md §1.2), written plainly: the reference oracle.

Shapes: e_a, e_b [B, D] (L2-normalised embeddings), labels [B] int, weight [B] or None (= 1).
Returns the four scalars `(vcl, soft_vcl, icl, soft_icl)` of one official `SupMCL.forward` call, both directions.
Q1 kept: the same-instance cross-network pair is neither a positive nor in the denominator.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from . import checks
from .backend import resolve_backend
from .rows import kl_rows, supcon_rows, weighted_mean


class ContrastiveTerms(NamedTuple):
    vcl: Tensor
    soft_vcl: Tensor
    icl: Tensor
    soft_icl: Tensor


def inbatch_masks(labels: Tensor) -> tuple[Tensor, Tensor]:
    """P = 1[y_i = y_j] − I (positives) and M = 1 − I (denominator), as bool [B, B]."""
    off_diag = ~torch.eye(labels.shape[0], dtype=torch.bool, device=labels.device)
    return (labels[:, None] == labels[None, :]) & off_diag, off_diag


def compute_dtype(x: Tensor) -> torch.dtype:
    """Losses and softmax statistics run in fp32 (fp64 stays fp64): half-precision inputs are upcast at once."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def contrastive_terms(e_a: Tensor, e_b: Tensor, labels: Tensor, *, tau: float = 0.1, kd_T: float = 3.0,
                      weight: Tensor | None = None, backend: str = "reference") -> ContrastiveTerms:
    checks.check_embedding_pair(e_a, e_b)
    checks.check_labels(labels, e_a.shape[0], e_a.device)
    checks.check_positive("tau", tau)
    checks.check_positive("kd_T", kd_T)
    checks.check_weight(weight, (e_a.shape[0],))
    if resolve_backend(backend, e_a.device, e_a.dtype) != "reference":  # fused kernels: the cohort engine with one pair
        from .cohort_terms import cohort_contrastive_terms
        from .plan import pair_plan
        w = None if weight is None else weight[None]
        return cohort_contrastive_terms([e_a, e_b], labels, pair_plan(), weights=w, tau=tau, kd_T=kd_T,
                                        backend=backend)

    dtype = compute_dtype(e_a)
    a, b = e_a.to(dtype), e_b.to(dtype)
    pos, denom = inbatch_masks(labels)
    s_ab = a @ b.T / tau
    s_ba = b @ a.T / tau
    s_aa = a @ a.T / tau
    s_bb = b @ b.T / tau
    T2 = kd_T * kd_T
    icl = weighted_mean(supcon_rows(s_ab, pos, denom), weight) + weighted_mean(supcon_rows(s_ba, pos, denom), weight)
    vcl = weighted_mean(supcon_rows(s_aa, pos, denom), weight) + weighted_mean(supcon_rows(s_bb, pos, denom), weight)
    soft_icl = T2 * (weighted_mean(kl_rows(s_ab, s_ba, kd_T), weight) + weighted_mean(kl_rows(s_ba, s_ab, kd_T), weight))
    soft_vcl = T2 * (weighted_mean(kl_rows(s_aa, s_bb, kd_T), weight) + weighted_mean(kl_rows(s_bb, s_aa, kd_T), weight))
    return ContrastiveTerms(vcl, soft_vcl, icl, soft_icl)
