"""Deliberately naive versions of the official loss code (docs/official_mcl.md §1.2, §1.3): Python loops, plain exp, no
log-sum-exp tricks. Used only as an independent oracle for the reference losses."""
from __future__ import annotations

import math

import torch


def naive_supcon(S, labels, weight):
    """−(1/B) Σ_i w_i Σ_{j: y_j = y_i, j ≠ i} (S_ij − log Σ_{k ≠ i} exp S_ik) / #pos_i; rows without positives add 0."""
    B = S.shape[0]
    total = 0.0
    for i in range(B):
        denom = sum(math.exp(S[i, k]) for k in range(B) if k != i)
        pos = [j for j in range(B) if j != i and labels[j] == labels[i]]
        if not pos:
            continue
        total += weight[i] * sum(S[i, j] - math.log(denom) for j in pos) / len(pos)
    return -float(total) / B


def naive_kl(S_s, S_t, T, weight):
    """T² (1/B) Σ_i w_i Σ_j p_t (log p_t − log p_s), softmax over all columns."""
    B, K = S_s.shape
    total = 0.0
    for i in range(B):
        zs = sum(math.exp(S_s[i, k] / T) for k in range(K))
        zt = sum(math.exp(S_t[i, k] / T) for k in range(K))
        for j in range(K):
            pt = math.exp(S_t[i, j] / T) / zt
            ps = math.exp(S_s[i, j] / T) / zs
            total += weight[i] * pt * (math.log(pt) - math.log(ps))
    return T * T * float(total) / B


def naive_leading(S, n_pos, weight):
    B, K = S.shape
    total = 0.0
    for b in range(B):
        denom = sum(math.exp(S[b, k]) for k in range(K))
        total += weight[b] * sum(S[b, c] - math.log(denom) for c in range(n_pos)) / n_pos
    return -float(total) / B


def _mm(x, y, tau):
    return [[float(x[i] @ y[j]) / tau for j in range(len(y))] for i in range(len(x))]


def naive_contrastive_terms(e_a, e_b, labels, tau, kd_T, weight):
    B = e_a.shape[0]
    w = [1.0] * B if weight is None else [float(v) for v in weight]
    y = [int(v) for v in labels]
    S = {k: torch.tensor(_mm(x, z, tau), dtype=torch.float64)
         for k, (x, z) in {"ab": (e_a, e_b), "ba": (e_b, e_a), "aa": (e_a, e_a), "bb": (e_b, e_b)}.items()}
    vcl = naive_supcon(S["aa"], y, w) + naive_supcon(S["bb"], y, w)
    icl = naive_supcon(S["ab"], y, w) + naive_supcon(S["ba"], y, w)
    soft_vcl = naive_kl(S["aa"], S["bb"], kd_T, w) + naive_kl(S["bb"], S["aa"], kd_T, w)
    soft_icl = naive_kl(S["ab"], S["ba"], kd_T, w) + naive_kl(S["ba"], S["ab"], kd_T, w)
    return vcl, soft_vcl, icl, soft_icl


def naive_bank_terms(e_a, e_b, bank_a, bank_b, idx, tau, kd_T, pos_k, weight):
    B, K = idx.shape
    w = [1.0] * B if weight is None else [float(v) for v in weight]

    def logits(bank, e, cols):
        return torch.tensor([[float(bank[idx[b, c]] @ e[b]) / tau for c in cols] for b in range(B)],
                            dtype=torch.float64)

    s_ab, s_ba = logits(bank_a, e_b, range(K)), logits(bank_b, e_a, range(K))
    v_a, v_b = logits(bank_a, e_a, range(1, K)), logits(bank_b, e_b, range(1, K))
    icl = naive_leading(s_ab, 1 + pos_k, w) + naive_leading(s_ba, 1 + pos_k, w)
    vcl = naive_leading(v_a, pos_k, w) + naive_leading(v_b, pos_k, w)
    soft_icl = naive_kl(s_ab, s_ba, kd_T, w) + naive_kl(s_ba, s_ab, kd_T, w)
    soft_vcl = naive_kl(v_a, v_b, kd_T, w) + naive_kl(v_b, v_a, kd_T, w)
    return vcl, soft_vcl, icl, soft_icl
