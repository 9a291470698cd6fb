"""Fused memory-bank contrastive rows (docs/kernels/bank.md; the contract of docs/losses.md "Contracts").

`bank_rows` has the semantics, shapes and gradients of `fastmcl.losses.cohort_terms.bank_rows_reference`. One pass
over the gathered bank rows accumulates the softmax statistics and the softmax-weighted sums of those rows that dE is
made of; backward is a small contraction of the saved sums, without a second gather of the bank. Design, derivation,
limits and performance model: docs/kernels/bank.md. `launches` returns every kernel launch as data, built by the same code the
launcher runs, for ahead-of-time compilation.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import astuple, dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from .launch import KernelLaunch
from .tuning import timed_choice, wants_timing

__all__ = ["bank_rows", "launches", "tunings", "beyond_limit", "default_precision", "Tuning", "CONFIG_SPACE",
           "ASSUMED_SM_COUNT", "MAX_COMBOS"]

_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)
_PRECISIONS = ("ieee", "tf32", "tf32x3")
_BF16_PIECES = {"tf32x3": 3, "tf32": 2}   # a bf16 bank's dots: pieces of the fp32 operand, as accurate or more
ASSUMED_SM_COUNT = 132                 # the split-K heuristic's SM count where no GPU is asked (interpreter, AOT)
_ACC_ELEMS = 16384                     # fp32 elements of one program's weighted-sum accumulators
_TILE_BYTES = 16384                    # bytes of one gathered tile as a program holds it (`_config`)
_WEIGHT_ELEMS = 1024                   # softmax weights [BLOCK_K, 2 C]: the operand every warp holds whole
_MIN_BLOCK_K, _MAX_BLOCK_K = 8, 64
MAX_COMBOS = _WEIGHT_ELEMS // (2 * _MIN_BLOCK_K)    # padded embeddings × padded banks (e.g. 16 × 4 or 8 × 8)
_SPLIT_TRAFFIC = 4                     # a split's gathered bytes ≥ this × its partial sums' bytes
_D_CHUNK = 32                          # D columns per step of the logit dot
_J_BLOCK = 16                          # CE / KL blocks per step of the merge (the loops over blocks unroll)
_ROW_BLOCK = 16                        # accumulator rows per step of the merge
_BWD_D_BLOCK, _BWD_WARPS = 32, 4        # backward: D columns and warps per program
_BWD_TERMS = 2048                      # backward: fp32 terms [blocks, D columns] of a step (64 blocks at ImageNet)
_RESCALE = 8.0                         # log2 headroom of the lazy softmax rescaling: 2^(y − m) ≤ 256
_LN2 = math.log(2.0)
_LOG2E = 1.0 / _LN2
_NSTAT = 6                             # per combo: reference and sum at τ and at τ·T, positive sum, column-0 logit


def _pow2(x: int, floor: int = 1) -> int:
    return max(floor, triton.next_power_of_2(max(int(x), 1)))


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels. Logits are base 2: y = log2(e)/τ · e·r, so every softmax is an exp2; the KL softmax uses y/T.
# Combo c = m · NE_P + u pairs embedding u with bank m. Accumulator rows: r < C the τ-softmax sum of combo r over
# its own bank's rows; r = C + m'·C + c the (τ·T)-softmax of combo c applied to bank m''s rows; both over k ≥ 1.
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def _bank_pass_kernel(E_ptr, EP_ptr, BANK_ptr, IDX_ptr, PSTAT_ptr, PACC_ptr, TICKET_ptr, ACC_ptr, ROWS_ptr, STATS_ptr,
                      CE_U_ptr, CE_M_ptr, CE_VIEW_ptr, KL_SU_ptr, KL_SM_ptr, KL_TU_ptr, KL_TM_ptr, KL_VIEW_ptr,
                      CE_ptr, KL_ptr,
                      B, K, D, N_ROWS, NE, N_BANKS, GROUPS, SPLITS, K_PER_SPLIT, scale, inv_tau, inv_T,
                      NC: tl.constexpr, NK: tl.constexpr, POS_K: tl.constexpr, NE_P: tl.constexpr, N_P: tl.constexpr,
                      D_P: tl.constexpr, BLOCK_K: tl.constexpr,
                      NT: tl.constexpr, A1_COLS: tl.constexpr, D_CHUNK: tl.constexpr, PRECISION: tl.constexpr,
                      NATIVE_DOT: tl.constexpr, PIECES: tl.constexpr, TF32_SPLIT: tl.constexpr,
                      INTERPRET: tl.constexpr,
                      E_PARTS: tl.constexpr, ROW_BLOCK: tl.constexpr, J_BLOCK: tl.constexpr,
                      RESCALE: tl.constexpr):
    """Program (b, split, group), launched group fastest then split then row (the groups of one row adjacent, so a
    row's gathered bank rows are read from DRAM once and from L2 by the other groups): columns
    [split·K_PER_SPLIT, …) of anchor row b, weighted sums onto the target banks [group·NT, group·NT + NT), over
    columns k ≥ 1. Writes unnormalised partial sums and online statistics; the last program of row b to finish (a
    ticket per row) merges them (docs/kernels/bank.md "Kernels")."""
    C: tl.constexpr = N_P * NE_P
    ROWS: tl.constexpr = C + N_P * C
    pid = tl.program_id(0)
    grp = pid % GROUPS
    split = (pid // GROUPS) % SPLITS
    b = (pid // (GROUPS * SPLITS)).to(tl.int64)
    offs_u = tl.arange(0, NE_P)
    offs_dc = tl.arange(0, D_CHUNK)
    offs_k = tl.arange(0, BLOCK_K)
    k_begin = split * K_PER_SPLIT
    k_end = tl.minimum(K, k_begin + K_PER_SPLIT)
    jj = tl.arange(0, N_P * BLOCK_K)                  # logit column j = bank (j // BLOCK_K), column (j % BLOCK_K)
    bank_off = (jj // BLOCK_K).to(tl.int64) * N_ROWS * D
    bank_ok = (jj // BLOCK_K) < N_BANKS
    ii = tl.arange(0, NT * D_P)                       # sum row i = target bank grp·NT + i // D_P, dimension i % D_P
    tgt_i = grp * NT + ii // D_P
    d_i = ii % D_P
    tgt_off = tgt_i.to(tl.int64) * N_ROWS * D + d_i
    tgt_ok = (tgt_i < N_BANKS) & (d_i < D)
    idx_row = IDX_ptr + b * K
    e_part = EP_ptr + pid.to(tl.int64) * (E_PARTS * NE_P * D_P)   # this program's parts of E: [E_PARTS, NE_P, D_P]
    if E_PARTS:
        _split_rows(E_ptr, e_part, b, B, D, NE, NE_P, D_P, PIECES)

    m1 = tl.full([NE_P, N_P], float("-inf"), tl.float32)          # online statistics per combo (embedding, bank)
    l1 = tl.zeros([NE_P, N_P], tl.float32)
    lT = tl.zeros([NE_P, N_P], tl.float32)
    acc1 = tl.zeros([NT * D_P, A1_COLS], tl.float32)  # transposed sums: target bank × D is the M dimension
    accT = tl.zeros([NT * D_P, C], tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        kcol = k0 + offs_k
        col_ok = kcol < k_end
        # the tile's indices, loaded once; the logit dot's columns are the same indices for every bank
        cols = tl.load(idx_row + kcol, mask=col_ok, other=0).to(tl.int64)
        rows = tl.reshape(tl.broadcast_to(cols[None, :], (N_P, BLOCK_K)), (N_P * BLOCK_K,))
        row_ok = tl.reshape(tl.broadcast_to(col_ok[None, :], (N_P, BLOCK_K)), (N_P * BLOCK_K,)) & bank_ok
        # the target banks' rows of the tile, whole and transposed [NT·D_P, BK]: one load with every row in flight
        Rt = tl.load(BANK_ptr + tgt_off[:, None] + cols[None, :] * D, mask=tgt_ok[:, None] & col_ok[None, :],
                     other=0.0)
        if PIECES == 0:
            Rt = Rt.to(tl.float32)
        Rt_lo = Rt
        if TF32_SPLIT:
            Rt, Rt_lo = _tf32_parts(Rt)
        # logits [NE_P, N_P·BK] of every bank's rows (the target banks' an L1 re-read of the load above), contracted
        # over D in chunks (unrolled: the K loop stays the innermost loop, which the pipeliner can run ahead)
        s = tl.zeros([NE_P, N_P * BLOCK_K], tl.float32)
        for d0 in range(0, D_P, D_CHUNK):
            dd = d0 + offs_dc
            Rc = tl.load(BANK_ptr + (bank_off + rows * D)[None, :] + dd[:, None],
                         mask=row_ok[None, :] & (dd[:, None] < D), other=0.0)               # [D_CHUNK, N_P·BK]
            e_off = offs_u[:, None].to(tl.int64) * B * D + b * D + dd[None, :]             # [NE_P, D_CHUNK]
            e_ok = (offs_u[:, None] < NE) & (dd[None, :] < D)
            p_off = offs_u[:, None] * D_P + dd[None, :]
            if NATIVE_DOT:
                s = tl.dot(tl.load(E_ptr + e_off, mask=e_ok, other=0.0), Rc, s)
            elif PIECES:        # E's bf16 pieces (`_split_rows`), smallest first
                for p in tl.static_range(PIECES - 1, -1, -1):
                    s = _dot_bf16(tl.load(e_part + p * NE_P * D_P + p_off), Rc, s, INTERPRET)
            elif TF32_SPLIT:    # E's tf32 parts (`_split_rows`)
                e_hi = tl.load(e_part + p_off)
                e_lo = tl.load(e_part + NE_P * D_P + p_off)
                r_hi, r_lo = _tf32_parts(Rc.to(tl.float32))
                s = tl.dot(e_hi, r_lo, s, input_precision="tf32")
                s = tl.dot(e_lo, r_hi, s, input_precision="tf32")
                s = tl.dot(e_hi, r_hi, s, input_precision="tf32")
            else:
                ec = tl.load(E_ptr + e_off, mask=e_ok, other=0.0)
                s = tl.dot(ec.to(tl.float32), Rc.to(tl.float32), s, input_precision=PRECISION)
        valid = ((kcol >= 1) & col_ok)[None, None, :]
        Y = tl.where(valid, tl.reshape(s * scale, (NE_P, N_P, BLOCK_K)), float("-inf"))    # [embedding, bank, k]
        # lazy rescaling: the reference m of every combo moves (and the sums with it) only when a tile's logits pass
        # it by more than RESCALE, so 2^(y − m) ≤ 2^RESCALE; the τ·T softmax's reference is m / T
        y_max = tl.max(Y, axis=2)
        if tl.max(tl.max(y_max - m1, axis=1), axis=0) > RESCALE:
            m_new = tl.maximum(m1, y_max)
            a1 = tl.exp2(m1 - m_new)
            aT = tl.exp2((m1 - m_new) * inv_T)
            l1 = l1 * a1
            lT = lT * aT
            m1 = m_new
            if NT == 1:
                acc1 = acc1 * tl.sum(tl.where((tl.arange(0, N_P) == grp)[None, :], a1, 0.0), axis=1)[None, :]
            else:
                acc1 = acc1 * tl.reshape(tl.trans(a1), (C,))[None, :]
            accT = accT * tl.reshape(tl.trans(aT), (C,))[None, :]
        P1 = tl.exp2(Y - m1[:, :, None])
        l1 += tl.sum(P1, axis=2)
        PT = tl.exp2((Y - m1[:, :, None]) * inv_T)
        lT += tl.sum(PT, axis=2)
        # weighted sums: the target banks' rows [NT·D_P, BK] times the softmax weights of every combo [BK, C] (combo
        # c = bank · NE_P + embedding), two dots sharing their A operand
        if NT == 1:             # one target bank: the τ sums of its own combos only
            W1 = tl.trans(tl.sum(tl.where((tl.arange(0, N_P) == grp)[None, :, None], P1, 0.0), axis=1))
        else:                   # the τ sums of every combo, of which each target bank keeps its own
            W1 = tl.reshape(tl.permute(P1, (2, 1, 0)), (BLOCK_K, C))
        acc1 = _rows_dot(Rt, Rt_lo, W1, acc1, PRECISION, PIECES, TF32_SPLIT, INTERPRET)
        WT = tl.reshape(tl.permute(PT, (2, 1, 0)), (BLOCK_K, C))
        accT = _rows_dot(Rt, Rt_lo, WT, accT, PRECISION, PIECES, TF32_SPLIT, INTERPRET)

    base = split.to(tl.int64) * B + b
    cc = tl.arange(0, C)
    if grp == 0:
        st = PSTAT_ptr + base * (4 * C) + cc
        tl.store(st, tl.reshape(tl.trans(m1), (C,)))
        tl.store(st + C, tl.reshape(tl.trans(l1), (C,)))
        tl.store(st + 2 * C, tl.reshape(tl.trans(m1 * inv_T), (C,)))
        tl.store(st + 3 * C, tl.reshape(tl.trans(lT), (C,)))
    acc = PACC_ptr + base * (ROWS * D_P) + d_i[:, None]
    if NT == 1:
        tl.store(acc + (grp * NE_P + offs_u)[None, :] * D_P, acc1)
    else:
        tl.store(acc + cc[None, :] * D_P, acc1, mask=(cc // NE_P)[None, :] == tgt_i[:, None])
    tl.store(acc + (C + tgt_i[:, None] * C + cc[None, :]) * D_P, accT)
    # every thread's stores above come before the ticket; the ticket's acquire makes the others' visible to the last
    tl.debug_barrier()
    ticket = tl.atomic_add(TICKET_ptr + b, 1, sem="acq_rel")
    if ticket == GROUPS * SPLITS - 1:
        tl.store(TICKET_ptr + b, 0)             # every program of row b has arrived: ready for the next launch
        _merge_row(b, E_ptr, BANK_ptr, IDX_ptr, PSTAT_ptr, PACC_ptr, ACC_ptr, ROWS_ptr, STATS_ptr,
                   CE_U_ptr, CE_M_ptr, CE_VIEW_ptr, KL_SU_ptr, KL_SM_ptr, KL_TU_ptr, KL_TM_ptr, KL_VIEW_ptr,
                   CE_ptr, KL_ptr, B, K, D, N_ROWS, NE, N_BANKS, SPLITS, scale, inv_tau, inv_T,
                   NC, NK, POS_K, NE_P, N_P, D_P, ROW_BLOCK, J_BLOCK)


@triton.jit
def _split_rows(E_ptr, out, b, B, D, NE, NE_P: tl.constexpr, D_P: tl.constexpr, PIECES: tl.constexpr):
    """Row b of E [NE, B, D] in parts at `out` [parts, NE_P, D_P], zero-padded: PIECES bf16 pieces whose sum is the
    row (each the rounding of what the previous leave), or (PIECES = 0) its tf32 parts (`_tf32_parts`). Made once
    per program and read back every K tile; the program's threads read what others wrote (hence the barrier)."""
    offs_u = tl.arange(0, NE_P)[:, None]
    offs_d = tl.arange(0, D_P)[None, :]
    x = tl.load(E_ptr + offs_u.to(tl.int64) * B * D + b * D + offs_d, mask=(offs_u < NE) & (offs_d < D),
                other=0.0).to(tl.float32)
    at = out + offs_u * D_P + offs_d
    if PIECES:
        for p in tl.static_range(PIECES):
            piece = x.to(tl.bfloat16)
            tl.store(at + p * NE_P * D_P, piece)
            x = x - piece.to(tl.float32)
    else:
        hi, lo = _tf32_parts(x)
        tl.store(at, hi)
        tl.store(at + NE_P * D_P, lo)
    tl.debug_barrier()


@triton.jit
def _rows_dot(R, R_lo, W, acc, PRECISION: tl.constexpr, PIECES: tl.constexpr, TF32_SPLIT: tl.constexpr,
              INTERPRET: tl.constexpr):
    """acc + R·W, R the bank rows, W fp32 softmax weights: fp32 dots at PRECISION; or (PIECES > 0) R in bf16 as
    stored and W split (`_split_dot`); or (TF32_SPLIT) R's tf32 parts (R, R_lo) and W's, three tf32 dots."""
    if PIECES:
        out = _split_dot(R, W, acc, PIECES, INTERPRET)
    elif TF32_SPLIT:
        w_hi, w_lo = _tf32_parts(W)
        out = tl.dot(R, w_lo, acc, input_precision="tf32")
        out = tl.dot(R_lo, w_hi, out, input_precision="tf32")
        out = tl.dot(R, w_hi, out, input_precision="tf32")
    else:
        out = tl.dot(R, W, acc, input_precision=PRECISION)
    return out


@triton.jit
def _tf32_parts(x):
    """x (fp32) as hi + lo, both rounded to tf32 by their bits (add half an ulp of tf32, clear the 13 low bits: two
    integer instructions where `cvt.rna.tf32.f32` is a sequence), lo = x − hi before its rounding."""
    hi = ((x.to(tl.int32, bitcast=True) + 0x1000) & -8192).to(tl.float32, bitcast=True)
    lo = x - hi
    return hi, ((lo.to(tl.int32, bitcast=True) + 0x1000) & -8192).to(tl.float32, bitcast=True)


@triton.jit
def _split_dot(a, b, acc, PIECES: tl.constexpr, INTERPRET: tl.constexpr):
    """acc + a·b, a a bf16 bank tile and b fp32: b as a sum of PIECES bf16 numbers (2: 16 significant bits, 3: 24,
    fp32's), one bf16 tensor-core dot per piece with exact products and fp32 accumulation, smallest first
    (docs/kernels/bank.md "bf16 banks")."""
    b1 = b.to(tl.bfloat16)
    rest = b - b1.to(tl.float32)
    b2 = rest.to(tl.bfloat16)
    if PIECES == 3:
        acc = _dot_bf16(a, (rest - b2.to(tl.float32)).to(tl.bfloat16), acc, INTERPRET)
    acc = _dot_bf16(a, b2, acc, INTERPRET)
    return _dot_bf16(a, b1, acc, INTERPRET)


@triton.jit
def _dot_bf16(a, b, acc, INTERPRET: tl.constexpr):
    """acc + a·b of bf16 operands on tensor cores. The interpreter's dot reads bf16 as the integers it stores them
    in, so there the same values are multiplied in fp32 (bf16 products are exact in fp32)."""
    if INTERPRET:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc)
    return out


