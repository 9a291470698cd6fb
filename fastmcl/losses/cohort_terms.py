"""The whole cohort's contrastive loss from a `ContrastPlan`, each distinct logit block computed once.

In-batch (spec §1.2): one GEMM gives every block e_u e_vᵀ/τ; the per-row statistics of the distinct blocks and
block pairs are computed once and combined with each pair's weights. Memory bank (spec §1.3): each network's bank is
gathered once per step and scored against every embedding ([B, K, D] × all NE embeddings), instead of 4 gathers per
pair call. Values equal the naive sum of pair calls (tests/test_cohort_terms.py).
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from . import checks
from .backend import resolve_backend
from .bank_logits import bank_logits_all
from .contrastive import ContrastiveTerms, compute_dtype, inbatch_masks
from .plan import ContrastPlan
from .rows import kl_rows, leading_positive_rows, supcon_rows


@functools.lru_cache(maxsize=64)
def _plan_indices(plan: ContrastPlan, device: torch.device) -> dict[str, Tensor]:
    """Index tensors for one plan on one device (built once; plans are frozen)."""
    ce_pos = {b: n for n, b in enumerate(plan.ce_blocks)}
    kl_pos = {b: n for n, b in enumerate(plan.kl_blocks)}

    def t(values):
        return torch.tensor(values, dtype=torch.long, device=device)

    return {
        "ce_u": t([b[0] for b in plan.ce_blocks]), "ce_v": t([b[1] for b in plan.ce_blocks]),
        "kl_su": t([s[0] for s, _ in plan.kl_blocks]), "kl_sv": t([s[1] for s, _ in plan.kl_blocks]),
        "kl_tu": t([t_[0] for _, t_ in plan.kl_blocks]), "kl_tv": t([t_[1] for _, t_ in plan.kl_blocks]),
        "ce_term": t([e[0] for e in plan.ce]), "ce_block": t([ce_pos[e[1]] for e in plan.ce]),
        "ce_row": t([e[2] for e in plan.ce]),
        "kl_term": t([e[0] for e in plan.kl]), "kl_block": t([kl_pos[(e[1], e[2])] for e in plan.kl]),
        "kl_row": t([e[3] for e in plan.kl]),
        "net_of": t(list(plan.net_of)),
        # bank setting: which distinct blocks are view (same network) or cross blocks
        "ce_view": t([n for n, b in enumerate(plan.ce_blocks) if plan.is_view_block(b)]),
        "ce_cross": t([n for n, b in enumerate(plan.ce_blocks) if not plan.is_view_block(b)]),
        "kl_view": t([n for n, (s, _) in enumerate(plan.kl_blocks) if plan.is_view_block(s)]),
        "kl_cross": t([n for n, (s, _) in enumerate(plan.kl_blocks) if not plan.is_view_block(s)]),
    }


def _combine(ce_rows: Tensor, kl_rows_: Tensor, ix: dict[str, Tensor], weights: Tensor | None,
             kd_T: float) -> ContrastiveTerms:
    """Σ over entries of (1/B) Σ_b w[row, b] · stat[block, b], into the four terms; soft terms × T²."""
    def reduce(rows: Tensor, block: Tensor, row: Tensor) -> Tensor:
        stats = rows[block]                                           # [entries, B]
        if weights is not None:
            stats = stats * weights.to(rows.dtype)[row]
        return stats.mean(-1)

    totals = ce_rows.new_zeros(4).index_add(0, ix["ce_term"], reduce(ce_rows, ix["ce_block"], ix["ce_row"]))
    totals = totals.index_add(0, ix["kl_term"], reduce(kl_rows_, ix["kl_block"], ix["kl_row"]) * (kd_T * kd_T))
    return ContrastiveTerms(*totals.unbind())


def _check_common(embeddings: list[Tensor], plan: ContrastPlan, weights, tau, kd_T) -> tuple[int, int]:
    if not isinstance(plan, ContrastPlan):
        raise ValueError(f"plan must be a ContrastPlan, got {type(plan).__name__}")
    if not isinstance(embeddings, (list, tuple)) or len(embeddings) != plan.num_embeddings:
        raise ValueError(f"embeddings must be a list of {plan.num_embeddings} tensors (one per network and stage "
                         f"of the plan), got {len(embeddings) if isinstance(embeddings, (list, tuple)) else embeddings!r}")
    B, D = checks.check_embedding_groups([list(embeddings)])
    checks.check_positive("tau", tau)
    checks.check_positive("kd_T", kd_T)
    checks.check_weight(weights, (plan.num_weight_rows, B), name="weights")
    return B, D


def cohort_contrastive_terms(embeddings: list[Tensor], labels: Tensor, plan: ContrastPlan, *,
                             weights: Tensor | None = None, tau: float = 0.1, kd_T: float = 3.0,
                             backend: str = "reference") -> ContrastiveTerms:
    """In-batch setting. embeddings: flat list of NE tensors [B, D] in the plan's order; weights [P, B] or None."""
    B, _ = _check_common(embeddings, plan, weights, tau, kd_T)
    checks.check_labels(labels, B, embeddings[0].device)
    resolve_backend(backend, embeddings[0].device)

    dtype = compute_dtype(embeddings[0])
    E = torch.stack([e.to(dtype) for e in embeddings])                # [NE, B, D]
    NE, _, D = E.shape
    flat = E.reshape(NE * B, D)
    G = (flat @ flat.T / tau).reshape(NE, B, NE, B).transpose(1, 2)    # G[u, v] = e_u e_vᵀ / τ, one GEMM
    ix = _plan_indices(plan, E.device)
    pos, denom = inbatch_masks(labels)
    ce = supcon_rows(G[ix["ce_u"], ix["ce_v"]], pos, denom)
    kl = kl_rows(G[ix["kl_su"], ix["kl_sv"]], G[ix["kl_tu"], ix["kl_tv"]], kd_T)
    return _combine(ce, kl, ix, weights, kd_T)


