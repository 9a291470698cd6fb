"""fastmcl.distributed: 2 gloo processes against single-process references (fp64), and the single-process identities.

The ranks are spawned once per module (`support.gloo.run_ranks`, environment set the way torchrun sets it) and run
every distributed scenario; the tests compare the ranks' results with references computed here in the parent.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from support.gloo import result_of, run_ranks

from fastmcl import distributed as D

WORLD = 2
TOL = dict(rtol=1e-6, atol=1e-9)


# --------------------------------------------------------------------------
# shared deterministic data (parent and children build the same tensors)
# --------------------------------------------------------------------------


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _gather_data():
    g = _gen(1)
    x = torch.randn(8, 5, generator=g, dtype=torch.float64)
    w = torch.randn(4, 5, generator=g, dtype=torch.float64)
    b = torch.randn(4, generator=g, dtype=torch.float64)
    return x, w, b


def _global_loss(e: torch.Tensor) -> torch.Tensor:
    """A nonlinear in-batch loss over the full batch (InfoNCE-like + L2)."""
    z = F.normalize(e, dim=1)
    logits = z @ z.t() / 0.2
    logits = logits - 1e4 * torch.eye(len(e), dtype=e.dtype)
    labels = torch.arange(len(e)) ^ 1  # positives: (0,1), (2,3), ...
    return F.cross_entropy(logits, labels) + 0.1 * (e**2).mean()


def _bn_data(step: int, n: int = 8, c: int = 3):
    g = _gen(100 + step)
    x = torch.randn(n, c, 4, 5, generator=g, dtype=torch.float64) * 2.0 + 0.5
    gy = torch.randn(n, c, 4, 5, generator=g, dtype=torch.float64)
    return x, gy


def _bn_init(bn: nn.Module) -> None:
    g = _gen(7)
    with torch.no_grad():
        if bn.weight is not None:
            bn.weight.copy_(torch.rand(bn.weight.shape, generator=g, dtype=torch.float64) + 0.5)
            bn.bias.copy_(torch.randn(bn.bias.shape, generator=g, dtype=torch.float64))


# name -> (momentum, affine, channels_last, per-rank batch sizes)
BN_CASES = {
    "plain": (0.1, True, False, (4, 4)),
    "channels_last": (0.1, True, True, (4, 4)),
    "cumulative_uneven": (None, True, False, (3, 5)),
    "no_affine": (0.3, False, False, (4, 4)),
}


def _slices(sizes):
    out, start = [], 0
    for s in sizes:
        out.append(slice(start, start + s))
        start += s
    return out


def _run_bn(bn: nn.Module, case: str, rank: int | None):
    """2 training steps + 1 eval step.  rank None: full batch, single process.

    Loss: global L = sum(y * gy) / n; rank r uses L_r = W * sum(y_r * gy_r) / n
    so that mean_r L_r = L (what DDP's gradient averaging assumes), also for
    uneven per-rank batch sizes.
    """
    momentum, affine, cl, sizes = BN_CASES[case]
    n = sum(sizes)
    res = {"steps": []}
    for step in range(2):
        x, gy = _bn_data(step, n)
        if rank is not None:
            sl = _slices(sizes)[rank]
            x, gy = x[sl], gy[sl]
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        x = x.clone().requires_grad_(True)
        bn.train()
        if bn.weight is not None:
            bn.weight.grad = None
            bn.bias.grad = None
        y = bn(x)
        scale = (WORLD if rank is not None else 1) / n
        (scale * (y * gy).sum()).backward()
        res["steps"].append(
            {
                "y": y.detach().clone(),
                "y_cl": bool(y.is_contiguous(memory_format=torch.channels_last)),
                "xgrad": x.grad.detach().clone(),
                "wgrad": None if bn.weight is None else bn.weight.grad.clone(),
                "bgrad": None if bn.bias is None else bn.bias.grad.clone(),
                "rm": bn.running_mean.clone(),
                "rv": bn.running_var.clone(),
                "nbt": int(bn.num_batches_tracked),
            }
        )
    bn.eval()
    x, _ = _bn_data(5, n)
    if rank is not None:
        x = x[_slices(sizes)[rank]]
    with torch.no_grad():
        res["eval_y"] = bn(x).clone()
    return res


def _ddp_model():
    torch.manual_seed(3)
    m = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 6),
    ).double()
    return m


def _ddp_data():
    g = _gen(11)
    x = torch.randn(8, 3, 6, 6, generator=g, dtype=torch.float64)
    return x


def _ddp_loss(out_local: torch.Tensor) -> torch.Tensor:
    # per-sample mean term (local) + in-batch global term through the gather
    local = (out_local**2).mean()
    full = D.all_gather_with_grad(out_local)
    return local + _global_loss(full)


# --------------------------------------------------------------------------
# child process
# --------------------------------------------------------------------------


def _scenario_init(rank, env, dev):
    return {
        "rank": env.rank,
        "world": env.world_size,
        "local_rank": env.local_rank,
        "backend": env.backend,
        "is_main": env.is_main,
        "enabled": env.enabled,
        "device": str(dev),
        "active": D.is_dist_active(),
        "torch_syncbn_refuses_cpu": _torch_syncbn_refuses_cpu(),
    }


def _torch_syncbn_refuses_cpu() -> bool:
    """Why `SyncBatchNorm2d` exists: torch's own SyncBatchNorm refuses CPU tensors under a process group."""
    try:
        nn.SyncBatchNorm(2).train()(torch.randn(4, 2, 3, 3))
    except ValueError as e:
        return "GPU" in str(e)
    return False


def _scenario_gather(rank, env, dev):
    x, w, b = _gather_data()
    w = w.clone().requires_grad_(True)
    b = b.clone().requires_grad_(True)
    xl = x[rank * 4 : (rank + 1) * 4]
    e = F.linear(xl, w, b)
    e.retain_grad()
    full = D.all_gather_with_grad(e)
    loss = _global_loss(full)
    loss.backward()
    with torch.no_grad():  # the memory-bank update: (indices, embeddings) of every rank
        gi = D.all_gather_with_grad(torch.arange(rank * 4, (rank + 1) * 4))
        ge = D.all_gather_with_grad(e.detach())
    return {
        "full": full.detach().clone(),
        "loss": loss.item(),
        "wgrad": w.grad.clone(),
        "bgrad": b.grad.clone(),
        "egrad": e.grad.clone(),
        "nograd_idx": gi,
        "nograd_e": ge,
        "nograd_requires_grad": ge.requires_grad,
    }


def _scenario_bn(rank, env, dev):
    out = {}
    for case, (momentum, affine, _cl, _sizes) in BN_CASES.items():
        bn = D.SyncBatchNorm2d(3, momentum=momentum, affine=affine).double()
        _bn_init(bn)
        out[case] = _run_bn(bn, case, rank)
    return out


def _scenario_reduce(rank, env, dev):
    # broadcast_module_: different init per rank; the conv weight is channels_last (not contiguous)
    torch.manual_seed(1000 + rank)
    m = _broadcast_model()
    with torch.no_grad():
        m[1].running_mean.fill_(rank + 1.0)
    m[1].num_batches_tracked.fill_(rank + 5)
    D.broadcast_module_(m)
    sd = {k: v.clone() for k, v in m.state_dict().items()}

    # all_reduce_mean_grads
    p1 = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    p2 = nn.Parameter(torch.zeros(2, 2, dtype=torch.float32))
    p3 = nn.Parameter(torch.zeros(2, dtype=torch.float64))  # grad None on all ranks
    p1.grad = torch.full((3,), float(rank + 1), dtype=torch.float64)
    p2.grad = torch.full((2, 2), 10.0 * (rank + 1), dtype=torch.float32)
    D.all_reduce_mean_grads([p1, p2, p3])

    t = torch.tensor([rank + 1.0, 2.0], dtype=torch.float64)
    t2 = D.all_reduce_sum(t)
    return {
        "sd": sd,
        "conv_channels_last": m[2].weight.is_contiguous(memory_format=torch.channels_last),
        "p1": p1.grad.clone(),
        "p2": p2.grad.clone(),
        "p3_none": p3.grad is None,
        "sum": t.clone(),
        "sum_same_obj": t2 is t,
    }


def _broadcast_model() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2), nn.Conv2d(2, 4, 3)).double().to(
        memory_format=torch.channels_last)


