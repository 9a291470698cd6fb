"""Reference losses against deliberately naive code, finite differences, and bad input."""
import pytest
import torch
import torch.nn.functional as F

from fastmcl.losses import MemoryBank, bank_contrastive_terms, contrastive_terms, cross_entropy, kd_kl
from fastmcl.losses.bank_logits import bank_logits_all
from fastmcl.losses.cohort_terms import bank_rows_reference
from fastmcl.losses.rows import kl_rows, leading_positive_rows, supcon_rows
from support.naive_losses import naive_bank_terms, naive_contrastive_terms

TOL = {torch.float32: dict(rtol=2e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-10)}

# (B, labels): B=6 with 3 classes; B=10 with a class of one (its rows have no positive: contribute 0); B=5 odd.
INBATCH_CASES = [
    (6, [0, 1, 2, 0, 1, 2]),
    (10, [0, 0, 1, 1, 1, 2, 2, 3, 3, 4]),
    (5, [1, 1, 0, 0, 0]),
]


def unit(*shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B,labels", INBATCH_CASES)
@pytest.mark.parametrize("weighted", [False, True])
def test_inbatch_terms_match_naive(dtype, B, labels, weighted):
    D = 7
    e_a, e_b = unit(B, D, dtype=dtype, seed=1), unit(B, D, dtype=dtype, seed=2)
    y = torch.tensor(labels)
    w = torch.rand(B, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(dtype) if weighted else None
    got = contrastive_terms(e_a, e_b, y, tau=0.1, kd_T=3.0, weight=w)
    want = naive_contrastive_terms(e_a.double(), e_b.double(), y, 0.1, 3.0, w)
    for name, g, ref in zip(got._fields, got, want):
        assert torch.allclose(g.double(), torch.tensor(ref, dtype=torch.float64), **TOL[dtype]), (name, g, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B,K,pos_k", [(3, 7, 1), (5, 12, 2), (1, 4, 1)])
@pytest.mark.parametrize("weighted", [False, True])
def test_bank_terms_match_naive(dtype, B, K, pos_k, weighted):
    D, N = 6, 23
    e_a, e_b = unit(B, D, dtype=dtype, seed=4), unit(B, D, dtype=dtype, seed=5)
    bank_a, bank_b = unit(N, D, dtype=dtype, seed=6), unit(N, D, dtype=dtype, seed=7)
    idx = torch.randint(0, N, (B, K), generator=torch.Generator().manual_seed(8))
    w = torch.rand(B, generator=torch.Generator().manual_seed(9), dtype=torch.float64).to(dtype) if weighted else None
    got = bank_contrastive_terms(e_a, e_b, bank_a, bank_b, idx, tau=0.07, kd_T=3.0, pos_k=pos_k, weight=w)
    want = naive_bank_terms(e_a.double(), e_b.double(), bank_a.double(), bank_b.double(), idx, 0.07, 3.0, pos_k, w)
    for name, g, ref in zip(got._fields, got, want):
        assert torch.allclose(g.double(), torch.tensor(ref, dtype=torch.float64), **TOL[dtype]), (name, g, ref)


def test_q2_fixed_vcl_uses_own_bank():
    """Q2 fixed: v_b scores e_b against bank_b; swapping bank_a changes VCL only through v_a."""
    B, K, D, N = 4, 9, 5, 17
    e_a, e_b = unit(B, D, dtype=torch.float64, seed=1), unit(B, D, dtype=torch.float64, seed=2)
    bank_a, bank_b = unit(N, D, dtype=torch.float64, seed=3), unit(N, D, dtype=torch.float64, seed=4)
    idx = torch.randint(0, N, (B, K), generator=torch.Generator().manual_seed(5))
    got = bank_contrastive_terms(e_a, e_b, bank_a, bank_b, idx)
    # VCL with the same e for both networks and the same bank would be symmetric; with the fix, v_b uses bank_b.
    want = naive_bank_terms(e_a, e_b, bank_a, bank_b, idx, 0.07, 3.0, 1, None)
    assert torch.allclose(got.vcl, torch.tensor(want[0], dtype=torch.float64))
    buggy = naive_bank_terms(e_a, e_b, bank_a, bank_a, idx, 0.07, 3.0, 1, None)
    assert not torch.allclose(got.vcl, torch.tensor(buggy[0], dtype=torch.float64))


def _gradcheck_terms(fn, inputs):
    """Finite differences see the teacher side move too, so the soft (KL) terms are checked with the teacher frozen
    in `test_kl_and_ce_rows_gradcheck` and composed in `test_detached_teacher_side_gets_no_gradient`."""
    for k in (0, 2):  # vcl, icl: fully differentiable
        assert torch.autograd.gradcheck(lambda *x: fn(*x)[k], inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_kl_and_ce_rows_gradcheck():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(3, 7, dtype=torch.float64, generator=g, requires_grad=True)
    teacher = torch.randn(3, 7, dtype=torch.float64, generator=g)
    assert torch.autograd.gradcheck(lambda s: kl_rows(s, teacher, 3.0), (student,))
    pos = torch.rand(3, 7, generator=g) > 0.5
    denom = torch.rand(3, 7, generator=g) > 0.3
    denom[:, 0] = True
    assert torch.autograd.gradcheck(lambda s: supcon_rows(s, pos, denom), (student,))
    assert torch.autograd.gradcheck(lambda s: leading_positive_rows(s, 2), (student,))


def test_inbatch_gradcheck():
    B, D = 5, 4
    e_a = unit(B, D, dtype=torch.float64, seed=11).requires_grad_()
    e_b = unit(B, D, dtype=torch.float64, seed=12).requires_grad_()
    y = torch.tensor([0, 0, 1, 1, 2])
    w = torch.rand(B, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    _gradcheck_terms(lambda a, b: contrastive_terms(a, b, y, weight=w), (e_a, e_b))


def test_bank_gradcheck_bank_gets_no_grad():
    B, K, D, N = 3, 6, 4, 11
    e_a = unit(B, D, dtype=torch.float64, seed=13).requires_grad_()
    e_b = unit(B, D, dtype=torch.float64, seed=14).requires_grad_()
    bank_a = unit(N, D, dtype=torch.float64, seed=15).requires_grad_()
    bank_b = unit(N, D, dtype=torch.float64, seed=16)
    idx = torch.randint(0, N, (B, K), generator=torch.Generator().manual_seed(1))
    _gradcheck_terms(lambda a, b: bank_contrastive_terms(a, b, bank_a, bank_b, idx), (e_a, e_b))
    sum(bank_contrastive_terms(e_a, e_b, bank_a, bank_b, idx)).backward()
    assert bank_a.grad is None


@pytest.mark.parametrize("k_chunk", [None, 4, 64])
def test_bank_logits_all_gradients_plain_and_streamed(k_chunk):
    """The hand-written backward of `bank_logits_all` (K = 11: ragged last chunk at k_chunk=4), and its double backward
    (the meta phase differentiates twice), against finite differences; values equal the plain einsum."""
    NE, n, B, K, D, N = 3, 2, 4, 11, 5, 17
    E = unit(NE, B, D, dtype=torch.float64, seed=31).requires_grad_()
    banks = unit(n, N, D, dtype=torch.float64, seed=32)
    idx = torch.randint(0, N, (B, K), generator=torch.Generator().manual_seed(3))
    want = torch.stack([torch.einsum("ubd,bkd->ubk", E, bank[idx]) for bank in banks], dim=1)
    assert torch.allclose(bank_logits_all(E, banks, idx, k_chunk), want, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda e: bank_logits_all(e, banks, idx, k_chunk), (E,))
    assert torch.autograd.gradgradcheck(lambda e: bank_logits_all(e, banks, idx, k_chunk), (E,))


def test_bank_rows_hand_written_backward_matches_autograd():
    """`bank_rows_reference`'s regular path (a hand-written backward that saves only the logits L and recomputes the
    softmaxes) against its split-teacher path (plain autograd through the same row functions), whose student copy of
    L gives the gradient with the teachers detached: values and ∂/∂E, with repeated student blocks and a block that is
    both a student and a teacher (its gradient must add up), both column settings (view drops column 0, cross not)."""
    g = torch.Generator().manual_seed(4)
    E = unit(3, 4, 5, dtype=torch.float64, seed=41).requires_grad_()
    banks = unit(2, 13, 5, dtype=torch.float64, seed=42)
    idx = torch.randint(0, 13, (4, 9), generator=g)

    def t(*values):
        return torch.tensor(values)

    # view rows: ce blocks (0, 0), (2, 1); kl (0, 0)|(2, 1), (2, 1)|(0, 0), (0, 0)|(1, 1). cross: ce (1, 0);
    # kl (1, 1)|(0, 0), (1, 0)|(2, 1)
    args = (E, banks, idx, t(0, 2, 1), t(0, 1, 0), t(True, True, False), t(0, 2, 0, 1, 1), t(0, 1, 0, 1, 0),
            t(2, 0, 1, 0, 2), t(1, 0, 1, 0, 1), t(True, True, True, False, False), 0.3, 3.0, 1)
    got = bank_rows_reference(*args)
    student = []
    want = bank_rows_reference(*args, student_out=student)
    upstream = [torch.rand(w.shape, dtype=torch.float64, generator=g) for w in want]
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
    (dg,) = torch.autograd.grad(sum((a * u).sum() for a, u in zip(got, upstream)), E)
    (d_student,) = torch.autograd.grad(sum((b * u).sum() for b, u in zip(want, upstream)), student)
    (dw,) = torch.autograd.grad(student, E, d_student)
    assert torch.allclose(dg, dw, rtol=1e-12, atol=1e-12)


def _student_only(S_s, S_t, T):
    return (T * T) * (F.softmax(S_t / T, 1) * (F.log_softmax(S_t / T, 1) - F.log_softmax(S_s / T, 1))).sum(1).mean()


def test_detached_teacher_side_gets_no_gradient():
    """soft VCL = KL(S_aa ‖ sg S_bb) + KL(S_bb ‖ sg S_aa): ∂/∂e_a comes only from the first KL's student side."""
    B, D, tau, T = 6, 5, 0.1, 3.0
    e_a = unit(B, D, dtype=torch.float64, seed=21).requires_grad_()
    e_b = unit(B, D, dtype=torch.float64, seed=22)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    soft_vcl = contrastive_terms(e_a, e_b, y, tau=tau, kd_T=T).soft_vcl
    (got,) = torch.autograd.grad(soft_vcl, e_a)
    want = torch.autograd.grad(_student_only(e_a @ e_a.T / tau, (e_b @ e_b.T / tau), T), e_a)[0]
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)
    # and with e_b also trainable, e_b's gradient comes only from the KL where e_b is the student
    e_b.requires_grad_()
    soft_icl = contrastive_terms(e_a, e_b, y, tau=tau, kd_T=T).soft_icl
    got_b = torch.autograd.grad(soft_icl, e_b)[0]
    S = lambda x, z: x @ z.T / tau  # noqa: E731
    want_b = torch.autograd.grad(_student_only(S(e_a.detach(), e_b), S(e_b, e_a).detach(), T)
                                 + _student_only(S(e_b, e_a.detach()), S(e_a, e_b).detach(), T), e_b)[0]
    assert torch.allclose(got_b, want_b, rtol=1e-10, atol=1e-12)


def test_kd_kl_matches_definition_and_detaches():
    s = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    T = 3.0
    p_t = torch.softmax(t / T, 1)
    want = T * T * (p_t * (torch.log(p_t) - torch.log_softmax(s / T, 1))).sum() / 4
    got = kd_kl(s, t, T)
    assert torch.allclose(got, want)
    got.backward()
    assert t.grad is None and s.grad is not None
    kd_kl(s, t, T, detach_teacher=False).backward()
    assert t.grad is not None
    assert torch.allclose(cross_entropy(s, torch.tensor([0, 1, 2, 3])),
                          F.cross_entropy(s, torch.tensor([0, 1, 2, 3])))


def test_memory_bank_update_is_momentum_then_renormalised():
    mem = MemoryBank(num_nets=2, num_samples=10, dim=4, momentum=0.5, generator=torch.Generator().manual_seed(0))
    before = mem.banks[1].clone()
    e = F.normalize(torch.randn(3, 4), dim=1).requires_grad_()
    idx = torch.tensor([2, 7, 4])
    mem.update(1, idx, e)
    want = F.normalize(0.5 * before[idx] + 0.5 * e.detach(), dim=1)
    assert torch.allclose(mem.banks[1][idx], want, atol=1e-6)
    untouched = torch.tensor([0, 1, 3, 5, 6, 8, 9])
    assert torch.equal(mem.banks[1][untouched], before[untouched])
    bound = 1 / (4 / 3) ** 0.5
    assert mem.banks[0].abs().max() <= bound and not mem.banks[0].requires_grad


def _pair(B=4, D=3):
    return unit(B, D, dtype=torch.float32, seed=1), unit(B, D, dtype=torch.float32, seed=2)


def _bank_call(bank_a=(9, 3), bank_b=(9, 3), idx=None, **kw):
    """`bank_contrastive_terms` on the pair with random banks of the given shapes and idx (default zeros [4, 5])."""
    idx = torch.zeros(4, 5, dtype=torch.long) if idx is None else idx
    return lambda a, b: bank_contrastive_terms(a, b, torch.randn(*bank_a), torch.randn(*bank_b), idx, **kw)


@pytest.mark.parametrize("call,match", [
    (lambda a, b: contrastive_terms(a, b[:3], torch.tensor([0, 0, 1, 1])), "e_a and e_b"),
    (lambda a, b: contrastive_terms(a, torch.randn(4, 5), torch.tensor([0, 0, 1, 1])), "e_a and e_b"),
    (lambda a, b: contrastive_terms(a, b, torch.tensor([0, 0, 1, 1]), tau=0), "tau"),
    (lambda a, b: contrastive_terms(a, b, torch.tensor([0, 0, 1, 1]), tau=-0.1), "tau"),
    (lambda a, b: contrastive_terms(a, b, torch.tensor([0., 0., 1., 1.])), "labels"),
    (lambda a, b: contrastive_terms(a, b, torch.tensor([[0, 0, 1, 1]])), "labels"),
    (lambda a, b: contrastive_terms(a, b, torch.tensor([0, 0, 1])), "labels"),
    (lambda a, b: contrastive_terms(a, b, torch.tensor([0, 0, 1, 1]), weight=torch.ones(3)), "weight"),
    (lambda a, b: contrastive_terms(a, b, torch.tensor([0, 0, 1, 1]), kd_T=0.0), "kd_T"),
    (lambda a, b: contrastive_terms(a, b, torch.tensor([0, 0, 1, 1]), backend="cuda"), "backend"),
    (_bank_call(idx=torch.randint(0, 9, (4, 5)).float()), "idx"),
    (_bank_call(idx=torch.randint(0, 9, (3, 5))), "idx"),
    (_bank_call(idx=torch.full((4, 5), 9)), "idx"),
    (_bank_call(idx=torch.full((4, 5), -1)), "idx"),
    (_bank_call(idx=torch.zeros(4, 2, dtype=torch.long)), "idx"),
    (_bank_call(bank_a=(9, 4)), "bank_a"),
    (_bank_call(bank_b=(8, 3)), "bank_b"),
    (_bank_call(tau=0), "tau"),
    (_bank_call(pos_k=0), "pos_k"),
])
def test_bad_input_raises_one_clear_value_error(call, match):
    a, b = _pair()
    with pytest.raises(ValueError, match=match):
        call(a, b)


def test_triton_backend_on_cpu_tensors_is_refused_loudly(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    a, b = _pair()
    with pytest.raises(NotImplementedError, match="triton"):
        contrastive_terms(a, b, torch.tensor([0, 0, 1, 1]), backend="triton")


def test_auto_backend_keeps_fp64_and_the_meta_phase_on_the_reference(monkeypatch):
    import fastmcl.losses.backend as backend
    monkeypatch.setattr(backend, "triton_usable", lambda device: (True, ""))
    cuda = torch.device("cuda")
    assert backend.resolve_backend("auto", cuda, torch.float32) == "triton"
    assert backend.resolve_backend("auto", cuda, torch.float64) == "reference"
    assert backend.resolve_backend("auto", cuda, torch.float32, twice_differentiable=True) == "reference"
    assert backend.resolve_backend("auto", torch.device("cpu"), torch.float32) == "reference"
