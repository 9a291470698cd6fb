"""The fused memory-bank kernel (`fastmcl.kernels.bank_rows`) against its contract `bank_rows_reference`.

Runs under TRITON_INTERPRET=1 on CPU (own pytest process, `-m interpreter`; see the Makefile) or on a CUDA GPU;
skips otherwise. Every check compares values and the gradient w.r.t. E under a random upstream gradient on both
the ce and the kl rows.

Covering design of `test_matches_reference` (each value of each axis appears at least once; 8 cases instead of the
3·3·2·4·3·2 = 432 cartesian product, to keep the interpreter run short):

    case  B   K     D    stages  dtype  pos_k
     1    1   3     16   1       fp32   1
     2    7   129   128  2       fp32   2
     3    32  1000  16   3       fp32   1
     4    7   1000  128  4       fp32   2
     5    32  129   16   4       bf16   2
     6    1   1000  128  3       bf16   1
     7    7   3     16   1       fp16   1
     8    32  129   128  2       fp16   2

K = 129 and 1000 are not multiples of any BLOCK_K; `test_explicit_block_k` forces BLOCK_K 16 and 64 and a pos_k
spanning two tiles. `test_plans` runs the plans of the GPU scenarios (`lmcl_plan([4, 4])`, `lmcl_plan([4, 4, 4, 4])`,
`mcl_plan(8)`, plus `mcl_plan(3)`: 3 banks padded to 4) at shrunk B and K, at D where one program serves all
target banks and where the banks are split across programs, with the K range split over programs and not.

Tolerances. fp32 with `input_precision="ieee"`: max |got − ref| ≤ 1e-5 · max |ref| per output (ce, kl, dE), and
elementwise rtol 1e-5. bf16/fp16 inputs: the kernel computes in fp32 from the same values, so it is compared with the
reference on the values upcast to fp32: ce/kl at the fp32 tolerance; dE is returned in the input dtype, so its
tolerance is that dtype's rounding (bf16: 2⁻⁸ relative, fp16: 2⁻¹⁰ relative, of max |dE|). The default precision
(tf32x3 on sm_80+) splits each fp32 operand into two tf32 parts, rounded by their bits, and drops the low × low
product (≈ 2⁻²¹ relative per product), so `test_default_precision` allows 2e-5; the interpreter evaluates every dot
in fp32 (it ignores the precision), so there this test checks the split's arithmetic and a GPU run checks tf32x3's
error. A bf16 bank's dots split the fp32 operand into bf16 pieces instead (docs/kernels/bank.md "bf16 banks"), which
the interpreter rounds as a GPU does: 3 pieces carry fp32's 24 bits (the ieee tolerance, 1e-5), 2 pieces 16 bits
(≈ 2⁻¹⁷ relative per product; measured ≤ 1.2e-5, allowed 1e-4, where one piece, plain bf16, errs by ~1e-3 and plain
tf32 by ~2e-4).
`torch.compile` (fullgraph) runs with backend="aot_eager" (traces forward and backward through the custom ops and
their fake implementations) and with the default "inductor" (≈20 s on this CPU: it compiles the surrounding C++).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = [
    pytest.mark.interpreter,
    pytest.mark.skipif(not INTERP and not torch.cuda.is_available(),
                       reason="Triton kernels need a CUDA GPU or TRITON_INTERPRET=1 (run: make test)"),
]
DEVICE = "cpu" if INTERP or not torch.cuda.is_available() else "cuda"

from fastmcl.losses import cohort_bank_contrastive_terms, lmcl_plan, mcl_plan  # noqa: E402
from fastmcl.losses.cohort_terms import bank_rows_reference  # noqa: E402

TAU, KD_T = 0.07, 3.0
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DE_RTOL = {"fp32": 1e-5, "bf16": 2.0 ** -8, "fp16": 2.0 ** -10}


def kernels():
    triton = pytest.importorskip("triton")  # noqa: F841
    from fastmcl import kernels as k
    return k


def unit(*shape, gen, dtype=torch.float32):
    return F.normalize(torch.randn(*shape, generator=gen), dim=-1).to(dtype).to(DEVICE)


def plan_vectors(plan, device):
    ix = plan.index_tables(device)
    net_of = ix["net_of"]
    return (ix["ce_u"], net_of[ix["ce_v"]], ix["ce_is_view"], ix["kl_su"], net_of[ix["kl_sv"]], ix["kl_tu"],
            net_of[ix["kl_tv"]], ix["kl_is_view"])


def inputs(NE, n, B, K, D, dtype, seed, N=None):
    gen = torch.Generator().manual_seed(seed)
    N = N or max(2 * K, 64)
    E = unit(NE, B, D, gen=gen, dtype=dtype)
    banks = unit(n, N, D, gen=gen, dtype=dtype)
    idx = torch.randint(0, N, (B, K), generator=gen).to(DEVICE)
    # make column 0 (the own row) and the positives resemble the anchor, as in training
    own = F.normalize(E[0].float() + 0.3 * torch.randn(B, D, generator=gen).to(DEVICE), dim=-1)
    banks[:, idx[:, 0]] = own.to(dtype)
    return E, banks, idx, gen


def assert_close(got, want, rtol, name):
    got, want = got.detach().double(), want.detach().double()
    assert got.shape == want.shape, name
    if want.numel() == 0:
        return
    scale = want.abs().max().clamp_min(1e-30)
    err = (got - want).abs().max()
    assert err <= rtol * scale, f"{name}: max error {err:.3e} > {rtol:.0e} · max|ref| ({scale:.3e})"
    assert torch.allclose(got, want, rtol=rtol, atol=float(rtol * scale)), name


def check(E, banks, idx, vecs, pos_k, dtype_name="fp32", seed=0, rtol=None, **kw):
    k = kernels()
    kw.setdefault("input_precision", "ieee")
    rtol = rtol or 1e-5
    E1 = E.detach().clone().requires_grad_()
    E2 = E.detach().float().clone().requires_grad_()
    ce, kl = k.bank_rows(E1, banks, idx, *vecs, TAU, KD_T, pos_k, **kw)
    rce, rkl = bank_rows_reference(E2, banks.float(), idx, *vecs, TAU, KD_T, pos_k)
    assert ce.dtype == kl.dtype == torch.float32
    assert ce.shape == rce.shape and kl.shape == rkl.shape
    gen = torch.Generator().manual_seed(seed + 1)
    gce = (torch.rand(rce.shape, generator=gen) * 2 - 0.5).to(DEVICE)     # random upstream gradient, != 1
    gkl = (torch.rand(rkl.shape, generator=gen) * 2 - 0.5).to(DEVICE)
    (dE,) = torch.autograd.grad((ce * gce).sum() + (kl * gkl).sum(), E1)
    (rdE,) = torch.autograd.grad((rce * gce).sum() + (rkl * gkl).sum(), E2)
    assert dE.dtype == E.dtype and dE.shape == E.shape
    assert_close(ce, rce, rtol, "ce")
    assert_close(kl, rkl, rtol, "kl")
    assert_close(dE, rdE, max(rtol, DE_RTOL[dtype_name]), "dE")


CASES = [  # B, K, D, stages, dtype, pos_k — the covering design in the module docstring
    (1, 3, 16, 1, "fp32", 1),
    (7, 129, 128, 2, "fp32", 2),
    (32, 1000, 16, 3, "fp32", 1),
    (7, 1000, 128, 4, "fp32", 2),
    (32, 129, 16, 4, "bf16", 2),
    (1, 1000, 128, 3, "bf16", 1),
    (7, 3, 16, 1, "fp16", 1),
    (32, 129, 128, 2, "fp16", 2),
]


@pytest.mark.parametrize("B,K,D,S,dtype,pos_k", CASES)
def test_matches_reference(B, K, D, S, dtype, pos_k):
    plan = lmcl_plan([S, S])
    E, banks, idx, _ = inputs(2 * S, 2, B, K, D, DTYPES[dtype], seed=B * 1000 + K + D + S)
    check(E, banks, idx, plan_vectors(plan, DEVICE), pos_k, dtype)


@pytest.mark.parametrize("block_k,pos_k", [(16, 17), (64, 1)])
def test_explicit_block_k(block_k, pos_k):
    """Ragged K against a forced tile size; pos_k = 17 puts the positives across the first two 16-wide tiles."""
    plan = lmcl_plan([2, 2])
    E, banks, idx, _ = inputs(4, 2, 5, 77, 24, torch.float32, seed=7)   # D = 24: padded to 32
    check(E, banks, idx, plan_vectors(plan, DEVICE), pos_k, block_k=block_k)


@pytest.mark.parametrize("split_k", [1, 3])
def test_logits_that_keep_rising_along_k_move_the_softmax_reference(split_k):
    """Bank rows that turn from opposite to each anchor towards it column by column, then away at the end: within one
    program's range the logits pass the softmax reference by more than its headroom several times (docs/kernels/bank.md
    "Lazy rescaling"), and the result still equals the reference."""
    plan = lmcl_plan([2, 2])
    B, K, D = 3, 200, 16
    E, _, _, gen = inputs(plan.num_embeddings, 2, B, K, D, torch.float32, seed=41)
    idx = torch.arange(B * K, device=DEVICE).reshape(B, K)
    other = F.normalize(torch.randn(B, D, generator=gen).to(DEVICE), dim=-1)
    other = F.normalize(other - (other * E[0]).sum(-1, keepdim=True) * E[0], dim=-1)

    def rows(angle):            # bank row of (b, k): at `angle[k]` from anchor b's first embedding
        return (angle.cos()[None, :, None] * E[0][:, None] + angle.sin()[None, :, None] * other[:, None]).reshape(-1, D)

    rising = torch.linspace(math.pi, 0.0, K, device=DEVICE)
    rising[-K // 10:] = math.pi / 2                                       # the last tenth: orthogonal again
    banks = torch.stack([rows(rising), rows(rising.flip(0))])             # the second bank: falling
    check(E, banks, idx, plan_vectors(plan, DEVICE), 1, split_k=split_k)


def test_consecutive_calls_reuse_the_arrival_counters():
    """Calls with K split over programs, one after another on one stream: the program that merges a row leaves its
    arrival counter at zero, so a second call, and one with fewer rows, merge exactly as the first did."""
    k = kernels()
    plan = lmcl_plan([2, 2])
    vecs = plan_vectors(plan, DEVICE)
    E, banks, idx, _ = inputs(plan.num_embeddings, 2, 5, 300, 16, torch.float32, seed=43)
    first = k.bank_rows(E, banks, idx, *vecs, TAU, KD_T, 1, input_precision="ieee", split_k=3)
    second = k.bank_rows(E, banks, idx, *vecs, TAU, KD_T, 1, input_precision="ieee", split_k=3)
    fewer = k.bank_rows(E[:, :2], banks, idx[:2], *vecs, TAU, KD_T, 1, input_precision="ieee", split_k=3)
    for a, b, c in zip(first, second, fewer):
        assert torch.equal(a, b) and torch.equal(a[:, :2], c)


PLANS = {"lmcl44": (lambda: lmcl_plan([4, 4]), 2), "lmcl4444": (lambda: lmcl_plan([4, 4, 4, 4]), 4),
         "mcl8": (lambda: mcl_plan(8), 8), "mcl3": (lambda: mcl_plan(3), 3)}


@pytest.mark.parametrize("plan_name,D,dtype,split_k", [
    ("lmcl44", 128, "fp32", 1),       # ImageNet L-MCL: one program serves both target banks
    ("lmcl44", 128, "bf16", 3),
    ("lmcl4444", 128, "fp32", 2),     # one target bank per program
    ("lmcl4444", 32, "bf16", 1),      # all four target banks in one program
    ("mcl8", 32, "fp32", 1),          # 4 of 8 target banks per program
    ("mcl8", 128, "fp32", 2),         # one target bank per program
    ("mcl3", 48, "fp16", 2),          # 3 banks padded to 4, D padded to 64
])
def test_plans(plan_name, D, dtype, split_k):
    """The plans of the GPU scenarios at shrunk B and K, with K split across programs and not."""
    make, n = PLANS[plan_name]
    plan = make()
    E, banks, idx, _ = inputs(plan.num_embeddings, n, 2, 37, D, DTYPES[dtype], seed=D + n)
    check(E, banks, idx, plan_vectors(plan, DEVICE), 2, dtype, split_k=split_k, block_k=8)


def test_default_precision():
    """The op's default precision (tf32x3 for fp32 on sm_80+), within the tolerance derived in the module docstring."""
    plan = lmcl_plan([2, 2])
    E, banks, idx, _ = inputs(4, 2, 6, 300, 64, torch.float32, seed=13)
    check(E, banks, idx, plan_vectors(plan, DEVICE), 1, rtol=2e-5, input_precision=None)


