"""Fused in-batch contrastive rows (spec/lmcl.md §1.2, §4.1): every distinct logit block of a step in one launch.

Contract: `fastmcl.losses.cohort_terms.inbatch_rows_reference` (same arguments, values and gradients).

    inbatch_rows(E, labels, ce_u, ce_v, kl_su, kl_sv, kl_tu, kl_tv, tau, kd_T, *, input_precision="ieee")
        -> (ce [Nc, B] fp32, kl [Nk, B] fp32)

E [NE, B, D] (fp32, bf16 or fp16; loaded and cast to fp32 at once, fp32 accumulation); block (u, v) is
S = e_u e_vᵀ / τ. `ce[n]` is the supervised-contrastive row of block (ce_u[n], ce_v[n]): positives P = same label off
the diagonal, denominator every column but the diagonal (Q1); a row with no positive gives 0 (and no gradient).
`kl[n]` is the KL row at temperature T of student block (kl_su[n], kl_sv[n]) against the detached teacher block
(kl_tu[n], kl_tv[n]), all B columns, centred form Σ p_t (t − s) − (lse_t − lse_s), with lse_t − lse_s formed as
(m_t − m_s) + log(z_t / z_s) from the running maxima and sums (≈3× closer to fp64 than the fp32 reference at B = 128).
fp64 is refused (TypeError naming the dtype): use the reference backend for fp64.

Kernels (written for a GPU's rules; on CPU they run only under TRITON_INTERPRET=1):
- forward, ONE launch for all Nc + Nk blocks: grid (cdiv(B, BLOCK_M), Nc + Nk). A program owns BLOCK_M anchor rows of
  one block and sweeps the B columns in tiles of BLOCK_N (one tile for B ≤ 128, so the online log-sum-exp below runs a
  single step there; for larger B it makes the sweep exact with no [B, B] buffer). CE programs build one logit tile
  (a D-loop of `tl.dot`), KL programs two (student and teacher). Saved for backward: the input E and indices plus
  per-row statistics only, stats [2, Nc + Nk, B] fp32 = (lse_M, n_pos) for CE rows and (lse_s, lse_t) for KL rows.
- backward, ONE launch: grid (cdiv(B, BLOCK_O), Nc + Nk, 2 · ND). Axis 2 picks the side (0: the anchor embedding
  e_u of the block, 1: the contrast embedding e_v) and a D-chunk of the output. A program recomputes the logit tiles
  of its owned rows (side 0) or owned columns (side 1, via e_v e_uᵀ = Sᵀ, no transpose) against the other side,
  forms dS from the saved statistics and accumulates dS·E_other / τ for its D-chunk. Each program writes its own
  slice of partial [2, Nc + Nk, B, D] fp32 (no atomics, deterministic); one one-hot GEMM then sums the partials into
  dE [NE, B, D] by embedding index. Teacher blocks never receive gradient (only student indices appear there).
- GPU rules honoured: power-of-two blocks, every tl.dot dimension ≥ 16 (small B and D are padded by masks),
  masks on every ragged edge, int64 row offsets, explicit `input_precision`.

`input_precision` is passed to every `tl.dot`: "ieee" (default, full fp32 products) or "tf32" / "tf32x3" (TF32 tensor
cores on Ampere and later: "tf32" rounds the GEMM inputs to a 10-bit mantissa, about 1e-3 relative error in the
logits; "tf32x3" recovers near-fp32 accuracy at ~3× the tensor-core work). Forward and backward dots
alike. The interpreter computes all three in fp32.

Wrapped as `torch.library.custom_op("fastmcl::inbatch_rows")` with `register_fake` and `register_autograd`; the
backward is the custom op "fastmcl::inbatch_rows_backward", so `torch.compile` traces both as opaque calls.
Index tensors are trusted to lie in [0, NE) (they come from a ContrastPlan); no range check (it would sync a GPU).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["inbatch_rows", "INPUT_PRECISIONS", "SUPPORTED_DTYPES"]

INPUT_PRECISIONS = ("ieee", "tf32", "tf32x3")
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_BLOCK_M = 32      # forward: anchor rows per program
_BLOCK_N_MAX = 128  # forward: column tile (a 128-wide row fits on chip)
_BLOCK_O = 32      # backward: owned rows (side 0) / columns (side 1) per program
_BLOCK_X_MAX = 64   # backward: tile of the other side
_BLOCK_DK_MAX = 64  # D-chunk of the logit GEMMs
_BLOCK_DO_MAX = 128  # D-chunk of the backward output per program


def _pow2(n: int, lo: int = 16, hi: int | None = None) -> int:
    p = max(lo, triton.next_power_of_2(max(int(n), 1)))
    return p if hi is None else min(p, hi)


# ---------------------------------------------------------------------------------------------------------------------
# shared tile helper
# ---------------------------------------------------------------------------------------------------------------------

@triton.jit
def _logit_tile(E, a, b, ra, ma, rb, mb, B, D,
                BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_DK: tl.constexpr, PREC: tl.constexpr):
    """E[a, ra] · E[b, rb]ᵀ as a [BLOCK_A, BLOCK_B] fp32 tile (not yet divided by τ). a, b: int64 scalars."""
    base_a = (a * B + ra) * D                                    # int64 [BLOCK_A]
    base_b = (b * B + rb) * D                                    # int64 [BLOCK_B]
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_DK):
        dk = d0 + tl.arange(0, BLOCK_DK)
        md = dk < D
        xa = tl.load(E + base_a[:, None] + dk[None, :], mask=ma[:, None] & md[None, :], other=0.0).to(tl.float32)
        xb = tl.load(E + base_b[:, None] + dk[None, :], mask=mb[:, None] & md[None, :], other=0.0).to(tl.float32)
        acc += tl.dot(xa, tl.trans(xb), input_precision=PREC)
    return acc


# ---------------------------------------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------------------------------------

@triton.jit
def _ce_fwd_program(E, labels, ce_u, ce_v, ce_out, stats, blk, rm, mm, Nb, B, D, tau,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, PREC: tl.constexpr):
    u = tl.load(ce_u + blk)
    v = tl.load(ce_v + blk)
    lab_m = tl.load(labels + rm, mask=mm, other=0)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    z_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    pos_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    n_pos = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, B, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        mn = rn < B
        lab_n = tl.load(labels + rn, mask=mn, other=0)
        s = _logit_tile(E, u, v, rm, mm, rn, mn, B, D, BLOCK_M, BLOCK_N, BLOCK_DK, PREC) / tau
        denom = mn[None, :] & (rm[:, None] != rn[None, :])               # M = 1 − I, ragged columns out
        pos = denom & (lab_m[:, None] == lab_n[None, :])                 # P = same label − I
        s_m = tl.where(denom, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s_m, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)           # a row may have no denominator column yet
        z_i = z_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(s_m - m_safe[:, None]), axis=1)
        m_i = m_new
        pos_sum += tl.sum(tl.where(pos, s, 0.0), axis=1)
        n_pos += tl.sum(pos.to(tl.float32), axis=1)
    lse = m_i + tl.log(z_i)                                             # −inf only when B = 1
    row = tl.where(n_pos > 0, lse - pos_sum / tl.maximum(n_pos, 1.0), 0.0)
    blk64 = blk.to(tl.int64)
    tl.store(ce_out + blk64 * B + rm, row, mask=mm)
    tl.store(stats + blk64 * B + rm, lse, mask=mm)
    tl.store(stats + (Nb + blk64) * B + rm, n_pos, mask=mm)


@triton.jit
def _kl_fwd_program(E, kl_su, kl_sv, kl_tu, kl_tv, kl_out, stats, k, blk, rm, mm, Nb, B, D, tau, kd_T,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, PREC: tl.constexpr):
    su = tl.load(kl_su + k)
    sv = tl.load(kl_sv + k)
    tu = tl.load(kl_tu + k)
    tv = tl.load(kl_tv + k)
    m_s = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    z_s = tl.zeros((BLOCK_M,), dtype=tl.float32)
    m_t = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    z_t = tl.zeros((BLOCK_M,), dtype=tl.float32)
    cross = tl.zeros((BLOCK_M,), dtype=tl.float32)                      # Σ exp(t − m_t)(t − s)
    for n0 in range(0, B, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        mn = rn < B                                                      # every tile has ≥ 1 valid column
        s = _logit_tile(E, su, sv, rm, mm, rn, mn, B, D, BLOCK_M, BLOCK_N, BLOCK_DK, PREC) / tau / kd_T
        t = _logit_tile(E, tu, tv, rm, mm, rn, mn, B, D, BLOCK_M, BLOCK_N, BLOCK_DK, PREC) / tau / kd_T
        t_minus_s = tl.where(mn[None, :], t - s, 0.0)                    # finite: padded logits are 0 here
        s = tl.where(mn[None, :], s, float("-inf"))
        t = tl.where(mn[None, :], t, float("-inf"))
        ms_new = tl.maximum(m_s, tl.max(s, axis=1))
        z_s = z_s * tl.exp(m_s - ms_new) + tl.sum(tl.exp(s - ms_new[:, None]), axis=1)
        m_s = ms_new
        mt_new = tl.maximum(m_t, tl.max(t, axis=1))
        alpha = tl.exp(m_t - mt_new)
        p_t = tl.exp(t - mt_new[:, None])
        z_t = z_t * alpha + tl.sum(p_t, axis=1)
        cross = cross * alpha + tl.sum(p_t * t_minus_s, axis=1)
        m_t = mt_new
    lse_s = m_s + tl.log(z_s)
    lse_t = m_t + tl.log(z_t)
    # centred form (DESIGN.md "Kernels"); lse_t − lse_s taken as (m_t − m_s) + log(z_t / z_s), which avoids
    # subtracting two ~log(B)-sized numbers (about 5× closer to fp64 than the difference of the two lse at B = 128)
    row = cross / z_t - ((m_t - m_s) + tl.log(z_t / z_s))
    blk64 = blk.to(tl.int64)
    tl.store(kl_out + k.to(tl.int64) * B + rm, row, mask=mm)
    tl.store(stats + blk64 * B + rm, lse_s, mask=mm)
    tl.store(stats + (Nb + blk64) * B + rm, lse_t, mask=mm)


@triton.jit
def _inbatch_fwd_kernel(E, labels, ce_u, ce_v, kl_su, kl_sv, kl_tu, kl_tv, ce_out, kl_out, stats,
                        Nc, Nb, B, D, tau, kd_T,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    blk = tl.program_id(1)                                               # blocks: Nc CE blocks, then Nk KL blocks
    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    mm = rm < B
    if blk < Nc:
        _ce_fwd_program(E, labels, ce_u, ce_v, ce_out, stats, blk, rm, mm, Nb, B, D, tau,
                        BLOCK_M, BLOCK_N, BLOCK_DK, PREC)
    else:
        _kl_fwd_program(E, kl_su, kl_sv, kl_tu, kl_tv, kl_out, stats, blk - Nc, blk, rm, mm, Nb, B, D, tau, kd_T,
                        BLOCK_M, BLOCK_N, BLOCK_DK, PREC)


# ---------------------------------------------------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------------------------------------------------

@triton.jit
def _rows(E, e, rx, mx, dcols, mdc, B, D):
    """Rows rx of embedding e, columns dcols: a [BLOCK_X, BLOCK_DO] fp32 tile (masked rows/columns are 0)."""
    return tl.load(E + ((e * B + rx) * D)[:, None] + dcols[None, :], mask=mx[:, None] & mdc[None, :],
                   other=0.0).to(tl.float32)


@triton.jit
def _store_partial(partial, tile, slot, ro, mo, dcols, mdc, B, D):
    """Write one program's dE tile into its own partial slot (summed over slots on the host: no atomics)."""
    tl.store(partial + ((slot * B + ro) * D)[:, None] + dcols[None, :], tile, mask=mo[:, None] & mdc[None, :])


