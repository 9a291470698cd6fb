"""Online-KD baselines (ONE, OKDDip, KDCL, CL-ILR, PCL) against the formulas of docs/official_baselines.md written out by hand
(docs/official_baselines.md §1, §2), fp64 on tiny cohorts. Gradients of the objective's loss are compared with those of
the hand loss, so every detach (or its absence) there is checked too."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from fastmcl.methods import METHODS, MethodNeeds, build_method, method_needs
from fastmcl.methods.rampup import sigmoid_rampup
from fastmcl.methods.teachers import min_logit
from fastmcl.models import build_cohort
from fastmcl.models.base import BackboneOutput

B, C = 6, 3


pytestmark = pytest.mark.usefixtures("fp64")  # tests/conftest.py


def kl(student, teacher, T=3.0):
    """T² · KL(softmax(teacher/T) ‖ softmax(student/T)), batch mean, written out (no detach here)."""
    log_p_s = F.log_softmax(student / T, 1)
    log_p_t = F.log_softmax(teacher / T, 1)
    return T * T * (log_p_t.exp() * (log_p_t - log_p_s)).sum(1).mean()


def ce(z, y):
    return F.cross_entropy(z, y)


def labels():
    return torch.tensor([0, 0, 1, 1, 2, 2])


def images(n=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    if n is None:
        return torch.randn(B, 3, 8, 8, generator=g)
    return [torch.randn(B, 3, 8, 8, generator=g) for _ in range(n)]


def shared_cohort(m, seed=0):
    torch.manual_seed(seed)
    return build_cohort(["resnet32"] * m, C, shared_stem=True, trunk_stages=None)


def make(name, cohort, **kw):
    return build_method(name, feature_dims=cohort.feature_dims, num_stages=cohort.num_stages, num_classes=C,
                        trunk_dim=cohort.trunk_dim, **kw)


def assert_same_grads(got, want, params):
    params = [p for p in params if p.requires_grad]
    g_got = torch.autograd.grad(got, params, retain_graph=True, allow_unused=True)
    g_want = torch.autograd.grad(want, params, retain_graph=True, allow_unused=True)
    for p, a, b in zip(params, g_got, g_want):
        a = torch.zeros_like(p) if a is None else a
        b = torch.zeros_like(p) if b is None else b
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-10), (p.shape, (a - b).abs().max())


def close(a, b):
    assert torch.allclose(torch.as_tensor(a), torch.as_tensor(b), rtol=1e-6, atol=0), (a, b)


# --- ramp-up ---------------------------------------------------------------------------------------------------

def test_rampup_values():
    assert sigmoid_rampup(0, 80) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(40, 80) == pytest.approx(math.exp(-1.25))
    assert sigmoid_rampup(80, 80) == 1.0
    assert sigmoid_rampup(250, 80) == 1.0
    assert sigmoid_rampup(3, 0) == 1.0
    # not the shaoeric bug (phase divided by the loss weight 1): w(2) must still be tiny, w(79) close to 1
    assert sigmoid_rampup(2, 80) < 0.01 and sigmoid_rampup(79, 80) > 0.99
    with pytest.raises(ValueError, match="rampup"):
        sigmoid_rampup(0, -1)


def hand_outputs(m, seed=0):
    """Made-up member outputs (features [B, 4], logits [B, C], trunk [B, 5]) as gradient leaves."""
    g = torch.Generator().manual_seed(seed)
    trunk = torch.randn(B, 5, generator=g, requires_grad=True)
    return [BackboneOutput([torch.randn(B, 4, generator=g, requires_grad=True)],
                           [torch.randn(B, C, generator=g).mul(2).requires_grad_()], trunk) for _ in range(m)]


KD_TERMS = {"one": ["kd"], "okddip": ["kd", "kd_leader"], "clilr": ["kd"], "pcl": ["kd", "kd_mean"]}


@pytest.mark.parametrize("name", sorted(KD_TERMS))
def test_rampup_weights_the_distillation_terms_via_set_epoch(name):
    m = 4 if name == "okddip" else 3
    outs = hand_outputs(m)
    ema = hand_outputs(m, seed=1) if name == "pcl" else None
    obj = build_method(name, feature_dims=[4] * m, num_stages=[1] * m, num_classes=C, trunk_dim=5)
    obj.set_epoch(80)
    full = obj(outs, labels(), ema_outputs=ema)
    kd_full = sum(full.terms[k] for k in KD_TERMS[name])
    for epoch, w in ((0, math.exp(-5)), (40, math.exp(-1.25)), (80, 1.0), (120, 1.0)):
        obj.set_epoch(epoch)
        out = obj(outs, labels(), ema_outputs=ema)
        close(out.terms["rampup"], w)
        close(out.loss, full.loss - kd_full + w * kd_full)
    obj = build_method(name, feature_dims=[4] * m, num_stages=[1] * m, num_classes=C, trunk_dim=5,
                       rampup_epochs=0)
    close(obj(outs, labels(), ema_outputs=ema).terms["rampup"], 1.0)


def hand_kd(name, z, y, T, ema=None):
    """The KD part at temperature T, by hand (kdcl: MinLogit; clilr: mean of the others; pcl: L_pm)."""
    m = len(z)
    if name == "kdcl":
        shifted = torch.stack([zk - zk.gather(1, y.view(-1, 1)) for zk in z])
        return sum(kl(zk, shifted.min(0).values, T) for zk in z)
    if name == "clilr":
        return sum(kl(z[j], (sum(z) - z[j]) / (m - 1), T) for j in range(m))
    return sum(kl(z[j], ema[l], T) for j in range(m) for l in range(m) if l != j) / (m - 1)


@pytest.mark.parametrize("name, term", [("kdcl", "kd"), ("clilr", "kd"), ("pcl", "kd_mean")])
def test_kd_terms_scale_as_T_squared_times_kl(name, term):
    """The KD part is T² · KL(p_T(teacher) ‖ p_T(student)): divided by the plain KL at temperature T it gives T²."""
    outs, y = hand_outputs(3), labels()
    ema = hand_outputs(3, seed=1)
    z, zp = [o.logits[-1] for o in outs], [o.logits[-1] for o in ema]
    for T in (1.0, 2.0, 4.0):
        obj = build_method(name, feature_dims=[4] * 3, num_stages=[1] * 3, num_classes=C, kd_T=T, rampup_epochs=0)
        got = obj(outs, y, ema_outputs=ema).terms[term]
        plain_kl = hand_kd(name, z, y, T, zp) / T ** 2
        close(got / plain_kl, T ** 2)


# --- ONE -------------------------------------------------------------------------------------------------------

def test_one_loss_equals_hand_formula_and_detaches_the_ensemble_teacher():
    cohort = shared_cohort(3)
    obj = make("one", cohort)
    obj.set_epoch(40)
    y = labels()
    outs = cohort(images())
    got = obj(outs, y)

    z = [o.logits[-1] for o in outs]
    fc, bn = obj.gate.gate[0], obj.gate.gate[1]
    a = outs[0].trunk @ fc.weight.T + fc.bias                      # FC(GAP(trunk))
    a = (a - a.mean(0)) / torch.sqrt(a.var(0, unbiased=False) + bn.eps) * bn.weight + bn.bias  # BN (batch stats)
    g = torch.softmax(torch.relu(a), 1)
    z_e = sum(g[:, j:j + 1] * z[j] for j in range(3))
    w = math.exp(-1.25)
    want = sum(ce(zj, y) for zj in z) + ce(z_e, y) + w * sum(kl(zj, z_e.detach()) for zj in z)
    close(got.loss, want)
    close(got.terms["ens_ce"], ce(z_e, y))
    assert_same_grads(got.loss, want, [*cohort.parameters(), *obj.parameters()])
    # the gate learns from CE(z_e) only: the KD term's teacher is detached
    g_gate = torch.autograd.grad(got.loss, fc.weight, retain_graph=True)[0]
    assert torch.allclose(g_gate, torch.autograd.grad(ce(z_e, y), fc.weight)[0], rtol=1e-8)

    obj.eval()
    named = obj.eval_logits(outs)
    assert list(named) == ["net0", "net1", "net2", "ens"] and obj.deployed == "net0"


def test_one_needs_a_trunk():
    with pytest.raises(ValueError, match="trunk_dim"):
        build_method("one", feature_dims=[64] * 3, num_stages=[1] * 3, num_classes=C)
    obj = build_method("one", feature_dims=[4] * 3, num_stages=[1] * 3, num_classes=C, trunk_dim=5)
    outs = [o._replace(trunk=None) for o in hand_outputs(3)]
    with pytest.raises(ValueError, match="shared-trunk"):
        obj(outs, labels())


# --- OKDDip ----------------------------------------------------------------------------------------------------

def okddip_hand_loss(obj, outs, y, w, *, detach_leader_target=False):
    z = [o.logits[-1] for o in outs]
    peers, lead = z[:-1], z[-1]
    n = len(peers)
    h = torch.stack([o.features[-1] for o in outs[:-1]], 1)        # [B, n, C_feat]
    q = h @ obj.attention.query.weight.T
    k = h @ obj.attention.key.weight.T
    A = torch.softmax(torch.einsum("bjd,bld->bjl", q, k), dim=2)   # per sample, rows over the peers
    targets = [sum(A[:, j, l:l + 1] * peers[l] for l in range(n)) for j in range(n)]
    lead_target = sum(peers) / n
    if detach_leader_target:
        lead_target = lead_target.detach()
    return (sum(ce(zj, y) for zj in peers) + ce(lead, y)
            + w * (sum(kl(peers[j], targets[j]) for j in range(n)) + kl(lead, lead_target)))


def test_okddip_loss_equals_hand_formula_and_targets_are_not_detached():
    cohort = shared_cohort(4)
    obj = make("okddip", cohort)
    obj.set_epoch(40)
    y = labels()
    outs = cohort(images())
    got = obj(outs, y)
    want = okddip_hand_loss(obj, outs, y, math.exp(-1.25))
    close(got.loss, want)
    assert_same_grads(got.loss, want, [*cohort.parameters(), *obj.parameters()])
    # Q/K get their training signal through the (not detached) distillation targets
    gq, gk = torch.autograd.grad(got.loss, [obj.attention.query.weight, obj.attention.key.weight])
    assert gq.abs().sum() > 0 and gk.abs().sum() > 0
    assert obj.attention.query.weight.shape == (cohort.feature_dims[0] // 8, cohort.feature_dims[0])

    named = obj.eval_logits(outs)
    assert list(named) == ["net0", "net1", "net2", "net3", "ens"] and obj.deployed == "net3"
    assert torch.allclose(named["ens"], sum(o.logits[-1] for o in outs[:3]) / 3)


def test_okddip_leader_target_carries_gradient_to_the_peers():
    """Official `KL_Loss` has no detach: KL_T(mean peers ‖ leader) also pulls the peers toward the leader."""
    obj = build_method("okddip", feature_dims=[4] * 3, num_stages=[1] * 3, num_classes=C, rampup_epochs=0)
    outs, y = hand_outputs(3), labels()
    peer = outs[0].logits[-1]
    g_got = torch.autograd.grad(obj(outs, y).loss, peer)[0]
    g_attached = torch.autograd.grad(okddip_hand_loss(obj, outs, y, 1.0), peer)[0]
    g_detached = torch.autograd.grad(okddip_hand_loss(obj, outs, y, 1.0, detach_leader_target=True), peer)[0]
    assert torch.allclose(g_got, g_attached, rtol=1e-8)
    assert not torch.allclose(g_got, g_detached, rtol=1e-3)


# --- KDCL ------------------------------------------------------------------------------------------------------

def test_min_logit_by_hand():
    z1 = torch.tensor([[1.0, 2.0, 3.0], [0.0, 5.0, -1.0]])
    z2 = torch.tensor([[3.0, 1.0, 0.0], [2.0, 2.0, 2.0]])
    y = torch.tensor([0, 1])
    t = min_logit([z1, z2], y)
    # row 0: z1 − 1 = [0, 1, 2], z2 − 3 = [0, −2, −3]; row 1: z1 − 5 = [−5, 0, −6], z2 − 2 = [0, 0, 0]
    assert torch.equal(t, torch.tensor([[0.0, -2.0, -3.0], [-5.0, 0.0, -6.0]]))
    assert torch.equal(t.gather(1, y.view(-1, 1)), torch.zeros(2, 1))


def test_kdcl_loss_equals_hand_formula_with_views():
    torch.manual_seed(0)
    cohort = build_cohort(["resnet32"] * 2, C)                      # independent networks
    obj = make("kdcl", cohort)
    y = labels()
    outs = cohort(images(2))                                        # one view per network
    got = obj(outs, y)

    z = [o.logits[-1] for o in outs]
    shifted = [zk - zk.gather(1, y.view(-1, 1)) for zk in z]
    z_t = torch.minimum(shifted[0], shifted[1]).detach()
    assert torch.allclose(z_t.gather(1, y.view(-1, 1)), torch.zeros(B, 1))
    assert torch.allclose(min_logit(z, y), z_t)
    assert not min_logit(z, y).requires_grad
    want = ce(z[0], y) + ce(z[1], y) + kl(z[0], z_t) + kl(z[1], z_t)
    close(got.loss, want)
    assert_same_grads(got.loss, want, list(cohort.parameters()))
    obj.set_epoch(0)                                                # no ramp-up for KDCL
    close(obj(outs, y).loss, want)
    named = obj.eval_logits(outs)
    assert list(named) == ["net0", "net1", "ens"] and torch.allclose(named["ens"], (z[0] + z[1]) / 2)


# --- CL-ILR ----------------------------------------------------------------------------------------------------

def test_clilr_loss_equals_hand_formula_and_detaches_the_peer_mean():
    cohort = shared_cohort(3)
    obj = make("clilr", cohort)
    obj.set_epoch(80)
    y = labels()
    outs = cohort(images())
    got = obj(outs, y)
    z = [o.logits[-1] for o in outs]
    others = [((z[1] + z[2]) / 2).detach(), ((z[0] + z[2]) / 2).detach(), ((z[0] + z[1]) / 2).detach()]
    want = sum(ce(zj, y) for zj in z) + sum(kl(z[j], others[j]) for j in range(3))
    close(got.loss, want)
    assert_same_grads(got.loss, want, list(cohort.parameters()))
    assert list(obj.eval_logits(outs)) == ["net0", "net1", "net2", "ens"]


def test_clilr_trunk_gradient_is_scaled_by_one_over_m():
    assert method_needs("clilr").trunk_grad_scale
    cohort = shared_cohort(3)
    obj = make("clilr", cohort)
    x, y = images(), labels()
    cohort.eval()                                                   # same forward twice (no BN-stat drift)

    def grads(scale):
        cohort.trunk_grad_scale = scale
        loss = obj(cohort(x), y).loss
        return (torch.autograd.grad(loss, list(cohort.trunk.parameters()), retain_graph=True),
                torch.autograd.grad(loss, list(cohort.nets.parameters())))

    trunk1, branch1 = grads(1.0)
    trunk3, branch3 = grads(1 / 3)
    for a, b in zip(trunk1, trunk3):
        assert torch.allclose(b, a / 3, rtol=1e-8, atol=1e-14)
    for a, b in zip(branch1, branch3):
        assert torch.allclose(a, b, rtol=1e-8)


# --- PCL -------------------------------------------------------------------------------------------------------

def test_pcl_loss_equals_hand_formula_and_ema_gets_no_gradient():
    cohort = shared_cohort(3)
    ema = copy.deepcopy(cohort)
    with torch.no_grad():                                           # a temporal mean that differs from the student
        for p in ema.parameters():
            p.add_(0.05 * torch.randn_like(p))
    obj = make("pcl", cohort)
    obj.set_epoch(40)
    y = labels()
    views = images(3)
    outs = cohort(views)
    ema_outs = ema(views)                                           # with grad on purpose: the objective must cut it
    got = obj(outs, y, ema_outputs=ema_outs)

    z = [o.logits[-1] for o in outs]
    zp = [o.logits[-1].detach() for o in ema_outs]
    fc = obj.ensemble.fc
    z_e = torch.cat([o.features[-1] for o in outs], 1) @ fc.weight.T + fc.bias
    w = math.exp(-1.25)
    l_pe = sum(kl(z[j], z_e.detach()) for j in range(3))
    l_pm = sum(sum(kl(z[j], zp[l]) for l in range(3) if l != j) / 2 for j in range(3))
    want = ce(z_e, y) + sum(ce(zj, y) for zj in z) + w * (l_pe + l_pm)
    close(got.loss, want)
    close(got.terms["kd_mean"], w * l_pm)
    assert_same_grads(got.loss, want, [*cohort.parameters(), *obj.parameters()])
    assert all(g is None for g in torch.autograd.grad(got.loss, list(ema.parameters()), retain_graph=True,
                                                      allow_unused=True))
    # the ensemble FC learns from CE(z_e) only (its KD role is detached)
    assert torch.allclose(torch.autograd.grad(got.loss, fc.weight, retain_graph=True)[0],
                          torch.autograd.grad(ce(z_e, y), fc.weight)[0], rtol=1e-8)

    named = obj.eval_logits(outs, ema_outs)
    assert list(named) == ["net0", "net1", "net2", "ens", "ema0", "ema1", "ema2"] and obj.deployed == "ema0"
    assert torch.allclose(named["ens"], z_e) and torch.allclose(named["ema1"], zp[1])
    with pytest.raises(ValueError, match="pcl.*ema_outputs"):
        obj(outs, y)


# --- needs, registry, member counts ----------------------------------------------------------------------------

def test_method_needs_and_registry():
    assert METHODS == ("baseline", "dml", "one", "okddip", "kdcl", "clilr", "pcl", "mcl", "lmcl")
    assert {n: method_needs(n).aux for n in METHODS} == {n: n == "lmcl" for n in METHODS}
    assert method_needs("dml") == MethodNeeds()
    assert method_needs("one") == MethodNeeds(shared_trunk=True, default_members=3)
    assert method_needs("okddip") == MethodNeeds(shared_trunk=True, min_members=3, default_members=4)
    assert method_needs("kdcl") == MethodNeeds(views=True)
    assert method_needs("clilr") == MethodNeeds(shared_trunk=True, trunk_grad_scale=True, default_members=3)
    assert method_needs("pcl") == MethodNeeds(shared_trunk=True, views=True, ema=True, default_members=3)
    assert method_needs("mcl").m_per_class == 2 and method_needs("mcl", memory_bank=True).m_per_class == 0
    assert method_needs("lmcl").aux
    with pytest.raises(ValueError, match="method must be one of"):
        method_needs("pcl_typo")
    for name in ("one", "okddip", "kdcl", "clilr", "pcl"):
        m = method_needs(name).default_members
        obj = build_method(name, feature_dims=[8] * m, num_stages=[1] * m, num_classes=C, trunk_dim=4)
        assert obj.needs == method_needs(name)


@pytest.mark.parametrize("name, too_few", [("one", 1), ("okddip", 2), ("kdcl", 1), ("clilr", 1), ("pcl", 1)])
def test_member_count_errors_name_the_method(name, too_few):
    with pytest.raises(ValueError, match=f"{name}.*at least"):
        build_method(name, feature_dims=[8] * too_few, num_stages=[1] * too_few, num_classes=C, trunk_dim=4)
    m = method_needs(name).default_members
    obj = build_method(name, feature_dims=[4] * m, num_stages=[1] * m, num_classes=C, trunk_dim=5)
    with pytest.raises(ValueError, match=f"{name}.*built for {m} members"):
        obj(hand_outputs(m + 1), labels(), ema_outputs=hand_outputs(m + 1))


def test_baselines_have_no_memory_bank():
    with pytest.raises(ValueError, match="no memory bank"):
        build_method("pcl", feature_dims=[8] * 3, num_stages=[1] * 3, num_classes=C, memory_bank=True,
                     num_samples=10)
