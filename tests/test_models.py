"""Model zoo: backbones (+ L-MCL aux branches), heads, meta-network, cohort (docs/official_mcl.md §1.1, §1.4, §2.1, §2.3, Q3;
docs/official_baselines.md §1.1, §3)."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from fastmcl.models import (
    ARCHS,
    Aggregator,
    BackboneOutput,
    Cohort,
    EmbedHead,
    MetaWeightNet,
    build_backbone,
    build_cohort,
    is_imagenet_arch,
)

CIFAR_ARCHS = ["resnet32", "resnet56", "resnet110", "wrn_16_2", "wrn_40_2"]
IMAGENET_ARCHS = ["resnet18", "resnet34", "resnet50"]
FEATURE_DIM = {"resnet32": 64, "resnet56": 64, "resnet110": 256, "wrn_16_2": 128, "wrn_40_2": 128,
               "resnet18": 512, "resnet34": 512, "resnet50": 2048}

# Published sizes in millions (CIFAR: 100 classes, ImageNet: 1000 classes). ResNet-110 is the *bottleneck* ResNet of
# the L-MCL/MCL repos (docs/official_mcl.md §2.1, 256-d feature): 1.17 M as listed in winycg/MCL-OKD's README (the 1.7 M figure
# belongs to the basic-block ResNet-110, which is not the architecture docs/official_mcl.md §2.1 describes).
REFERENCE_MPARAMS = {"resnet32": 0.47, "resnet56": 0.86, "resnet110": 1.17, "wrn_16_2": 0.70, "wrn_40_2": 2.26,
                     "resnet18": 11.69, "resnet34": 21.80, "resnet50": 25.56}
# Exact counts of this implementation (regression guard; option-B 1x1-conv shortcuts as the official code).
EXACT_PARAMS = {"resnet32": 472_756, "resnet56": 861_620, "resnet110": 1_170_868, "wrn_16_2": 703_284,
                "wrn_40_2": 2_255_156, "resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032}


def n_params(*modules: torch.nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def image(arch: str, batch: int = 2, seed: int = 0) -> torch.Tensor:
    size = 64 if is_imagenet_arch(arch) else 32
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------------------- registry

def test_registry_names_and_kind():
    assert set(ARCHS) == set(CIFAR_ARCHS + IMAGENET_ARCHS)
    assert [a for a in ARCHS if is_imagenet_arch(a)] == IMAGENET_ARCHS


@pytest.mark.parametrize("bad", ["resnet20", "ResNet32", "", None])
def test_unknown_arch_raises(bad):
    with pytest.raises(ValueError, match=r"arch.*resnet32.*wrn_40_2"):
        build_backbone(bad, 10)
    with pytest.raises(ValueError, match="arch"):
        is_imagenet_arch(bad)


@pytest.mark.parametrize("bad", [1, 0, -3, 2.0, True])
def test_bad_num_classes_raises(bad):
    with pytest.raises(ValueError, match="num_classes"):
        build_backbone("resnet32", bad)


# ------------------------------------------------------------------------------------------------- parameter counts

def test_param_counts_match_published_figures():
    rows, failures = [], []
    for arch in ARCHS:
        n = n_params(build_backbone(arch, 1000 if is_imagenet_arch(arch) else 100))
        ref = REFERENCE_MPARAMS[arch] * 1e6
        rows.append(f"{arch:>10s}: {n / 1e6:8.4f} M  (reference {ref / 1e6:.2f} M, {100 * (n / ref - 1):+.2f} %)")
        if abs(n / ref - 1) > 0.02:
            failures.append(arch)
        if n != EXACT_PARAMS[arch]:
            failures.append(f"{arch} exact {n} != {EXACT_PARAMS[arch]}")
    print("\nparameter counts (no aux):\n" + "\n".join(rows))
    assert not failures, failures


def test_resnet32_aux_structure_and_size():
    base = build_backbone("resnet32", 100)
    net = build_backbone("resnet32", 100, aux=True)
    assert net.num_stages == 3 and len(net.aux) == 2
    classifiers = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert len(classifiers) == 3 and all(c.out_features == 100 and c.in_features == 64 for c in classifiers)
    # aux 1 = fresh layer2+layer3 (+fc), aux 2 = fresh layer3 (+fc), same depth as the backbone (docs/official_mcl.md §2.1)
    assert [len(s) for s in net.aux[0].stages] == [5, 5] and [len(s) for s in net.aux[1].stages] == [5]
    fc = n_params(base.fc)
    expected = n_params(base) + (n_params(base.layer2, base.layer3) + fc) + (n_params(base.layer3) + fc)
    assert n_params(net) == expected
    print(f"\nresnet32+aux: {n_params(net) / 1e6:.4f} M (backbone {n_params(base) / 1e6:.4f} M); "
          f"2 x resnet32+aux = {2 * n_params(net) / 1e6:.2f} M (docs/official_mcl.md §4.1: 2.56 M)")
    assert abs(2 * n_params(net) / 2.56e6 - 1) < 0.01


def test_imagenet_aux_uses_one_block_per_stage():
    net = build_backbone("resnet50", 1000, aux=True)
    assert net.num_stages == 4 and len(net.aux) == 3
    assert [[len(s) for s in br.stages] for br in net.aux] == [[1, 1, 1], [1, 1], [1]]
    assert all(br.fc.in_features == 2048 for br in net.aux)
    print(f"\nresnet50+aux: {n_params(net) / 1e6:.2f} M; resnet18+aux: "
          f"{n_params(build_backbone('resnet18', 1000, aux=True)) / 1e6:.2f} M")


# ---------------------------------------------------------------------------------------------------------- forward

@pytest.mark.parametrize("aux", [False, True], ids=["plain", "aux"])
@pytest.mark.parametrize("arch", CIFAR_ARCHS + IMAGENET_ARCHS)
def test_forward_shapes(arch, aux):
    torch.manual_seed(0)
    net = build_backbone(arch, 7, aux=aux).eval()
    s = (4 if is_imagenet_arch(arch) else 3) if aux else 1
    assert net.num_stages == s and net.feature_dim == FEATURE_DIM[arch]
    with torch.no_grad():
        out = net(image(arch))
    assert isinstance(out, BackboneOutput)
    assert len(out.features) == len(out.logits) == s
    for f, z in zip(out.features, out.logits):
        assert f.shape == (2, FEATURE_DIM[arch]) and z.shape == (2, 7)
        assert torch.isfinite(f).all() and torch.isfinite(z).all()


@pytest.mark.parametrize("arch", ["resnet32", "wrn_16_2", "resnet18"])
def test_channels_last_matches_nchw(arch):
    torch.manual_seed(0)
    net = build_backbone(arch, 10, aux=True).train()  # batch statistics keep activations O(1) at fresh init
    net_cl = copy.deepcopy(net).to(memory_format=torch.channels_last)
    x = image(arch, batch=4)
    ref = net(x)
    out = net_cl(x.contiguous(memory_format=torch.channels_last))
    for a, b in zip(ref.features + ref.logits, out.features + out.logits):
        assert (a - b).abs().max().item() <= 1e-5 * max(1.0, a.abs().max().item())


def test_autocast_channels_last_train_step():
    torch.manual_seed(0)
    cohort = build_cohort(["resnet32", "wrn_16_2"], 10, aux=True).to(memory_format=torch.channels_last)
    x = image("resnet32", batch=4).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = cohort(x)
        loss = sum(F.cross_entropy(z.float(), torch.arange(4)) for o in outs for z in o.logits)
    loss.backward()
    assert all(z.dtype == torch.bfloat16 for o in outs for z in o.logits)
    assert torch.isfinite(loss) and all(p.grad is not None for p in cohort.parameters())


# ------------------------------------------------------------------------------------------------------------ heads

def test_embed_head_unit_norm_and_formula():
    torch.manual_seed(0)
    head = EmbedHead(64)
    x = torch.randn(6, 64)
    e = head(x)
    assert e.shape == (6, 128)
    torch.testing.assert_close(e.norm(dim=1), torch.ones(6))
    h = head.proj[2](torch.relu(head.proj[0](x)))
    torch.testing.assert_close(e, h / torch.sqrt((h * h).sum(1, keepdim=True)))


def test_aggregator_fixed_weights_hand_computed():
    agg = Aggregator(num_stages=2, dim=2, num_classes=3)
    with torch.no_grad():  # gate output = bias only → softmax weights (0.25, 0.75) for every sample
        agg.gate[2].weight.zero_()
        agg.gate[2].bias.copy_(torch.log(torch.tensor([1.0, 3.0])))
    feats = [torch.randn(2, 2), torch.randn(2, 2)]
    l0 = torch.tensor([[1.0, 2.0, 3.0], [0.0, -4.0, 8.0]])
    l1 = torch.tensor([[5.0, 6.0, 7.0], [4.0, 0.0, -8.0]])
    expected = torch.tensor([[4.0, 5.0, 6.0], [3.0, -1.0, -4.0]])  # 0.25·l0 + 0.75·l1
    torch.testing.assert_close(agg(feats, [l0, l1]), expected)


def test_aggregator_matches_explicit_formula():
    torch.manual_seed(0)
    agg = Aggregator(num_stages=3, dim=4, num_classes=5).double()
    feats = [torch.randn(3, 4, dtype=torch.float64) for _ in range(3)]
    logits = [torch.randn(3, 5, dtype=torch.float64) for _ in range(3)]
    W1, b1, W2, b2 = agg.gate[0].weight, agg.gate[0].bias, agg.gate[2].weight, agg.gate[2].bias
    out = agg(feats, logits)
    for b in range(3):
        cat = torch.cat([f[b] for f in feats])
        a = torch.softmax(W2 @ torch.relu(W1 @ cat + b1) + b2, dim=0)
        manual = sum(a[s] * logits[s][b] for s in range(3))
        torch.testing.assert_close(out[b], manual)
    with pytest.raises(ValueError, match="features/logits"):
        agg(feats[:2], logits[:2])


# ----------------------------------------------------------------------------------------------------- meta network

def lmcl_pairs(stages: list[int]) -> list[tuple[int, int, int, int]]:
    """Ordered pairs i≠j, every stage k of i and z of j (docs/official_mcl.md §2.2 loop order)."""
    n = len(stages)
    return [(i, k, j, z) for i in range(n) for j in range(n) if i != j
            for k in range(stages[i]) for z in range(stages[j])]


def test_meta_weight_net_matches_naive_loop_fp64():
    torch.manual_seed(0)
    dims = [[64, 64, 64], [128, 128, 128]]  # heterogeneous pair (resnet32 & wrn_16_2 + aux)
    meta = MetaWeightNet(dims).double()
    B = 5
    feats = [[torch.randn(B, d, dtype=torch.float64) for d in net] for net in dims]
    pairs = lmcl_pairs([3, 3])
    w = meta(feats, pairs)
    assert w.shape == (len(pairs), B) == (18, 5)
    for c, (i, k, j, z) in enumerate(pairs):
        for b in range(B):
            pa = meta.proj[i][k].weight @ feats[i][k][b] + meta.proj[i][k].bias
            pb = meta.proj[j][z].weight @ feats[j][z][b] + meta.proj[j][z].bias
            cos = (pa @ pb) / (pa.norm() * pb.norm())
            assert abs(w[c, b].item() - 1 / (1 + math.exp(-cos.item()))) < 1e-12
    assert (w > torch.sigmoid(torch.tensor(-1.0))).all() and (w < torch.sigmoid(torch.tensor(1.0))).all()
    # every unordered pair appears twice with the same weights (docs/official_mcl.md §2.2)
    torch.testing.assert_close(meta(feats, [(1, 2, 0, 1)]), meta(feats, [(0, 1, 1, 2)]))
    assert meta(feats, []).shape == (0, B)


def test_meta_weight_net_bad_inputs():
    meta = MetaWeightNet([[8, 8], [8, 8]])
    feats = [[torch.randn(2, 8) for _ in range(2)] for _ in range(2)]
    with pytest.raises(ValueError, match="pairs"):
        meta(feats, [(0, 2, 1, 0)])
    with pytest.raises(ValueError, match="pairs"):
        meta(feats, [(0, 0, 2, 0)])
    with pytest.raises(ValueError, match="features"):
        meta(feats[:1], [(0, 0, 0, 1)])


# ----------------------------------------------------------------------------------------------------------- cohort

def test_independent_cohort():
    torch.manual_seed(0)
    cohort = build_cohort(["resnet32", "resnet32"], 10)
    assert isinstance(cohort, Cohort) and not cohort.shared_trunk
    assert cohort.members == 2 and cohort.feature_dims == [64, 64] and cohort.num_stages == [1, 1]
    assert n_params(cohort) == 2 * EXACT_PARAMS["resnet32"] - 2 * 90 * 65  # 10 instead of 100 classes
    a, b = (list(cohort.member_modules(i)[0].parameters()) for i in range(2))
    assert not {id(p) for p in a} & {id(p) for p in b}
    assert not torch.equal(a[0], b[0])  # independent initialisations
    outs = cohort.eval()(image("resnet32"))
    assert len(outs) == 2 and all(o.logits[0].shape == (2, 10) for o in outs)


def test_shared_stem_cohort_shares_trunk():
    torch.manual_seed(0)
    single = EXACT_PARAMS["resnet32"]
    cohort = build_cohort(["resnet32"] * 4, 100, shared_stem=True)
    assert cohort.shared_trunk and cohort.members == 4 and cohort.num_stages == [1] * 4
    trunk = n_params(cohort.trunk)
    branch = n_params(cohort.nets[0])
    assert n_params(cohort) == trunk + 4 * branch  # trunk counted once
    assert all(n_params(*cohort.member_modules(i)) == single for i in range(4))  # each member = one ResNet-32
    print(f"\nMCL x4 shared-stem resnet32: {n_params(cohort) / 1e6:.4f} M "
          f"(trunk {trunk} params, branch {branch}); 4 independent: {4 * single / 1e6:.4f} M")

    calls = []
    cohort.trunk.register_forward_hook(lambda *_: calls.append(1))
    outs = cohort(image("resnet32", batch=4))
    assert len(calls) == 1 and len(outs) == 4
    outs[1].logits[0].sum().backward()  # gradient from branch 1 reaches the shared trunk, not branch 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in cohort.trunk.parameters()
               if p.requires_grad and p.dim() > 1)
    assert all(p.grad is None for p in cohort.nets[0].parameters())
    assert all(p.grad is not None for p in cohort.nets[1].parameters())


def test_shared_stem_pcl_split():
    cohort = build_cohort(["wrn_16_2"] * 3, 10, shared_stem=True, trunk_stages=2)
    assert len(cohort.trunk) == 3  # stem, layer1, layer2 (docs/official_baselines.md §1.1)
    assert all(n_params(*cohort.member_modules(i)) == n_params(build_backbone("wrn_16_2", 10)) for i in range(3))
    outs = cohort.eval()(image("wrn_16_2"))
    assert [o.features[0].shape for o in outs] == [(2, 128)] * 3


@pytest.mark.parametrize("shared", [False, True], ids=["independent", "shared_stem"])
def test_per_member_views(shared):
    torch.manual_seed(0)
    cohort = build_cohort(["resnet32"] * 3, 10, shared_stem=shared).eval()
    views = [image("resnet32", seed=s) for s in range(3)]
    calls = []
    if shared:
        cohort.trunk.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        outs = cohort(views)
        for i, v in enumerate(views):
            if shared:
                ref = cohort.nets[i](cohort.trunk(v))[1]
            else:
                ref = cohort.nets[i](v).logits[-1]
            torch.testing.assert_close(outs[i].logits[-1], ref)
    if shared:
        assert len(calls) == 3 + 3  # once per view inside forward, + 3 reference calls
    assert not torch.allclose(outs[0].logits[-1], outs[1].logits[-1])


def test_heterogeneous_cohort_with_aux():
    cohort = build_cohort(["resnet32", "wrn_40_2"], 100, aux=True)
    assert cohort.feature_dims == [64, 128] and cohort.num_stages == [3, 3]
    assert cohort.archs == ["resnet32", "wrn_40_2"]
    with torch.no_grad():
        outs = cohort.eval()(image("resnet32"))
    for o, d in zip(outs, [64, 128]):
        assert [f.shape for f in o.features] == [(2, d)] * 3 and [z.shape for z in o.logits] == [(2, 100)] * 3


def test_cohort_bad_inputs_raise():
    with pytest.raises(ValueError, match="archs"):
        build_cohort(["resnet32", "resnet56"], 10, shared_stem=True)
    with pytest.raises(ValueError, match="aux"):
        build_cohort(["resnet32", "resnet32"], 10, aux=True, shared_stem=True)
    with pytest.raises(ValueError, match="archs"):
        build_cohort([], 10)
    with pytest.raises(ValueError, match="archs"):
        build_cohort("resnet32", 10)
    with pytest.raises(ValueError, match="arch"):
        build_cohort(["resnet32", "vgg16"], 10)
    with pytest.raises(ValueError, match="num_classes"):
        build_cohort(["resnet32"], 1)
    with pytest.raises(ValueError, match="trunk_stages"):
        build_cohort(["resnet32"] * 2, 10, shared_stem=True, trunk_stages=3)
    with pytest.raises(ValueError, match="trunk_stages"):
        build_cohort(["resnet32"] * 2, 10, trunk_stages=2)
    cohort = build_cohort(["wrn_16_2"] * 2, 10)
    x = image("wrn_16_2")
    with pytest.raises(ValueError, match="x"):
        cohort([x, x, x])
    with pytest.raises(ValueError, match="x"):
        cohort([x, "not a tensor"])
    with pytest.raises(ValueError, match="i"):
        cohort.member_modules(2)


# -- EMA copy (PCL temporal mean, docs/official_baselines.md §1.4) ---------------------------------------------------------
def test_ema_update_rule_and_bn_policy():
    from fastmcl.models.ema import EmaCohort, ema_alpha
    torch.manual_seed(0)
    cohort = build_cohort(["resnet32"] * 3, 5, shared_stem=True, trunk_stages=None).double()
    ema = EmaCohort(cohort, alpha_max=0.999)
    assert ema_alpha(0, 0.999) == 0.0 and ema_alpha(1, 0.999) == 0.5 and ema_alpha(10**6, 0.999) == 0.999
    assert all(not p.requires_grad for p in ema.parameters())
    # step 0: α = 0 → exact copy; then θ' = α θ' + (1 − α) θ for parameters AND BN running stats
    with torch.no_grad():
        for p in cohort.parameters():
            p.add_(torch.randn_like(p))
    cohort.train()(torch.randn(4, 3, 16, 16, dtype=torch.float64))   # move the student's BN running stats
    ema.update(cohort, 0)
    for (n, a), b in zip(ema.module.state_dict().items(), cohort.state_dict().values()):
        assert torch.equal(a, b), n
    before = {n: t.clone() for n, t in ema.module.state_dict().items()}
    with torch.no_grad():
        for p in cohort.parameters():
            p.add_(torch.randn_like(p))
    cohort.train()(torch.randn(4, 3, 16, 16, dtype=torch.float64))
    alpha = ema.update(cohort, 3)
    assert alpha == 0.75
    for (n, a), b in zip(ema.module.state_dict().items(), cohort.state_dict().values()):
        want = b if not a.dtype.is_floating_point else alpha * before[n] + (1 - alpha) * b
        assert torch.allclose(a, want, rtol=1e-12, atol=1e-12), n
    # train-mode forwards of the copy (batch statistics) never move its running statistics
    state = {n: t.clone() for n, t in ema.module.state_dict().items() if "running" in n}
    with torch.no_grad():
        ema.train()(torch.randn(4, 3, 16, 16, dtype=torch.float64))
    for n, t in state.items():
        assert torch.equal(ema.module.state_dict()[n], t), n
    with pytest.raises(ValueError, match="alpha_max"):
        EmaCohort(cohort, alpha_max=1.0)


def test_trunk_output_and_grad_scale():
    torch.manual_seed(0)
    cohort = build_cohort(["resnet32"] * 3, 5, shared_stem=True, trunk_stages=None).double()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    outs = cohort(x)
    assert cohort.trunk_dim == 32 and all(o.trunk.shape == (2, 32) for o in outs)
    grads = []
    for scale in (1.0, 1 / 3):
        cohort.zero_grad()
        cohort.trunk_grad_scale = scale
        sum(o.logits[-1].sum() for o in cohort(x)).backward()
        grads.append([p.grad.clone() for p in cohort.trunk.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(b, a / 3, rtol=1e-10, atol=1e-12)
