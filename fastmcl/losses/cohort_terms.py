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
from torch.utils.checkpoint import checkpoint

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
        "ce_is_view": torch.tensor([plan.is_view_block(b) for b in plan.ce_blocks], dtype=torch.bool, device=device),
        "kl_is_view": torch.tensor([plan.is_view_block(s) for s, _ in plan.kl_blocks], dtype=torch.bool, device=device),
    }


@functools.lru_cache(maxsize=64)
def _bank_groups(plan: ContrastPlan, device: torch.device) -> tuple:
    """The bank path's static partition of the plan, on the host: per (view, drop, n_pos) setting, the ce rows it owns
    (`sel`), their distinct (embedding, bank) blocks (`u·n + m`) and each row's block (`inverse`), and the kl rows it
    owns. Precomputed so a compiled step has no data-dependent `nonzero`/`unique` (no graph break)."""
    n = max(plan.net_of) + 1

    def t(values):
        return torch.tensor(values, dtype=torch.long, device=device)

    groups = []
    for view in (True, False):
        ce_sel = [i for i, b in enumerate(plan.ce_blocks) if plan.is_view_block(b) == view]
        keys = [plan.ce_blocks[i][0] * n + plan.net_of[plan.ce_blocks[i][1]] for i in ce_sel]
        blocks = sorted(set(keys))
        kl_sel = [i for i, (s, _) in enumerate(plan.kl_blocks) if plan.is_view_block(s) == view]
        groups.append((view, t(ce_sel), t(blocks), t([blocks.index(k) for k in keys]), t(kl_sel)))
    return tuple(groups)


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
                             backend: str = "reference", student_out: list | None = None) -> ContrastiveTerms:
    """In-batch setting. embeddings: flat list of NE tensors [B, D] in the plan's order; weights [P, B] or None.

    `student_out` (meta phase only, reference backend): a list that receives the student copy of the logits; the
    teacher copy is then NOT detached, so the meta phase can form ∇θ with the teacher held fixed while keeping the
    teacher's dependence on θ for its second derivatives (see fastmcl/meta.py).
    """
    B, _ = _check_common(embeddings, plan, weights, tau, kd_T)
    checks.check_labels(labels, B, embeddings[0].device)
    use = resolve_backend(backend, embeddings[0].device, embeddings[0].dtype,
                          twice_differentiable=student_out is not None)

    E = _stack(embeddings)
    ix = _plan_indices(plan, E.device)
    args = (E, labels, ix["ce_u"], ix["ce_v"], ix["kl_su"], ix["kl_sv"], ix["kl_tu"], ix["kl_tv"], tau, kd_T)
    if use == "reference":
        ce, kl = inbatch_rows_reference(*args, student_out=student_out)
    else:
        _no_split(student_out)
        ce, kl = _kernels().inbatch_rows(*args)
    return _combine(ce, kl, ix, weights, kd_T)


def inbatch_rows_reference(E: Tensor, labels: Tensor, ce_u: Tensor, ce_v: Tensor, kl_su: Tensor, kl_sv: Tensor,
                           kl_tu: Tensor, kl_tv: Tensor, tau: float, kd_T: float, *,
                           student_out: list | None = None) -> tuple[Tensor, Tensor]:
    """Per-row statistics of the distinct in-batch blocks: the contract every in-batch kernel implements.

    E [NE, B, D]; block (u, v) = e_u e_vᵀ/τ. Returns ce [Nc, B] = supcon rows of blocks (ce_u, ce_v) with P = same
    label off the diagonal and the diagonal out of the denominator (Q1), and kl [Nk, B] = KL rows at temperature T
    between student blocks (kl_su, kl_sv) and detached teacher blocks (kl_tu, kl_tv).
    """
    NE, B, D = E.shape
    flat = E.reshape(NE * B, D)
    G = (flat @ flat.T / tau).reshape(NE, B, NE, B).transpose(1, 2)    # G[u, v] = e_u e_vᵀ / τ, one GEMM
    G_s, G_t = _split(G, student_out)
    pos, denom = inbatch_masks(labels)
    ce = supcon_rows(G_s[ce_u, ce_v], pos, denom)
    kl = kl_rows(G_s[kl_su, kl_sv], G_t[kl_tu, kl_tv], kd_T, detach_teacher=student_out is None)
    return ce, kl