def test_the_timed_choice_is_a_candidate_made_once_and_kept(tmp_path, monkeypatch):
    """With timing on (a GPU's default; forced here), the first call times the space's candidates for its shapes and
    saves the fastest; the result is the reference's whichever wins, and later calls read the choice."""
    from fastmcl.kernels.bank_contrastive import tunings
    cache = tmp_path / "tuning.json"
    monkeypatch.setenv("FASTMCL_TUNING", "always")
    monkeypatch.setenv("FASTMCL_TUNING_CACHE", str(cache))
    plan = lmcl_plan([2, 2])
    E, banks, idx, _ = inputs(plan.num_embeddings, 2, 5, 70, 32, torch.float32, seed=31)
    check(E, banks, idx, plan_vectors(plan, DEVICE), 1, rtol=2e-5, input_precision=None)
    [(key, chosen)] = json.loads(cache.read_text()).items()
    assert key.startswith("bank_rows") and isinstance(chosen, int), (key, chosen)
    if DEVICE == "cpu":     # the interpreter stands in for an sm_90 GPU: two candidates for 4 × 2 combos
        assert len(tunings((9, 0), torch.float32, 8)) == 2 and chosen in (0, 1)
    written = cache.stat().st_mtime_ns
    check(E, banks, idx, plan_vectors(plan, DEVICE), 1, rtol=2e-5, input_precision=None)
    assert cache.stat().st_mtime_ns == written
    monkeypatch.setenv("FASTMCL_TUNING", "fastest")
    with pytest.raises(ValueError, match="FASTMCL_TUNING"):
        kernels().bank_rows(E, banks, idx, *plan_vectors(plan, DEVICE), TAU, KD_T, 1)


