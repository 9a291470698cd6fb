"""The deduplicated cohort objective equals the naive sum of official pair calls (docs/fidelity.md, last paragraph)."""
import pytest
import torch
import torch.nn.functional as F

from fastmcl.losses import (bank_contrastive_terms, cohort_bank_contrastive_terms, cohort_contrastive_terms,
                            contrastive_terms, layer_pairs, lmcl_plan, mcl_plan)
from fastmcl.losses.plan import ContrastPlan


def unit(*shape, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1).to(dtype).requires_grad_()


def embeddings_for(num_stages, B, D, seed=0):
    return [unit(B, D, seed=seed + u) for u in range(sum(num_stages))]


def close(got, want, rtol=1e-6):
    return all(torch.allclose(g, w, rtol=rtol, atol=1e-9) for g, w in zip(got, want))


def grads(terms, inputs):
    return torch.autograd.grad(sum(terms), inputs)


@pytest.mark.parametrize("num_stages", [[3, 3], [1, 1], [2, 3], [2, 2, 2]])
@pytest.mark.parametrize("weighted", [False, True])
def test_lmcl_inbatch_dedup_equals_naive_pair_sum(num_stages, weighted):
    B, D = 10, 8
    e = embeddings_for(num_stages, B, D)
    y = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3, 3, 4])
    pairs = layer_pairs(num_stages)
    plan = lmcl_plan(num_stages)
    w = torch.rand(len(pairs), B, dtype=torch.float64) if weighted else None
    offs = [sum(num_stages[:i]) for i in range(len(num_stages))]
    naive = [0.0] * 4
    for r, (i, k, j, z) in enumerate(pairs):
        t = contrastive_terms(e[offs[i] + k], e[offs[j] + z], y, weight=None if w is None else w[r])
        naive = [a + b for a, b in zip(naive, t)]
    got = cohort_contrastive_terms(e, y, plan, weights=w)
    assert close(got, naive)
    assert all(torch.allclose(g, n, rtol=1e-6, atol=1e-12) for g, n in zip(grads(got, e), grads(naive, e)))


@pytest.mark.parametrize("num_stages", [[4, 4], [3, 2]])
@pytest.mark.parametrize("k_chunk", [None, 5])
def test_lmcl_bank_dedup_equals_naive_pair_sum(num_stages, k_chunk):
    B, D, N, K, pos_k = 5, 8, 40, 13, 2
    e = embeddings_for(num_stages, B, D, seed=3)
    banks = [unit(N, D, seed=100 + i).detach() for i in range(len(num_stages))]
    idx = torch.randint(0, N, (B, K), generator=torch.Generator().manual_seed(1))
    pairs = layer_pairs(num_stages)
    w = torch.rand(len(pairs), B, dtype=torch.float64)
    offs = [sum(num_stages[:i]) for i in range(len(num_stages))]
    naive = [0.0] * 4
    for r, (i, k, j, z) in enumerate(pairs):
        t = bank_contrastive_terms(e[offs[i] + k], e[offs[j] + z], banks[i], banks[j], idx, pos_k=pos_k, weight=w[r])
        naive = [a + b for a, b in zip(naive, t)]
    got = cohort_bank_contrastive_terms(e, banks, idx, lmcl_plan(num_stages), weights=w, pos_k=pos_k,
                                        k_chunk=k_chunk)
    assert close(got, naive)
    assert all(torch.allclose(g, n, rtol=1e-6, atol=1e-12) for g, n in zip(grads(got, e), grads(naive, e)))


def test_mcl_two_nets_is_one_pair_call_and_three_nets_follow_spec():
    B, D = 6, 5
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    e = embeddings_for([1, 1, 1], B, D, seed=7)
    assert close(cohort_contrastive_terms(e[:2], y, mcl_plan(2)), contrastive_terms(e[0], e[1], y))
    # n = 3: ICL/soft ICL over pairs i<j; VCL once per network; soft VCL over ordered pairs (docs/official_mcl.md §1.2).
    calls = {(i, j): contrastive_terms(e[i], e[j], y) for i in range(3) for j in range(3) if i < j}
    vcl_once = sum(contrastive_terms(e[i], e[i], y).vcl / 2 for i in range(3))
    want_icl = sum(c.icl for c in calls.values())
    want_soft_icl = sum(c.soft_icl for c in calls.values())
    want_soft_vcl = sum(c.soft_vcl for c in calls.values())  # each unordered pair's call has both directions
    got = cohort_contrastive_terms(e, y, mcl_plan(3))
    assert close(got, [vcl_once, want_soft_vcl, want_icl, want_soft_icl])


def test_streamed_bank_logits_use_less_memory_path_same_grad_fp32():
    B, D, N, K = 4, 16, 100, 37
    e = [unit(B, D, seed=s, dtype=torch.float32) for s in range(4)]
    banks = [unit(N, D, seed=50 + i, dtype=torch.float32).detach() for i in range(2)]
    idx = torch.randint(0, N, (B, K), generator=torch.Generator().manual_seed(2))
    plan = lmcl_plan([2, 2])
    plain = cohort_bank_contrastive_terms(e, banks, idx, plan)
    streamed = cohort_bank_contrastive_terms(e, banks, idx, plan, k_chunk=8)
    assert close(plain, streamed, rtol=1e-5)
    for a, b in zip(grads(plain, e), grads(streamed, e)):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_plan_rejects_mixed_view_and_cross_kl():
    with pytest.raises(ValueError, match="view block"):
        ContrastPlan((0, 1), ce=(), kl=((1, (0, 0), (0, 1), 0),), num_weight_rows=1)


def test_cohort_bad_input():
    y = torch.tensor([0, 0, 1, 1])
    e = [unit(4, 3, seed=s) for s in range(6)]
    plan = lmcl_plan([3, 3])
    with pytest.raises(ValueError, match="embeddings"):
        cohort_contrastive_terms(e[:5], y, plan)
    with pytest.raises(ValueError, match="weights"):
        cohort_contrastive_terms(e, y, plan, weights=torch.ones(17, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="banks"):
        cohort_bank_contrastive_terms(e, [torch.randn(9, 3)], torch.zeros(4, 5, dtype=torch.long), plan)
    with pytest.raises(ValueError, match="idx"):
        cohort_bank_contrastive_terms(e, [torch.randn(9, 3)] * 2, torch.full((4, 5), 12), plan)
    with pytest.raises(ValueError, match="k_chunk"):
        cohort_bank_contrastive_terms(e, [torch.randn(9, 3)] * 2, torch.zeros(4, 5, dtype=torch.long), plan, k_chunk=0)