def _split(S: Tensor, student_out: list | None) -> tuple[Tensor, Tensor]:
    """(student, teacher) views of the logits: the same tensor normally (the teacher is detached in `kl_rows`), or
    two separate graph nodes, the student one handed out, for the meta phase."""
    if student_out is None:
        return S, S
    student = S.clone()
    student_out.append(student)
    return student, S.clone()


def _no_split(student_out: list | None) -> None:
    if student_out is not None:
        raise ValueError("student_out (the meta phase's split teacher) needs backend='reference'")


def cohort_bank_contrastive_terms(embeddings: list[Tensor], banks: list[Tensor], idx: Tensor, plan: ContrastPlan, *,
                                  weights: Tensor | None = None, tau: float = 0.07, kd_T: float = 3.0,
                                  pos_k: int = 1, k_chunk: int | None = None,
                                  backend: str = "reference", student_out: list | None = None) -> ContrastiveTerms:
    """Memory-bank setting. banks[i]: network i's memory [N, D]; idx [B, K] = [own, pos_k positives, negatives].

    k_chunk=None gathers each bank once with autograd (keeps [B, K, D] per bank for backward); an int streams K in
    chunks of that size and re-gathers in backward, keeping only the [NE, B, K] logits.
    """
    B, D = _check_common(embeddings, plan, weights, tau, kd_T)
    n_nets = max(plan.net_of) + 1
    banks = _bank_tensor(banks, n_nets)
    n_rows = checks.check_banks(list(banks.unbind(0)), D, [f"banks[{i}]" for i in range(n_nets)])
    checks.check_index(idx, B, pos_k, n_rows, check_range=True)
    if k_chunk is not None and (not isinstance(k_chunk, int) or k_chunk < 1):
        raise ValueError(f"k_chunk must be None or an int >= 1, got {k_chunk!r}")
    use = resolve_backend(backend, embeddings[0].device, embeddings[0].dtype,
                          twice_differentiable=student_out is not None)

    E = _stack(embeddings)
    ix = _plan_indices(plan, E.device)
    net_of = ix["net_of"]
    args = (E, banks.detach(), idx.long(), ix["ce_u"], net_of[ix["ce_v"]], ix["ce_is_view"], ix["kl_su"],
            net_of[ix["kl_sv"]], ix["kl_tu"], net_of[ix["kl_tv"]], ix["kl_is_view"], tau, kd_T, pos_k)
    if use == "reference":
        ce, kl = bank_rows_reference(*args, k_chunk=k_chunk, student_out=student_out,
                                     groups=_bank_groups(plan, E.device))
    else:
        _no_split(student_out)
        ce, kl = _kernels().bank_rows(*args)
    return _combine(ce, kl, ix, weights, kd_T)