@triton.jit
def _ce_bwd_program(E, labels, ce_u, ce_v, g_ce, stats, partial, blk, side, ro, mo, dcols, mdc, Nb, B, D, tau,
                    BLOCK_O: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DO: tl.constexpr,
                    PREC: tl.constexpr):
    u = tl.load(ce_u + blk)
    v = tl.load(ce_v + blk)
    side64 = side.to(tl.int64)
    a = u + side64 * (v - u)                  # owned side: anchors e_u (side 0) or contrasts e_v (side 1)
    b = v + side64 * (u - v)                  # the other side
    blk64 = blk.to(tl.int64)
    lab_o = tl.load(labels + ro, mask=mo, other=0)
    acc = tl.zeros((BLOCK_O, BLOCK_DO), dtype=tl.float32)
    for x0 in range(0, B, BLOCK_X):
        rx = x0 + tl.arange(0, BLOCK_X).to(tl.int64)
        mx = rx < B
        lab_x = tl.load(labels + rx, mask=mx, other=0)
        # element (o, x) is S[i, j] with (i, j) = (o, x) on side 0 and (x, o) on side 1 (E[v] E[u]ᵀ = Sᵀ)
        s = _logit_tile(E, a, b, ro, mo, rx, mx, B, D, BLOCK_O, BLOCK_X, BLOCK_DK, PREC) / tau
        ri = ro[:, None] * (1 - side64) + rx[None, :] * side64                 # anchor row i of each element
        valid = mo[:, None] & mx[None, :]
        offdiag = valid & (ro[:, None] != rx[None, :])
        pos = offdiag & (lab_o[:, None] == lab_x[None, :])
        g = tl.load(g_ce + blk64 * B + ri, mask=valid, other=0.0)
        lse = tl.load(stats + blk64 * B + ri, mask=valid, other=0.0)
        n_pos = tl.load(stats + (Nb + blk64) * B + ri, mask=valid, other=0.0)
        live = offdiag & (n_pos > 0)                                            # rows with no positive: no grad
        p = tl.where(live, tl.exp(s - lse), 0.0)
        ds = tl.where(live, g * (p - tl.where(pos, 1.0, 0.0) / tl.maximum(n_pos, 1.0)), 0.0)
        acc += tl.dot(ds, _rows(E, b, rx, mx, dcols, mdc, B, D), input_precision=PREC)
    _store_partial(partial, acc / tau, side64 * Nb + blk64, ro, mo, dcols, mdc, B, D)


