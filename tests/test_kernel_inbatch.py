"""Fused in-batch kernel (`fastmcl.kernels.inbatch_rows`) vs its contract `inbatch_rows_reference`.

Runs under the Triton interpreter (TRITON_INTERPRET=1, own pytest process: `make test`) or on a CUDA GPU.

Covering design (each axis value appears at least once in the op-level cases AND in the end-to-end cases, without
the full product; `test_covering_design_covers_every_axis_value` checks it):
  B ∈ {1, 7, 32, 130} (1: no positive and no CE denominator; 7: ragged < 16; 32: one exact tile; 130: ragged, two
  column tiles in forward, three in backward, five row tiles), D ∈ {16, 128} (128: two D-chunks of the logit GEMM),
  plans lmcl_plan([S, S]) for S = 1..4 stages per network and mcl_plan(3), dtypes fp32 / bf16 / fp16, weights given
  and None (end to end). Every label set holds a class of one (a row with no positive → 0, no gradient).
  Big plans go with small B (the interpreter runs one program at a time).

Tolerances (normwise: max |got − want| / max |want|, per output tensor), "want" = the reference on an fp64 copy of
the very same input values (the exact oracle; the fp32 reference itself is ~7e-6 off in the KL rows at B = 128, the
kernel ~2.5e-6, because it forms lse_t − lse_s as (m_t − m_s) + log(z_t / z_s)):
  values with `input_precision="ieee"`: 1e-5 for every input dtype (half inputs give exact products in fp32, all
  accumulation is fp32);
  gradients: fp32 1e-5; bf16 4e-3 and fp16 5e-4 (dE is returned in E's dtype: one rounding to nearest, at most
  the unit roundoff 2^-8 = 3.9e-3 / 2^-11 = 4.9e-4 of the largest entry; measured 3.3e-3 / 2.3e-4).
  At the default precision ("tf32x3") on a GPU, fp32 inputs: 1e-4 for values and gradients — a bound, not a
  measurement: tf32x3 drops the small·small term and truncates the small parts, about 2^-21 of Σ|a_i b_i| per dot
  (unit embeddings: ≤ 5e-6 absolute in a logit at τ = 0.1), amplified through the log-sum-exps of rows whose values
  are O(0.1–1). The interpreter computes every precision in fp32, so there the strict tolerances apply.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from fastmcl.losses import cohort_contrastive_terms, lmcl_plan, mcl_plan
from fastmcl.losses.cohort_terms import inbatch_rows_reference
from fastmcl.losses.plan import ICL, SOFT_ICL, SOFT_VCL, VCL, ContrastPlan

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = [
    pytest.mark.interpreter,
    # B = 1: a CE row with no denominator column has lse = log(0) = −inf by design (the row is 0, no gradient)
    pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning"),
    pytest.mark.skipif(not INTERPRET and not torch.cuda.is_available(),
                       reason="the Triton kernels need a CUDA GPU or the interpreter: run with TRITON_INTERPRET=1 "
                              "in its own pytest process (`TRITON_INTERPRET=1 pytest -m interpreter`)"),
]
DEVICE = torch.device("cpu" if INTERPRET or not torch.cuda.is_available() else "cuda")

VALUE_TOL = 1e-5
GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 4e-3, torch.float16: 5e-4}
DEFAULT_PRECISION_FP32_TOL = VALUE_TOL if INTERPRET else 1e-4


def value_tol(dtype: torch.dtype, precision: str | None = None) -> float:
    """Tolerance of values at `precision` (None: the op's default; fp32 at tf32x3 on a GPU: the looser bound)."""
    strict = precision == "ieee" or dtype != torch.float32
    return VALUE_TOL if strict else DEFAULT_PRECISION_FP32_TOL


def grad_tol(dtype: torch.dtype, precision: str | None = None) -> float:
    strict = precision == "ieee" or dtype != torch.float32
    return GRAD_TOL[dtype] if strict else DEFAULT_PRECISION_FP32_TOL
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PLANS = {"lmcl1": lambda: lmcl_plan([1, 1]), "lmcl2": lambda: lmcl_plan([2, 2]), "lmcl3": lambda: lmcl_plan([3, 3]),
         "lmcl4": lambda: lmcl_plan([4, 4]), "mcl3": lambda: mcl_plan(3)}
IDX_KEYS = ("ce_u", "ce_v", "kl_su", "kl_sv", "kl_tu", "kl_tv")

# (B, D, plan, dtype)
OP_CASES = [
    (1, 16, "lmcl1", "fp32"),
    (7, 128, "lmcl4", "fp32"),
    (32, 16, "mcl3", "fp32"),
    (130, 128, "lmcl1", "fp32"),
    (32, 128, "lmcl2", "bf16"),
    (7, 16, "lmcl3", "bf16"),
    (130, 16, "lmcl1", "fp16"),
    (1, 128, "mcl3", "fp16"),
]
# (B, D, plan, dtype, weighted)
E2E_CASES = [
    (7, 16, "lmcl3", "fp32", True),
    (32, 128, "lmcl2", "bf16", False),
    (130, 16, "mcl3", "fp32", False),
    (1, 128, "lmcl4", "fp16", True),
    (32, 16, "lmcl1", "fp16", True),
    (130, 128, "lmcl1", "bf16", True),
]


def labels_with_singleton(B: int, seed: int) -> torch.Tensor:
    """Labels with repeated classes and at least one class of one (label 1000 occurs once)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, max(1, B // 3), (B,), generator=g)
    y[0] = 1000
    return y.to(DEVICE)


def unit_embeddings(NE: int, B: int, D: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(NE, B, D, generator=g, dtype=torch.float64), dim=-1).to(dtype).to(DEVICE)


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    if want.numel() == 0:
        return 0.0
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def indices(plan):
    ix = plan.index_tables(DEVICE)
    return [ix[k] for k in IDX_KEYS]


def kernels():
    from fastmcl import kernels as k
    return k


def run_rows(fn, E, y, idx, g_ce, g_kl, tau=0.1, kd_T=3.0, **kw):
    """Values and dE of Σ g_ce·ce + Σ g_kl·kl (upstream gradients ≠ 1)."""
    E = E.detach().clone().requires_grad_()
    ce, kl = fn(E, y, *idx, tau, kd_T, **kw)
    (dE,) = torch.autograd.grad((ce * g_ce).sum() + (kl * g_kl).sum(), E)
    return ce, kl, dE


@pytest.mark.parametrize("B,D,plan_name,dtype_name", OP_CASES)
def test_rows_match_reference(B, D, plan_name, dtype_name):
    dtype = DTYPES[dtype_name]
    plan = PLANS[plan_name]()
    idx = indices(plan)
    E = unit_embeddings(plan.num_embeddings, B, D, dtype, seed=B + D)
    y = labels_with_singleton(B, seed=B)
    g = torch.Generator().manual_seed(1)
    g_ce = (torch.randn(len(plan.ce_blocks), B, generator=g, dtype=torch.float64) * 0.7 + 0.3).to(DEVICE)
    g_kl = (torch.randn(len(plan.kl_blocks), B, generator=g, dtype=torch.float64) * 0.7 - 0.2).to(DEVICE)

    ce, kl, dE = run_rows(kernels().inbatch_rows, E, y, idx, g_ce.float(), g_kl.float(), input_precision="ieee")
    want_ce, want_kl, want_dE = run_rows(inbatch_rows_reference, E.double(), y, idx, g_ce, g_kl)

    assert ce.dtype == kl.dtype == torch.float32 and dE.dtype == dtype
    assert ce.shape == (len(plan.ce_blocks), B) and kl.shape == (len(plan.kl_blocks), B) and dE.shape == E.shape
    assert torch.isfinite(ce).all() and torch.isfinite(kl).all() and torch.isfinite(dE).all()
    assert rel(ce, want_ce) <= VALUE_TOL
    assert rel(kl, want_kl) <= VALUE_TOL
    assert rel(dE, want_dE) <= GRAD_TOL[dtype]
    # the class of one (row 0) has no positive: its CE rows are 0
    assert (ce[:, 0] == 0).all()


@pytest.mark.parametrize("B,D,plan_name,dtype_name,weighted", E2E_CASES)
def test_cohort_terms_triton_matches_reference(B, D, plan_name, dtype_name, weighted):
    dtype = DTYPES[dtype_name]
    plan = PLANS[plan_name]()
    base = unit_embeddings(plan.num_embeddings, B, D, dtype, seed=7 * B + D)
    y = labels_with_singleton(B, seed=B + 1)
    w = (torch.rand(plan.num_weight_rows, B, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 0.25
         ).to(DEVICE) if weighted else None
    coeff = torch.tensor([0.1, 1.0, 0.1, 1.0], dtype=torch.float64, device=DEVICE)      # upstream grads ≠ 1

    def run(backend, dt, weights):
        embs = [e.detach().to(dt).requires_grad_() for e in base.unbind(0)]
        terms = cohort_contrastive_terms(embs, y, plan, weights=weights, tau=0.1, kd_T=3.0, backend=backend)
        loss = sum(c * t for c, t in zip(coeff.to(terms[0].dtype), terms))
        return torch.stack(list(terms)), torch.autograd.grad(loss, embs)

    got, got_g = run("triton", dtype, None if w is None else w.float())
    want, want_g = run("reference", torch.float64, w)             # the oracle on the same input values
    ref32, ref32_g = run("reference", dtype, None if w is None else w.float())

    assert got.dtype == torch.float32 and all(g.dtype == dtype for g in got_g)
    assert rel(got, want) <= value_tol(dtype)                  # the dispatcher runs the op's default precision
    assert rel(torch.stack(got_g), torch.stack(want_g)) <= grad_tol(dtype)
    # and against the fp32 reference path itself (whose own KL error is ~7e-6)
    assert rel(got, ref32) <= 3 * value_tol(dtype)
    assert rel(torch.stack(got_g), torch.stack(ref32_g)) <= 2 * grad_tol(dtype)


def teacher_only_plan() -> ContrastPlan:
    """Embeddings 2 and 3 appear only inside teacher blocks: they must get exactly zero gradient."""
    return ContrastPlan(net_of=(0, 1, 0, 1),
                        ce=((ICL, (0, 1), 0), (VCL, (1, 1), 0)),
                        kl=((SOFT_ICL, (0, 1), (2, 3), 0), (SOFT_ICL, (1, 0), (3, 2), 0),
                            (SOFT_VCL, (0, 0), (3, 3), 0)),
                        num_weight_rows=1)


def test_teacher_side_gets_no_gradient():
    plan = teacher_only_plan()
    B, D = 7, 16
    E = unit_embeddings(4, B, D, torch.float32, seed=11)
    y = labels_with_singleton(B, seed=2)
    idx = indices(plan)
    g_ce = torch.randn(len(plan.ce_blocks), B, device=DEVICE)
    g_kl = torch.randn(len(plan.kl_blocks), B, device=DEVICE)
    ce, kl, dE = run_rows(kernels().inbatch_rows, E, y, idx, g_ce, g_kl)
    want_ce, want_kl, want_dE = run_rows(inbatch_rows_reference, E.double(), y, idx, g_ce.double(), g_kl.double())
    assert (dE[2:] == 0).all() and (want_dE[2:] == 0).all()
    assert dE[:2].abs().amax() > 0
    assert rel(ce, want_ce) <= VALUE_TOL and rel(kl, want_kl) <= VALUE_TOL and rel(dE, want_dE) <= 1e-5
    # the same through the cohort API
    embs = [e.clone().requires_grad_() for e in E.unbind(0)]
    terms = cohort_contrastive_terms(embs, y, plan, backend="triton")
    grads = torch.autograd.grad(sum(terms), embs)
    assert (grads[2] == 0).all() and (grads[3] == 0).all() and grads[0].abs().amax() > 0


def test_kl_gradient_reaches_both_student_embeddings():
    """A lone KL block (u, v) with u ≠ v: e_u gets the row-side and e_v the column-side gradient."""
    B, D = 7, 16
    E = unit_embeddings(4, B, D, torch.float32, seed=5)
    y = labels_with_singleton(B, seed=3)
    t = lambda *v: torch.tensor(v, dtype=torch.long, device=DEVICE)
    idx = [t(), t(), t(0), t(1), t(2), t(3)]
    g_kl = torch.rand(1, B, device=DEVICE) + 0.5
    ce, kl, dE = run_rows(kernels().inbatch_rows, E, y, idx, torch.zeros(0, B, device=DEVICE), g_kl)
    _, want_kl, want_dE = run_rows(inbatch_rows_reference, E.double(), y, idx, torch.zeros(0, B, device=DEVICE,
                                                                                         dtype=torch.float64),
                                   g_kl.double())
    assert ce.shape == (0, B)
    assert dE[0].abs().amax() > 0 and dE[1].abs().amax() > 0 and (dE[2:] == 0).all()
    assert rel(kl, want_kl) <= VALUE_TOL and rel(dE, want_dE) <= 1e-5


def test_empty_kl_list_and_tf32_option():
    B, D = 7, 16
    E = unit_embeddings(2, B, D, torch.float32, seed=6)
    y = labels_with_singleton(B, seed=4)
    t = lambda *v: torch.tensor(v, dtype=torch.long, device=DEVICE)
    idx = [t(0, 1, 1), t(1, 0, 1), t(), t(), t(), t()]
    g_ce = torch.randn(3, B, device=DEVICE)
    ce, kl, dE = run_rows(kernels().inbatch_rows, E, y, idx, g_ce, torch.zeros(0, B, device=DEVICE),
                          input_precision="tf32")
    want_ce, _, want_dE = run_rows(inbatch_rows_reference, E.double(), y, idx, g_ce.double(),
                                   torch.zeros(0, B, device=DEVICE, dtype=torch.float64))
    assert kl.shape == (0, B)
    tol = 1e-5 if INTERPRET else 5e-3            # the interpreter computes tf32 dots in fp32
    assert rel(ce, want_ce) <= tol and rel(dE, want_dE) <= tol


def test_a_tf32_setting_does_not_round_the_ieee_gradient():
    """`set_float32_matmul_precision("high")` lets cuBLAS use TF32; the op's dE reduction stays IEEE fp32 (on a GPU
    TF32 would put it near 1e-3 of the reference)."""
    plan = PLANS["lmcl1"]()
    idx = indices(plan)
    B, D = 64, 128
    E = unit_embeddings(plan.num_embeddings, B, D, torch.float32, seed=3)
    y = labels_with_singleton(B, seed=3)
    g_ce = torch.randn(len(plan.ce_blocks), B, device=DEVICE)
    g_kl = torch.randn(len(plan.kl_blocks), B, device=DEVICE)
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        _, _, dE = run_rows(kernels().inbatch_rows, E, y, idx, g_ce, g_kl, input_precision="ieee")
    finally:
        torch.set_float32_matmul_precision(saved)
    _, _, want_dE = run_rows(inbatch_rows_reference, E.double(), y, idx, g_ce.double(), g_kl.double())
    assert rel(dE, want_dE) <= GRAD_TOL[torch.float32]


def test_fp64_and_bad_arguments_raise_clearly():
    plan = lmcl_plan([1, 1])
    idx = indices(plan)
    y = labels_with_singleton(7, seed=0)
    E64 = unit_embeddings(2, 7, 16, torch.float64, seed=0)
    with pytest.raises(TypeError, match="torch.float64"):
        kernels().inbatch_rows(E64, y, *idx, 0.1, 3.0)
    with pytest.raises(TypeError, match="torch.float64"):
        cohort_contrastive_terms(list(E64.unbind(0)), y, plan, backend="triton")
    E = E64.float()
    with pytest.raises(ValueError, match="labels"):
        kernels().inbatch_rows(E, y[:5], *idx, 0.1, 3.0)
    with pytest.raises(ValueError, match="input_precision"):
        kernels().inbatch_rows(E, y, *idx, 0.1, 3.0, input_precision="bf16")
    with pytest.raises(ValueError, match="kl_su"):
        kernels().inbatch_rows(E, y, *idx[:2], idx[2][:1], *idx[3:], 0.1, 3.0)
    with pytest.raises(ValueError, match="tau"):
        kernels().inbatch_rows(E, y, *idx, 0.0, 3.0)


def test_custom_op_registration_opcheck():
    """torch.library.opcheck: schema, fake (meta) kernel, autograd registration, AOT dispatch."""
    plan = lmcl_plan([1, 1])
    idx = indices(plan)
    E = unit_embeddings(2, 7, 16, torch.float32, seed=9).requires_grad_()
    y = labels_with_singleton(7, seed=9)
    torch.library.opcheck(torch.ops.fastmcl.inbatch_rows.default, (E, y, *idx, 0.1, 3.0, "ieee"))


def test_under_torch_compile_aot_eager():
    """torch.compile with the aot_eager backend (CPU has no inductor-Triton path here; it traces the custom op
    and its autograd into forward/backward graphs): fullgraph on the op, and the whole cohort step."""
    plan = lmcl_plan([2, 2])
    idx = indices(plan)
    B, D = 7, 16
    E0 = unit_embeddings(plan.num_embeddings, B, D, torch.float32, seed=13)
    y = labels_with_singleton(B, seed=13)
    w = torch.rand(plan.num_weight_rows, B, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    torch._dynamo.reset()

    def op_step(E, y):
        ce, kl = kernels().inbatch_rows(E, y, *idx, 0.1, 3.0)
        return (ce * 0.3).sum() + (kl * 1.7).sum()

    def cohort_step(embs, y, w):
        terms = cohort_contrastive_terms(embs, y, plan, weights=w, backend="triton")
        return 0.1 * terms.vcl + terms.soft_vcl + 0.1 * terms.icl + terms.soft_icl

    compiled_op = torch.compile(op_step, backend="aot_eager", fullgraph=True)
    E = E0.clone().requires_grad_()
    loss = compiled_op(E, y)
    (dE,) = torch.autograd.grad(loss, E)
    E_ref = E0.double().requires_grad_()
    ce, kl = inbatch_rows_reference(E_ref, y, *idx, 0.1, 3.0)
    want = (ce * 0.3).sum() + (kl * 1.7).sum()
    (want_dE,) = torch.autograd.grad(want, E_ref)
    assert rel(loss, want) <= value_tol(torch.float32) and rel(dE, want_dE) <= grad_tol(torch.float32)

    compiled_cohort = torch.compile(cohort_step, backend="aot_eager")
    embs = [e.clone().requires_grad_() for e in E0.unbind(0)]
    loss = compiled_cohort(embs, y, w)
    grads = torch.autograd.grad(loss, embs)
    embs64 = [e.double().requires_grad_() for e in E0.unbind(0)]
    terms = cohort_contrastive_terms(embs64, y, plan, weights=w.double(), backend="reference")
    want = 0.1 * terms.vcl + terms.soft_vcl + 0.1 * terms.icl + terms.soft_icl
    want_g = torch.autograd.grad(want, embs64)
    assert rel(loss, want) <= value_tol(torch.float32)
    assert rel(torch.stack(grads), torch.stack(want_g)) <= grad_tol(torch.float32)


@pytest.mark.parametrize("B,D,plan_name,dtype_name", [(130, 128, "lmcl1", "fp32"), (32, 16, "mcl3", "fp32"),
                                                       (7, 128, "lmcl2", "bf16")])
def test_default_precision_matches_reference(B, D, plan_name, dtype_name):
    """The op's default precision (tensor cores on a GPU) against the fp64 oracle, at its own tolerance."""
    dtype = DTYPES[dtype_name]
    plan = PLANS[plan_name]()
    idx = indices(plan)
    E = unit_embeddings(plan.num_embeddings, B, D, dtype, seed=3 * B + D)
    y = labels_with_singleton(B, seed=B + 2)
    g = torch.Generator().manual_seed(2)
    g_ce = (torch.randn(len(plan.ce_blocks), B, generator=g, dtype=torch.float64) - 0.4).to(DEVICE)
    g_kl = (torch.randn(len(plan.kl_blocks), B, generator=g, dtype=torch.float64) + 0.6).to(DEVICE)
    ce, kl, dE = run_rows(kernels().inbatch_rows, E, y, idx, g_ce.float(), g_kl.float())
    want_ce, want_kl, want_dE = run_rows(inbatch_rows_reference, E.double(), y, idx, g_ce, g_kl)
    assert rel(ce, want_ce) <= value_tol(dtype) and rel(kl, want_kl) <= value_tol(dtype)
    assert rel(dE, want_dE) <= grad_tol(dtype)