def test_split_k_heuristic_and_launches_are_what_runs(monkeypatch):
    """Few rows split K over a second grid axis, many rows do not; `launches` describes exactly the kernels the op
    issues (names, grids, constexprs, warps, stages) and the split path agrees with the reference."""
    kernels()
    from fastmcl.kernels import launch as launch_mod
    from fastmcl.kernels.bank_contrastive import ASSUMED_SM_COUNT, launches
    plan = lmcl_plan([2, 2])
    vecs = plan_vectors(plan, DEVICE)
    few = launches((4, 32, 16), 2, 500, 8194, len(plan.ce_blocks), len(plan.kl_blocks), sm_count=132)
    many = launches((4, 1024, 16), 2, 500, 8194, len(plan.ce_blocks), len(plan.kl_blocks), sm_count=132)
    assert [x.name for x in few] == ["bank.pass", "bank.backward"]
    from fastmcl.kernels.bank_contrastive import tunings
    slots = 132 * tunings((9, 0), torch.float32, 8)[0].blocks_per_sm      # every resident block slot of sm_90
    assert few[0].grid[0] >= slots and many[0].grid[0] == 1024                  # one group; many rows: no split

    issued = []
    real = launch_mod.KernelLaunch.launch
    monkeypatch.setattr(launch_mod.KernelLaunch, "launch", lambda self: (issued.append(self), real(self))[1])
    E, banks, idx, _ = inputs(4, 2, 2, 2000, 16, torch.float32, seed=17)
    check(E, banks, idx, vecs, 1, seed=17)
    want = launches(tuple(E.shape), 2, banks.shape[1], 2000, len(plan.ce_blocks), len(plan.kl_blocks),
                    input_precision="ieee", sm_count=ASSUMED_SM_COUNT)
    key = lambda x: (x.name, x.grid, x.constexprs, x.num_warps, x.num_stages, x.signature)   # noqa: E731
    assert [key(x) for x in issued] == [key(x) for x in want]
    assert issued[0].grid[0] > 2                                   # this call ran the split path (B = 2, 1 group)