@triton.jit
def _full_set(M, Z, y0):
    """Online statistics (max, sum of 2^(y − max)) over k ≥ 1 merged with column 0: (max', sum', view fraction,
    column-0 probability), the full-set softmax being (view fraction) · view softmax on k ≥ 1."""
    Mf = tl.maximum(M, y0)
    zv = Z * tl.exp2(M - Mf)
    z0 = tl.exp2(y0 - Mf)
    Zf = zv + z0
    return Mf, Zf, zv / Zf, z0 / Zf


@triton.jit
def _kl_blocks(KL_SU_ptr, KL_SM_ptr, KL_TU_ptr, KL_TM_ptr, KL_VIEW_ptr, j, jm, NE_P: tl.constexpr):
    """KL blocks j (masked by jm): student and teacher embedding and bank, view flag, student and teacher combo."""
    su = tl.load(KL_SU_ptr + j, mask=jm, other=0).to(tl.int32)
    sm = tl.load(KL_SM_ptr + j, mask=jm, other=0).to(tl.int32)
    tu = tl.load(KL_TU_ptr + j, mask=jm, other=0).to(tl.int32)
    tm = tl.load(KL_TM_ptr + j, mask=jm, other=0).to(tl.int32)
    view = tl.load(KL_VIEW_ptr + j, mask=jm, other=0) != 0
    return su, sm, tu, tm, view, sm * NE_P + su, tm * NE_P + tu


