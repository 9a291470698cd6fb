"""The per-anchor-row statistics every contrastive term is built from (docs/official_mcl.md §1.2, §1.3) and the terms' type.

Row functions take logits that are already `cos / tau` and reduce over the last dimension, so they work on one [B, K]
block and on stacked [..., B, K] blocks alike; they compute in the logits' dtype (callers pass fp32 or fp64).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class ContrastiveTerms(NamedTuple):
    vcl: Tensor
    soft_vcl: Tensor
    icl: Tensor
    soft_icl: Tensor


def compute_dtype(x: Tensor) -> torch.dtype:
    """Losses and softmax statistics run in fp32 (fp64 stays fp64): half-precision inputs are upcast at once."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def inbatch_masks(labels: Tensor) -> tuple[Tensor, Tensor]:
    """P = 1[y_i = y_j] − I (positives) and M = 1 − I (denominator), as bool [B, B]."""
    off_diag = ~torch.eye(labels.shape[0], dtype=torch.bool, device=labels.device)
    return (labels[:, None] == labels[None, :]) & off_diag, off_diag


def supcon_rows(logits: Tensor, pos_mask: Tensor, denom_mask: Tensor | None = None) -> Tensor:
    """−Σ_j P[i,j]·(S[i,j] − log Σ_{k: M[i,k]} exp S[i,k]) / Σ_j P[i,j] per row (docs/official_mcl.md §1.2 `L(S)` before the mean).

    A row with no positive (a class of one in the batch; the official code divides 0/0 = NaN) contributes 0. With the
    official samplers every row has a positive and nothing changes.
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
    """Σ_j p_t (log p_t − log p_s) per row with p = softmax(S / T) over all columns; the teacher is detached unless
    `detach_teacher=False` (the meta phase's split teacher, `fastmcl.meta`).

    Centred form: log p_t − log p_s = (S_t − S_s)/T − (lse_t − lse_s), accurate in fp32 where subtracting two
    log-softmaxes is not (docs/losses.md "Backends and numerics").
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