def test_arbitrary_blocks_mixed_flags_and_empty_lists():
    """The contract allows any (u, m) blocks: duplicates, one combo as both view and cross, 3 banks (padded to 4),
    and empty CE or KL lists."""
    E, banks, idx, _ = inputs(3, 3, 6, 40, 16, torch.float32, seed=11)
    t = lambda *v: torch.tensor(v, dtype=torch.long, device=DEVICE)          # noqa: E731
    f = lambda *v: torch.tensor(v, dtype=torch.bool, device=DEVICE)          # noqa: E731
    ce = (t(0, 0, 1, 2, 2), t(0, 0, 1, 2, 0), f(True, False, True, False, True))
    kl = (t(0, 0, 1, 2, 2), t(0, 0, 2, 1, 1), t(1, 1, 0, 0, 0), t(1, 1, 0, 0, 2), f(True, False, False, True, True))
    check(E, banks, idx, ce + kl, 2)
    empty_l, empty_b = t(), f()
    check(E, banks, idx, ce + (empty_l, empty_l, empty_l, empty_l, empty_b), 1)
    check(E, banks, idx, (empty_l, empty_l, empty_b) + kl, 1)


def test_backward_does_not_read_the_bank_again():
    """Single pass: the bank and idx are overwritten after forward, and dE still equals the reference's on the
    original values (backward contracts the sums saved in forward)."""
    k = kernels()
    plan = lmcl_plan([2, 2])
    vecs = plan_vectors(plan, DEVICE)
    E, banks, idx, gen = inputs(4, 2, 3, 50, 16, torch.float32, seed=19)
    E1 = E.clone().requires_grad_()
    E2 = E.clone().requires_grad_()
    bank_copy, idx_copy = banks.clone(), idx.clone()
    ce, kl = k.bank_rows(E1, bank_copy, idx_copy, *vecs, TAU, KD_T, 1, input_precision="ieee", split_k=2)
    bank_copy.normal_()
    idx_copy.zero_()
    rce, rkl = bank_rows_reference(E2, banks, idx, *vecs, TAU, KD_T, 1)
    gce = torch.rand(rce.shape, generator=gen).to(DEVICE)
    gkl = torch.rand(rkl.shape, generator=gen).to(DEVICE)
    (dE,) = torch.autograd.grad((ce * gce).sum() + (kl * gkl).sum(), E1)
    (rdE,) = torch.autograd.grad((rce * gce).sum() + (rkl * gkl).sum(), E2)
    assert_close(dE, rdE, 1e-5, "dE")


