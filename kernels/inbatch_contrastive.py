"""Fused in-batch contrastive rows (docs/kernels/inbatch.md; the contract of docs/losses.md "Contracts"): every distinct logit block of a step in two launches.

Contract: `fastmcl.losses.cohort_terms.inbatch_rows_reference` (same arguments, values and gradients).

    inbatch_rows(E, labels, ce_u, ce_v, kl_su, kl_sv, kl_tu, kl_tv, tau, kd_T, *, input_precision="tf32x3")
        -> (ce [Nc, B] fp32, kl [Nk, B] fp32)

E [NE, B, D] (fp32, bf16 or fp16; fp32 accumulation); labels [B] integer class ids (below 2^31: the kernels compare
them as int32); block (u, v) is S = e_u e_vᵀ / τ. `ce[n]` is the supervised-contrastive row of block
(ce_u[n], ce_v[n]): positives P = same label off the diagonal, denominator every column but the diagonal (Q1); a row
with no positive gives 0 (and no gradient). `kl[n]` is the KL row at temperature T of student block
(kl_su[n], kl_sv[n]) against the detached teacher block (kl_tu[n], kl_tv[n]), all B columns, centred form
Σ p_t (t − s) − (lse_t − lse_s), with lse_t − lse_s formed as (m_t − m_s) + log(z_t / z_s) from the running
maxima and sums (≈3× closer to fp64 than the fp32 reference at B = 128). fp64 is refused (TypeError naming the
dtype): use the reference backend for fp64.

Kernels (written for a GPU's rules; on CPU they run only under TRITON_INTERPRET=1). CE and KL bodies are separate
kernels, so each is compiled with only its own live tiles (docs/kernels/inbatch.md has the register, spill and
shared-memory numbers per target):
- forward: grid (cdiv(B, BLOCK_M), Nc) for the CE blocks and (cdiv(B, BLOCK_M), Nk) for the KL blocks. A program owns
  BLOCK_M anchor rows of one block and sweeps the B columns in tiles of BLOCK_N with an online log-sum-exp (exact,
  no [B, B] buffer). CE programs build one logit tile (a D-loop of `tl.dot`), KL programs two (student and teacher).
  Saved for backward: the input E and indices plus per-row statistics only, stats [2, Nc + Nk, B] fp32 =
  (lse_M, n_pos) for CE rows and (lse_s, lse_t) for KL rows.
- backward: grid (cdiv(B, BLOCK_O), Nc or Nk, 2 · ND) per kind. Axis 2 picks the side (0: the anchor embedding e_u of
  the block, 1: the contrast embedding e_v) and a D-chunk of the output. A program recomputes the logit tiles of its
  owned rows (side 0) or owned columns (side 1, via e_v e_uᵀ = Sᵀ, no transpose) against the other side, reads the
  saved per-row statistics with 1-D loads, forms dS and accumulates dS·E_other / τ for its D-chunk. Each program
  writes its own slice of partial [2, Nc + Nk, B, D] fp32 (no atomics, deterministic); one one-hot GEMM then sums the
  partials into dE [NE, B, D] by embedding index, in fp64, which no TF32 setting of torch's touches. Teacher blocks never receive gradient.
- GPU rules honoured: power-of-two blocks, every tl.dot dimension ≥ 16 (small B and D are padded by masks),
  masks on every ragged edge, int64 embedding offsets (one per program; rows and columns within an embedding are
  int32, B·D < 2^31), explicit `input_precision`.

`input_precision` applies to every `tl.dot` with fp32 operands: "tf32x3" (default: tensor cores, near-fp32 accuracy
at ~3× the tensor-core work of "tf32"), "tf32" (10-bit mantissa inputs, about 1e-3 relative error in the logits) or
"ieee" (fp32 FMAs, no tensor cores; kept for tests). With bf16/fp16 E the logit dots take the half operands natively
on a GPU (their products are exact in the fp32 accumulator, whatever the precision); the dS·E dots of the backward
stay fp32 at `input_precision`. The interpreter computes every precision in fp32.

`launches(...)` publishes every kernel launch of one forward + backward call as `KernelLaunch` data, built by the
same functions the launchers use: the GPU-readiness test compiles exactly these for sm_80 / sm_90.

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

from .launch import KernelLaunch

__all__ = ["inbatch_rows", "launches", "DEFAULT_PRECISION", "INPUT_PRECISIONS", "SUPPORTED_DTYPES"]

INPUT_PRECISIONS = ("ieee", "tf32", "tf32x3")
DEFAULT_PRECISION = "tf32x3"      # tensor cores at near-fp32 accuracy (module docstring)
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_BLOCK_M = 32      # forward: anchor rows per program
_BLOCK_N_MAX = 64   # forward: column tile (online log-sum-exp across tiles)
_BLOCK_O = 32      # backward: owned rows (side 0) / columns (side 1) per program
_BLOCK_X_MAX = 64   # backward: tile of the other side
_BLOCK_DK_MAX = 32  # D-chunk of the logit GEMMs
_BLOCK_DO_MAX = 128  # D-chunk of the backward output per program
_NUM_WARPS = 8
_STAGES = {"tf32": 3}        # software-pipeline stages by input precision, else 2 (docs/kernels/inbatch.md)


def _pow2(n: int, lo: int = 16, hi: int | None = None) -> int:
    p = max(lo, triton.next_power_of_2(max(int(n), 1)))
    return p if hi is None else min(p, hi)


# ---------------------------------------------------------------------------------------------------------------------
# shared tile helpers
# ---------------------------------------------------------------------------------------------------------------------

@triton.jit
def _logit_tile(Ea, ra, ma, Eb, rb, mb, D,
                BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_DK: tl.constexpr, PREC: tl.constexpr,
                NATIVE_DOT: tl.constexpr):
    """Ea[ra] · Eb[rb]ᵀ as a [BLOCK_A, BLOCK_B] fp32 tile (not yet divided by τ). Ea, Eb: one embedding's [B, D]
    base pointer (int64 offset applied once); ra, rb: int32 rows. NATIVE_DOT: bf16/fp16 operands straight into
    `tl.dot` (their products are exact in the fp32 accumulator), else fp32 operands at precision PREC."""
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_DK):
        dk = d0 + tl.arange(0, BLOCK_DK)
        md = dk < D
        xa = tl.load(Ea + ra[:, None] * D + dk[None, :], mask=ma[:, None] & md[None, :], other=0.0)
        xb = tl.load(Eb + rb[:, None] * D + dk[None, :], mask=mb[:, None] & md[None, :], other=0.0)
        if NATIVE_DOT:
            acc = tl.dot(xa, tl.trans(xb), acc)
        else:
            acc = tl.dot(xa.to(tl.float32), tl.trans(xb.to(tl.float32)), acc, input_precision=PREC)
    return acc


@triton.jit
def _embedding(E, e, B, D):
    """Base pointer of embedding e (an int64 index) in E [NE, B, D]: the int64 offset is taken once, per program."""
    return E + e * B * D


# ---------------------------------------------------------------------------------------------------------------------
# forward: one kernel for the CE blocks, one for the KL blocks (each body compiled on its own: no shared register
# budget with the other one)
# ---------------------------------------------------------------------------------------------------------------------

@triton.jit
def _ce_fwd_kernel(E, labels, ce_u, ce_v, ce_out, stats, Nb, B, D, inv_tau,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, PREC: tl.constexpr,
                   NATIVE_DOT: tl.constexpr):
    pid_m = tl.program_id(0)
    blk = tl.program_id(1).to(tl.int64)
    Eu = _embedding(E, tl.load(ce_u + blk), B, D)
    Ev = _embedding(E, tl.load(ce_v + blk), B, D)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mm = rm < B
    lab_m = tl.load(labels + rm, mask=mm, other=0).to(tl.int32)   # 2-D compares in int32
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    z_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    pos_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    n_pos = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, B, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        mn = rn < B
        lab_n = tl.load(labels + rn, mask=mn, other=-1).to(tl.int32)
        s = _logit_tile(Eu, rm, mm, Ev, rn, mn, D, BLOCK_M, BLOCK_N, BLOCK_DK, PREC, NATIVE_DOT) * inv_tau
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
    tl.store(ce_out + blk * B + rm, row, mask=mm)
    tl.store(stats + blk * B + rm, lse, mask=mm)
    tl.store(stats + (Nb + blk) * B + rm, n_pos, mask=mm)


@triton.jit
def _kl_fwd_kernel(E, kl_su, kl_sv, kl_tu, kl_tv, kl_out, stats, Nc, Nb, B, D, inv_tau_T,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, PREC: tl.constexpr,
                   NATIVE_DOT: tl.constexpr):
    pid_m = tl.program_id(0)
    k = tl.program_id(1).to(tl.int64)
    blk = Nc + k                                                         # stats rows: CE blocks first, then KL
    Esu = _embedding(E, tl.load(kl_su + k), B, D)
    Esv = _embedding(E, tl.load(kl_sv + k), B, D)
    Etu = _embedding(E, tl.load(kl_tu + k), B, D)
    Etv = _embedding(E, tl.load(kl_tv + k), B, D)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mm = rm < B
    m_s = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    z_s = tl.zeros((BLOCK_M,), dtype=tl.float32)
    m_t = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    z_t = tl.zeros((BLOCK_M,), dtype=tl.float32)
    cross = tl.zeros((BLOCK_M,), dtype=tl.float32)                      # Σ exp(t − m_t)(t − s)
    for n0 in range(0, B, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        mn = rn < B                                                      # every tile has ≥ 1 valid column
        s = _logit_tile(Esu, rm, mm, Esv, rn, mn, D, BLOCK_M, BLOCK_N, BLOCK_DK, PREC, NATIVE_DOT) * inv_tau_T
        ms_new = tl.maximum(m_s, tl.max(tl.where(mn[None, :], s, float("-inf")), axis=1))
        z_s = z_s * tl.exp(m_s - ms_new) + tl.sum(tl.where(mn[None, :], tl.exp(s - ms_new[:, None]), 0.0), axis=1)
        m_s = ms_new
        t = _logit_tile(Etu, rm, mm, Etv, rn, mn, D, BLOCK_M, BLOCK_N, BLOCK_DK, PREC, NATIVE_DOT) * inv_tau_T
        mt_new = tl.maximum(m_t, tl.max(tl.where(mn[None, :], t, float("-inf")), axis=1))
        alpha = tl.exp(m_t - mt_new)
        p_t = tl.where(mn[None, :], tl.exp(t - mt_new[:, None]), 0.0)     # padded logits are 0: t − s stays finite
        z_t = z_t * alpha + tl.sum(p_t, axis=1)
        cross = cross * alpha + tl.sum(p_t * (t - s), axis=1)
        m_t = mt_new
    # centred form (docs/losses.md "Contracts"); lse_t − lse_s taken as (m_t − m_s) + log(z_t / z_s), which avoids
    # subtracting two ~log(B)-sized numbers
    row = cross / z_t - ((m_t - m_s) + tl.log(z_t / z_s))
    tl.store(kl_out + k * B + rm, row, mask=mm)
    tl.store(stats + blk * B + rm, m_s + tl.log(z_s), mask=mm)
    tl.store(stats + (Nb + blk) * B + rm, m_t + tl.log(z_t), mask=mm)


# ---------------------------------------------------------------------------------------------------------------------
# backward: one kernel for the CE blocks, one for the KL blocks. Grid axis 2 = side · ND + D-chunk: side 0 owns rows
# of the block's anchor embedding e_u, side 1 rows of its contrast embedding e_v (E[v] E[u]ᵀ = Sᵀ, no transpose).
# Element (o, x) of a program's tile is S[i, j] with (i, j) = (o, x) on side 0 and (x, o) on side 1, so a per-row
# statistic of S is a 1-D load over the owned rows (side 0) or over the other side's rows (side 1).
# ---------------------------------------------------------------------------------------------------------------------

@triton.jit
def _rows(Eb, rx, mx, dcols, mdc, D):
    """Rows rx of one embedding, columns dcols: a [BLOCK_X, BLOCK_DO] fp32 tile (masked rows/columns are 0)."""
    return tl.load(Eb + rx[:, None] * D + dcols[None, :], mask=mx[:, None] & mdc[None, :], other=0.0).to(tl.float32)


@triton.jit
def _anchor_stat(ptr, side, ro, mo, rx, mx):
    """A per-anchor-row statistic as a [BLOCK_O, BLOCK_X] tile from one 1-D load of the side that holds the anchor."""
    v_o = tl.load(ptr + ro, mask=mo & (side == 0), other=0.0)
    v_x = tl.load(ptr + rx, mask=mx & (side == 1), other=0.0)
    return v_o[:, None] + v_x[None, :]                                 # the other side's load gave zeros


@triton.jit
def _ce_bwd_kernel(E, labels, ce_u, ce_v, g_ce, stats, partial, Nb, B, D, ND, inv_tau,
                   BLOCK_O: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DO: tl.constexpr,
                   PREC: tl.constexpr, NATIVE_DOT: tl.constexpr):
    pid_o = tl.program_id(0)
    blk = tl.program_id(1).to(tl.int64)
    pid_z = tl.program_id(2)
    side = pid_z // ND
    dcols = (pid_z % ND) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    mdc = dcols < D
    u = tl.load(ce_u + blk)
    v = tl.load(ce_v + blk)
    Ea = _embedding(E, tl.where(side == 0, u, v), B, D)                 # owned side
    Eb = _embedding(E, tl.where(side == 0, v, u), B, D)                 # the other side
    ro = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    mo = ro < B
    lab_o = tl.load(labels + ro, mask=mo, other=0).to(tl.int32)
    acc = tl.zeros((BLOCK_O, BLOCK_DO), dtype=tl.float32)
    for x0 in range(0, B, BLOCK_X):
        rx = x0 + tl.arange(0, BLOCK_X)
        mx = rx < B
        lab_x = tl.load(labels + rx, mask=mx, other=-1).to(tl.int32)
        s = _logit_tile(Ea, ro, mo, Eb, rx, mx, D, BLOCK_O, BLOCK_X, BLOCK_DK, PREC, NATIVE_DOT) * inv_tau
        g = _anchor_stat(g_ce + blk * B, side, ro, mo, rx, mx)
        lse = _anchor_stat(stats + blk * B, side, ro, mo, rx, mx)
        n_pos = _anchor_stat(stats + (Nb + blk) * B, side, ro, mo, rx, mx)
        offdiag = mo[:, None] & mx[None, :] & (ro[:, None] != rx[None, :])
        live = offdiag & (n_pos > 0)                                    # rows with no positive: no gradient
        pos = tl.where(lab_o[:, None] == lab_x[None, :], 1.0, 0.0)
        ds = tl.where(live, g * (tl.exp(s - lse) - pos / tl.maximum(n_pos, 1.0)), 0.0)
        acc = tl.dot(ds, _rows(Eb, rx, mx, dcols, mdc, D), acc, input_precision=PREC)
    slot = side.to(tl.int64) * Nb + blk
    tl.store(partial + slot * B * D + ro[:, None] * D + dcols[None, :], acc * inv_tau,
             mask=mo[:, None] & mdc[None, :])


@triton.jit
def _kl_bwd_kernel(E, kl_su, kl_sv, kl_tu, kl_tv, g_kl, stats, partial, Nc, Nb, B, D, ND, inv_tau_T,
                   BLOCK_O: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DO: tl.constexpr,
                   PREC: tl.constexpr, NATIVE_DOT: tl.constexpr):
    pid_o = tl.program_id(0)
    k = tl.program_id(1).to(tl.int64)
    pid_z = tl.program_id(2)
    side = pid_z // ND
    dcols = (pid_z % ND) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    mdc = dcols < D
    blk = Nc + k
    su = tl.load(kl_su + k)
    sv = tl.load(kl_sv + k)
    tu = tl.load(kl_tu + k)
    tv = tl.load(kl_tv + k)
    Ea_s = _embedding(E, tl.where(side == 0, su, sv), B, D)
    Eb_s = _embedding(E, tl.where(side == 0, sv, su), B, D)
    Ea_t = _embedding(E, tl.where(side == 0, tu, tv), B, D)          # the teacher tile is recomputed for p_t only
    Eb_t = _embedding(E, tl.where(side == 0, tv, tu), B, D)
    ro = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    mo = ro < B
    acc = tl.zeros((BLOCK_O, BLOCK_DO), dtype=tl.float32)
    for x0 in range(0, B, BLOCK_X):
        rx = x0 + tl.arange(0, BLOCK_X)
        mx = rx < B
        valid = mo[:, None] & mx[None, :]
        s = _logit_tile(Ea_s, ro, mo, Eb_s, rx, mx, D, BLOCK_O, BLOCK_X, BLOCK_DK, PREC, NATIVE_DOT) * inv_tau_T
        ds = tl.exp(s - _anchor_stat(stats + blk * B, side, ro, mo, rx, mx))
        t = _logit_tile(Ea_t, ro, mo, Eb_t, rx, mx, D, BLOCK_O, BLOCK_X, BLOCK_DK, PREC, NATIVE_DOT) * inv_tau_T
        ds -= tl.exp(t - _anchor_stat(stats + (Nb + blk) * B, side, ro, mo, rx, mx))
        ds = tl.where(valid, ds * _anchor_stat(g_kl + k * B, side, ro, mo, rx, mx), 0.0)    # ∂KL/∂S_s · T
        acc = tl.dot(ds, _rows(Eb_s, rx, mx, dcols, mdc, D), acc, input_precision=PREC)
    slot = side.to(tl.int64) * Nb + blk
    tl.store(partial + slot * B * D + ro[:, None] * D + dcols[None, :], acc * inv_tau_T,
             mask=mo[:, None] & mdc[None, :])


# ---------------------------------------------------------------------------------------------------------------------
# launch plan (the launchers below and the GPU-readiness test both read it) and custom ops
# ---------------------------------------------------------------------------------------------------------------------

def _native_dot(dtype: torch.dtype) -> bool:
    """bf16/fp16 operands go straight into `tl.dot` on a GPU; the interpreter computes such dots wrongly, so there
    they are upcast first (the same exact products: a bf16/fp16 value is exact in fp32)."""
    return dtype != torch.float32 and os.environ.get("TRITON_INTERPRET") != "1"


def _stages(input_precision: str) -> int:
    return _STAGES.get(input_precision, 2)


def _tiles(B: int, D: int) -> dict:
    return {"BLOCK_M": _pow2(B, hi=_BLOCK_M), "BLOCK_N": _pow2(B, hi=_BLOCK_N_MAX), "BLOCK_O": _pow2(B, hi=_BLOCK_O),
            "BLOCK_X": _pow2(B, hi=_BLOCK_X_MAX), "BLOCK_DK": _pow2(D, hi=_BLOCK_DK_MAX),
            "BLOCK_DO": _pow2(D, hi=_BLOCK_DO_MAX)}


def _forward_launches(E, labels, ce_u, ce_v, kl_su, kl_sv, kl_tu, kl_tv, ce, kl, stats, tau, kd_T,
                      input_precision) -> list[KernelLaunch]:
    _, B, D = E.shape
    Nc, Nk = ce_u.shape[0], kl_su.shape[0]
    Nb = Nc + Nk
    t = _tiles(B, D)
    common = {"BLOCK_M": t["BLOCK_M"], "BLOCK_N": t["BLOCK_N"], "BLOCK_DK": t["BLOCK_DK"], "PREC": input_precision,
              "NATIVE_DOT": _native_dot(E.dtype)}
    rows = triton.cdiv(B, t["BLOCK_M"])
    out = []
    if Nc:
        out.append(KernelLaunch.of("inbatch.ce_fwd", _ce_fwd_kernel, (rows, Nc),
                                   (E, labels, ce_u, ce_v, ce, stats, Nb, B, D, 1.0 / tau), common,
                                   num_warps=_NUM_WARPS, num_stages=_stages(input_precision)))
    if Nk:
        out.append(KernelLaunch.of("inbatch.kl_fwd", _kl_fwd_kernel, (rows, Nk),
                                   (E, kl_su, kl_sv, kl_tu, kl_tv, kl, stats, Nc, Nb, B, D, 1.0 / (tau * kd_T)),
                                   common, num_warps=_NUM_WARPS, num_stages=_stages(input_precision)))
    return out


def _backward_launches(E, labels, ce_u, ce_v, kl_su, kl_sv, kl_tu, kl_tv, g_ce, g_kl, stats, partial, tau, kd_T,
                       input_precision) -> list[KernelLaunch]:
    _, B, D = E.shape
    Nc, Nk = ce_u.shape[0], kl_su.shape[0]
    Nb = Nc + Nk
    t = _tiles(B, D)
    common = {"BLOCK_O": t["BLOCK_O"], "BLOCK_X": t["BLOCK_X"], "BLOCK_DK": t["BLOCK_DK"], "BLOCK_DO": t["BLOCK_DO"],
              "PREC": input_precision, "NATIVE_DOT": _native_dot(E.dtype)}
    ND = triton.cdiv(D, t["BLOCK_DO"])
    rows = triton.cdiv(B, t["BLOCK_O"])
    out = []
    if Nc:
        out.append(KernelLaunch.of("inbatch.ce_bwd", _ce_bwd_kernel, (rows, Nc, 2 * ND),
                                   (E, labels, ce_u, ce_v, g_ce, stats, partial, Nb, B, D, ND, 1.0 / tau), common,
                                   num_warps=_NUM_WARPS, num_stages=_stages(input_precision)))
    if Nk:
        out.append(KernelLaunch.of("inbatch.kl_bwd", _kl_bwd_kernel, (rows, Nk, 2 * ND),
                                   (E, kl_su, kl_sv, kl_tu, kl_tv, g_kl, stats, partial, Nc, Nb, B, D, ND,
                                    1.0 / (tau * kd_T)),
                                   common, num_warps=_NUM_WARPS, num_stages=_stages(input_precision)))
    return out


def launches(E: Tensor, labels: Tensor, ce_u: Tensor, ce_v: Tensor, kl_su: Tensor, kl_sv: Tensor, kl_tu: Tensor,
             kl_tv: Tensor, tau: float, kd_T: float, *, input_precision: str = DEFAULT_PRECISION) -> list[KernelLaunch]:
    """Every kernel launch of one forward + backward call of `inbatch_rows` on these arguments, as the launchers
    issue them (same code path). Tensors may be on the `meta` device: only shapes and dtypes are read."""
    E, labels, idx = _prep(E, labels, (ce_u, ce_v, kl_su, kl_sv, kl_tu, kl_tv))
    _, B, D = E.shape
    Nc, Nk = ce_u.shape[0], kl_su.shape[0]
    f32 = {"dtype": torch.float32, "device": E.device}
    stats = torch.empty((2, Nc + Nk, B), **f32)
    fwd = _forward_launches(E, labels, *idx, torch.empty((Nc, B), **f32), torch.empty((Nk, B), **f32), stats, tau,
                            kd_T, input_precision)
    bwd = _backward_launches(E, labels, *idx, torch.empty((Nc, B), **f32), torch.empty((Nk, B), **f32), stats,
                             torch.empty((2, Nc + Nk, B, D), **f32), tau, kd_T, input_precision)
    return fwd + bwd


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
    E, labels, idx = _prep(E, labels, (ce_u, ce_v, kl_su, kl_sv, kl_tu, kl_tv))
    for launch in _forward_launches(E, labels, *idx, ce, kl, stats, tau, kd_T, input_precision):
        launch.launch()
    return ce, kl, stats


def _backward_impl(g_ce, g_kl, E, labels, ce_u, ce_v, kl_su, kl_sv, kl_tu, kl_tv, stats, tau, kd_T,
                   input_precision):
    NE, B, D = E.shape
    Nc, Nk = ce_u.shape[0], kl_su.shape[0]
    Nb = Nc + Nk
    if Nb == 0:
        return torch.zeros_like(E)
    E, labels, idx = _prep(E, labels, (ce_u, ce_v, kl_su, kl_sv, kl_tu, kl_tv))
    g_ce = g_ce.to(torch.float32).contiguous()
    g_kl = g_kl.to(torch.float32).contiguous()
    partial = torch.empty((2, Nb, B, D), dtype=torch.float32, device=E.device)
    for launch in _backward_launches(E, labels, *idx, g_ce, g_kl, stats.contiguous(), partial, tau, kd_T,
                                     input_precision):
        launch.launch()
    # Sum the per-(side, block) partial gradients into dE by embedding index: one deterministic one-hot GEMM.
    ce_u, ce_v, kl_su, kl_sv = idx[:4]
    owner = torch.cat([ce_u, kl_su, ce_v, kl_sv])                       # partial's [2, Nb] order
    # in fp64, which no TF32 setting of torch's touches (module docstring)
    onehot = (owner[None, :] == torch.arange(NE, device=E.device)[:, None]).to(torch.float64)
    dE = onehot @ partial.view(2 * Nb, B * D).to(torch.float64)
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
    if B * D >= 2**31:
        raise ValueError(f"inbatch_rows (Triton) indexes one embedding with int32: B * D must be < 2**31, got "
                         f"B={B}, D={D}")
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
                 kl_tv: Tensor, tau: float, kd_T: float, *,
                 input_precision: str = DEFAULT_PRECISION) -> tuple[Tensor, Tensor]:
    """Fused `inbatch_rows_reference`: (ce [Nc, B], kl [Nk, B]) in fp32, differentiable w.r.t. E (student side only).

    E [NE, B, D] fp32/bf16/fp16 (fp64 raises TypeError); labels [B] int; index tensors 1-D int in [0, NE).
    input_precision: "tf32x3" (default), "tf32" or "ieee" for the fp32 `tl.dot`s (see the module docstring).
    """
    idx = (ce_u, ce_v, kl_su, kl_sv, kl_tu, kl_tv)
    _check(E, labels, idx, tau, kd_T, input_precision)
    ce, kl, _ = torch.ops.fastmcl.inbatch_rows(E, labels, *idx, float(tau), float(kd_T), input_precision)
    return ce, kl
