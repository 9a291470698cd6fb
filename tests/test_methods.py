"""Method objectives against hand compositions of the formulas in docs/official_mcl.md and docs/official_baselines.md (fp64, tiny cohorts)."""
import pytest
import torch
import torch.nn.functional as F

from fastmcl.losses import bank_contrastive_terms, contrastive_terms, layer_pairs
from fastmcl.methods import ContrastWeights, build_method
from fastmcl.models import build_cohort

pytestmark = pytest.mark.usefixtures("fp64")  # tests/conftest.py


def kl(s, t, T=3.0):
    return T * T * F.kl_div(F.log_softmax(s / T, 1), F.softmax(t.detach() / T, 1), reduction="batchmean")


def tiny_batch():
    torch.manual_seed(0)
    x = torch.randn(6, 3, 32, 32)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    return x, y


@pytest.mark.parametrize("memory_bank", [False, True])
def test_lmcl_loss_equals_hand_composition(memory_bank):
    x, y = tiny_batch()
    cohort = build_cohort(["resnet32", "resnet32"], 3, aux=True).double()
    m = build_method("lmcl", feature_dims=cohort.feature_dims, num_stages=cohort.num_stages, num_classes=3,
                     memory_bank=memory_bank, num_samples=20).double()
    outs = cohort(x)
    idx = torch.randint(0, 20, (6, 9)) if memory_bank else None
    got = m(outs, y, idx)

    w = ContrastWeights.defaults("lmcl", memory_bank)
    want = 0.0
    for o in outs:
        want = want + sum(F.cross_entropy(z, y) for z in o.logits)
    aggs = []
    for i, o in enumerate(outs):  # aggregator: softmax over stages of an MLP on concatenated raw features
        agg = m.aggregators[i]
        a = agg(list(o.features), list(o.logits))
        aggs.append(a)
        want = want + F.cross_entropy(a, y)
    want = want + sum(kl(o.logits[-1], a) for o in outs for a in aggs)
    emb = [[m.heads[i][s](f) for s, f in enumerate(o.features)] for i, o in enumerate(outs)]
    for r, (i, k, j, z) in enumerate(layer_pairs(cohort.num_stages)):
        fa, fb = outs[i].features[k], outs[j].features[z]
        pa, pb = m.meta_net.proj[i][k](fa), m.meta_net.proj[j][z](fb)
        wt = torch.sigmoid((F.normalize(pa, dim=1) * F.normalize(pb, dim=1)).sum(1)).detach()
        if memory_bank:
            t = bank_contrastive_terms(emb[i][k], emb[j][z], m.memory.banks[i], m.memory.banks[j], idx,
                                       tau=w.tau, weight=wt)
        else:
            t = contrastive_terms(emb[i][k], emb[j][z], y, tau=w.tau, weight=wt)
        want = want + w.alpha * t.vcl + w.gamma * t.soft_vcl + w.beta * t.icl + w.lam * t.soft_icl
    assert torch.allclose(got.loss, want, rtol=1e-10), (got.loss, want)


def test_mcl_two_nets_with_logit_kd_equals_hand_composition():
    x, y = tiny_batch()
    cohort = build_cohort(["resnet32", "resnet32"], 3).double()
    m = build_method("mcl", feature_dims=cohort.feature_dims, num_stages=cohort.num_stages, num_classes=3,
                     logit_kd=True).double()
    outs = cohort(x)
    got = m(outs, y)
    z = [o.logits[-1] for o in outs]
    ens = (z[0] + z[1]) / 2
    e = [m.heads[i](o.features[-1]) for i, o in enumerate(outs)]
    t = contrastive_terms(e[0], e[1], y, tau=0.1)
    want = (F.cross_entropy(z[0], y) + F.cross_entropy(z[1], y) + kl(z[0], ens) + kl(z[1], ens)
            + 0.1 * t.vcl + 1.0 * t.soft_vcl + 0.1 * t.icl + 1.0 * t.soft_icl)
    assert torch.allclose(got.loss, want, rtol=1e-10)


def test_dml_equals_formula_and_detaches_peers():
    x, y = tiny_batch()
    cohort = build_cohort(["resnet32"] * 3, 3).double()
    m = build_method("dml", feature_dims=cohort.feature_dims, num_stages=cohort.num_stages, num_classes=3)
    outs = cohort(x)
    z = [o.logits[-1] for o in outs]
    want = sum(F.cross_entropy(z[k], y) + sum(kl(z[k], z[l]) for l in range(3) if l != k) / 2 for k in range(3))
    got = m(outs, y)
    assert torch.allclose(got.loss, want, rtol=1e-10)
    # net 0's parameters get gradient only from its own CE and its own student KLs
    z0 = z[0]
    g_full = torch.autograd.grad(got.loss, z0, retain_graph=True)[0]
    g_own = torch.autograd.grad(F.cross_entropy(z0, y) + (kl(z0, z[1]) + kl(z0, z[2])) / 2, z0)[0]
    assert torch.allclose(g_full, g_own, rtol=1e-10)


def test_memory_bank_update_after_step_uses_final_embeddings():
    x, y = tiny_batch()
    cohort = build_cohort(["resnet32", "resnet32"], 3, aux=True).double()
    m = build_method("lmcl", feature_dims=cohort.feature_dims, num_stages=cohort.num_stages, num_classes=3,
                     memory_bank=True, num_samples=20).double()
    out = m(cohort(x), y, torch.randint(0, 20, (6, 9)))
    index = torch.tensor([3, 4, 5, 6, 7, 8])
    before = m.memory.banks[1].clone()
    m.after_step(out, index)
    final_e1 = out.state["final_embeddings"][1]
    assert torch.allclose(m.memory.banks[1][index], F.normalize(0.5 * before[index] + 0.5 * final_e1, dim=1))


def test_build_method_bad_input():
    with pytest.raises(ValueError, match="method"):
        build_method("kdcl_typo", feature_dims=[64, 64], num_stages=[1, 1], num_classes=3)
    with pytest.raises(ValueError, match="at least 2"):
        build_method("lmcl", feature_dims=[64], num_stages=[3], num_classes=3)
    with pytest.raises(ValueError, match="num_samples"):
        build_method("mcl", feature_dims=[64, 64], num_stages=[1, 1], num_classes=3, memory_bank=True)