def test_bank_gets_no_gradient_and_errors():
    k = kernels()
    plan = lmcl_plan([1, 1])
    E, banks, idx, _ = inputs(2, 2, 3, 10, 16, torch.float32, seed=3)
    vecs = plan_vectors(plan, DEVICE)
    E = E.requires_grad_()
    banks = banks.requires_grad_()
    ce, kl = k.bank_rows(E, banks, idx, *vecs, TAU, KD_T, 1)
    (ce.sum() + kl.sum()).backward()
    assert banks.grad is None and E.grad is not None
    with pytest.raises(TypeError, match="float64"):
        k.bank_rows(E.detach().double(), banks.detach(), idx, *vecs, TAU, KD_T, 1)
    with pytest.raises(ValueError, match="combos"):
        big = E.detach().new_zeros(40, 3, 16)
        k.bank_rows(big, banks.detach().repeat(3, 1, 1)[:5], idx, *vecs, TAU, KD_T, 1)
    with pytest.raises(ValueError, match="input_precision"):
        k.bank_rows(E.detach(), banks.detach(), idx, *vecs, TAU, KD_T, 1, input_precision="fast")
    with pytest.raises(ValueError, match="K >= pos_k"):
        k.bank_rows(E.detach(), banks.detach(), idx[:, :3], *vecs, TAU, KD_T, 2)