def _scenario_ddp(rank, env, dev):
    from torch.nn.parallel import DistributedDataParallel as DDP

    m = _ddp_model()
    # perturb the other ranks: DDP's construction must broadcast rank 0's parameters (no broadcast_module_ here)
    if rank != 0:
        with torch.no_grad():
            for p in m.parameters():
                p.add_(1.0)
    m = D.convert_sync_batchnorm(m, dev)
    converted = type(m[1]).__name__
    ddp = DDP(m)
    x = _ddp_data()[rank * 4 : (rank + 1) * 4]
    loss = _ddp_loss(ddp(x))
    loss.backward()
    return {
        "converted": converted,
        "grads": {n: p.grad.clone() for n, p in m.named_parameters()},
        "rm": m[1].running_mean.clone(),
        "rv": m[1].running_var.clone(),
    }


SCENARIOS = {
    "init": _scenario_init,
    "gather": _scenario_gather,
    "bn": _scenario_bn,
    "reduce": _scenario_reduce,
    "ddp": _scenario_ddp,
}


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory):
    return run_ranks(SCENARIOS, tmp_path_factory.mktemp("dist"), world=WORLD)


def _close(a, b, **kw):
    torch.testing.assert_close(a, b, **(TOL | kw))


# --------------------------------------------------------------------------
# distributed tests
# --------------------------------------------------------------------------