@triton.jit
def _kl_bwd_program(E, kl_su, kl_sv, kl_tu, kl_tv, g_kl, stats, partial, k, blk, side, ro, mo, dcols, mdc,
                    Nb, B, D, tau, kd_T,
                    BLOCK_O: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DO: tl.constexpr,
                    PREC: tl.constexpr):
    su = tl.load(kl_su + k)
    sv = tl.load(kl_sv + k)
    tu = tl.load(kl_tu + k)
    tv = tl.load(kl_tv + k)
    side64 = side.to(tl.int64)
    a_s = su + side64 * (sv - su)
    b_s = sv + side64 * (su - sv)
    a_t = tu + side64 * (tv - tu)              # the teacher tile is recomputed for p_t only: it gets no gradient
    b_t = tv + side64 * (tu - tv)
    blk64 = blk.to(tl.int64)
    acc = tl.zeros((BLOCK_O, BLOCK_DO), dtype=tl.float32)
    for x0 in range(0, B, BLOCK_X):
        rx = x0 + tl.arange(0, BLOCK_X).to(tl.int64)
        mx = rx < B
        s = _logit_tile(E, a_s, b_s, ro, mo, rx, mx, B, D, BLOCK_O, BLOCK_X, BLOCK_DK, PREC) / tau / kd_T
        t = _logit_tile(E, a_t, b_t, ro, mo, rx, mx, B, D, BLOCK_O, BLOCK_X, BLOCK_DK, PREC) / tau / kd_T
        ri = ro[:, None] * (1 - side64) + rx[None, :] * side64
        valid = mo[:, None] & mx[None, :]
        g = tl.load(g_kl + k.to(tl.int64) * B + ri, mask=valid, other=0.0)
        lse_s = tl.load(stats + blk64 * B + ri, mask=valid, other=0.0)
        lse_t = tl.load(stats + (Nb + blk64) * B + ri, mask=valid, other=0.0)
        ds = tl.where(valid, g * (tl.exp(s - lse_s) - tl.exp(t - lse_t)) / kd_T, 0.0)   # ∂KL/∂S_s
        acc += tl.dot(ds, _rows(E, b_s, rx, mx, dcols, mdc, B, D), input_precision=PREC)
    _store_partial(partial, acc / tau, side64 * Nb + blk64, ro, mo, dcols, mdc, B, D)