@pytest.mark.parametrize("plan_name,pos_k", [("lmcl22", 2), ("mcl3", 1)])
def test_end_to_end_cohort_terms(monkeypatch, plan_name, pos_k):
    """cohort_bank_contrastive_terms(backend="triton") == backend="reference" (plain and K-streamed), with weights."""
    k = kernels()
    plan = lmcl_plan([2, 2]) if plan_name == "lmcl22" else mcl_plan(3)
    NE, n = plan.num_embeddings, max(plan.net_of) + 1
    B, K, D = 6, 70, 32
    E, banks, idx, gen = inputs(NE, n, B, K, D, torch.float32, seed=5)
    w = (torch.rand(plan.num_weight_rows, B, generator=gen) + 0.5).to(DEVICE)
    emb1 = [e.clone().requires_grad_() for e in E.unbind(0)]
    emb2 = [e.clone().requires_grad_() for e in E.unbind(0)]
    got = cohort_bank_contrastive_terms(emb1, list(banks.unbind(0)), idx, plan, weights=w, pos_k=pos_k,
                                        backend="triton")
    for k_chunk in (None, 16):
        want = cohort_bank_contrastive_terms(emb2, list(banks.unbind(0)), idx, plan, weights=w, pos_k=pos_k,
                                             k_chunk=k_chunk, backend="reference")
        for name, g_, w_ in zip(("vcl", "soft_vcl", "icl", "soft_icl"), got, want):
            assert_close(g_, w_, 1e-5, name)
    coeffs = torch.tensor([0.3, 1.7, -0.6, 2.2], device=DEVICE)
    g1 = torch.autograd.grad(sum(c * t for c, t in zip(coeffs, got)), emb1)
    g2 = torch.autograd.grad(sum(c * t for c, t in zip(coeffs, want)), emb2)
    for a, b in zip(g1, g2):
        assert_close(a, b, 1e-5, "d embedding")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_step(backend, monkeypatch):
    """A compiled step (fullgraph) calls the custom op forward and backward."""
    k = kernels()
    plan = lmcl_plan([2, 2])
    E, banks, idx, gen = inputs(4, 2, 5, 129, 16, torch.float32, seed=9)
    vecs = plan_vectors(plan, DEVICE)
    wce = torch.rand(len(plan.ce_blocks), 5, generator=gen).to(DEVICE)
    wkl = torch.rand(len(plan.kl_blocks), 5, generator=gen).to(DEVICE)

    def step(E, banks, idx):
        ce, kl = k.bank_rows(E, banks, idx, *vecs, TAU, KD_T, 2)
        return (ce * wce).mean() + 9.0 * (kl * wkl).mean()

    def ref_step(E, banks, idx):
        ce, kl = bank_rows_reference(E, banks, idx, *vecs, TAU, KD_T, 2)
        return (ce * wce).mean() + 9.0 * (kl * wkl).mean()

    torch._dynamo.reset()
    # compiled graphs cached on disk per version of the kernel module: a graph cached for an earlier schema of the
    # custom ops would call it with the old arguments
    source = Path(k.bank_contrastive.__file__).read_bytes()
    cache = Path(tempfile.gettempdir()) / f"fastmcl_bank_inductor_{hashlib.sha1(source).hexdigest()[:12]}"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache))
    compiled = torch.compile(step, backend=backend, fullgraph=True)
    E1 = E.clone().requires_grad_()
    E2 = E.clone().requires_grad_()
    loss = compiled(E1, banks, idx)
    loss.backward()
    ref = ref_step(E2, banks, idx)
    ref.backward()
    assert_close(loss, ref, 1e-5, "compiled loss")
    assert_close(E1.grad, E2.grad, 1e-5, "compiled dE")


def tuning_cases():
    """Every distinct point of the configuration space (all architectures, bank dtypes and row ranges)."""
    from fastmcl.kernels.bank_contrastive import CONFIG_SPACE
    return sorted({tu for entries in CONFIG_SPACE.values() for _, cands in entries for tu in cands},
                  key=repr)


@pytest.mark.parametrize("tuning", tuning_cases(), ids=repr)
@pytest.mark.parametrize("bank", ["fp32", "bf16"])
def test_every_configuration_of_the_space(tuning, bank):
    """Each configuration the space can pick (its target banks per program, tile width, warps, stages), on the
    ImageNet plan shrunk, with an fp32 (ieee dots) and a bf16 memory bank (fp32 embeddings split into three bf16
    pieces): value and gradient equal the reference on the same bank values at 1e-5."""
    plan = lmcl_plan([4, 4])
    E, banks, idx, _ = inputs(plan.num_embeddings, 2, 3, 45, 32, torch.float32, seed=23)
    check(E, banks.to(DTYPES[bank]), idx, plan_vectors(plan, DEVICE), 1, tuning=tuning, split_k=2,
          input_precision="ieee" if bank == "fp32" else "tf32x3")


