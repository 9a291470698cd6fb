"""The whole cohort's contrastive terms from a `ContrastPlan`, each distinct logit block computed once (docs/official_mcl.md §4.2).

In-batch (docs/official_mcl.md §1.2): one GEMM gives every block e_u e_vᵀ/τ. Memory bank (docs/official_mcl.md §1.3): each network's bank is gathered
once and scored against every embedding. The per-row statistics of the distinct blocks (`inbatch_rows_reference`,
`bank_rows_reference`: the contracts the kernels implement) are combined with each pair's weights; the values equal
the sum of the plan's pair calls (`pair_terms`).
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from . import checks
from .backend import resolve_backend
from .bank_logits import bank_logits_all
from .plan import ContrastPlan, index_tables
from .rows import ContrastiveTerms, compute_dtype, inbatch_masks, kl_rows, leading_positive_rows, supcon_rows


plan_indices = index_tables         # the plan's index tables (also ContrastPlan.index_tables)


@functools.lru_cache(maxsize=64)
def _bank_groups(ce_u: tuple, ce_m: tuple, ce_view: tuple, kl_su: tuple, kl_sm: tuple, kl_tu: tuple, kl_tm: tuple,
                 kl_view: tuple, device: torch.device) -> tuple:
    """The bank rows' static partition, from host copies of `bank_rows_reference`'s index arguments: per setting (view
    blocks, then cross blocks), the ce rows it owns (`sel`), each row's distinct (embedding, bank) block (`inverse`),
    the kl rows it owns (`kl_sel`), and on the host the distinct ce blocks (u, m) and the kl blocks (su, sm, tu, tm).
    Host indices make every block a view of L; built once per plan, a compiled step has no data-dependent op."""
    def t(values):
        return torch.tensor(values, dtype=torch.long, device=device)

    groups = []
    for view in (True, False):
        ce_sel = [i for i, v in enumerate(ce_view) if v == view]
        keys = [(ce_u[i], ce_m[i]) for i in ce_sel]
        blocks = sorted(set(keys))
        kl_sel = [i for i, v in enumerate(kl_view) if v == view]
        host = ([u for u, _ in blocks], [m for _, m in blocks]) + tuple([col[i] for i in kl_sel]
                                                                        for col in (kl_su, kl_sm, kl_tu, kl_tm))
        groups.append((t(ce_sel), t([blocks.index(k) for k in keys]), t(kl_sel), host))
    return tuple(groups)


@functools.lru_cache(maxsize=64)
def _plan_bank_groups(plan: ContrastPlan, device: torch.device) -> tuple:
    """`_bank_groups` of a plan's bank rows, without reading any device tensor."""
    net = plan.net_of
    ce, kl = plan.ce_blocks, plan.kl_blocks
    return _bank_groups(tuple(u for u, _ in ce), tuple(net[v] for _, v in ce), tuple(map(plan.is_view_block, ce)),
                        tuple(s[0] for s, _ in kl), tuple(net[s[1]] for s, _ in kl), tuple(t[0] for _, t in kl),
                        tuple(net[t[1]] for _, t in kl), tuple(plan.is_view_block(s) for s, _ in kl), device)


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
        got = len(embeddings) if isinstance(embeddings, (list, tuple)) else repr(embeddings)
        raise ValueError(f"embeddings must be a list of {plan.num_embeddings} tensors (one per network and stage "
                         f"of the plan), got {got}")
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
    teacher's dependence on θ for its second derivatives (`fastmcl.meta`).
    """
    B, _ = _check_common(embeddings, plan, weights, tau, kd_T)
    checks.check_labels(labels, B, embeddings[0].device)
    use = resolve_backend(backend, embeddings[0].device, embeddings[0].dtype,
                          twice_differentiable=student_out is not None)

    E = _stack(embeddings)
    ix = plan_indices(plan, E.device)
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
    two separate graph nodes, the student one handed out, for the meta phase (and the teacher one too, when
    `student_out` has a `teachers` list: the meta phase's transpose correction)."""
    if student_out is None:
        return S, S
    student, teacher = S.clone(), S.clone()
    student_out.append(student)
    if getattr(student_out, "teachers", None) is not None:
        student_out.teachers.append(teacher)
    return student, teacher


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
    use = resolve_backend(backend, embeddings[0].device, embeddings[0].dtype,
                          twice_differentiable=student_out is not None, bank_shape=(len(embeddings), n_nets, D))
    checks.check_index(idx, B, pos_k, n_rows, check_range=use == "reference")   # the fused path never syncs
    if k_chunk is not None and (not isinstance(k_chunk, int) or k_chunk < 1):
        raise ValueError(f"k_chunk must be None or an int >= 1, got {k_chunk!r}")

    E = _stack(embeddings)
    ix = plan_indices(plan, E.device)
    args = (E, banks.detach(), idx.long(), ix["ce_u"], ix["ce_m"], ix["ce_is_view"], ix["kl_su"], ix["kl_sm"],
            ix["kl_tu"], ix["kl_tm"], ix["kl_is_view"], tau, kd_T, pos_k)
    if use == "reference":
        ce, kl = bank_rows_reference(*args, k_chunk=k_chunk, student_out=student_out,
                                     groups=_plan_bank_groups(plan, E.device))
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
    `groups`: `_bank_groups` of these arguments when the caller has it (the engine, from its plan); None reads the
    index arguments on the host to build it.
    """
    B = E.shape[1]
    # L[u, m] = e_u · Mem_m[idx]ᵀ / τ: depends on the contrast side only through the bank (docs/official_mcl.md §4.2).
    L = bank_logits_all(E / tau, banks, idx, k_chunk)                      # [NE, n, B, K]
    if groups is None:
        host = (tuple(i.tolist()) for i in (ce_u, ce_m, ce_view, kl_su, kl_sm, kl_tu, kl_tm, kl_view))
        groups = _bank_groups(*host, E.device)
    # per group: (columns dropped, leading positives, host lists of ce blocks (u, m) and kl blocks (su, sm, tu, tm))
    specs = tuple((drop, n_pos, *host) for (*_, host), (drop, n_pos) in zip(groups, ((1, pos_k), (0, 1 + pos_k))))
    # The hand-written backward keeps only L alive; the meta phase (student_out) differentiates twice: plain autograd.
    if student_out is None and torch.is_grad_enabled() and L.requires_grad:
        rows = _BankRows.apply(L, specs, kd_T)
    else:
        L_s, L_t = _split(L, student_out)
        rows = _bank_rows(L_s, L_t, specs, kd_T, detach_teacher=student_out is None)
    ce = L.new_empty(ce_u.shape[0], B)
    kl = L.new_empty(kl_su.shape[0], B)
    for (sel, inverse, kl_sel, _), ce_rows, kl_rows_ in zip(groups, rows[0::2], rows[1::2]):
        if sel.numel():            # each distinct (embedding, bank) block once; plan blocks (u, v) share m = net(v)
            ce = ce.index_copy(0, sel, ce_rows[inverse])
        if kl_sel.numel():
            kl = kl.index_copy(0, kl_sel, kl_rows_)
    return ce, kl


def _bank_rows(L_s: Tensor, L_t: Tensor, specs: tuple, kd_T: float, *, detach_teacher: bool = True) -> tuple:
    """(ce rows, kl rows) per group of `specs`, from student logits L_s and teacher logits L_t [NE, n, B, K]; one
    [B, K] block (a view of L) at a time, so the temporaries stay [B, K]-sized."""
    def rows(values: list) -> Tensor:
        return torch.stack(values) if values else L_s.new_empty(0, L_s.shape[2])

    out = []
    for drop, n_pos, cu, cm, su, sm, tu, tm in specs:
        out.append(rows([leading_positive_rows(L_s[u, m, :, drop:], n_pos) for u, m in zip(cu, cm)]))
        out.append(rows([kl_rows(L_s[a, b, :, drop:], L_t[c, d, :, drop:], kd_T, detach_teacher=detach_teacher)
                         for a, b, c, d in zip(su, sm, tu, tm)]))
    return tuple(out)


class _BankRows(torch.autograd.Function):
    """`_bank_rows` with detached teachers and a flash-style backward (docs/losses.md "Contracts"): only L is saved (no
    [B, K] softmax per block kept, no full-size zero gradient per block slice); backward recomputes each block's
    softmax from L and adds its gradient into one buffer. Per row, with x the block's logits (docs/official_mcl.md §1.3):
    ce = lse(x) − mean(x[:n_pos])             →  ∂/∂x = softmax(x) − 1[k < n_pos] / n_pos        (ICL, VCL);
    kl = KL(softmax(t/T) ‖ softmax(s/T)), t detached  →  ∂/∂s = (softmax(s/T) − softmax(t/T)) / T  (soft ICL, VCL).
    """

    @staticmethod
    def forward(ctx, L: Tensor, specs: tuple, kd_T: float):
        ctx.save_for_backward(L)
        ctx.specs, ctx.kd_T = specs, kd_T
        return _bank_rows(L, L, specs, kd_T)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grad_rows: Tensor):
        L, = ctx.saved_tensors
        T = ctx.kd_T
        grad_L = torch.zeros_like(L)
        for (drop, n_pos, cu, cm, su, sm, tu, tm), g_ce, g_kl in zip(ctx.specs, grad_rows[0::2], grad_rows[1::2]):
            for u, m, g in zip(cu, cm, g_ce[:, :, None]):
                d = torch.softmax(L[u, m, :, drop:], dim=-1).mul_(g)
                d[:, :n_pos] -= g / n_pos
                grad_L[u, m, :, drop:] += d
            for a, b, c, e, g in zip(su, sm, tu, tm, g_kl[:, :, None] / T):
                d = torch.softmax(L[a, b, :, drop:] / T, dim=-1)
                d -= torch.softmax(L[c, e, :, drop:] / T, dim=-1)
                grad_L[a, b, :, drop:] += d.mul_(g)
        return grad_L, None, None


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
                raise ValueError(f"banks[{i}] must be [N, D] like banks[0] {tuple(banks[0].shape)}, "
                                 f"got {tuple(b.shape)}")
        return torch.stack(list(banks))
    raise ValueError(f"banks must be a [{n_nets}, N, D] tensor or a list of {n_nets} [N, D] tensors (one per network)")


def _kernels():
    from fastmcl import kernels  # imported lazily: triton is only needed on the fused path
    return kernels