@triton.jit
def _inbatch_bwd_kernel(E, labels, ce_u, ce_v, kl_su, kl_sv, kl_tu, kl_tv, g_ce, g_kl, stats, partial,
                        Nc, Nb, B, D, ND, tau, kd_T,
                        BLOCK_O: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_DK: tl.constexpr,
                        BLOCK_DO: tl.constexpr, PREC: tl.constexpr):
    pid_o = tl.program_id(0)
    blk = tl.program_id(1)
    pid_z = tl.program_id(2)
    side = pid_z // ND                         # 0: grad of the block's anchor embedding, 1: of its contrast embedding
    dc = pid_z % ND
    ro = pid_o.to(tl.int64) * BLOCK_O + tl.arange(0, BLOCK_O).to(tl.int64)
    mo = ro < B
    dcols = dc.to(tl.int64) * BLOCK_DO + tl.arange(0, BLOCK_DO).to(tl.int64)
    mdc = dcols < D
    if blk < Nc:
        _ce_bwd_program(E, labels, ce_u, ce_v, g_ce, stats, partial, blk, side, ro, mo, dcols, mdc, Nb, B, D, tau,
                        BLOCK_O, BLOCK_X, BLOCK_DK, BLOCK_DO, PREC)
    else:
        _kl_bwd_program(E, kl_su, kl_sv, kl_tu, kl_tv, g_kl, stats, partial, blk - Nc, blk, side, ro, mo, dcols, mdc,
                        Nb, B, D, tau, kd_T, BLOCK_O, BLOCK_X, BLOCK_DK, BLOCK_DO, PREC)