@pytest.mark.parametrize("precision, rtol", [("tf32x3", 1e-5), ("tf32", 1e-4)])
def test_a_bf16_bank_splits_the_fp32_operand_into_bf16_pieces(precision, rtol):
    """With a bf16 bank every dot runs on bf16 tensor cores, the fp32 operand (embeddings, softmax weights) a sum of
    bf16 pieces: at tf32x3 as accurate as fp32, at tf32 more accurate than tf32 (tolerances: module docstring)."""
    plan = lmcl_plan([4, 4])
    E, banks, idx, _ = inputs(plan.num_embeddings, 2, 7, 129, 128, torch.float32, seed=31)
    check(E, banks.to(torch.bfloat16), idx, plan_vectors(plan, DEVICE), 2, rtol=rtol, input_precision=precision)


def test_bf16_memory_bank_end_to_end():
    """A bf16 `MemoryBank` (rows stored in bf16, momentum update in fp32): the fused terms equal the reference's on
    the same bank, and an update rounds the fp32 result once."""
    kernels()
    from fastmcl.losses import MemoryBank
    plan = lmcl_plan([2, 2])
    gen = torch.Generator().manual_seed(29)
    bank = MemoryBank(2, 64, 32, momentum=0.5, generator=gen, dtype="bf16").to(DEVICE)
    assert bank.memory.dtype == torch.bfloat16
    emb = [unit(6, 32, gen=gen).requires_grad_() for _ in range(plan.num_embeddings)]
    idx = torch.randint(0, 64, (6, 40), generator=gen).to(DEVICE)
    got = cohort_bank_contrastive_terms(emb, bank.memory, idx, plan, backend="triton")
    want = cohort_bank_contrastive_terms(emb, bank.memory, idx, plan, backend="reference")
    for g_, w_ in zip(got, want):
        assert_close(g_, w_, 1e-5, "term")
    before = bank.memory[0, idx[:, 0]].float()
    bank.update(0, idx[:, 0], emb[0].detach())
    mixed = before * 0.5 + emb[0].detach().float() * 0.5
    want_rows = (mixed / mixed.norm(dim=1, keepdim=True)).to(torch.bfloat16)
    last = {int(i): n for n, i in enumerate(idx[:, 0])}                  # duplicates: one of the writes is kept
    for i, n in last.items():
        assert bank.memory[0, i].dtype == torch.bfloat16
        assert torch.allclose(bank.memory[0, i].float(), want_rows[n].float(), rtol=2 ** -8, atol=0) or any(
            torch.equal(bank.memory[0, i], want_rows[m]) for m, j in enumerate(idx[:, 0].tolist()) if j == i)


def test_precision_follows_torch(monkeypatch):
    """fp32 dots follow torch.get_float32_matmul_precision(): "highest" → tf32x3, "high" → tf32 (on sm_80+)."""
    from fastmcl.kernels.bank_contrastive import launches
    plan = lmcl_plan([2, 2])
    prec = {}
    for setting in ("highest", "high"):
        monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda s=setting: s)
        L = launches((4, 8, 32), 2, 100, 50, len(plan.ce_blocks), len(plan.kl_blocks), device_capability=(8, 0))
        prec[setting] = L[0].constexprs["PRECISION"]
    assert prec == {"highest": "tf32x3", "high": "tf32"}


def test_auto_backend_takes_the_reference_beyond_the_kernel_limit(capsys):
    """`auto` on a CUDA device with a plan the bank kernel cannot hold (5 networks × 4 stages): the reference path,
    one notice line (not one per call); a plan that fits gets the kernels; `triton` asked explicitly still refuses."""
    from fastmcl.losses import resolve_backend
    cuda = torch.device("cuda")
    assert resolve_backend("auto", cuda, torch.float32, bank_shape=(8, 2, 128)) == "triton"
    for _ in range(3):
        assert resolve_backend("auto", cuda, torch.float32, bank_shape=(20, 5, 128)) == "reference"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "reference path" in err[0] and "combos" in err[0], err
    plan = lmcl_plan([4, 4, 4, 4, 4])
    E, banks, idx, _ = inputs(plan.num_embeddings, 5, 2, 10, 16, torch.float32, seed=31)
    with pytest.raises(ValueError, match="combos"):
        kernels().bank_rows(E, banks, idx, *plan_vectors(plan, DEVICE), TAU, KD_T, 1)
