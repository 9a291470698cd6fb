"""Memory-bank contrastive rows at ImageNet shape: the fused Triton op's roofline, and (on CUDA) its measured time.

ImageNet L-MCL (spec/lmcl.md §4.2): 2 networks × 4 stages (NE = 8 embeddings, n = 2 banks), K = 8194, D = 128,
τ = 0.07, T = 3, pos_k = 1; forward + backward w.r.t. E (the bank is never differentiated). B = 256 rows on one GPU,
or 32 per GPU when 8 GPUs share a global batch of 256.

Roofline (runs anywhere, no GPU needed): bytes moved and FLOPs per call as the kernels execute them, from the launch
configuration the op really uses (`fastmcl.kernels.bank_contrastive.launches`), for the single-pass kernel (AFTER)
and the previous two-pass kernel that gathered the bank again in backward (BEFORE), beside the memory floor of a
single pass on H100, H200 and A100. `python benchmarks/bench_bank_kernel.py` prints the table and writes
benchmarks/results/bank_roofline.{md,json}; so does the `test_roofline` benchmark.
On CUDA: time and peak memory of `bank_rows_reference(..., k_chunk=1024)` and of `fastmcl.kernels.bank_rows` at both
precisions (pytest-benchmark), with the achieved DRAM bandwidth against the model. Not part of `make test`; run
`make bench BENCH=benchmarks/bench_bank_kernel.py`.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fastmcl.losses import lmcl_plan
from fastmcl.losses.cohort_terms import _plan_indices, bank_rows_reference

B, K, D, STAGES, N_ROWS = 256, 8194, 128, 4, 1_281_167
B_PER_GPU = 32                                          # 8 GPUs sharing a global batch of B
TAU, KD_T, POS_K, K_CHUNK = 0.07, 3.0, 1, 1024
CUDA = torch.cuda.is_available()
RESULTS = Path(__file__).resolve().parent / "results"
# HBM bandwidth (bytes/s) and dense tensor-core TF32 / BF16 throughput (FLOP/s) from the vendors' data sheets
GPUS = {"H100 SXM": dict(bw=3.35e12, tf32=494.7e12, bf16=989.4e12, sms=132, cc=(9, 0)),
        "H200 SXM": dict(bw=4.8e12, tf32=494.7e12, bf16=989.4e12, sms=132, cc=(9, 0)),
        "A100 80GB SXM": dict(bw=2.039e12, tf32=156e12, bf16=312e12, sms=108, cc=(8, 0))}
ROWS: list[tuple[str, str, str, str]] = []          # (path, time, peak memory, note) for the closing table


def _plan_sizes():
    plan = lmcl_plan([STAGES, STAGES])
    return plan.num_embeddings, 2, len(plan.ce_blocks), len(plan.kl_blocks)


def single_pass(rows: int, bank_bytes: int = 4, sm_count: int = 132, cc: tuple[int, int] = (9, 0)) -> dict:
    """Bytes and FLOPs of one forward + backward of the single-pass op on `rows` anchor rows, counted from the launch
    configuration it uses. DRAM bytes assume that the logit dot's D-chunk reads of rows the same loop iteration has
    just loaded whole (the target banks') hit L1, and count every other gathered row once per group."""
    from fastmcl.kernels import bank_contrastive as bc
    NE, n, NC, NK = _plan_sizes()
    dtype = torch.float32 if bank_bytes == 4 else torch.bfloat16
    L = bc.launches((NE, rows, D), n, N_ROWS, K, NC, NK, dtype=dtype, pos_k=POS_K, device_capability=cc,
                    sm_count=sm_count)
    c = L[0].constexprs
    NE_P, N_P, D_P, BK, NT = c["NE_P"], c["N_P"], c["D_P"], c["BLOCK_K"], c["NT"]
    a1_cols = c["A1_COLS"]
    _, splits, groups = L[0].grid
    C = NE_P * N_P
    sum_rows = C + n * C                              # accumulator rows written per (row, split): own τ + all (τ·T)
    k_split = math.ceil(K / splits)
    tiles = splits * math.ceil(k_split / BK)          # loop iterations per (row, group), ragged edge included
    gathers = groups * n * rows * K * D * bank_bytes  # every bank row of every anchor, once per group
    idx = groups * rows * K * 8
    partials = rows * splits * (4 * C * 4 + sum_rows * D * 4)
    fwd_bytes = (gathers + idx + partials                              # pass: reads, partial sums written
                 + partials + rows * sum_rows * D * 4                  # merge: partial sums read, normalised written
                 + rows * n * (1 + POS_K) * D * bank_bytes + rows * NE * D * bank_bytes
                 + rows * (6 * C * 4 + (NC + NK) * 4))
    bwd_bytes = rows * sum_rows * D * 4 + rows * (6 * C + NC + NK) * 4 + rows * NE * D * 4    # sums in, dE out
    logit_flops = rows * groups * tiles * 2 * NE_P * N_P * BK * D_P
    sum_flops = rows * groups * tiles * 2 * NT * D_P * BK * (a1_cols + C)
    fwd_flops = logit_flops + sum_flops
    bwd_flops = rows * 2 * NE_P * D_P * 16 * (math.ceil(NC / 16) + math.ceil(NK / 16))   # routing dots
    return dict(rows=rows, splits=splits, groups=groups, BLOCK_K=BK, NT=NT, fwd_bytes=fwd_bytes,
                bwd_bytes=bwd_bytes, bytes=fwd_bytes + bwd_bytes, fwd_flops=fwd_flops, bwd_flops=bwd_flops,
                flops=fwd_flops + bwd_flops, logit_flops=logit_flops,
                precision=L[0].constexprs["PRECISION"], native_dot=L[0].constexprs["NATIVE_DOT"])


def two_pass(rows: int, bank_bytes: int = 4) -> dict:
    """The previous kernel: forward gathers every bank row, backward gathers them again to recompute the logits
    (grid (B,), E padded to 16 rows, fp32 FMA dots at its default "ieee" precision)."""
    NE, n, NC, NK = _plan_sizes()
    C = 16 * n
    gathers = n * rows * K * D * bank_bytes
    idx = rows * K * 8
    stats = rows * 3 * C * 4
    fwd_bytes = gathers + idx + rows * NE * D * bank_bytes + stats + rows * (NC + NK) * 4
    bwd_bytes = gathers + idx + rows * NE * D * bank_bytes + stats + rows * NE * D * 4
    logits = 2 * 16 * n * rows * K * D
    return dict(rows=rows, fwd_bytes=fwd_bytes, bwd_bytes=bwd_bytes, bytes=fwd_bytes + bwd_bytes,
                fwd_flops=logits, bwd_flops=2 * logits + 2 * C * C * rows * K, flops=3 * logits + 2 * C * C * rows * K)


def floor(rows: int, bank_bytes: int = 4) -> int:
    """Bytes no single-pass implementation avoids: each gathered bank row and index once, E in, dE out."""
    NE, n, _, _ = _plan_sizes()
    return n * rows * K * D * bank_bytes + rows * K * 8 + rows * NE * D * (bank_bytes + 4)


def roofline() -> list[dict]:
    """One record per (GPU, rows per GPU, bank dtype): model bytes/FLOPs before and after, floors, ratios."""
    out = []
    for gpu, g in GPUS.items():
        for rows in (B, B_PER_GPU):
            for bank_bytes, dname in ((4, "fp32"), (2, "bf16")):
                after = single_pass(rows, bank_bytes, g["sms"], g["cc"])
                before = two_pass(rows, bank_bytes)
                fl = floor(rows, bank_bytes)
                logit_rate = g["bf16"] if after["native_dot"] else g["tf32"] / 3     # tf32x3: three MMAs
                tc_s = after["logit_flops"] / logit_rate + (after["flops"] - after["logit_flops"]) / (g["tf32"] / 3)
                rec = dict(gpu=gpu, rows=rows, bank=dname, floor_bytes=fl, floor_ms=fl / g["bw"] * 1e3,
                           after_bytes=after["bytes"], after_mem_ms=after["bytes"] / g["bw"] * 1e3,
                           after_ratio=after["bytes"] / fl, after_flops=after["flops"],
                           after_tc_ms=tc_s * 1e3, splits=after["splits"], groups=after["groups"],
                           block_k=after["BLOCK_K"], precision=after["precision"],
                           before_bytes=before["bytes"], before_mem_ms=before["bytes"] / g["bw"] * 1e3,
                           before_ratio=before["bytes"] / fl, before_flops=before["flops"],
                           before_fma_ms=before["flops"] / (g["tf32"] / 8) * 1e3)
                out.append(rec)
    return out


def markdown(records: list[dict]) -> str:
    lines = [f"# Memory-bank kernel roofline: ImageNet L-MCL, {2 * STAGES} embeddings × 2 banks, K = {K}, D = {D}, "
             f"forward + backward",
             "",
             "Analytic model from the launch configuration the op uses (`benchmarks/bench_bank_kernel.py`). Bytes are "
             "DRAM traffic; floor = each gathered bank row and index read once, E in, dE out. BEFORE = the two-pass "
             "kernel (backward gathers the bank again, fp32 FMA dots); AFTER = the single-pass kernel (dE's "
             "weighted sums accumulated in forward, tensor-core dots: tf32x3 for the sums; bf16 banks feed the logit "
             "dot natively). Tensor-core time at dense TF32 peak / 3 (tf32x3 issues three MMAs); FMA time at the "
             "TF32 peak / 8 (fp32 FMA throughput of these GPUs).",
             "",
             "| GPU | rows/GPU | bank | floor GB | floor ms | BEFORE GB | BEFORE ms | BEFORE/floor | AFTER GB | "
             "AFTER ms | AFTER/floor | AFTER GFLOP | AFTER tensor-core ms | splits × groups, BLOCK_K |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['gpu']} | {r['rows']} | {r['bank']} | {r['floor_bytes'] / 1e9:.3f} | "
                     f"{r['floor_ms']:.3f} | {r['before_bytes'] / 1e9:.3f} | {r['before_mem_ms']:.3f} | "
                     f"{r['before_ratio']:.2f}× | {r['after_bytes'] / 1e9:.3f} | {r['after_mem_ms']:.3f} | "
                     f"{r['after_ratio']:.3f}× | {r['after_flops'] / 1e9:.1f} | {r['after_tc_ms']:.3f} | "
                     f"{r['splits']} × {r['groups']}, {r['block_k']} |")
    return "\n".join(lines) + "\n"


def write_results(records: list[dict]) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bank_roofline.json").write_text(json.dumps(records, indent=1) + "\n")
    (RESULTS / "bank_roofline.md").write_text(markdown(records))


def test_roofline(benchmark):
    """Runs everywhere (also under --benchmark-only): the model a GPU run is compared with; the single pass stays
    within 1.15× of its floor and the two-pass kernel is about twice it."""
    records = benchmark.pedantic(roofline, rounds=1, iterations=1)
    write_results(records)
    for r in records:
        assert r["after_ratio"] <= 1.15, r
        assert r["before_ratio"] >= 1.9, r
    ROWS.extend((f"model {r['gpu']} B={r['rows']} {r['bank']}", f"{r['after_mem_ms']:.3f} ms",
                 "-", f"{r['after_ratio']:.3f}× floor; before {r['before_mem_ms']:.3f} ms")
                for r in records if r["gpu"] == "H100 SXM")


@pytest.fixture(scope="module", autouse=True)
def table():
    yield
    print(f"\n\nbank rows, ImageNet shape: K={K} D={D}, {2 * STAGES} embeddings × 2 banks, fwd+bwd")
    print(f"  {'path':<34}{'time / step':>14}{'peak memory':>16}  note")
    for path, t, mem, note in ROWS:
        print(f"  {path:<34}{t:>14}{mem:>16}  {note}")


def _inputs(device):
    g = torch.Generator().manual_seed(0)
    plan = lmcl_plan([STAGES, STAGES])
    E = F.normalize(torch.randn(plan.num_embeddings, B, D, generator=g), dim=-1).to(device).requires_grad_()
    banks = F.normalize(torch.randn(2, N_ROWS, D, device=device), dim=-1)
    idx = torch.randint(0, N_ROWS, (B, K), device=device)
    ix = _plan_indices(plan, torch.device(device))
    net_of = ix["net_of"]
    vecs = (ix["ce_u"], net_of[ix["ce_v"]], ix["ce_is_view"], ix["kl_su"], net_of[ix["kl_sv"]], ix["kl_tu"],
            net_of[ix["kl_tv"]], ix["kl_is_view"])
    gce = torch.rand(len(plan.ce_blocks), B, device=device)
    gkl = torch.rand(len(plan.kl_blocks), B, device=device)
    return E, banks, idx, vecs, gce, gkl


def _measure(benchmark, name, fn, note=""):
    torch.cuda.synchronize()
    fn()                                                      # warm-up / compile
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base

    def step():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(step, rounds=10, iterations=1, warmup_rounds=2)
    mean = benchmark.stats.stats.mean
    ROWS.append((name, f"{mean * 1e3:.2f} ms", f"{peak / 1e6:.0f} MB", note))
    return mean


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (the roofline model runs regardless)")
def test_reference_streamed(benchmark):
    E, banks, idx, vecs, gce, gkl = _inputs("cuda")

    def fn():
        ce, kl = bank_rows_reference(E, banks, idx, *vecs, TAU, KD_T, POS_K, k_chunk=K_CHUNK)
        torch.autograd.grad((ce * gce).sum() + (kl * gkl).sum(), E)

    _measure(benchmark, f"reference k_chunk={K_CHUNK}", fn)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (the roofline model runs regardless)")
@pytest.mark.parametrize("precision", ["ieee", "default"])
def test_triton_fused(benchmark, precision):
    from fastmcl import kernels
    E, banks, idx, vecs, gce, gkl = _inputs("cuda")
    kw = {} if precision == "default" else {"input_precision": precision}

    def fn():
        ce, kl = kernels.bank_rows(E, banks, idx, *vecs, TAU, KD_T, POS_K, **kw)
        torch.autograd.grad((ce * gce).sum() + (kl * gkl).sum(), E)

    mean = _measure(benchmark, f"triton ({precision})", fn)
    props = torch.cuda.get_device_properties(0)
    model = single_pass(B, 4, props.multi_processor_count, (props.major, props.minor))
    ROWS[-1] = ROWS[-1][:3] + (f"{model['bytes'] / mean / 1e12:.2f} TB/s of the modelled DRAM bytes",)


if __name__ == "__main__":
    recs = roofline()
    write_results(recs)
    sys.stdout.write(markdown(recs))