# ---------------------------------------------------------------------------------------------------------------------
# launchers and custom ops
# ---------------------------------------------------------------------------------------------------------------------

def _prep(E, labels, idx):
    return E.contiguous(), labels.to(torch.int64).contiguous(), [i.to(torch.int64).contiguous() for i in idx]


def _forward_impl(E, labels, ce_u, ce_v, kl_su, kl_sv, kl_tu, kl_tv, tau, kd_T, input_precision):
    NE, B, D = E.shape
    Nc, Nk = ce_u.shape[0], kl_su.shape[0]
    Nb = Nc + Nk
    ce = torch.empty((Nc, B), dtype=torch.float32, device=E.device)
    kl = torch.empty((Nk, B), dtype=torch.float32, device=E.device)
    stats = torch.empty((2, Nb, B), dtype=torch.float32, device=E.device)
    if Nb == 0:
        return ce, kl, stats
    E, labels, (ce_u, ce_v, kl_su, kl_sv, kl_tu, kl_tv) = _prep(E, labels, (ce_u, ce_v, kl_su, kl_sv, kl_tu, kl_tv))
    BLOCK_M = _pow2(B, hi=_BLOCK_M)
    BLOCK_N = _pow2(B, hi=_BLOCK_N_MAX)
    BLOCK_DK = _pow2(D, hi=_BLOCK_DK_MAX)
    grid = (triton.cdiv(B, BLOCK_M), Nb)
    _inbatch_fwd_kernel[grid](E, labels, ce_u, ce_v, kl_su, kl_sv, kl_tu, kl_tv, ce, kl, stats,
                              Nc, Nb, B, D, float(tau), float(kd_T),
                              BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_DK=BLOCK_DK, PREC=input_precision,
                              num_warps=4)
    return ce, kl, stats