def test_init_distributed_under_torchrun_env(dist_results):
    for r, res in enumerate(result_of(dist_results, "init")):
        assert res == {
            "rank": r,
            "world": WORLD,
            "local_rank": r,
            "backend": "gloo",
            "is_main": r == 0,
            "enabled": True,
            "device": "cpu",
            "active": True,
            "torch_syncbn_refuses_cpu": True,
        }


def test_all_gather_with_grad_matches_single_process(dist_results):
    x, w, b = _gather_data()
    w = w.clone().requires_grad_(True)
    b = b.clone().requires_grad_(True)
    e = F.linear(x, w, b)
    e.retain_grad()
    loss = _global_loss(e)
    loss.backward()

    res = result_of(dist_results, "gather")
    for r, rr in enumerate(res):
        _close(rr["full"], e.detach())  # rank order along dim 0
        assert rr["loss"] == pytest.approx(loss.item(), rel=1e-12)
        # each rank holds W * dL/de_local for its slice ...
        _close(rr["egrad"], WORLD * e.grad[r * 4 : (r + 1) * 4])
    # ... so DDP's average over ranks gives the single-process gradient
    _close(sum(rr["wgrad"] for rr in res) / WORLD, w.grad)
    _close(sum(rr["bgrad"] for rr in res) / WORLD, b.grad)


def test_all_gather_under_no_grad(dist_results):
    x, w, b = _gather_data()
    e = F.linear(x, w, b)
    for rr in result_of(dist_results, "gather"):
        assert torch.equal(rr["nograd_idx"], torch.arange(8))
        _close(rr["nograd_e"], e)
        assert rr["nograd_requires_grad"] is False


@pytest.mark.parametrize("case", list(BN_CASES))
def test_sync_batchnorm2d_matches_batchnorm_on_global_batch(dist_results, case):
    momentum, affine, cl, sizes = BN_CASES[case]
    ref_bn = nn.BatchNorm2d(3, momentum=momentum, affine=affine).double()
    _bn_init(ref_bn)
    ref = _run_bn(ref_bn, case, None)
    res = [rr[case] for rr in result_of(dist_results, "bn")]
    sl = _slices(sizes)
    for step in range(2):
        rs = ref["steps"][step]
        for r in range(WORLD):
            ds = res[r]["steps"][step]
            _close(ds["y"], rs["y"][sl[r]])
            # input grad: W * dL/dx_local (sum-all-reduce backward), see docs/runtime.md
            _close(ds["xgrad"], WORLD * rs["xgrad"][sl[r]])
            _close(ds["rm"], rs["rm"])
            _close(ds["rv"], rs["rv"])
            assert ds["nbt"] == rs["nbt"] == step + 1
            if cl:
                assert ds["y_cl"] and rs["y_cl"]
        if affine:
            _close(sum(res[r]["steps"][step]["wgrad"] for r in range(WORLD)) / WORLD, rs["wgrad"])
            _close(sum(res[r]["steps"][step]["bgrad"] for r in range(WORLD)) / WORLD, rs["bgrad"])
    for r in range(WORLD):  # eval mode: running statistics, no sync
        _close(res[r]["eval_y"], ref["eval_y"][sl[r]])


def test_broadcast_and_reductions(dist_results):
    res = result_of(dist_results, "reduce")
    torch.manual_seed(1000)
    m0 = _broadcast_model()
    with torch.no_grad():
        m0[1].running_mean.fill_(1.0)
    m0[1].num_batches_tracked.fill_(5)
    for rr in res:
        for k, v in m0.state_dict().items():
            assert torch.equal(rr["sd"][k], v), k
        _close(rr["p1"], torch.full((3,), 1.5, dtype=torch.float64))
        assert rr["p2"].dtype == torch.float32
        _close(rr["p2"], torch.full((2, 2), 15.0))
        assert rr["p3_none"]
        assert rr["conv_channels_last"]
        _close(rr["sum"], torch.tensor([3.0, 4.0], dtype=torch.float64))
        assert rr["sum_same_obj"]