def bank_rows_reference(E: Tensor, banks: Tensor, idx: Tensor, ce_u: Tensor, ce_m: Tensor, ce_view: Tensor,
                        kl_su: Tensor, kl_sm: Tensor, kl_tu: Tensor, kl_tm: Tensor, kl_view: Tensor, tau: float,
                        kd_T: float, pos_k: int, *, k_chunk: int | None = None,
                        student_out: list | None = None, groups: tuple | None = None) -> tuple[Tensor, Tensor]:
    """Per-row statistics of the distinct bank blocks: the contract every memory-bank kernel implements.

    E [NE, B, D]; banks [n, N, D] (never differentiated); idx [B, K]. Block (u, m) has logits e_u · banks[m][idx]ᵀ/τ.
    A view block (VCL) drops column 0 and has pos_k leading positives; a cross block (ICL) keeps all K columns with
    1 + pos_k leading positives. Returns ce [Nc, B] (rows of blocks (ce_u, ce_m)) and kl [Nk, B] (KL rows at T of
    student (kl_su, kl_sm) vs detached teacher (kl_tu, kl_tm); both sides share the view flag).
    `groups`: the plan's partition into view / cross rows precomputed (`_bank_groups`); None derives it here.
    """
    B = E.shape[1]
    # L[u, m] = e_u · Mem_m[idx]ᵀ / τ: depends on the contrast side only through the bank (spec §4.2).
    L = torch.stack([bank_logits_all(E, bank.to(E.dtype), idx, k_chunk) for bank in banks], dim=1) / tau
    L_s, L_t = _split(L, student_out)
    n = L.shape[1]
    # Row statistics are computed in chunks of blocks whose intermediates are recomputed in backward
    # (activation checkpointing), so only L and its gradient stay alive: the [blocks, B, K] softmax temporaries
    # would otherwise dominate the memory of the streamed path. The meta phase (student_out) differentiates twice and
    # takes the plain path.
    # (Under torch.compile the compiler plans the memory itself: no checkpoint regions there.)
    recompute = (student_out is None and torch.is_grad_enabled() and L.requires_grad
                 and not torch.compiler.is_compiling())
    ce = L.new_empty(ce_u.shape[0], B)
    kl = L.new_empty(kl_su.shape[0], B)
    if groups is None:
        groups = []
        for view in (True, False):
            sel = (ce_view == view).nonzero().flatten()
            blocks, inverse = torch.unique(ce_u[sel] * n + ce_m[sel], return_inverse=True)
            groups.append((view, sel, blocks, inverse, (kl_view == view).nonzero().flatten()))
    for (view, sel, blocks, inverse, kl_sel), (drop, n_pos) in zip(groups, ((1, pos_k), (0, 1 + pos_k))):
        if sel.numel():
            # each distinct (embedding, bank) block once: plan blocks (u, v) share the bank m = net(v) (spec §4.2)
            rows = _chunked(lambda Ls, b, drop=drop, n_pos=n_pos:  # bound now: backward recomputes later
                            leading_positive_rows(Ls[b // n, b % n, :, drop:], n_pos), (L_s,), (blocks,), recompute)
            ce = ce.index_copy(0, sel, rows[inverse])
        sel = kl_sel
        if sel.numel():
            rows = _chunked(lambda Ls, Lt, su, sm, tu, tm, drop=drop:
                            kl_rows(Ls[su, sm, :, drop:], Lt[tu, tm, :, drop:], kd_T, detach_teacher=student_out is None),
                            (L_s, L_t), (kl_su[sel], kl_sm[sel], kl_tu[sel], kl_tm[sel]), recompute)
            kl = kl.index_copy(0, sel, rows)
    return ce, kl


def _chunked(fn, tensors: tuple, index_args: tuple, recompute: bool, chunk: int = 4) -> Tensor:
    """fn(*tensors, *index_args[lo:hi]) over chunks of the index vectors, concatenated; checkpointed if asked."""
    out = []
    for lo in range(0, index_args[0].shape[0], chunk):
        args = tensors + tuple(a[lo:lo + chunk] for a in index_args)
        out.append(checkpoint(fn, *args, use_reentrant=False) if recompute else fn(*args))
    return torch.cat(out)


def _stack(embeddings: list[Tensor]) -> Tensor:
    dtype = compute_dtype(embeddings[0])
    return torch.stack([e.to(dtype) for e in embeddings])             # [NE, B, D]


def _bank_tensor(banks, n_nets: int) -> Tensor:
    """Accept one [n, N, D] tensor (MemoryBank.memory, no copy) or a list of n [N, D] banks."""
    if isinstance(banks, Tensor) and banks.dim() == 3 and banks.shape[0] == n_nets:
        return banks
    if isinstance(banks, (list, tuple)) and len(banks) == n_nets and all(isinstance(b, Tensor) for b in banks):
        for i, b in enumerate(banks):
            if b.dim() != 2 or b.shape != banks[0].shape:
                raise ValueError(f"banks[{i}] must be [N, D] like banks[0] {tuple(banks[0].shape)}, got {tuple(b.shape)}")
        return torch.stack(list(banks))
    raise ValueError(f"banks must be a [{n_nets}, N, D] tensor or a list of {n_nets} [N, D] tensors (one per network)")


def _kernels():
    from fastmcl import kernels  # imported lazily: triton is only needed on the fused path
    return kernels
