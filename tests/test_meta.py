"""L-MCL meta phase: hypergradient vs central differences (fp64), rollback exactness, first-order limit."""
import pytest
import torch
from torch import nn

from fastmcl.build import build_trainer
from fastmcl.config import TrainConfig
from fastmcl.meta import FD_STEP, MetaPhase, ieee_fp32
from fastmcl.methods import ContrastWeights
from fastmcl.methods.lmcl import LMCL
from fastmcl.models import BackboneOutput
from fastmcl.train import main
from support.meta_checks import outer_loss


class TinyNet(nn.Module):
    """Two 'stages' with BatchNorm, so BN statistics and their rollback are exercised."""

    def __init__(self, classes=3, width=4):
        super().__init__()
        self.s1 = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.s2 = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.fc = nn.ModuleList([nn.Linear(width, classes), nn.Linear(width, classes)])

    def forward(self, x):
        h1 = self.s1(x)
        h2 = self.s2(h1)
        feats = [h1.mean((2, 3)), h2.mean((2, 3))]
        return BackboneOutput(feats, [fc(f) for fc, f in zip(self.fc, feats)])


class TinyCohort(nn.Module):
    def __init__(self):
        super().__init__()
        self.nets = nn.ModuleList([TinyNet(), TinyNet()])
        self.feature_dims, self.num_stages = [4, 4], [2, 2]

    def forward(self, x):
        return [net(x) for net in self.nets]