def test_ddp_with_sync_bn_and_gather_reproduces_single_process(dist_results):
    res = result_of(dist_results, "ddp")
    m = _ddp_model()
    x = _ddp_data()
    out = m(x)
    loss = (out**2).mean() + _global_loss(out)
    loss.backward()
    for rr in res:
        assert rr["converted"] == "SyncBatchNorm2d"
        for n, p in m.named_parameters():
            # DDP already averaged: every rank holds the single-process gradient
            _close(rr["grads"][n], p.grad, rtol=1e-6, atol=1e-10)
        _close(rr["rm"], m[1].running_mean)
        _close(rr["rv"], m[1].running_var)


# --------------------------------------------------------------------------
# single-process tests
# --------------------------------------------------------------------------

_ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def clean_env(monkeypatch):
    for k in _ENV_KEYS:
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


def test_init_distributed_single_process(clean_env):
    env, dev = D.init_distributed("cpu")
    assert env == D.DistEnv(0, 1, 0, None)
    assert env.is_main and not env.enabled
    assert dev == torch.device("cpu")
    assert not dist.is_initialized()
    clean_env.setenv("WORLD_SIZE", "1")
    clean_env.setenv("RANK", "0")
    env, _ = D.init_distributed("auto")
    assert env.world_size == 1 and not dist.is_initialized()
    D.shutdown()  # no group: harmless


@pytest.mark.parametrize(
    "env, match",
    [
        ({"WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "x", "MASTER_PORT": "1"}, "RANK"),
        ({"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "x", "MASTER_PORT": "1"}, "LOCAL_RANK"),
        ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_PORT": "1"}, "MASTER_ADDR"),
        ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "x"}, "MASTER_PORT"),
    ],
)
def test_init_distributed_outside_torchrun_names_the_missing_variable(clean_env, env, match):
    for k, v in env.items():
        clean_env.setenv(k, v)
    with pytest.raises(ValueError, match=match):
        D.init_distributed("cpu")
    assert not dist.is_initialized()


def test_init_distributed_bad_device(clean_env):
    with pytest.raises(ValueError, match="unknown device"):
        D.init_distributed("tpu:x")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            D.init_distributed("cuda")


def test_identities_without_process_group():
    assert not dist.is_initialized()
    x = torch.randn(3, 2, requires_grad=True)
    assert D.all_gather_with_grad(x) is x
    t = torch.ones(2)
    assert D.all_reduce_sum(t) is t and torch.equal(t, torch.ones(2))
    p = nn.Parameter(torch.zeros(2))
    p.grad = torch.ones(2)
    D.all_reduce_mean_grads([p])
    assert torch.equal(p.grad, torch.ones(2))
    m = nn.Linear(2, 2)
    assert D.broadcast_module_(m) is m
    assert not D.is_dist_active()


def test_sync_batchnorm2d_without_group_is_batchnorm():
    torch.manual_seed(0)
    ref = nn.BatchNorm2d(3).double()
    bn = D.SyncBatchNorm2d(3).double()
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    for mode in ("train", "eval"):
        ref.train(mode == "train")
        bn.train(mode == "train")
        torch.testing.assert_close(bn(x), ref(x))
    torch.testing.assert_close(bn.running_var, ref.running_var)


def test_convert_sync_batchnorm_keeps_params_and_buffers():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1),
        nn.BatchNorm2d(4, momentum=0.2, eps=1e-3),
        nn.Sequential(nn.BatchNorm2d(4, affine=False)),
        nn.Flatten(),
        nn.BatchNorm1d(4 * 2 * 2),
    )
    model(torch.randn(3, 3, 2, 2))  # populate running stats
    bn = model[1]
    with torch.no_grad():
        bn.weight.uniform_()
    bn.bias.requires_grad_(False)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    w_obj, rm_obj = bn.weight, bn.running_mean

    out = D.convert_sync_batchnorm(model, "cpu")
    assert out is model
    assert type(model[1]) is D.SyncBatchNorm2d and type(model[2][0]) is D.SyncBatchNorm2d
    assert type(model[4]) is nn.BatchNorm1d  # BatchNorm1d left alone
    new = model[1]
    assert new.weight is w_obj and new.running_mean is rm_obj
    assert new.weight.requires_grad and not new.bias.requires_grad
    assert (new.momentum, new.eps, new.affine) == (0.2, 1e-3, True)
    assert model[2][0].weight is None and model[2][0].track_running_stats
    assert not new.training
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    # a bare BatchNorm2d is returned converted; already-converted ones untouched
    single = D.convert_sync_batchnorm(nn.BatchNorm2d(2), torch.device("cpu"))
    assert type(single) is D.SyncBatchNorm2d
    assert D.convert_sync_batchnorm(single, "cpu") is single