def _backward_impl(g_ce, g_kl, E, labels, ce_u, ce_v, kl_su, kl_sv, kl_tu, kl_tv, stats, tau, kd_T,
                   input_precision):
    NE, B, D = E.shape
    Nc, Nk = ce_u.shape[0], kl_su.shape[0]
    Nb = Nc + Nk
    if Nb == 0:
        return torch.zeros_like(E)
    E, labels, (ce_u, ce_v, kl_su, kl_sv, kl_tu, kl_tv) = _prep(E, labels, (ce_u, ce_v, kl_su, kl_sv, kl_tu, kl_tv))
    g_ce = g_ce.to(torch.float32).contiguous()
    g_kl = g_kl.to(torch.float32).contiguous()
    stats = stats.contiguous()
    partial = torch.empty((2, Nb, B, D), dtype=torch.float32, device=E.device)
    BLOCK_O = _pow2(B, hi=_BLOCK_O)
    BLOCK_X = _pow2(B, hi=_BLOCK_X_MAX)
    BLOCK_DK = _pow2(D, hi=_BLOCK_DK_MAX)
    BLOCK_DO = _pow2(D, hi=_BLOCK_DO_MAX)
    ND = triton.cdiv(D, BLOCK_DO)
    grid = (triton.cdiv(B, BLOCK_O), Nb, 2 * ND)
    _inbatch_bwd_kernel[grid](E, labels, ce_u, ce_v, kl_su, kl_sv, kl_tu, kl_tv, g_ce, g_kl, stats, partial,
                              Nc, Nb, B, D, ND, float(tau), float(kd_T),
                              BLOCK_O=BLOCK_O, BLOCK_X=BLOCK_X, BLOCK_DK=BLOCK_DK, BLOCK_DO=BLOCK_DO,
                              PREC=input_precision, num_warps=4)
    # Sum the per-(side, block) partial gradients into dE by embedding index: one deterministic one-hot GEMM.
    owner = torch.cat([ce_u, kl_su, ce_v, kl_sv])                       # partial's [2, Nb] order
    onehot = (owner[None, :] == torch.arange(NE, device=E.device)[:, None]).to(torch.float32)
    dE = onehot @ partial.view(2 * Nb, B * D)
    return dE.view(NE, B, D).to(E.dtype)


@torch.library.custom_op("fastmcl::inbatch_rows", mutates_args=())
def _inbatch_rows_op(E: Tensor, labels: Tensor, ce_u: Tensor, ce_v: Tensor, kl_su: Tensor, kl_sv: Tensor,
                     kl_tu: Tensor, kl_tv: Tensor, tau: float, kd_T: float,
                     input_precision: str) -> tuple[Tensor, Tensor, Tensor]:
    return _forward_impl(E, labels, ce_u, ce_v, kl_su, kl_sv, kl_tu, kl_tv, tau, kd_T, input_precision)


@_inbatch_rows_op.register_fake
def _(E, labels, ce_u, ce_v, kl_su, kl_sv, kl_tu, kl_tv, tau, kd_T, input_precision):
    B = E.shape[1]
    Nc, Nk = ce_u.shape[0], kl_su.shape[0]
    return (E.new_empty((Nc, B), dtype=torch.float32), E.new_empty((Nk, B), dtype=torch.float32),
            E.new_empty((2, Nc + Nk, B), dtype=torch.float32))


@torch.library.custom_op("fastmcl::inbatch_rows_backward", mutates_args=())
def _inbatch_rows_backward_op(g_ce: Tensor, g_kl: Tensor, E: Tensor, labels: Tensor, ce_u: Tensor, ce_v: Tensor,
                              kl_su: Tensor, kl_sv: Tensor, kl_tu: Tensor, kl_tv: Tensor, stats: Tensor, tau: float,
                              kd_T: float, input_precision: str) -> Tensor:
    return _backward_impl(g_ce, g_kl, E, labels, ce_u, ce_v, kl_su, kl_sv, kl_tu, kl_tv, stats, tau, kd_T,
                          input_precision)


@_inbatch_rows_backward_op.register_fake
def _(g_ce, g_kl, E, labels, ce_u, ce_v, kl_su, kl_sv, kl_tu, kl_tv, stats, tau, kd_T, input_precision):
    return torch.empty_like(E)


def _setup_context(ctx, inputs, output):
    E, labels, ce_u, ce_v, kl_su, kl_sv, kl_tu, kl_tv, tau, kd_T, input_precision = inputs
    stats = output[2]
    ctx.mark_non_differentiable(stats)
    ctx.save_for_backward(E, labels, ce_u, ce_v, kl_su, kl_sv, kl_tu, kl_tv, stats)
    ctx.tau, ctx.kd_T, ctx.input_precision = tau, kd_T, input_precision