@triton.jit
def _merge_row(b, E_ptr, BANK_ptr, IDX_ptr, PSTAT_ptr, PACC_ptr, ACC_ptr, ROWS_ptr, STATS_ptr,
               CE_U_ptr, CE_M_ptr, CE_VIEW_ptr, KL_SU_ptr, KL_SM_ptr, KL_TU_ptr, KL_TM_ptr, KL_VIEW_ptr,
               CE_ptr, KL_ptr, B, K, D, N_ROWS, NE, N_BANKS, SPLITS, scale, inv_tau, inv_T,
               NC: tl.constexpr, NK: tl.constexpr, POS_K: tl.constexpr, NE_P: tl.constexpr, N_P: tl.constexpr,
               D_P: tl.constexpr, ROW_BLOCK: tl.constexpr, J_BLOCK: tl.constexpr):
    """Row b: merges the splits (flash-decoding), normalises the weighted sums, adds column 0 and the positives
    (1 + pos_k rows per bank), writes the ce and kl rows and what backward needs."""
    C: tl.constexpr = N_P * NE_P
    ROWS: tl.constexpr = C + N_P * C
    LN2: tl.constexpr = 0.6931471805599453
    cc = tl.arange(0, C)
    offs_d = tl.arange(0, D_P)
    offs_u = tl.arange(0, NE_P)
    banks = tl.arange(0, N_P)
    st_b = PSTAT_ptr + b * (4 * C)
    split_stride = B * (4 * C)
    M1 = tl.full([C], float("-inf"), tl.float32)
    MT = tl.full([C], float("-inf"), tl.float32)
    for s in range(SPLITS):
        M1 = tl.maximum(M1, tl.load(st_b + s * split_stride + cc, cache_modifier=".cg"))
        MT = tl.maximum(MT, tl.load(st_b + s * split_stride + 2 * C + cc, cache_modifier=".cg"))
    Z1 = tl.zeros([C], tl.float32)
    ZT = tl.zeros([C], tl.float32)
    for s in range(SPLITS):
        st = st_b + s * split_stride
        Z1 += tl.load(st + C + cc, cache_modifier=".cg") * tl.exp2(tl.load(st + cc, cache_modifier=".cg") - M1)
        ZT += tl.load(st + 3 * C + cc, cache_modifier=".cg") * tl.exp2(
            tl.load(st + 2 * C + cc, cache_modifier=".cg") - MT)

    # column 0 and the sum of the positives 1..pos_k, bank by bank (saved for backward); their logits per combo
    e = tl.load(E_ptr + offs_u[:, None].to(tl.int64) * B * D + b * D + offs_d[None, :],
                mask=(offs_u[:, None] < NE) & (offs_d[None, :] < D), other=0.0).to(tl.float32)   # [NE_P, D_P]
    Y0 = tl.zeros([N_P, NE_P], tl.float32)
    POS = tl.zeros([N_P, NE_P], tl.float32)
    dmask = offs_d < D
    ro = ROWS_ptr + b * (2 * N_P * D_P) + offs_d
    for mb in tl.static_range(N_P):
        row_m = BANK_ptr + mb * N_ROWS * D + offs_d
        ok = dmask & (mb < N_BANKS)
        r0 = tl.load(row_m + tl.load(IDX_ptr + b * K).to(tl.int64) * D, mask=ok, other=0.0).to(tl.float32)
        rp = tl.zeros([D_P], tl.float32)
        for k in tl.static_range(1, POS_K + 1):
            rp += tl.load(row_m + tl.load(IDX_ptr + b * K + k).to(tl.int64) * D, mask=ok, other=0.0).to(tl.float32)
        tl.store(ro + mb * D_P, r0)
        tl.store(ro + (N_P + mb) * D_P, rp)
        Y0 = tl.where(banks[:, None] == mb, tl.sum(e * r0[None, :], axis=1)[None, :], Y0)
        POS = tl.where(banks[:, None] == mb, tl.sum(e * rp[None, :], axis=1)[None, :], POS)
    Y0 = tl.reshape(Y0, (C,)) * scale
    POS = tl.reshape(POS, (C,)) * scale
    out = STATS_ptr + b * (6 * C) + cc
    tl.store(out, M1)
    tl.store(out + C, Z1)
    tl.store(out + 2 * C, MT)
    tl.store(out + 3 * C, ZT)
    tl.store(out + 4 * C, POS)
    tl.store(out + 5 * C, Y0)

    # weighted sums: Σ_s acc_s · 2^(m_s − M) / Z, row by row (row r belongs to combo r mod C)
    n_rows = C + N_BANKS * C
    for r0 in range(0, n_rows, ROW_BLOCK):
        r = r0 + tl.arange(0, ROW_BLOCK)
        rmask = r < n_rows
        src = r % C
        kind = tl.where(r < C, 0, 2)
        M = tl.full([ROW_BLOCK], float("-inf"), tl.float32)
        for s in range(SPLITS):
            M = tl.maximum(M, tl.load(st_b + s * split_stride + kind * C + src, mask=rmask, other=0.0,
                                      cache_modifier=".cg"))
        Z = tl.zeros([ROW_BLOCK], tl.float32)
        acc = tl.zeros([ROW_BLOCK, D_P], tl.float32)
        for s in range(SPLITS):
            st = st_b + s * split_stride
            w = tl.exp2(tl.load(st + kind * C + src, mask=rmask, other=0.0, cache_modifier=".cg") - M)
            Z += tl.load(st + (kind + 1) * C + src, mask=rmask, other=1.0, cache_modifier=".cg") * w
            part = tl.load(PACC_ptr + (s * B + b) * (ROWS * D_P) + r[:, None] * D_P + offs_d[None, :],
                           mask=rmask[:, None], other=0.0, cache_modifier=".cg")
            acc += part * w[:, None]
        tl.store(ACC_ptr + b * (ROWS * D_P) + r[:, None] * D_P + offs_d[None, :], acc / Z[:, None],
                 mask=rmask[:, None])
    tl.debug_barrier()          # the rows above are read back below by other threads of this program

    # CE rows: view lse − mean of the pos_k positives; cross rows add column 0 to both
    st = STATS_ptr + b * (6 * C)
    for j0 in tl.static_range(0, NC, J_BLOCK):
        j = j0 + tl.arange(0, J_BLOCK)
        jm = j < NC
        c = tl.load(CE_M_ptr + j, mask=jm, other=0).to(tl.int32) * NE_P + tl.load(CE_U_ptr + j, mask=jm,
                                                                                   other=0).to(tl.int32)
        view = tl.load(CE_VIEW_ptr + j, mask=jm, other=0) != 0
        m = tl.load(st + c)
        z = tl.load(st + C + c)
        p = tl.load(st + 4 * C + c)
        q = tl.load(st + 5 * C + c)
        Mf, Zf, _, _ = _full_set(m, z, q)
        ce_view = LN2 * (m + tl.log2(z) - p / POS_K)
        ce_cross = LN2 * (Mf + tl.log2(Zf) - (p + q) / (POS_K + 1))
        tl.store(CE_ptr + j.to(tl.int64) * B + b, tl.where(view, ce_view, ce_cross), mask=jm)

    # KL rows: Σ_k q_k (t_k − s_k)/T from the teacher-weighted sums, minus the centred lse difference
    accb = ACC_ptr + b * (ROWS * D_P)
    e_b = E_ptr + b * D + offs_d[None, :]
    dmask = offs_d[None, :] < D
    for j0 in tl.static_range(0, NK, J_BLOCK):
        j = j0 + tl.arange(0, J_BLOCK)
        jm = j < NK
        su, sm, tu, tm, view, cs, ct = _kl_blocks(KL_SU_ptr, KL_SM_ptr, KL_TU_ptr, KL_TM_ptr, KL_VIEW_ptr, j, jm,
                                                  NE_P)
        ms = tl.load(st + 2 * C + cs)
        zs = tl.load(st + 3 * C + cs)
        mt = tl.load(st + 2 * C + ct)
        zt = tl.load(st + 3 * C + ct)
        qs = tl.load(st + 5 * C + cs) * inv_T
        qt = tl.load(st + 5 * C + ct) * inv_T
        msf, zsf, _, _ = _full_set(ms, zs, qs)
        mtf, ztf, ft, p0t = _full_set(mt, zt, qt)
        ms = tl.where(view, ms, msf)
        zs = tl.where(view, zs, zsf)
        mt = tl.where(view, mt, mtf)
        zt = tl.where(view, zt, ztf)
        ft = tl.where(view, 1.0, ft)
        p0t = tl.where(view, 0.0, p0t)
        jm2 = jm[:, None] & dmask
        xt = tl.load(accb + (C + tm * C + ct)[:, None] * D_P + offs_d[None, :], mask=jm2, other=0.0)
        xs = tl.load(accb + (C + sm * C + ct)[:, None] * D_P + offs_d[None, :], mask=jm2, other=0.0)
        et = tl.load(e_b + tu[:, None].to(tl.int64) * B * D, mask=jm2, other=0.0).to(tl.float32)
        es = tl.load(e_b + su[:, None].to(tl.int64) * B * D, mask=jm2, other=0.0).to(tl.float32)
        cross = tl.sum(et * xt - es * xs, axis=1) * (inv_tau * inv_T)
        kl = ft * cross + p0t * (qt - qs) * LN2 - LN2 * ((mt - ms) + tl.log2(zt / zs))
        tl.store(KL_ptr + j.to(tl.int64) * B + b, kl, mask=jm)