def tiny_setup(seed=0, memory_bank=False):
    torch.manual_seed(seed)
    cohort = TinyCohort().double()
    obj = LMCL([4, 4], [2, 2], 3, weights=ContrastWeights.defaults("lmcl", memory_bank), memory_bank=memory_bank,
               num_samples=20, feat_dim=8, meta_proj_dim=4).double()
    x = torch.randn(6, 3, 5, 5, dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    idx = torch.randint(0, 20, (6, 7)) if memory_bank else None
    return cohort, obj, x, y, idx


@pytest.mark.parametrize("fd_step", [None, 1e-7], ids=["exact", "default-path"])
@pytest.mark.parametrize("memory_bank", [False, True])
def test_second_order_hypergradient_matches_central_differences(memory_bank, fd_step):
    cohort, obj, x, y, idx = tiny_setup(memory_bank=memory_bank)
    meta = MetaPhase(cohort, obj, None, inner_steps=2, mode="second-order", weight_decay=5e-4, fd_step=fd_step)
    lr = 0.5
    hyper, _ = meta.hypergradient(x, y, idx, lr)
    eps = 1e-6
    fd = []
    for p in obj.meta_parameters():
        g = torch.zeros_like(p)
        flat = p.data.view(-1)
        for k in range(flat.numel()):
            old = flat[k].item()
            flat[k] = old + eps
            plus = outer_loss(meta, x, y, idx, lr)
            flat[k] = old - eps
            minus = outer_loss(meta, x, y, idx, lr)
            flat[k] = old
            g.view(-1)[k] = (plus - minus) / (2 * eps)
        fd.append(g)
    h, f = torch.cat([t.flatten() for t in hyper]), torch.cat([t.flatten() for t in fd])
    assert f.abs().max() > 1e-6  # the weights do influence the outer loss
    assert (h - f).norm() / f.norm() <= 1e-4, ((h - f).norm() / f.norm()).item()
    assert torch.allclose(h, f, rtol=1e-4, atol=1e-6 * f.abs().max().item())


def test_first_order_agrees_with_second_order_for_small_lr():
    """The dropped Hessian terms are O(lr²) against the kept O(lr) mixed term."""
    cohort, obj, x, y, idx = tiny_setup(seed=1)
    lr = 1e-4
    so, _ = MetaPhase(cohort, obj, None, mode="second-order", fd_step=None).hypergradient(x, y, idx, lr)
    fo, _ = MetaPhase(cohort, obj, None, mode="first-order", fd_step=None).hypergradient(x, y, idx, lr)
    so, fo = torch.cat([t.flatten() for t in so]), torch.cat([t.flatten() for t in fo])
    assert so.norm() > 0
    assert (so - fo).norm() / so.norm() < 1e-2


@pytest.mark.parametrize("mode", ["second-order", "first-order"])
def test_meta_phase_changes_only_the_meta_network(mode):
    cohort, obj, x, y, idx = tiny_setup(memory_bank=True)
    main_opt = torch.optim.SGD(list(cohort.parameters()) + obj.main_parameters(), lr=0.1, momentum=0.9)
    out = obj(cohort(x), y, idx)
    out.loss.backward()
    main_opt.step()
    obj.after_step(out, torch.arange(6))
    meta_opt = torch.optim.SGD(obj.meta_parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    before = {k: v.clone() for k, v in {**cohort.state_dict(), **obj.state_dict()}.items()}
    opt_before = {id(p): {k: v.clone() for k, v in s.items()} for p, s in main_opt.state.items()}
    result = MetaPhase(cohort, obj, meta_opt, mode=mode).step(x, y, idx, lr=0.1)
    assert result.hypergrad_norm > 0
    after = {**cohort.state_dict(), **obj.state_dict()}
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all(k.startswith("meta_net.") for k in changed), changed
    for p, s in main_opt.state.items():
        assert all(torch.equal(v, opt_before[id(p)][k]) for k, v in s.items())
    assert all(p.grad is None for p in obj.meta_parameters())


def test_bad_meta_mode(tmp_path, capsys):
    rc = main(["--data", "synthetic", "--meta-mode", "third-order", "--out", str(tmp_path / "r"), "--no-progress"])
    assert rc == 2 and "--meta-mode: must be second-order, first-order or off" in capsys.readouterr().err


def _flat(tensors):
    return torch.cat([t.flatten() for t in tensors])


@pytest.mark.parametrize("autocast", [False, True], ids=["one-sided", "central"])
@pytest.mark.parametrize("mode", ["second-order", "first-order"])
@pytest.mark.parametrize("memory_bank", [False, True])
def test_default_path_matches_the_exact_unrolled_form(memory_bank, mode, autocast):
    """The default path takes every derivative of the networks from differences with the pieces held fixed (mixed
    terms, and for second-order the transposed step Jacobians): one-sided against the recorded base point, O(h);
    central under autocast, where the base point is not in the shifted evaluations' fp32, O(h²). It equals the form
    differentiated through the networks (fp64; autocast leaves fp64 alone, so only the scheme changes)."""
    cohort, obj, x, y, idx = tiny_setup(memory_bank=memory_bank)
    lr = 0.5
    exact = _flat(MetaPhase(cohort, obj, None, mode=mode, fd_step=None).hypergradient(x, y, idx, lr)[0])
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        diff = _flat(MetaPhase(cohort, obj, None, mode=mode, fd_step=1e-4 if autocast else 1e-7)
                     .hypergradient(x, y, idx, lr)[0])
    assert exact.abs().max() > 1e-8
    assert (exact - diff).norm() / exact.norm() <= 1e-6, ((exact - diff).norm() / exact.norm()).item()
    coarse = _flat(MetaPhase(cohort, obj, None, mode=mode, fd_step=1e-3).hypergradient(x, y, idx, lr)[0])
    assert (exact - coarse).norm() > (exact - diff).norm()        # the difference scheme is really in use


def test_bad_fd_step():
    cohort, obj, *_ = tiny_setup()
    with pytest.raises(ValueError, match="fd_step"):
        MetaPhase(cohort, obj, None, mode="first-order", fd_step=0.0)


@pytest.mark.parametrize("memory_bank", [False, True])
def test_inner_step_jacobian_is_not_symmetric_and_the_default_path_transposes_it(memory_bank):
    """An inner step's gradient holds the KL teachers fixed, so its Jacobian J is not symmetric: J v, which a difference
    of gradients gives, is measurably off Jᵀ v (double backward). The second-order sweep needs Jᵀ v for the second
    inner step; the default path, which reads it off one shifted forward+backward plus the loss-tail correction, gives
    the exact hypergradient (fp64)."""
    cohort, obj, x, y, idx = tiny_setup(memory_bank=memory_bank)
    lr = 0.5
    meta = MetaPhase(cohort, obj, None, mode="second-order", fd_step=1e-7)
    u = meta.unroll(x, y, idx, lr)
    theta = u.theta0
    torch.manual_seed(3)
    v = [torch.randn_like(p) for p in theta.values()]
    pairs = [(g, vv) for g, vv in zip(u.inner_grad(theta), v) if g is not None]
    jtv = torch.autograd.grad([g for g, _ in pairs], list(theta.values()), [vv for _, vv in pairs], allow_unused=True)
    jtv = _flat([torch.zeros_like(p) if e is None else e for e, p in zip(jtv, theta.values())])
    h = 1e-7                                               # J v, by a central difference of the gradient
    plus = u.inner_grad({n: (p + h * vv).detach().requires_grad_(True) for (n, p), vv in zip(theta.items(), v)})
    minus = u.inner_grad({n: (p - h * vv).detach().requires_grad_(True) for (n, p), vv in zip(theta.items(), v)})
    jv = _flat([torch.zeros_like(p) if a is None else (a - b).detach() / (2 * h)
                for a, b, p in zip(plus, minus, theta.values())])
    assert (jv - jtv).norm() / jtv.norm() > 1e-3, ((jv - jtv).norm() / jtv.norm()).item()
    exact = _flat(MetaPhase(cohort, obj, None, mode="second-order", fd_step=None).hypergradient(x, y, idx, lr)[0])
    diff = _flat(meta.hypergradient(x, y, idx, lr)[0])
    assert (exact - diff).norm() / exact.norm() <= 1e-6, ((exact - diff).norm() / exact.norm()).item()


def test_the_difference_path_runs_in_ieee_fp32_and_restores_the_users_tf32_settings():
    """cuDNN convolutions default to TF32 on Ampere+ GPUs (10 mantissa bits), which would bury the differences; the
    phase forces IEEE fp32 in every backend for its duration and puts the user's settings back, also on an error."""
    cohort, obj, x, y, idx = tiny_setup()
    meta = MetaPhase(cohort, obj, None, mode="second-order")
    seen = []
    hook = cohort.register_forward_hook(lambda *_: seen.append((torch.backends.cudnn.conv.fp32_precision,
                                                                torch.backends.mkldnn.matmul.fp32_precision)))
    before = (torch.backends.cudnn.conv.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision)
    torch.backends.mkldnn.matmul.fp32_precision = "tf32"
    try:
        meta.hypergradient(x, y, idx, lr=0.1)
        assert len(seen) == 7 and set(seen) == {("ieee", "ieee")}     # 4 recorded steps, 3 shifted evaluations
        assert torch.backends.mkldnn.matmul.fp32_precision == "tf32"
        assert torch.backends.cudnn.conv.fp32_precision == before[0] == "tf32"   # torch's default
        hook.remove()
        cohort.register_forward_hook(lambda *_: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            meta.hypergradient(x, y, idx, lr=0.1)
        assert (torch.backends.cudnn.conv.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision) == \
            ("tf32", "tf32")
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = before[1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["second-order", "first-order"])
def test_difference_path_on_cuda_with_torchs_default_tf32_matches_the_exact_form(mode):
    """fp32 on the GPU with torch's defaults (cuDNN convolutions in TF32 on Ampere+): the difference path must still
    agree with the unrolled form computed in IEEE fp32; differences of TF32 evaluations would be dominated by its
    10-bit rounding."""
    for seed in range(3):
        cohort, obj, x, y, idx = tiny_setup(seed)
        cohort, obj, x, y = cohort.float().cuda(), obj.float().cuda(), x.float().cuda(), y.cuda()
        with ieee_fp32():
            exact = _flat(MetaPhase(cohort, obj, None, mode=mode, fd_step=None).hypergradient(x, y, idx, 0.5)[0])
        diff = _flat(MetaPhase(cohort, obj, None, mode=mode).hypergradient(x, y, idx, 0.5)[0])
        assert ((diff - exact).norm() / exact.norm()).item() <= 2e-2


def test_meta_derivatives_flag_picks_the_path(tmp_path, capsys):
    for choice, fd_step in (("differences", FD_STEP), ("autograd", None)):
        cfg = TrainConfig(data="synthetic", num_classes=4, synthetic_samples=16, image_size=16, batch_size=8,
                          arch=["resnet32", "resnet32"], method="lmcl", meta_derivatives=choice,
                          out=str(tmp_path / choice), progress=False, workers=0)
        assert build_trainer(cfg).meta.fd_step == fd_step
    rc = main(["--data", "synthetic", "--meta-derivatives", "hessian", "--out", str(tmp_path / "r"), "--no-progress"])
    assert rc == 2 and "--meta-derivatives: must be differences or autograd" in capsys.readouterr().err