def _backward(ctx, g_ce, g_kl, _g_stats):
    E, labels, ce_u, ce_v, kl_su, kl_sv, kl_tu, kl_tv, stats = ctx.saved_tensors
    dE = None
    if ctx.needs_input_grad[0]:
        B = E.shape[1]
        if g_ce is None:
            g_ce = E.new_zeros((ce_u.shape[0], B), dtype=torch.float32)
        if g_kl is None:
            g_kl = E.new_zeros((kl_su.shape[0], B), dtype=torch.float32)
        dE = torch.ops.fastmcl.inbatch_rows_backward(g_ce, g_kl, E, labels, ce_u, ce_v, kl_su, kl_sv, kl_tu, kl_tv,
                                                     stats, ctx.tau, ctx.kd_T, ctx.input_precision)
    return dE, None, None, None, None, None, None, None, None, None, None


_inbatch_rows_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------------------------------

def _check(E, labels, idx, tau, kd_T, input_precision) -> None:
    if not isinstance(E, Tensor) or E.dim() != 3:
        raise ValueError(f"E must be a 3-D tensor [NE, B, D], got {_describe(E)}")
    if E.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"inbatch_rows (Triton) supports E of dtype float32, bfloat16 or float16, got {E.dtype}; "
                        f"use backend='reference' for {E.dtype}")
    NE, B, D = E.shape
    if NE < 1 or B < 1 or D < 1:
        raise ValueError(f"E must have NE >= 1, B >= 1 and D >= 1, got shape {tuple(E.shape)}")
    if E.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"inbatch_rows (Triton) needs CUDA tensors, or TRITON_INTERPRET=1 for {E.device.type} "
                           f"tensors (the interpreter); got E on {E.device}")
    if (not isinstance(labels, Tensor) or labels.dim() != 1 or labels.shape[0] != B
            or labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool):
        raise ValueError(f"labels must be a 1-D integer tensor of length B={B}, got {_describe(labels)}")
    names = ("ce_u", "ce_v", "kl_su", "kl_sv", "kl_tu", "kl_tv")
    for name, t in zip(names, idx):
        if (not isinstance(t, Tensor) or t.dim() != 1 or t.is_floating_point() or t.is_complex()
                or t.dtype == torch.bool):
            raise ValueError(f"{name} must be a 1-D integer index tensor, got {_describe(t)}")
    for name, t in zip(("labels",) + names, (labels,) + tuple(idx)):
        if t.device != E.device:
            raise ValueError(f"{name} is on {t.device} but E is on {E.device}")
    if idx[0].shape != idx[1].shape:
        raise ValueError(f"ce_u and ce_v must have the same length, got {idx[0].shape[0]} and {idx[1].shape[0]}")
    if not all(t.shape == idx[2].shape for t in idx[3:]):
        raise ValueError("kl_su, kl_sv, kl_tu and kl_tv must have the same length, got "
                         f"{[t.shape[0] for t in idx[2:]]}")
    for name, value in (("tau", tau), ("kd_T", kd_T)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
            raise ValueError(f"{name} must be a number > 0, got {value!r}")
    if input_precision not in INPUT_PRECISIONS:
        raise ValueError(f"input_precision must be one of {INPUT_PRECISIONS}, got {input_precision!r}")


def _describe(x) -> str:
    if isinstance(x, Tensor):
        return f"tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return type(x).__name__


def inbatch_rows(E: Tensor, labels: Tensor, ce_u: Tensor, ce_v: Tensor, kl_su: Tensor, kl_sv: Tensor, kl_tu: Tensor,
                 kl_tv: Tensor, tau: float, kd_T: float, *, input_precision: str = "ieee") -> tuple[Tensor, Tensor]:
    """Fused `inbatch_rows_reference`: (ce [Nc, B], kl [Nk, B]) in fp32, differentiable w.r.t. E (student side only).

    E [NE, B, D] fp32/bf16/fp16 (fp64 raises TypeError); labels [B] int; index tensors 1-D int in [0, NE).
    input_precision: "ieee" (default), "tf32" or "tf32x3" for every tl.dot (see the module docstring).
    """
    idx = (ce_u, ce_v, kl_su, kl_sv, kl_tu, kl_tv)
    _check(E, labels, idx, tau, kd_T, input_precision)
    ce, kl, _ = torch.ops.fastmcl.inbatch_rows(E, labels, *idx, float(tau), float(kd_T), input_precision)
    return ce, kl