@triton.jit
def _bank_bwd_kernel(ACC_ptr, ROWS_ptr, STATS_ptr, G_CE_ptr, G_KL_ptr, DE_ptr,
                     CE_U_ptr, CE_M_ptr, CE_VIEW_ptr, KL_SU_ptr, KL_SM_ptr, KL_TU_ptr, KL_TM_ptr, KL_VIEW_ptr,
                     B, D, NE, inv_tau, inv_T, NC: tl.constexpr, NK: tl.constexpr, POS_K: tl.constexpr,
                     NE_P: tl.constexpr, N_P: tl.constexpr, D_P: tl.constexpr, D_BLOCK: tl.constexpr,
                     J_CE: tl.constexpr, J_KL: tl.constexpr):
    """Program (b, u, D block), D blocks fastest: dE[u, b, block] = Σ over the CE and KL blocks anchored at u of
    (upstream gradient × saved weighted sums) / τ, in fp32 FMA (no tensor core, so no TF32 rounding of dE). J_CE /
    J_KL blocks per step: the terms are summed over blocks once, after the loops."""
    C: tl.constexpr = N_P * NE_P
    ROWS: tl.constexpr = C + N_P * C
    N_DB: tl.constexpr = D_P // D_BLOCK
    pid = tl.program_id(0)
    offs_d = (pid % N_DB) * D_BLOCK + tl.arange(0, D_BLOCK)
    anchor = (pid // N_DB) % NE
    b = (pid // (N_DB * NE)).to(tl.int64)
    st = STATS_ptr + b * (6 * C)
    accb = ACC_ptr + b * (ROWS * D_P) + offs_d[None, :]
    rowb = ROWS_ptr + b * (2 * N_P * D_P) + offs_d[None, :]
    ce_terms = tl.zeros([J_CE, D_BLOCK], tl.float32)
    for j0 in range(0, NC, J_CE):
        j = j0 + tl.arange(0, J_CE)
        u = tl.load(CE_U_ptr + j, mask=j < NC, other=-1).to(tl.int32)
        jm = u == anchor
        m = tl.load(CE_M_ptr + j, mask=jm, other=0).to(tl.int32)
        view = tl.load(CE_VIEW_ptr + j, mask=jm, other=0) != 0
        g = tl.load(G_CE_ptr + j.to(tl.int64) * B + b, mask=jm, other=0.0).to(tl.float32)
        c = m * NE_P + u
        _, _, f, p0 = _full_set(tl.load(st + c, mask=jm, other=0.0), tl.load(st + C + c, mask=jm, other=1.0),
                                tl.load(st + 5 * C + c, mask=jm, other=0.0))
        a_s = g * tl.where(view, 1.0, f)
        a_0 = tl.where(view, 0.0, g * (p0 - 1.0 / (POS_K + 1)))
        a_p = -g / tl.where(view, POS_K, POS_K + 1)
        jm2 = jm[:, None]
        ce_terms += (a_s[:, None] * tl.load(accb + c[:, None] * D_P, mask=jm2, other=0.0)
                     + a_0[:, None] * tl.load(rowb + m[:, None] * D_P, mask=jm2, other=0.0)
                     + a_p[:, None] * tl.load(rowb + (N_P + m)[:, None] * D_P, mask=jm2, other=0.0))
    kl_terms = tl.zeros([J_KL, D_BLOCK], tl.float32)
    for j0 in range(0, NK, J_KL):
        j = j0 + tl.arange(0, J_KL)
        su0 = tl.load(KL_SU_ptr + j, mask=j < NK, other=-1).to(tl.int32)
        jm = su0 == anchor
        su, sm, tu, tm, view, cs, ct = _kl_blocks(KL_SU_ptr, KL_SM_ptr, KL_TU_ptr, KL_TM_ptr, KL_VIEW_ptr, j, jm,
                                                  NE_P)
        h = tl.load(G_KL_ptr + j.to(tl.int64) * B + b, mask=jm, other=0.0).to(tl.float32) * inv_T
        _, _, fs, p0s = _full_set(tl.load(st + 2 * C + cs, mask=jm, other=0.0),
                                  tl.load(st + 3 * C + cs, mask=jm, other=1.0),
                                  tl.load(st + 5 * C + cs, mask=jm, other=0.0) * inv_T)
        _, _, ft, p0t = _full_set(tl.load(st + 2 * C + ct, mask=jm, other=0.0),
                                  tl.load(st + 3 * C + ct, mask=jm, other=1.0),
                                  tl.load(st + 5 * C + ct, mask=jm, other=0.0) * inv_T)
        fs = tl.where(view, 1.0, fs)
        ft = tl.where(view, 1.0, ft)
        d0 = tl.where(view, 0.0, p0s - p0t)
        jm2 = jm[:, None]
        kl_terms += ((h * fs)[:, None] * tl.load(accb + (C + sm * C + cs)[:, None] * D_P, mask=jm2, other=0.0)
                     - (h * ft)[:, None] * tl.load(accb + (C + sm * C + ct)[:, None] * D_P, mask=jm2, other=0.0)
                     + (h * d0)[:, None] * tl.load(rowb + sm[:, None] * D_P, mask=jm2, other=0.0))
    dE = tl.sum(ce_terms, axis=0) + tl.sum(kl_terms, axis=0)
    tl.store(DE_ptr + anchor.to(tl.int64) * B * D + b * D + offs_d, dE * inv_tau, mask=offs_d < D)


# ----------------------------------------------------------------------------------------------------------------
# Launch configuration: one function decides block sizes, groups, splits, warps and stages; the launcher and
# `launches` both read it.
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Tuning:
    """One point of the configuration space: the pass kernel's warps, software-pipeline stages, tile width along K
    (0: the widest the tile budgets allow), the accumulator budget that sets the target banks per program, and the
    block slots per SM the split heuristic fills: at least the resident blocks it compiles to (the readiness test
    checks the grid against the compile), more where a fuller last wave is worth the partial sums' traffic."""
    num_warps: int
    num_stages: int
    block_k: int
    acc_elems: int
    blocks_per_sm: int


# (arch major, bank bytes, fp32 dot precision) → ((largest padded combo count, candidates best first), ...). The first
# candidate is the one the performance model ranks best (docs/kernels/performance_model.md,
# benchmarks/results/bank_model.md); every candidate passes the GPU-readiness test and the interpreter tests.
_FEW, _MANY = 16, MAX_COMBOS      # ImageNet L-MCL (8 × 2 combos); 4 × 4 stages, MCL × 4 (8 × 4 padded), MCL × 8
_BIG_PLANS = (_MANY, (Tuning(8, 2, 0, 4096, 1),))
CONFIG_SPACE: dict[tuple[int, int, str], tuple[tuple[int, tuple[Tuning, ...]], ...]] = {
    **{(a, 4, "tf32x3"): ((_FEW, (Tuning(4, 3, 16, 16384, 3), Tuning(4, 3, 16, 4096, 3))), _BIG_PLANS)
       for a in (8, 9)},
    **{(a, 4, "tf32"): ((_FEW, (Tuning(4, 3, 16, 16384, 3), Tuning(4, 2, 16, 16384, 3))), _BIG_PLANS)
       for a in (8, 9)},
    **{(a, 2, p): ((_FEW, (Tuning(4, 3, 32, 16384, 3), Tuning(4, 3, 16, 16384, 3), Tuning(4, 2, 16, 4096, 4))),
                   _BIG_PLANS)
       for a in (8, 9) for p in ("tf32x3", "tf32")},
}
_FALLBACK = Tuning(8, 2, 0, 4096, 1)                  # older GPUs, "ieee" and the interpreter


def tunings(capability: tuple[int, int], bank_dtype: torch.dtype, combos: int,
            precision: str | None = None) -> tuple[Tuning, ...]:
    """The candidates of the configuration space for a GPU of `capability`, a bank of `bank_dtype`, `combos` padded
    (embedding, bank) pairs (`_padded`) and the fp32 dots' `precision` (None: `default_precision`)."""
    key = (min(capability[0], 9), bank_dtype.itemsize, precision or default_precision(capability))
    for max_combos, candidates in CONFIG_SPACE.get(key, ()):
        if combos <= max_combos:
            return candidates
    return (_FALLBACK,)


def _padded(NE: int, n: int, D: int) -> tuple[int, int, int]:
    """Embeddings, banks and D padded to what a program holds. Four or more banks take at least 8 embedding rows:
    with 4 × 4, Triton 3.8 fails to compile the tf32 logit dot for sm_90 (`TritonGPUOptimizeDotOperands`)."""
    N_P = _pow2(n)
    return _pow2(NE, floor=8 if N_P >= 4 else 1), N_P, _pow2(D, floor=16)


def beyond_limit(NE: int, n: int, D: int) -> str | None:
    """Why NE embeddings × n banks at width D exceed what one program holds, or None when they fit."""
    NE_P, N_P, D_P = _padded(NE, n, D)
    max_combos = min(_ACC_ELEMS // (2 * D_P), MAX_COMBOS)
    if NE_P * N_P > max_combos:
        return (f"{NE} embeddings × {n} banks pad to {NE_P} × {N_P} = {NE_P * N_P} combos, above the {max_combos} "
                f"one program holds at D = {D} (registers of its accumulators and softmax weights)")
    return None


def default_precision(capability: tuple[int, int]) -> str:
    """fp32 dots follow `torch.get_float32_matmul_precision()` as Inductor does: "highest" → tf32x3 (fp32-level
    accuracy on tensor cores), "high" / "medium" → tf32; "ieee" (FMA) below sm_80."""
    if capability < (8, 0):
        return "ieee"
    return "tf32x3" if torch.get_float32_matmul_precision() == "highest" else "tf32"


@dataclass(frozen=True)
class _Config:
    NE_P: int
    N_P: int
    D_P: int
    BLOCK_K: int
    NT: int                 # target banks per program
    groups: int             # programs per (row, split) along the target banks
    splits: int             # programs per row along K
    k_per_split: int
    precision: str
    native_dot: bool
    pieces: int             # bf16 bank: bf16 pieces of the fp32 operand per dot (0: fp32 dots at `precision`)
    tf32_split: bool        # fp32 bank at tf32x3: the operands' tf32 parts made by their bits, E's once per program
    num_warps: int
    num_stages: int

    @property
    def e_parts(self) -> int:
        """Parts of E the logit dot takes (bf16 pieces, or tf32 hi and lo), made once per program; 0: E as it is."""
        return 0 if self.native_dot else self.pieces or 2 * self.tf32_split

    @property
    def C(self) -> int:
        return self.NE_P * self.N_P

    @property
    def rows(self) -> int:
        return self.C + self.N_P * self.C


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _config(NE: int, n: int, B: int, K: int, D: int, e_dtype: torch.dtype, bank_dtype: torch.dtype,
            precision: str | None, capability: tuple[int, int], sm_count: int, block_k: int = 0,
            split_k: int = 0, tuning: Tuning | None = None) -> _Config:
    NE_P, N_P, D_P = _padded(NE, n, D)
    C = NE_P * N_P
    if beyond := beyond_limit(NE, n, D):
        raise ValueError(f"bank_rows kernel: {beyond}; use the reference backend")
    if precision is None:
        precision = default_precision(capability)
    if precision not in _PRECISIONS:
        raise ValueError(f"input_precision must be one of {_PRECISIONS}, got {precision!r}")
    tuning = tuning or tunings(capability, bank_dtype, C, precision)[0]
    # target banks per program: as many as keep the accumulators 2 × [NT·D_P, C] within the tuning's budget
    NT = N_P
    while NT > 1 and 2 * NT * D_P * C > tuning.acc_elems:
        NT //= 2
    # a bf16 bank's rows stay bf16 where the dots take bf16 pieces; any other bank is held in fp32
    pieces = _BF16_PIECES.get(precision, 0) if bank_dtype == torch.bfloat16 else 0
    held = 2 if pieces else 4
    bk = tuning.block_k or _MAX_BLOCK_K
    while bk > _MIN_BLOCK_K and (N_P * bk * min(D_P, _D_CHUNK) * held > _TILE_BYTES
                                 or NT * bk * D_P * held > _TILE_BYTES or 2 * C * bk > _WEIGHT_ELEMS):
        bk //= 2
    if block_k:
        if block_k < _MIN_BLOCK_K or block_k & (block_k - 1):
            raise ValueError(f"block_k must be 0 (auto) or a power of two >= {_MIN_BLOCK_K}, got {block_k}")
        bk = block_k
    groups = triton.cdiv(n, NT)
    if split_k:
        splits = split_k
    else:                   # flash-decoding split: fill every resident block slot of every SM at least once, with
        # splits at least 4 tiles long whose partial sums (written and read back: 2 · rows · D_P fp32) stay under a
        # quarter of the bank rows they gather
        min_k = max(4 * bk, _SPLIT_TRAFFIC * 2 * (C + N_P * C) * 4 // (n * bank_dtype.itemsize))
        splits = 1
        while B * groups * splits < tuning.blocks_per_sm * sm_count and K >= 2 * splits * min_k:
            splits *= 2
    k_per_split = triton.cdiv(triton.cdiv(K, splits), bk) * bk
    splits = triton.cdiv(K, k_per_split)            # no empty split
    native = e_dtype == bank_dtype and e_dtype != torch.float32 and not _interpreting()
    if bk < 16:             # bf16 dots contract over ≥ 16: the weighted sums' BLOCK_K
        pieces = 0
    return _Config(NE_P=NE_P, N_P=N_P, D_P=D_P, BLOCK_K=bk, NT=NT, groups=groups, splits=splits,
                   k_per_split=k_per_split, precision=precision, native_dot=native, pieces=pieces,
                   tf32_split=precision == "tf32x3" and not pieces and not native,
                   num_warps=tuning.num_warps, num_stages=tuning.num_stages)


def _forward_launches(cfg: _Config, E, banks, idx, vecs, pos_k, tau, kd_T, work, outs) -> list[KernelLaunch]:
    NE, B, D = E.shape
    n, N_ROWS = banks.shape[0], banks.shape[1]
    K = idx.shape[1]
    pstat, pacc, ticket, parts = work
    ce, kl, stats, acc, rows = outs
    pass_ = KernelLaunch.of(
        "bank.pass", _bank_pass_kernel, (B * cfg.splits * cfg.groups,),
        (E, parts, banks, idx, pstat, pacc, ticket, acc, rows, stats, *vecs, ce, kl, B, K, D, N_ROWS, NE, n,
         cfg.groups, cfg.splits, cfg.k_per_split, _LOG2E / tau, 1.0 / tau, 1.0 / kd_T),
        dict(NC=ce.shape[0], NK=kl.shape[0], POS_K=pos_k, NE_P=cfg.NE_P, N_P=cfg.N_P, D_P=cfg.D_P,
             BLOCK_K=cfg.BLOCK_K, NT=cfg.NT, A1_COLS=cfg.NE_P if cfg.NT == 1 else cfg.C, D_CHUNK=min(cfg.D_P, _D_CHUNK),
             PRECISION=cfg.precision, NATIVE_DOT=cfg.native_dot, PIECES=cfg.pieces,
             TF32_SPLIT=cfg.tf32_split, INTERPRET=_interpreting(), E_PARTS=cfg.e_parts, ROW_BLOCK=_ROW_BLOCK,
             J_BLOCK=_J_BLOCK, RESCALE=_RESCALE),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, order=("group", "split", "row"))
    return [pass_]


def _bwd_j_block(blocks: int) -> int:
    """The backward's CE / KL blocks per step: all of a plan's, as far as `_BWD_TERMS` allows."""
    return min(_pow2(blocks, floor=16), _BWD_TERMS // _BWD_D_BLOCK)


def _backward_launch(cfg: _Config, E, vecs, pos_k, tau, kd_T, saved, g_ce, g_kl, dE) -> KernelLaunch:
    NE, B, D = E.shape
    stats, acc, rows = saved
    d_block = min(cfg.D_P, _BWD_D_BLOCK)
    return KernelLaunch.of(
        "bank.backward", _bank_bwd_kernel, (B * NE * (cfg.D_P // d_block),),
        (acc, rows, stats, g_ce, g_kl, dE, *vecs, B, D, NE, 1.0 / tau, 1.0 / kd_T),
        dict(NC=g_ce.shape[0], NK=g_kl.shape[0], POS_K=pos_k, NE_P=cfg.NE_P, N_P=cfg.N_P, D_P=cfg.D_P,
             D_BLOCK=d_block, J_CE=_bwd_j_block(g_ce.shape[0]), J_KL=_bwd_j_block(g_kl.shape[0])),
        num_warps=_BWD_WARPS, num_stages=1, order=("d_block", "embedding", "row"))


def _buffers(cfg: _Config, B: int, n_ce: int, n_kl: int, device) -> tuple[tuple, tuple]:
    """(workspace, outputs). Outputs: ce, kl, stats [B, 6, C], normalised sums [B, rows, D_P], rows [B, 2, N_P, D_P]
    (column 0 and the positives' sum per bank). With one split the pass writes its sums straight into the output.
    Workspace: partial statistics and sums per split, one zeroed ticket per row (the merge's arrival count,
    `_tickets`), and each program's parts of its row of E (bf16 pieces or tf32 parts, `_split_rows`)."""
    f32 = dict(dtype=torch.float32, device=device)
    outs = (torch.empty(n_ce, B, **f32), torch.empty(n_kl, B, **f32), torch.empty(B, _NSTAT, cfg.C, **f32),
            torch.empty(B, cfg.rows, cfg.D_P, **f32), torch.empty(B, 2, cfg.N_P, cfg.D_P, **f32))
    pacc = outs[3][None] if cfg.splits == 1 else torch.empty(cfg.splits, B, cfg.rows, cfg.D_P, **f32)
    parts = torch.empty(B * cfg.splits * cfg.groups, cfg.e_parts, cfg.NE_P, cfg.D_P, device=device,
                        dtype=torch.bfloat16 if cfg.pieces else torch.float32)       # empty when E goes as it is
    work = (torch.empty(cfg.splits, B, 4, cfg.C, **f32), pacc, _tickets(B, device), parts)
    return work, outs


_TICKETS: dict[tuple, Tensor] = {}


def _tickets(B: int, device: torch.device) -> Tensor:
    """B zeroed int32 arrival counters. The program that merges a row sets its counter back to zero, so one buffer per
    device and stream serves every launch on that stream without a memset of its own; a launch being captured into a
    CUDA graph gets a buffer of its own, zeroed by a memset captured with it."""
    if device.type == "meta" or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        return torch.zeros(B, dtype=torch.int32, device=device)
    key = (device, torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None)
    buf = _TICKETS.get(key)
    if buf is None or buf.numel() < B:
        buf = _TICKETS[key] = torch.zeros(B, dtype=torch.int32, device=device)
    return buf[:B]


def launches(E_shape: tuple[int, int, int], n_banks: int, n_rows: int, K: int, n_ce: int, n_kl: int, *,
             dtype: torch.dtype = torch.float32, bank_dtype: torch.dtype | None = None,
             idx_dtype: torch.dtype = torch.int64, pos_k: int = 1, tau: float = 0.07, kd_T: float = 3.0,
             input_precision: str | None = None, device_capability: tuple[int, int] = (9, 0),
             sm_count: int = ASSUMED_SM_COUNT, block_k: int = 0, split_k: int = 0,
             tuning: Tuning | None = None) -> list[KernelLaunch]:
    """Every kernel launch of one forward + backward call of `bank_rows` (E of shape `E_shape` and `dtype`, `n_banks`
    banks of `n_rows` rows, idx [B, K], `n_ce` CE and `n_kl` KL blocks) on a GPU of `device_capability` with
    `sm_count` SMs, as the launcher issues them (the same code path; tensors live on the `meta` device). `tuning`:
    a point of the configuration space (default: the space's first candidate for this GPU, bank dtype and B)."""
    NE, B, D = E_shape
    bank_dtype = bank_dtype or dtype
    cfg = _config(NE, n_banks, B, K, D, dtype, bank_dtype, input_precision, device_capability, sm_count, block_k,
                  split_k, tuning)
    meta = torch.device("meta")
    E = torch.empty(E_shape, dtype=dtype, device=meta)
    banks = torch.empty(n_banks, n_rows, D, dtype=bank_dtype, device=meta)
    idx = torch.empty(B, K, dtype=idx_dtype, device=meta)
    ce_v = [torch.empty(n_ce, dtype=torch.int64, device=meta)] * 2 + [torch.empty(n_ce, dtype=torch.bool,
                                                                                  device=meta)]
    kl_v = [torch.empty(n_kl, dtype=torch.int64, device=meta)] * 4 + [torch.empty(n_kl, dtype=torch.bool,
                                                                                  device=meta)]
    vecs = tuple(ce_v + kl_v)
    work, outs = _buffers(cfg, B, n_ce, n_kl, meta)
    fwd = _forward_launches(cfg, E, banks, idx, vecs, pos_k, tau, kd_T, work, outs)
    dE = torch.empty(E_shape, dtype=torch.float32, device=meta)
    bwd = _backward_launch(cfg, E, vecs, pos_k, tau, kd_T, outs[2:], outs[0], outs[1], dE)
    return fwd + [bwd]


@functools.lru_cache(maxsize=16)
def _device_facts(device: torch.device) -> tuple[tuple[int, int], int]:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return (props.major, props.minor), props.multi_processor_count
    return (9, 0), ASSUMED_SM_COUNT


def _device_config(E: Tensor, n_banks: int, bank_dtype: torch.dtype, K: int, input_precision: str, block_k: int,
                   split_k: int, tuning: list[int] = ()) -> _Config:
    NE, B, D = E.shape
    capability, sms = _device_facts(E.device)
    return _config(NE, n_banks, B, K, D, E.dtype, bank_dtype, input_precision or None, capability, sms, block_k,
                   split_k, Tuning(*tuning) if tuning else None)


# ----------------------------------------------------------------------------------------------------------------
# custom ops (usable inside torch.compile: docs/kernels/bank.md "Host side")
# ----------------------------------------------------------------------------------------------------------------

def _check(E, banks, idx, ce_u, ce_m, ce_view, kl_su, kl_sm, kl_tu, kl_tm, kl_view, tau, kd_T, pos_k):
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
    for name, v in (("ce_m", ce_m), ("ce_view", ce_view)):
        if v.shape != ce_u.shape:
            raise ValueError(f"bank_rows kernel: {name} has shape {list(v.shape)}, ce_u {list(ce_u.shape)}")
    for name, v in (("kl_sm", kl_sm), ("kl_tu", kl_tu), ("kl_tm", kl_tm), ("kl_view", kl_view)):
        if v.shape != kl_su.shape:
            raise ValueError(f"bank_rows kernel: {name} has shape {list(v.shape)}, kl_su {list(kl_su.shape)}")
    for name, t in (("banks", banks), ("idx", idx), ("ce_u", ce_u), ("kl_su", kl_su)):
        if t.device != E.device:
            raise ValueError(f"bank_rows kernel: {name} is on {t.device}, E on {E.device}")


def _vectors(*vecs: Tensor) -> tuple[Tensor, ...]:
    return tuple(v.contiguous() for v in vecs)


@torch.library.custom_op("fastmcl::bank_rows", mutates_args=())
def _bank_rows_op(E: Tensor, banks: Tensor, idx: Tensor, ce_u: Tensor, ce_m: Tensor, ce_view: Tensor,
                  kl_su: Tensor, kl_sm: Tensor, kl_tu: Tensor, kl_tm: Tensor, kl_view: Tensor, tau: float,
                  kd_T: float, pos_k: int, input_precision: str, block_k: int, split_k: int,
                  tuning: list[int]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    _check(E, banks, idx, ce_u, ce_m, ce_view, kl_su, kl_sm, kl_tu, kl_tm, kl_view, tau, kd_T, pos_k)
    n_ce, n_kl = ce_u.shape[0], kl_su.shape[0]
    E, banks, idx = E.contiguous(), banks.detach().contiguous(), idx.contiguous()
    vecs = _vectors(ce_u, ce_m, ce_view, kl_su, kl_sm, kl_tu, kl_tm, kl_view)

    def forward(cfg: _Config) -> tuple:
        work, outs = _buffers(cfg, E.shape[1], n_ce, n_kl, E.device)
        if E.shape[1]:
            for launch in _forward_launches(cfg, E, banks, idx, vecs, pos_k, tau, kd_T, work, outs):
                launch.launch()
        return outs

    def config(tuning: Tuning | None) -> _Config:
        return _device_config(E, banks.shape[0], banks.dtype, idx.shape[1], input_precision, block_k, split_k,
                              astuple(tuning) if tuning else ())

    chosen = Tuning(*tuning) if tuning else None
    if chosen is None and not (block_k or split_k) and E.shape[1] and wants_timing(E.device):
        chosen = _timed_tuning(E, banks, idx, input_precision, lambda t: forward(config(t)))
    return forward(config(chosen))


def _timed_tuning(E: Tensor, banks: Tensor, idx: Tensor, input_precision: str, run) -> Tuning:
    """The fastest candidate of the configuration space for this GPU and these shapes (`kernels/tuning.py`)."""
    key, candidates = _tuning_key(E.device, tuple(E.shape), E.dtype, tuple(banks.shape), banks.dtype, idx.shape[1],
                                  input_precision, torch.get_float32_matmul_precision())
    return candidates[timed_choice(key, candidates, run, E.device)] if key else candidates[0]


@functools.lru_cache(maxsize=64)
def _tuning_key(device: torch.device, E_shape: tuple, E_dtype: torch.dtype, banks_shape: tuple,
                bank_dtype: torch.dtype, K: int, input_precision: str, matmul_precision: str) -> tuple:
    """(the timed choice's cache key, or None where there is one candidate; the candidates), made once per shapes.
    `matmul_precision` (torch's, which `default_precision` reads) is an argument only so that it keys the memo."""
    NE, B, D = E_shape
    capability, sms = _device_facts(device)
    precision = input_precision or default_precision(capability)
    NE_P, N_P, _ = _padded(NE, banks_shape[0], D)
    candidates = tunings(capability, bank_dtype, NE_P * N_P, precision)
    if len(candidates) == 1:
        return None, candidates
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return (f"bank_rows {gpu} sm{capability[0]}{capability[1]}x{sms} E{E_shape} {E_dtype} banks{banks_shape} "
            f"{bank_dtype} K{K} {precision} {candidates}"), candidates


@_bank_rows_op.register_fake
def _(E, banks, idx, ce_u, ce_m, ce_view, kl_su, kl_sm, kl_tu, kl_tm, kl_view, tau, kd_T, pos_k,
      input_precision, block_k, split_k, tuning):
    _check(E, banks, idx, ce_u, ce_m, ce_view, kl_su, kl_sm, kl_tu, kl_tm, kl_view, tau, kd_T, pos_k)
    NE, B, D = E.shape
    cfg = _config(NE, banks.shape[0], B, idx.shape[1], D, E.dtype, banks.dtype, input_precision or None, (9, 0),
                  ASSUMED_SM_COUNT, block_k, split_k, Tuning(*tuning) if tuning else None)   # shapes: GPU-independent
    f32 = dict(dtype=torch.float32)
    return (E.new_empty(ce_u.shape[0], B, **f32), E.new_empty(kl_su.shape[0], B, **f32),
            E.new_empty(B, _NSTAT, cfg.C, **f32), E.new_empty(B, cfg.rows, cfg.D_P, **f32),
            E.new_empty(B, 2, cfg.N_P, cfg.D_P, **f32))


@torch.library.custom_op("fastmcl::bank_rows_backward", mutates_args=())
def _bank_rows_backward_op(g_ce: Tensor, g_kl: Tensor, stats: Tensor, acc: Tensor, rows: Tensor, E: Tensor,
                           ce_u: Tensor, ce_m: Tensor, ce_view: Tensor, kl_su: Tensor, kl_sm: Tensor, kl_tu: Tensor,
                           kl_tm: Tensor, kl_view: Tensor, tau: float, kd_T: float, pos_k: int,
                           input_precision: str) -> Tensor:
    # the backward kernel's sizes depend on E and the padded bank count only (`rows` is [B, 2, N_P, D_P])
    cfg = _device_config(E, rows.shape[2], E.dtype, 1, input_precision, 0, 1)
    # fp32 result, rounded to E's dtype by torch (round-to-nearest; the interpreter's in-kernel cast truncates)
    dE = torch.empty(E.shape, dtype=torch.float32, device=E.device)
    if E.shape[1] == 0:
        return dE.to(E.dtype)
    vecs = _vectors(ce_u, ce_m, ce_view, kl_su, kl_sm, kl_tu, kl_tm, kl_view)
    _backward_launch(cfg, E, vecs, pos_k, tau, kd_T, (stats, acc, rows), g_ce.float().contiguous(),
                     g_kl.float().contiguous(), dE).launch()
    return dE if E.dtype == torch.float32 else dE.to(E.dtype)


@_bank_rows_backward_op.register_fake
def _(g_ce, g_kl, stats, acc, rows, E, ce_u, ce_m, ce_view, kl_su, kl_sm, kl_tu, kl_tm, kl_view, tau, kd_T, pos_k,
      input_precision):
    return torch.empty_like(E, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    (E, banks, idx, ce_u, ce_m, ce_view, kl_su, kl_sm, kl_tu, kl_tm, kl_view, tau, kd_T, pos_k,
     input_precision, block_k, split_k, tuning) = inputs
    # backward reads the saved sums, never the bank or idx (they may change in place after forward)
    ctx.save_for_backward(E, ce_u, ce_m, ce_view, kl_su, kl_sm, kl_tu, kl_tm, kl_view, *output[2:])
    ctx.scalars = (tau, kd_T, pos_k, input_precision)


def _backward(ctx, g_ce, g_kl, *_unused):
    E, ce_u, ce_m, ce_view, kl_su, kl_sm, kl_tu, kl_tm, kl_view, stats, acc, rows = ctx.saved_tensors
    dE = None
    if ctx.needs_input_grad[0]:
        B = E.shape[1]
        if g_ce is None:
            g_ce = E.new_zeros(ce_u.shape[0], B, dtype=torch.float32)
        if g_kl is None:
            g_kl = E.new_zeros(kl_su.shape[0], B, dtype=torch.float32)
        dE = _bank_rows_backward_op(g_ce, g_kl, stats, acc, rows, E, ce_u, ce_m, ce_view, kl_su, kl_sm, kl_tu,
                                    kl_tm, kl_view, *ctx.scalars)
    return (dE,) + (None,) * 17


_bank_rows_op.register_autograd(_backward, setup_context=_setup_context)


def bank_rows(E: Tensor, banks: Tensor, idx: Tensor, ce_u: Tensor, ce_m: Tensor, ce_view: Tensor,
              kl_su: Tensor, kl_sm: Tensor, kl_tu: Tensor, kl_tm: Tensor, kl_view: Tensor, tau: float,
              kd_T: float, pos_k: int, *, input_precision: str | None = None, block_k: int = 0,
              split_k: int = 0, tuning: Tuning | None = None) -> tuple[Tensor, Tensor]:
    """Fused `bank_rows_reference`: returns (ce [Nc, B], kl [Nk, B]) in fp32; gradient flows into E only.

    E [NE, B, D] fp32/bf16/fp16 (fp64 → TypeError), banks [n, N, D] (detached), idx [B, K] int64/int32 (values in
    [0, N), not checked here), index vectors int64 (views bool/int). `input_precision` of the fp32 dots: None follows
    `torch.get_float32_matmul_precision()` (`default_precision`); "ieee" is fp32-exact. `block_k` (0 = automatic,
    else a power of two ≥ 8) and `split_k` (0 = automatic, else the number of programs per row along K) override the heuristics;
    `tuning` picks a point of `CONFIG_SPACE`; by default the fastest candidate for the GPU and shapes, timed once and
    cached (`kernels/tuning.py`), or the space's first where nothing is timed (deterministic runs, CPU).
    """
    ce, kl, *_ = _bank_rows_op(E, banks.detach(), idx, ce_u, ce_m, ce_view, kl_su, kl_sm, kl_tu, kl_tm, kl_view,
                               float(tau), float(kd_T), int(pos_k), input_precision or "", int(block_k),
                               int(split_k), list(astuple(tuning)) if tuning else [])
    return ce, kl
