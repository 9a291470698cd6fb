"""Fused memory-bank contrastive rows (DESIGN.md "Kernels", fusion target 1; spec/lmcl.md §1.3, §4.2).

`bank_rows(E, banks, idx, ce_u, ce_m, ce_view, kl_su, kl_sm, kl_tu, kl_tm, kl_view, tau, kd_T, pos_k)` has the
semantics, shapes and gradients of `fastmcl.losses.cohort_terms.bank_rows_reference` (the contract): E [NE, B, D],
banks [n, N, D] (never differentiated), idx [B, K]; block (u, m) has logits L[u, m, b, k] = E[u, b] · banks[m][idx[b, k]] / τ;
a view block drops column 0 and has `pos_k` leading positives, a cross block keeps all K columns and has 1 + pos_k.
Returns ce [Nc, B] (leading-positive CE rows) and kl [Nk, B] (KL rows at T of student vs detached teacher), fp32.

Structure
---------
A *combo* c = u · N_PAD + m is one (embedding, bank) pair; every CE block and both sides of every KL block are combos.
The kernel works on all C = NE_PAD · N_PAD combos of one anchor row at once:

* grid = (B,): one program per anchor row b. It loads E[:, b, :] once ([NE_PAD, D_PAD], rows ≥ NE masked to 0) and
  streams the K columns of its row in tiles of BLOCK_K. Per tile it gathers the rows banks[m, idx[b, k]] of *every*
  bank inside the kernel (int64 offsets, masked on the ragged K edge, the padded banks and the padded D), as one
  [N_PAD · BLOCK_K, D_PAD] operand, and computes one `tl.dot` [NE_PAD, D_PAD] × [D_PAD, N_PAD · BLOCK_K], reshaped to
  the combo tile [C, BLOCK_K]. Nothing [B, K, D] or [blocks, B, K] ever exists in memory.
* Column 0 (the own index) is kept apart: all online statistics run over columns k ≥ 1 (the view column set), and
  the column-0 logit L0[c] is stored. A cross block's statistics are the view ones merged with column 0 by a stable
  log-add-exp at the end, so one pass serves view and cross blocks without a per-combo flag.
* Forward keeps, per combo, the online max / sum-exp at τ (CE) and at τ·T (KL), and the sum of the positive
  columns 1..pos_k. Per KL block j it gathers (`tl.gather`, exact) the student and teacher rows of the combo tile and
  keeps the teacher's online max / sum-exp at T and A_j = Σ_k exp(t_k − max)·(t_k − s_k), rescaled when the max
  moves; the centred form KL = A/Z − (lse_t − lse_s) (DESIGN.md) then costs no extra pass.
* Saved for backward: E, banks, idx, the index vectors and `stats` [3, B, C] fp32 = (lse over k ≥ 1 at τ,
  lse over k ≥ 1 at τ·T, L0): per-row statistics only.
* Backward (flash-attention style), grid = (B,): the per-combo coefficients are folded from the upstream gradients
  once per row (one-hot reductions over the block lists), then each tile of logits is recomputed from E and the
  re-gathered bank rows, and the logit gradient is built in registers:
      G[c, k] = coef_ce[c]·exp(L − lse_τ[c]) − pos[c]·1[1 ≤ k ≤ pos_k]
              + coef_kl[c]·exp(L/T − lse_T[c]) − (W @ exp(L/T − lse_T))[c, k]
  (W [C, C]: the teacher-softmax weights −g_j/T of every KL block j routed from teacher combo to student combo, one
  `tl.dot`; the teacher itself is detached), column 0 from its own closed form. dE[:, b, :] += G @ bank_rows / τ,
  one `tl.dot` per tile; each program writes its own row of dE (no atomics).

GPU rules (the interpreter is laxer): every `tl.dot` dimension is ≥ 16 (NE_PAD ≥ 16, D_PAD ≥ 16, BLOCK_K ≥ 16, the
block lists padded to ≥ 16); all block sizes are powers of two; every ragged edge is masked; bf16/fp16 are loaded
and cast to fp32 at once; all offsets into E / banks / idx are int64. The logit dots use `input_precision="ieee"`
(fp32-exact, the default); `input_precision="tf32"` (or "tf32x3") is the speed switch on Ampere+ — it perturbs the
logits by ~1e-3 relative (≈1e-2 absolute at 1/τ = 14), so use it only where that is acceptable. The small
mixing dots (one-hot routing, W) always run in "ieee".

Limits: fp64 is not supported (TypeError: the dispatcher should use the reference backend for fp64); C = NE_PAD ·
N_PAD ≤ MAX_COMBOS (128; e.g. ≤ 16 embeddings × ≤ 8 banks, or ≤ 32 × 4); idx values are not range-checked here
(the reference dispatcher checks them; an out-of-range index reads out of bounds on a GPU).

Wrapped as `torch.library.custom_op` "fastmcl::bank_rows" (+ "fastmcl::bank_rows_backward") with `register_fake`
and `register_autograd`, so a `torch.compile`d function can call it (DESIGN.md: `triton_op` / `wrap_triton` fail
under compile on CPU here).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["bank_rows", "MAX_COMBOS", "pick_block_k"]

MAX_COMBOS = 128
_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)
_PRECISIONS = ("ieee", "tf32", "tf32x3")


def _pow2(x: int, floor: int = 16) -> int:
    return max(floor, triton.next_power_of_2(max(int(x), 1)))


def pick_block_k(C: int, n_pad: int, d_pad: int) -> int:
    """BLOCK_K: a power of two in [16, 64] keeping the gathered tile (N_PAD·BLOCK_K × D_PAD) ≤ 8K elements and the
    combo tile (C × BLOCK_K) ≤ 4K elements (register budget of one program on a GPU)."""
    bk = 64
    while bk > 16 and (n_pad * bk * d_pad > 8192 or C * bk > 4096):
        bk //= 2
    return bk


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def _pick(vec, index, C: tl.constexpr):
    """vec[index] for a [C] vector and a [J] index vector, as an exact one-hot reduction."""
    cols = tl.arange(0, C)
    return tl.sum(tl.where(index[:, None] == cols[None, :], vec[None, :], 0.0), axis=1)


@triton.jit
def _logaddexp(a, b):
    mx = tl.maximum(a, b)
    return mx + tl.log(tl.exp(a - mx) + tl.exp(b - mx))


@triton.jit
def _load_anchor(E_ptr, b, B, D, NE, NE_PAD: tl.constexpr, D_PAD: tl.constexpr):
    """E[:, b, :] as an fp32 [NE_PAD, D_PAD] tile (padded rows / columns are 0)."""
    offs_u = tl.arange(0, NE_PAD)
    offs_d = tl.arange(0, D_PAD)
    ptrs = E_ptr + offs_u[:, None].to(tl.int64) * B * D + b * D + offs_d[None, :]
    mask = (offs_u[:, None] < NE) & (offs_d[None, :] < D)
    return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _gather_banks(BANK_ptr, IDX_ptr, b, k0, K, D, N_ROWS, N_BANKS,
                  N_PAD: tl.constexpr, BLOCK_K: tl.constexpr, D_PAD: tl.constexpr):
    """Rows banks[m, idx[b, k0 + k]] for every bank m and k < BLOCK_K as an fp32 [N_PAD·BLOCK_K, D_PAD] tile,
    row j = m·BLOCK_K + k; columns past K, padded banks and padded D are 0."""
    jj = tl.arange(0, N_PAD * BLOCK_K)
    m_of = jj // BLOCK_K
    kk = k0 + jj % BLOCK_K
    col_ok = kk < K
    rows = tl.load(IDX_ptr + b * K + kk, mask=col_ok, other=0).to(tl.int64)
    offs_d = tl.arange(0, D_PAD)
    row_off = m_of.to(tl.int64) * N_ROWS * D + rows * D
    mask = (col_ok & (m_of < N_BANKS))[:, None] & (offs_d[None, :] < D)
    return tl.load(BANK_ptr + row_off[:, None] + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _bank_rows_fwd_kernel(
        E_ptr, BANK_ptr, IDX_ptr,
        CE_C_ptr, CE_VIEW_ptr, KL_S_ptr, KL_T_ptr, KL_VIEW_ptr,
        CE_OUT_ptr, KL_OUT_ptr, STATS_ptr,
        B, K, D, N_ROWS, NE, N_BANKS, NC, NK, POS_K, tau, kd_T,
        NE_PAD: tl.constexpr, N_PAD: tl.constexpr, D_PAD: tl.constexpr, BLOCK_K: tl.constexpr,
        NC_PAD: tl.constexpr, NK_PAD: tl.constexpr, PRECISION: tl.constexpr):
    C: tl.constexpr = NE_PAD * N_PAD
    b = tl.program_id(0).to(tl.int64)
    e = _load_anchor(E_ptr, b, B, D, NE, NE_PAD, D_PAD)

    offs_k = tl.arange(0, BLOCK_K)
    # per combo: online stats over columns k >= 1 at tau (m1, l1) and at tau*T (mT, lT), positive sum, column 0
    m1 = tl.full([C], float("-inf"), tl.float32)
    l1 = tl.zeros([C], tl.float32)
    mT = tl.full([C], float("-inf"), tl.float32)
    lT = tl.zeros([C], tl.float32)
    pos = tl.zeros([C], tl.float32)
    l0 = tl.zeros([C], tl.float32)
    # per KL block: teacher online stats at T over k >= 1 and the cross term A = sum exp(t - max) (t - s)
    kj = tl.arange(0, NK_PAD)
    kmask = kj < NK
    ks = tl.load(KL_S_ptr + kj, mask=kmask, other=0).to(tl.int32)
    kt = tl.load(KL_T_ptr + kj, mask=kmask, other=0).to(tl.int32)
    ks2 = ks[:, None] + tl.zeros([NK_PAD, BLOCK_K], tl.int32)
    kt2 = kt[:, None] + tl.zeros([NK_PAD, BLOCK_K], tl.int32)
    mp = tl.full([NK_PAD], float("-inf"), tl.float32)
    zp = tl.zeros([NK_PAD], tl.float32)
    ap = tl.zeros([NK_PAD], tl.float32)

    for k0 in range(0, K, BLOCK_K):
        g = _gather_banks(BANK_ptr, IDX_ptr, b, k0, K, D, N_ROWS, N_BANKS, N_PAD, BLOCK_K, D_PAD)
        s = tl.dot(e, tl.trans(g), input_precision=PRECISION) / tau            # [NE_PAD, N_PAD*BLOCK_K]
        L = tl.reshape(s, (C, BLOCK_K))                                        # row c = u*N_PAD + m
        kcol = k0 + offs_k
        valid = (kcol >= 1) & (kcol < K)
        if k0 == 0:
            l0 = tl.sum(tl.where(kcol[None, :] == 0, L, 0.0), axis=1)
        if k0 <= POS_K:
            is_pos = (kcol >= 1) & (kcol <= POS_K)
            pos += tl.sum(tl.where(is_pos[None, :], L, 0.0), axis=1)
        # CE softmax (tau)
        Lm = tl.where(valid[None, :], L, float("-inf"))
        m_new = tl.maximum(m1, tl.max(Lm, axis=1))
        l1 = l1 * tl.exp(m1 - m_new) + tl.sum(tl.exp(Lm - m_new[:, None]), axis=1)
        m1 = m_new
        # KL softmax (tau * T)
        LT = Lm / kd_T
        m_new = tl.maximum(mT, tl.max(LT, axis=1))
        lT = lT * tl.exp(mT - m_new) + tl.sum(tl.exp(LT - m_new[:, None]), axis=1)
        mT = m_new
        # KL cross terms, centred: sum_k exp(t_k - max_t) (t_k - s_k)
        t = tl.gather(L, kt2, 0) / kd_T
        st = tl.gather(L, ks2, 0) / kd_T
        t_m = tl.where(valid[None, :], t, float("-inf"))
        m_new = tl.maximum(mp, tl.max(t_m, axis=1))
        alpha = tl.exp(mp - m_new)
        w = tl.exp(t_m - m_new[:, None])
        zp = zp * alpha + tl.sum(w, axis=1)
        ap = ap * alpha + tl.sum(w * tl.where(valid[None, :], t - st, 0.0), axis=1)
        mp = m_new

    # per-combo log-sum-exps: view set (k >= 1) and full set (with column 0)
    lse1 = m1 + tl.log(l1)
    lseT = mT + tl.log(lT)
    lse1_f = _logaddexp(lse1, l0)
    lseT_f = _logaddexp(lseT, l0 / kd_T)
    cc = tl.arange(0, C)
    st_ptr = STATS_ptr + b * C + cc
    tl.store(st_ptr, lse1)
    tl.store(st_ptr + B * C, lseT)
    tl.store(st_ptr + 2 * B * C, l0)

    # CE rows: lse - mean of the leading positives
    cj = tl.arange(0, NC_PAD)
    cmask = cj < NC
    cidx = tl.load(CE_C_ptr + cj, mask=cmask, other=0).to(tl.int32)
    cview = tl.load(CE_VIEW_ptr + cj, mask=cmask, other=0) != 0
    pos_j = _pick(pos, cidx, C)
    ce_view = _pick(lse1, cidx, C) - pos_j / POS_K
    ce_cross = _pick(lse1_f, cidx, C) - (pos_j + _pick(l0, cidx, C)) / (POS_K + 1)
    tl.store(CE_OUT_ptr + cj.to(tl.int64) * B + b, tl.where(cview, ce_view, ce_cross), mask=cmask)

    # KL rows: a cross block merges column 0 into the teacher's stats and its cross term
    kview = tl.load(KL_VIEW_ptr + kj, mask=kmask, other=0) != 0
    t0 = _pick(l0, kt, C) / kd_T
    s0 = _pick(l0, ks, C) / kd_T
    M = tl.where(kview, mp, tl.maximum(mp, t0))
    alpha = tl.exp(mp - M)
    w0 = tl.where(kview, 0.0, tl.exp(t0 - M))
    Z = zp * alpha + w0
    A = ap * alpha + w0 * (t0 - s0)
    lse_t = M + tl.log(Z)
    lse_s = tl.where(kview, _pick(lseT, ks, C), _pick(lseT_f, ks, C))
    kl = A / Z - (lse_t - lse_s)
    tl.store(KL_OUT_ptr + kj.to(tl.int64) * B + b, kl, mask=kmask)


@triton.jit
def _bank_rows_bwd_kernel(
        E_ptr, BANK_ptr, IDX_ptr,
        CE_C_ptr, CE_VIEW_ptr, KL_S_ptr, KL_T_ptr, KL_VIEW_ptr,
        G_CE_ptr, G_KL_ptr, STATS_ptr, DE_ptr,
        B, K, D, N_ROWS, NE, N_BANKS, NC, NK, POS_K, tau, kd_T,
        NE_PAD: tl.constexpr, N_PAD: tl.constexpr, D_PAD: tl.constexpr, BLOCK_K: tl.constexpr,
        NC_PAD: tl.constexpr, NK_PAD: tl.constexpr, PRECISION: tl.constexpr):
    C: tl.constexpr = NE_PAD * N_PAD
    b = tl.program_id(0).to(tl.int64)
    e = _load_anchor(E_ptr, b, B, D, NE, NE_PAD, D_PAD)
    cc = tl.arange(0, C)
    st_ptr = STATS_ptr + b * C + cc
    lse1 = tl.load(st_ptr)
    lseT = tl.load(st_ptr + B * C)
    l0 = tl.load(st_ptr + 2 * B * C)
    lse1_f = _logaddexp(lse1, l0)
    lseT_f = _logaddexp(lseT, l0 / kd_T)
    f1 = tl.exp(lse1 - lse1_f)          # full-set softmax = f · view-set softmax on k >= 1
    fT = tl.exp(lseT - lseT_f)

    # CE blocks → per combo: a_v (view) and a_x (cross) upstream gradients
    cj = tl.arange(0, NC_PAD)
    cmask = cj < NC
    cidx = tl.load(CE_C_ptr + cj, mask=cmask, other=0).to(tl.int32)
    cview_i = tl.load(CE_VIEW_ptr + cj, mask=cmask, other=0)
    cview = cview_i != 0
    ccross = cview_i == 0
    gce = tl.load(G_CE_ptr + cj.to(tl.int64) * B + b, mask=cmask, other=0.0).to(tl.float32)
    oh_c = (cidx[:, None] == cc[None, :]) & cmask[:, None]
    a_v = tl.sum(tl.where(oh_c & cview[:, None], gce[:, None], 0.0), axis=0)
    a_x = tl.sum(tl.where(oh_c & ccross[:, None], gce[:, None], 0.0), axis=0)
    coef_ce = a_v + a_x * f1
    pos_c = a_v / POS_K + a_x / (POS_K + 1)

    # KL blocks → per student combo: b_v, b_x; teacher routing matrix W [C, C]
    kj = tl.arange(0, NK_PAD)
    kmask = kj < NK
    ks = tl.load(KL_S_ptr + kj, mask=kmask, other=0).to(tl.int32)
    kt = tl.load(KL_T_ptr + kj, mask=kmask, other=0).to(tl.int32)
    kview_i = tl.load(KL_VIEW_ptr + kj, mask=kmask, other=0)
    kview = kview_i != 0
    kcross = kview_i == 0
    h = tl.load(G_KL_ptr + kj.to(tl.int64) * B + b, mask=kmask, other=0.0).to(tl.float32) / kd_T
    oh_s = (ks[:, None] == cc[None, :]) & kmask[:, None]
    oh_t = ((kt[:, None] == cc[None, :]) & kmask[:, None]).to(tl.float32)
    b_v = tl.sum(tl.where(oh_s & kview[:, None], h[:, None], 0.0), axis=0)
    b_x = tl.sum(tl.where(oh_s & kcross[:, None], h[:, None], 0.0), axis=0)
    coef_kl = b_v + b_x * fT
    h_w = h * tl.where(kview, 1.0, _pick(fT, kt, C))
    W = tl.dot(tl.trans(tl.where(oh_s, h_w[:, None], 0.0)), oh_t, input_precision="ieee")     # [C, C]

    # column 0 (cross blocks only)
    pT0 = tl.exp(l0 / kd_T - lseT_f)
    hx_t0 = tl.where(kview, 0.0, h * _pick(pT0, kt, C))
    g0 = (a_x * tl.exp(l0 - lse1_f) - a_x / (POS_K + 1) + b_x * pT0
          - tl.sum(tl.where(oh_s, hx_t0[:, None], 0.0), axis=0))

    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([NE_PAD, D_PAD], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        g = _gather_banks(BANK_ptr, IDX_ptr, b, k0, K, D, N_ROWS, N_BANKS, N_PAD, BLOCK_K, D_PAD)
        s = tl.dot(e, tl.trans(g), input_precision=PRECISION) / tau
        L = tl.reshape(s, (C, BLOCK_K))
        kcol = k0 + offs_k
        valid = (kcol >= 1) & (kcol < K)
        p1 = tl.exp(L - lse1[:, None])
        pT = tl.exp(L / kd_T - lseT[:, None])
        G = coef_ce[:, None] * p1 + coef_kl[:, None] * pT - tl.dot(W, pT, input_precision="ieee")
        is_pos = (kcol >= 1) & (kcol <= POS_K)
        G = G - tl.where(is_pos[None, :], pos_c[:, None], 0.0)
        G = tl.where(valid[None, :], G, 0.0)
        G = tl.where(kcol[None, :] == 0, g0[:, None], G)
        acc = tl.dot(tl.reshape(G, (NE_PAD, N_PAD * BLOCK_K)), g, acc, input_precision=PRECISION)

    acc = acc / tau
    offs_u = tl.arange(0, NE_PAD)
    offs_d = tl.arange(0, D_PAD)
    ptrs = DE_ptr + offs_u[:, None].to(tl.int64) * B * D + b * D + offs_d[None, :]
    tl.store(ptrs, acc, mask=(offs_u[:, None] < NE) & (offs_d[None, :] < D))


# ----------------------------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------------------------

def _layout(E: Tensor, banks: Tensor, block_k: int) -> dict:
    NE, B, D = E.shape
    n = banks.shape[0]
    NE_PAD, N_PAD, D_PAD = _pow2(NE), _pow2(n, floor=1), _pow2(D)
    C = NE_PAD * N_PAD
    if C > MAX_COMBOS:
        raise ValueError(f"bank_rows kernel: {NE} embeddings × {n} banks pad to {NE_PAD} × {N_PAD} = {C} combos, "
                         f"above the cap of {MAX_COMBOS}; use the reference backend")
    BLOCK_K = block_k if block_k > 0 else pick_block_k(C, N_PAD, D_PAD)
    if BLOCK_K < 16 or BLOCK_K & (BLOCK_K - 1):
        raise ValueError(f"block_k must be 0 (auto) or a power of two >= 16, got {block_k}")
    return dict(NE_PAD=NE_PAD, N_PAD=N_PAD, D_PAD=D_PAD, BLOCK_K=BLOCK_K, C=C,
                num_warps=8 if N_PAD * BLOCK_K * D_PAD >= 8192 else 4)


def _check(E, banks, idx, ce_u, ce_m, ce_view, kl_su, kl_sm, kl_tu, kl_tm, kl_view, tau, kd_T, pos_k,
           input_precision):
    if E.dtype not in _SUPPORTED:
        raise TypeError(f"bank_rows kernel: E has dtype {E.dtype}; supported: fp32, bf16, fp16 (accumulation is "
                        f"fp32). For {E.dtype} use the reference backend")
    if banks.dtype not in _SUPPORTED:
        raise TypeError(f"bank_rows kernel: banks have dtype {banks.dtype}; supported: fp32, bf16, fp16")
    if E.dim() != 3 or banks.dim() != 3 or idx.dim() != 2:
        raise ValueError(f"bank_rows kernel: expected E [NE, B, D], banks [n, N, D], idx [B, K]; got "
                         f"{list(E.shape)}, {list(banks.shape)}, {list(idx.shape)}")
    NE, B, D = E.shape
    if banks.shape[2] != D or idx.shape[0] != B:
        raise ValueError(f"bank_rows kernel: shapes disagree: E {list(E.shape)}, banks {list(banks.shape)}, "
                         f"idx {list(idx.shape)}")
    if idx.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"bank_rows kernel: idx must be int64 or int32, got {idx.dtype}")
    if not isinstance(pos_k, int) or pos_k < 1 or idx.shape[1] < pos_k + 2:
        raise ValueError(f"bank_rows kernel: need pos_k >= 1 and K >= pos_k + 2, got pos_k={pos_k}, "
                         f"K={idx.shape[1]}")
    if not (tau > 0 and kd_T > 0):
        raise ValueError(f"bank_rows kernel: tau and kd_T must be > 0, got {tau}, {kd_T}")
    if input_precision not in _PRECISIONS:
        raise ValueError(f"input_precision must be one of {_PRECISIONS}, got {input_precision!r}")
    for name, v in (("ce_m", ce_m), ("ce_view", ce_view)):
        if v.shape != ce_u.shape:
            raise ValueError(f"bank_rows kernel: {name} has shape {list(v.shape)}, ce_u {list(ce_u.shape)}")
    for name, v in (("kl_sm", kl_sm), ("kl_tu", kl_tu), ("kl_tm", kl_tm), ("kl_view", kl_view)):
        if v.shape != kl_su.shape:
            raise ValueError(f"bank_rows kernel: {name} has shape {list(v.shape)}, kl_su {list(kl_su.shape)}")
    for name, t in (("banks", banks), ("idx", idx), ("ce_u", ce_u), ("kl_su", kl_su)):
        if t.device != E.device:
            raise ValueError(f"bank_rows kernel: {name} is on {t.device}, E on {E.device}")


def _prep(E, banks, idx, ce_u, ce_m, ce_view, kl_su, kl_sm, kl_tu, kl_tm, kl_view, block_k):
    lay = _layout(E, banks, block_k)
    n_pad = lay["N_PAD"]

    def combo(u, m):
        return (u.long() * n_pad + m.long()).to(torch.int32).contiguous()

    vecs = (combo(ce_u, ce_m), ce_view.to(torch.int32).contiguous(), combo(kl_su, kl_sm), combo(kl_tu, kl_tm),
            kl_view.to(torch.int32).contiguous())
    return lay, vecs


def _meta(E, banks, idx, ce_u, kl_su, lay):
    NE, B, D = E.shape
    return dict(B=B, K=idx.shape[1], D=D, N_ROWS=banks.shape[1], NE=NE, N_BANKS=banks.shape[0],
                NC=ce_u.shape[0], NK=kl_su.shape[0], NE_PAD=lay["NE_PAD"], N_PAD=lay["N_PAD"],
                D_PAD=lay["D_PAD"], BLOCK_K=lay["BLOCK_K"], NC_PAD=_pow2(ce_u.shape[0]),
                NK_PAD=_pow2(kl_su.shape[0]))


@torch.library.custom_op("fastmcl::bank_rows", mutates_args=())
def _bank_rows_op(E: Tensor, banks: Tensor, idx: Tensor, ce_u: Tensor, ce_m: Tensor, ce_view: Tensor,
                  kl_su: Tensor, kl_sm: Tensor, kl_tu: Tensor, kl_tm: Tensor, kl_view: Tensor, tau: float,
                  kd_T: float, pos_k: int, input_precision: str, block_k: int) -> tuple[Tensor, Tensor, Tensor]:
    _check(E, banks, idx, ce_u, ce_m, ce_view, kl_su, kl_sm, kl_tu, kl_tm, kl_view, tau, kd_T, pos_k,
           input_precision)
    lay, vecs = _prep(E, banks, idx, ce_u, ce_m, ce_view, kl_su, kl_sm, kl_tu, kl_tm, kl_view, block_k)
    NE, B, D = E.shape
    ce = torch.empty(ce_u.shape[0], B, dtype=torch.float32, device=E.device)
    kl = torch.empty(kl_su.shape[0], B, dtype=torch.float32, device=E.device)
    stats = torch.empty(3, B, lay["C"], dtype=torch.float32, device=E.device)
    if B == 0:
        return ce, kl, stats
    meta = _meta(E, banks, idx, ce_u, kl_su, lay)
    _bank_rows_fwd_kernel[(B,)](
        E.contiguous(), banks.detach().contiguous(), idx.contiguous(), *vecs, ce, kl, stats,
        meta["B"], meta["K"], meta["D"], meta["N_ROWS"], meta["NE"], meta["N_BANKS"], meta["NC"], meta["NK"],
        pos_k, float(tau), float(kd_T),
        NE_PAD=meta["NE_PAD"], N_PAD=meta["N_PAD"], D_PAD=meta["D_PAD"], BLOCK_K=meta["BLOCK_K"],
        NC_PAD=meta["NC_PAD"], NK_PAD=meta["NK_PAD"], PRECISION=input_precision, num_warps=lay["num_warps"])
    return ce, kl, stats


@_bank_rows_op.register_fake
def _(E, banks, idx, ce_u, ce_m, ce_view, kl_su, kl_sm, kl_tu, kl_tm, kl_view, tau, kd_T, pos_k,
      input_precision, block_k):
    _check(E, banks, idx, ce_u, ce_m, ce_view, kl_su, kl_sm, kl_tu, kl_tm, kl_view, tau, kd_T, pos_k,
           input_precision)                                   # shape / dtype errors surface at trace time
    _layout(E, banks, block_k)
    NE, B, _ = E.shape
    C = _pow2(NE) * _pow2(banks.shape[0], floor=1)
    return (E.new_empty(ce_u.shape[0], B, dtype=torch.float32), E.new_empty(kl_su.shape[0], B, dtype=torch.float32),
            E.new_empty(3, B, C, dtype=torch.float32))


@torch.library.custom_op("fastmcl::bank_rows_backward", mutates_args=())
def _bank_rows_backward_op(g_ce: Tensor, g_kl: Tensor, stats: Tensor, E: Tensor, banks: Tensor, idx: Tensor,
                           ce_u: Tensor, ce_m: Tensor, ce_view: Tensor, kl_su: Tensor, kl_sm: Tensor, kl_tu: Tensor,
                           kl_tm: Tensor, kl_view: Tensor, tau: float, kd_T: float, pos_k: int,
                           input_precision: str, block_k: int) -> Tensor:
    lay, vecs = _prep(E, banks, idx, ce_u, ce_m, ce_view, kl_su, kl_sm, kl_tu, kl_tm, kl_view, block_k)
    NE, B, D = E.shape
    # fp32 result, rounded to E's dtype by torch (round-to-nearest everywhere; the interpreter's in-kernel
    # fp32 → bf16 cast truncates)
    dE = torch.empty(E.shape, dtype=torch.float32, device=E.device)
    if B == 0:
        return dE.to(E.dtype)
    meta = _meta(E, banks, idx, ce_u, kl_su, lay)
    _bank_rows_bwd_kernel[(B,)](
        E.contiguous(), banks.detach().contiguous(), idx.contiguous(), *vecs,
        g_ce.float().contiguous(), g_kl.float().contiguous(), stats.contiguous(), dE,
        meta["B"], meta["K"], meta["D"], meta["N_ROWS"], meta["NE"], meta["N_BANKS"], meta["NC"], meta["NK"],
        pos_k, float(tau), float(kd_T),
        NE_PAD=meta["NE_PAD"], N_PAD=meta["N_PAD"], D_PAD=meta["D_PAD"], BLOCK_K=meta["BLOCK_K"],
        NC_PAD=meta["NC_PAD"], NK_PAD=meta["NK_PAD"], PRECISION=input_precision, num_warps=lay["num_warps"])
    return dE.to(E.dtype)


@_bank_rows_backward_op.register_fake
def _(g_ce, g_kl, stats, E, banks, idx, ce_u, ce_m, ce_view, kl_su, kl_sm, kl_tu, kl_tm, kl_view, tau, kd_T,
      pos_k, input_precision, block_k):
    return torch.empty_like(E, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    (E, banks, idx, ce_u, ce_m, ce_view, kl_su, kl_sm, kl_tu, kl_tm, kl_view, tau, kd_T, pos_k,
     input_precision, block_k) = inputs
    ctx.save_for_backward(E, banks, idx, ce_u, ce_m, ce_view, kl_su, kl_sm, kl_tu, kl_tm, kl_view, output[2])
    ctx.scalars = (tau, kd_T, pos_k, input_precision, block_k)


def _backward(ctx, g_ce, g_kl, _g_stats):
    E, banks, idx, ce_u, ce_m, ce_view, kl_su, kl_sm, kl_tu, kl_tm, kl_view, stats = ctx.saved_tensors
    dE = None
    if ctx.needs_input_grad[0]:
        B = E.shape[1]
        if g_ce is None:
            g_ce = E.new_zeros(ce_u.shape[0], B, dtype=torch.float32)
        if g_kl is None:
            g_kl = E.new_zeros(kl_su.shape[0], B, dtype=torch.float32)
        dE = _bank_rows_backward_op(g_ce, g_kl, stats, E, banks, idx, ce_u, ce_m, ce_view, kl_su, kl_sm, kl_tu,
                                    kl_tm, kl_view, *ctx.scalars)
    return (dE,) + (None,) * 15


_bank_rows_op.register_autograd(_backward, setup_context=_setup_context)


def bank_rows(E: Tensor, banks: Tensor, idx: Tensor, ce_u: Tensor, ce_m: Tensor, ce_view: Tensor,
              kl_su: Tensor, kl_sm: Tensor, kl_tu: Tensor, kl_tm: Tensor, kl_view: Tensor, tau: float,
              kd_T: float, pos_k: int, *, input_precision: str = "ieee", block_k: int = 0) -> tuple[Tensor, Tensor]:
    """Fused `bank_rows_reference`: returns (ce [Nc, B], kl [Nk, B]) in fp32; gradient flows into E only.

    E [NE, B, D] fp32/bf16/fp16 (fp64 → TypeError), banks [n, N, D] (detached), idx [B, K] int64/int32 (values in
    [0, N), not checked here), index vectors int64 (views bool/int). `input_precision` of the logit dots: "ieee"
    (default, fp32-exact) or "tf32"/"tf32x3" (GPU speed switch). `block_k`: 0 = automatic, else a power of two ≥ 16.
    """
    ce, kl, _ = _bank_rows_op(E, banks.detach(), idx, ce_u, ce_m, ce_view, kl_su, kl_sm, kl_tu, kl_tm, kl_view,
                              float(tau), float(kd_T), int(pos_k), input_precision, int(block_k))
    return ce, kl
