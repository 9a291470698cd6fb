"""Memory-bank contrastive rows at ImageNet shape: reference (K-streamed) vs the fused Triton op.

ImageNet L-MCL (spec/lmcl.md §4.2): 2 networks × 4 stages (NE = 8 embeddings, n = 2 banks), B = 256, K = 8194,
D = 128, τ = 0.07, T = 3, pos_k = 1; forward + backward w.r.t. E (the bank is never differentiated).

On CUDA: time and peak memory of `bank_rows_reference(..., k_chunk=1024)` and of `fastmcl.kernels.bank_rows`
(pytest-benchmark), plus the achieved bandwidth against the analytic floor. Without a GPU the measured rows are
skipped and only the analytic table is printed (bytes moved and FLOPs of the kernel), so a GPU user can compare.
Not part of `make test`; run `make bench` (or `pytest benchmarks/bench_bank_kernel.py --benchmark-only -s`).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastmcl.losses import lmcl_plan
from fastmcl.losses.cohort_terms import _plan_indices, bank_rows_reference

B, K, D, STAGES, N_ROWS = 256, 8194, 128, 4, 1_281_167
TAU, KD_T, POS_K, K_CHUNK = 0.07, 3.0, 1, 1024
CUDA = torch.cuda.is_available()
ROWS: list[tuple[str, str, str, str]] = []          # (path, time, peak memory, note) for the closing table


def analytic(NE: int = 2 * STAGES, n: int = 2, bytes_per: int = 4) -> dict[str, float]:
    """Roofline floor of the fused op, forward + backward (bank rows are gathered once per pass)."""
    gather = n * B * K * D * bytes_per                       # every bank row of every anchor, one pass
    idx = B * K * 8
    fwd_bytes, bwd_bytes = gather + idx, gather + idx
    fwd_flops = 2 * NE * n * B * K * D                       # logits of all (embedding, bank) combos
    bwd_flops = 2 * fwd_flops                                # recompute + dE
    ne_pad = max(16, 1 << (NE - 1).bit_length())             # tl.dot pads the embedding dim to ≥ 16
    return dict(fwd_bytes=fwd_bytes, bwd_bytes=bwd_bytes, fwd_flops=fwd_flops, bwd_flops=bwd_flops,
                pad_factor=ne_pad / NE,
                ref_logits_bytes=NE * n * B * K * 4,         # [NE, n, B, K] fp32 the reference keeps alive
                naive_gather_bytes=B * K * D * 4)            # one [B, K, D] fp32 gather (128 of them naively)


@pytest.fixture(scope="module", autouse=True)
def table():
    yield
    a = analytic()
    gb, gf = 1e9, 1e9
    print(f"\n\nbank rows, ImageNet shape: B={B} K={K} D={D}, {2 * STAGES} embeddings × 2 banks, fwd+bwd")
    print(f"  analytic floor (fused): gathers {a['fwd_bytes'] / gb:.2f} GB fwd + {a['bwd_bytes'] / gb:.2f} GB bwd; "
          f"FLOPs {a['fwd_flops'] / gf:.1f} G fwd + {a['bwd_flops'] / gf:.1f} G bwd "
          f"(×{a['pad_factor']:.0f} executed: embedding dim padded to 16 for tl.dot)")
    print(f"  H100 SXM floor: {(a['fwd_bytes'] + a['bwd_bytes']) / 3.35e12 * 1e3:.2f} ms at 3.35 TB/s; "
          f"{(a['fwd_flops'] + a['bwd_flops']) * a['pad_factor'] / 67e12 * 1e3:.2f} ms of fp32 FMA at 67 TFLOP/s")
    print(f"  reference keeps [NE, n, B, K] logits: {a['ref_logits_bytes'] / 1e6:.0f} MB; "
          f"one naive [B, K, D] gather: {a['naive_gather_bytes'] / 1e9:.2f} GB")
    print(f"  {'path':<28}{'time / step':>14}{'peak memory':>16}  note")
    for path, t, mem, note in ROWS:
        print(f"  {path:<28}{t:>14}{mem:>16}  {note}")


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
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (the analytic table is printed regardless)")
def test_reference_streamed(benchmark):
    E, banks, idx, vecs, gce, gkl = _inputs("cuda")

    def fn():
        ce, kl = bank_rows_reference(E, banks, idx, *vecs, TAU, KD_T, POS_K, k_chunk=K_CHUNK)
        torch.autograd.grad((ce * gce).sum() + (kl * gkl).sum(), E)

    _measure(benchmark, f"reference k_chunk={K_CHUNK}", fn)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (the analytic table is printed regardless)")
@pytest.mark.parametrize("precision", ["ieee", "tf32"])
def test_triton_fused(benchmark, precision):
    from fastmcl import kernels
    E, banks, idx, vecs, gce, gkl = _inputs("cuda")

    def fn():
        ce, kl = kernels.bank_rows(E, banks, idx, *vecs, TAU, KD_T, POS_K, input_precision=precision)
        torch.autograd.grad((ce * gce).sum() + (kl * gkl).sum(), E)

    mean = _measure(benchmark, f"triton ({precision})", fn)
    a = analytic()
    ROWS[-1] = ROWS[-1][:3] + (f"{(a['fwd_bytes'] + a['bwd_bytes']) / mean / 1e12:.2f} TB/s of gathers",)


def test_analytic_floor(benchmark):
    """Runs everywhere (also under --benchmark-only): the numbers a GPU run is compared with."""
    a = benchmark.pedantic(analytic, rounds=1, iterations=1)
    assert a["fwd_bytes"] == 2 * B * K * D * 4 + B * K * 8
    if not CUDA:
        ROWS.append(("triton (analytic, no GPU)", "-", f"{3 * B * 16 * 2 * 4 / 1e3:.0f} kB stats",
                     "saved for backward: [3, B, C] stats + the inputs"))