def cohort_bank_contrastive_terms(embeddings: list[Tensor], banks: list[Tensor], idx: Tensor, plan: ContrastPlan, *,
                                  weights: Tensor | None = None, tau: float = 0.07, kd_T: float = 3.0,
                                  pos_k: int = 1, k_chunk: int | None = None,
                                  backend: str = "reference") -> ContrastiveTerms:
    """Memory-bank setting. banks[i]: network i's memory [N, D]; idx [B, K] = [own, pos_k positives, negatives].

    k_chunk=None gathers each bank once with autograd (keeps [B, K, D] per bank for backward); an int streams K in
    chunks of that size and re-gathers in backward, keeping only the [NE, B, K] logits.
    """
    B, D = _check_common(embeddings, plan, weights, tau, kd_T)
    n_nets = max(plan.net_of) + 1
    if not isinstance(banks, (list, tuple)) or len(banks) != n_nets:
        raise ValueError(f"banks must be a list of {n_nets} tensors (one per network), got {type(banks).__name__}"
                         f"{'' if not isinstance(banks, (list, tuple)) else f' of length {len(banks)}'}")
    n_rows = checks.check_banks(list(banks), D, [f"banks[{i}]" for i in range(n_nets)])
    checks.check_index(idx, B, pos_k, n_rows)
    if k_chunk is not None and (not isinstance(k_chunk, int) or k_chunk < 1):
        raise ValueError(f"k_chunk must be None or an int >= 1, got {k_chunk!r}")
    resolve_backend(backend, embeddings[0].device)

    dtype = compute_dtype(embeddings[0])
    E = torch.stack([e.to(dtype) for e in embeddings])                # [NE, B, D]
    idx = idx.long()
    # L[u, m] = e_u · Mem_m[idx]ᵀ / τ: depends on the contrast side only through the bank (spec §4.2).
    L = torch.stack([bank_logits_all(E, bank.to(dtype), idx, k_chunk) for bank in banks], dim=1) / tau
    ix = _plan_indices(plan, E.device)
    net_of = ix["net_of"]
    # View blocks (VCL) drop the own column: K−1 columns, first pos_k positive; cross blocks (ICL) keep all K.
    ce = L.new_empty(len(plan.ce_blocks), B)
    kl = L.new_empty(len(plan.kl_blocks), B)
    for view, drop, n_pos in (("view", 1, pos_k), ("cross", 0, 1 + pos_k)):
        sel = ix[f"ce_{view}"]
        if sel.numel():
            rows = L[ix["ce_u"][sel], net_of[ix["ce_v"][sel]], :, drop:]
            ce = ce.index_copy(0, sel, leading_positive_rows(rows, n_pos))
        sel = ix[f"kl_{view}"]
        if sel.numel():
            student = L[ix["kl_su"][sel], net_of[ix["kl_sv"][sel]], :, drop:]
            teacher = L[ix["kl_tu"][sel], net_of[ix["kl_tv"][sel]], :, drop:]
            kl = kl.index_copy(0, sel, kl_rows(student, teacher, kd_T))
    return _combine(ce, kl, ix, weights, kd_T)