def test_launcher_issues_exactly_its_published_launches(monkeypatch):
    """`launches(...)` (what the GPU-readiness test compiles) is what a forward + backward call really launches:
    the same kernels, grids, argument types, constexprs and specialisations, in order."""
    from fastmcl.kernels import inbatch_contrastive
    from fastmcl.kernels.launch import KernelLaunch

    issued = []
    real_launch = KernelLaunch.launch
    monkeypatch.setattr(KernelLaunch, "launch", lambda self: (issued.append(self), real_launch(self))[1])
    plan = PLANS["lmcl2"]()
    idx = indices(plan)
    E = unit_embeddings(plan.num_embeddings, 33, 16, torch.bfloat16, seed=21)
    y = labels_with_singleton(33, seed=21)
    run_rows(kernels().inbatch_rows, E, y, idx, torch.ones(len(plan.ce_blocks), 33, device=DEVICE),
             torch.ones(len(plan.kl_blocks), 33, device=DEVICE))
    published = inbatch_contrastive.launches(E, y, *idx, 0.1, 3.0)

    def view(launches):
        return [(l.name, l.fn, l.grid, l.signature, l.constexprs, l.attrs, l.num_warps, l.num_stages) for l in launches]

    assert [l.name for l in published] == ["inbatch.ce_fwd", "inbatch.kl_fwd", "inbatch.ce_bwd", "inbatch.kl_bwd"]
    assert view(issued) == view(published)


def test_covering_design_covers_every_axis_value():
    axes = {"B": {1, 7, 32, 130}, "D": {16, 128}, "plan": set(PLANS), "dtype": set(DTYPES)}
    for cases in (OP_CASES, E2E_CASES):
        seen = {"B": {c[0] for c in cases}, "D": {c[1] for c in cases}, "plan": {c[2] for c in cases},
                "dtype": {c[3] for c in cases}}
        assert seen == axes
    assert {c[4] for c in E2E_CASES} == {True, False}
