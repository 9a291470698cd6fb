"""Per-anchor-row statistics shared by every contrastive term (spec/lmcl.md §1.2, §1.3).

All functions take logit matrices S that are already `cos / tau` and reduce over the last dimension, so they work on
[B, K] and on stacked [..., B, K] blocks alike. Computation is in the logits' dtype; callers pass fp32 or fp64.
"""
from __future__ import annotations

import torch
from torch import Tensor


def supcon_rows(logits: Tensor, pos_mask: Tensor, denom_mask: Tensor | None = None) -> Tensor:
    """−Σ_j P[i,j]·(S[i,j] − log Σ_{k: M[i,k]} exp S[i,k]) / Σ_j P[i,j], per row (spec §1.2 `L(S)` before the mean).

    Rule for a row with no positive (e.g. a class of one in the batch; the official code divides 0/0 = NaN):
    the row contributes 0. With the official samplers every row has a positive and nothing changes.
    """
    masked = logits if denom_mask is None else logits.masked_fill(~denom_mask, float("-inf"))
    lse = torch.logsumexp(masked, dim=-1)
    pos = pos_mask.to(logits.dtype)
    n_pos = pos.sum(-1)
    pos_logit_sum = (logits * pos).sum(-1)
    rows = lse - pos_logit_sum / n_pos.clamp_min(1)
    return torch.where(n_pos > 0, rows, torch.zeros_like(rows))


def leading_positive_rows(logits: Tensor, n_pos: int) -> Tensor:
    """Bank form of `supcon_rows`: the first `n_pos` columns are positives, the denominator is every column."""
    return torch.logsumexp(logits, dim=-1) - logits[..., :n_pos].mean(-1)


def kl_rows(student: Tensor, teacher: Tensor, T: float, *, detach_teacher: bool = True) -> Tensor:
    """Σ_j p_t (log p_t − log p_s) per row with p = softmax(S / T) over all columns; the teacher is detached
    (`detach_teacher=False` only for the meta phase's split-teacher gradient, see fastmcl/meta.py).

    Centred form (DESIGN.md "Kernels"): log p_t − log p_s = (S_t − S_s)/T − (lse_t − lse_s), which keeps fp32
    accurate where subtracting two log-softmaxes loses ~4e-5 relative.
    """
    if detach_teacher:
        teacher = teacher.detach()
    s = student / T
    t = teacher / T
    lse_s = torch.logsumexp(s, dim=-1)
    lse_t = torch.logsumexp(t, dim=-1)
    p_t = torch.softmax(t, dim=-1)
    return (p_t * (t - s)).sum(-1) - (lse_t - lse_s)


def weighted_mean(rows: Tensor, weight: Tensor | None) -> Tensor:
    """(1/B) Σ_b w_b · rows_b — the official `(weight * …).sum() / B` reduction; w = None means 1."""
    if weight is None:
        return rows.mean(-1)
    return (rows * weight.to(rows.dtype)).mean(-1)
