"""torchrun / DDP pieces: process-group start, collectives with the gradient rules that make W processes reproduce one,
and BatchNorm synchronised over ranks (also on CPU/gloo).

Every function is an identity or no-op without a process group, so single-process code calls them unconditionally.
Collectives block and must be called by every rank in the same order with tensors of the same shape. Why the
gradients come out exact (the all-gather's backward sums over ranks, DDP averages): `docs/runtime.md`.
"""
from __future__ import annotations

import contextlib
import os
import types
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job; `backend` is None when it runs alone."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs, evaluates and checkpoints."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def is_dist_active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def init_distributed(device: str | torch.device = "auto", *,
                     timeout: timedelta | None = None) -> tuple[DistEnv, torch.device]:
    """Start the process group from the variables torchrun sets (never a `--local_rank` flag) and pick the device.

    `device`: `"auto"` (CUDA when available), `"cpu"`, `"cuda"` or any torch device string. `WORLD_SIZE` unset or 1:
    no process group, rank 0 of 1. Otherwise NCCL on CUDA (the device becomes `cuda:LOCAL_RANK`) and gloo elsewhere,
    through `init_method="env://"`; an existing group is reused. `timeout` bounds the start and every collective.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"unknown device {device!r}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested but CUDA is not available")
    world_size = int(os.environ.get("WORLD_SIZE") or 1)
    if world_size == 1:
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)
        return DistEnv(), device
    missing = [name for name in TORCHRUN_VARIABLES if not os.environ.get(name)]
    if missing:
        raise ValueError(f"WORLD_SIZE={world_size} but {', '.join(missing)} not set: launch with torchrun")
    local_rank = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, **_attempt_store(timeout), **({} if timeout is None else {"timeout": timeout}))
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, dist.get_backend()), device


def _attempt_store(timeout: timedelta | None) -> dict:
    """The `env://` rendezvous, with the store's keys kept apart per torchrun restart.

    torchrun's static rendezvous keeps one store for every restart of the group, and the process group's keys do not
    name the attempt: a restarted rank could read the address of a process that died and be refused
    (`docs/runtime.md`, restarts).
    """
    store, rank, world_size = next(dist.rendezvous("env://", **({} if timeout is None else {"timeout": timeout})))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return {"store": dist.PrefixStore(f"attempt-{attempt}", store), "rank": rank, "world_size": world_size}


def launch_rank() -> int:
    """This process's rank as torchrun set it (`RANK`), readable before the process group starts; 0 alone."""
    return int(os.environ.get("RANK") or 0)


def shutdown() -> None:
    """Destroy the process group if there is one (safe to call always)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class _AllGatherWithGrad(torch.autograd.Function):
    # all_gather of a list and all_reduce exist on every backend and every torch we support; the backward's extra
    # volume over a reduce-scatter is one [W*n, D] embedding gradient, small beside DDP's gradient all-reduce
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rows = slice(dist.get_rank() * x.shape[0], (dist.get_rank() + 1) * x.shape[0])
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)  # autograd's may be shared: sum a copy
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rows]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """`x` of every rank concatenated along dim 0 in rank order, keeping autograd (global in-batch contrast).

    Backward sums the incoming gradients over ranks and returns this rank's slice: when every rank computes the same
    global loss L, each holds `W * dL/dx_local`, which DDP's average turns into the single-process gradient. Every
    rank must therefore backpropagate through the result. Under `no_grad` it is a plain gather (memory-bank updates).
    """
    return _AllGatherWithGrad.apply(x) if is_dist_active() else x


class _AllReduceSumWithGrad(torch.autograd.Function):
    """SUM all-reduce whose backward is a SUM all-reduce (torch's `distributed.nn` version warns as deprecated)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _AllReduceSumWithGrad.apply(grad)


@torch.no_grad()
def all_reduce_mean_grads(params) -> None:
    """Average `.grad` over ranks for parameters outside DDP (the objective's heads, the meta-network).

    Every rank passes the same parameters in the same order with the same ones holding a gradient (a `None` grad is
    skipped); one flattened all-reduce per (device, dtype).
    """
    if not is_dist_active():
        return
    groups: dict[tuple, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            groups.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
    for grads in groups.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(dist.get_world_size())
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """SUM all-reduce `t` over ranks in place (no autograd) and return it."""
    if is_dist_active():
        with torch.no_grad():
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


@torch.no_grad()
def broadcast_module_(module: nn.Module, src: int = 0) -> nn.Module:
    """Overwrite every parameter and buffer with rank `src`'s values, in place; returns `module`.

    For modules outside DDP (the objective: heads, meta-network, memory banks); DDP does this for the module it wraps.
    """
    if is_dist_active():
        for t in [*module.parameters(), *module.buffers()]:
            buf = t.detach().contiguous()  # `t`'s own storage unless it is laid out otherwise (channels_last)
            dist.broadcast(buf, src)
            t.copy_(buf)  # returns at once when `buf` is `t`'s storage
    return module


class SyncBatchNorm2d(nn.BatchNorm2d):
    """`nn.BatchNorm2d` whose training statistics span all ranks, on any device (torch's `SyncBatchNorm` refuses CPU).

    Mean and biased variance of the concatenated global batch (per-rank sizes may differ) from two differentiable SUM
    all-reduces in at least fp32, so W ranks match BatchNorm on the global batch to rounding; the input gradient is
    `W * dL/dx_local`, as for `all_gather_with_grad`. Running statistics update as BatchNorm's would for the global
    batch (unbiased variance), identically on every rank. Eval mode or no process group: plain `nn.BatchNorm2d`.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if not (self.training and is_dist_active()):
            return super().forward(input)
        c = input.shape[1]
        stat_dtype = torch.promote_types(input.dtype, torch.float32)
        x = input.to(stat_dtype)
        dims = (0, 2, 3)
        packed = _AllReduceSumWithGrad.apply(torch.cat([x.sum(dim=dims), x.new_full((1,), float(input.numel() // c))]))
        n = float(packed[c].detach().item())
        if n <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got global count {int(n)}")
        mean = packed[:c] / n
        diff = x - mean.view(1, c, 1, 1)
        var = _AllReduceSumWithGrad.apply((diff * diff).sum(dim=dims)) / n
        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight.to(stat_dtype)
        out = diff * scale.view(1, c, 1, 1)
        if self.bias is not None:
            out = out + self.bias.to(stat_dtype).view(1, c, 1, 1)
        out = out.to(input.dtype)
        if input.is_contiguous(memory_format=torch.channels_last) and not input.is_contiguous():
            out = out.contiguous(memory_format=torch.channels_last)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked.item()) if self.momentum is None else self.momentum
                self.running_mean.mul_(1.0 - factor).add_(mean.detach().to(self.running_mean.dtype), alpha=factor)
                unbiased = (var.detach() * (n / (n - 1.0))).to(self.running_var.dtype)
                self.running_var.mul_(1.0 - factor).add_(unbiased, alpha=factor)
        return out


def convert_sync_batchnorm(module: nn.Module, device: str | torch.device) -> nn.Module:
    """Make the BatchNorm layers of `module` synchronise over ranks (`--sync-bn`).

    CUDA: torch's `SyncBatchNorm.convert_sync_batchnorm` (every BatchNorm*D). Elsewhere every `nn.BatchNorm2d` becomes
    a `SyncBatchNorm2d` sharing its parameters and buffers; BatchNorm1d/3d keep per-rank statistics there. Returns the
    converted module (a new object only when `module` itself is a BatchNorm2d).
    """
    if torch.device(device).type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, SyncBatchNorm2d):
        sync = SyncBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats)
        # the very same Parameter and buffer objects, as torch's converter does: optimizer references stay valid
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            setattr(sync, name, getattr(module, name))
        if hasattr(module, "qconfig"):
            sync.qconfig = module.qconfig
        return sync.train(module.training)
    for name, child in module.named_children():
        setattr(module, name, convert_sync_batchnorm(child, device))
    return module


@contextlib.contextmanager
def local_batchnorm(module: nn.Module):
    """Inside: every synchronised BatchNorm of `module` normalises with this rank's batch only, as plain BatchNorm.

    The L-MCL meta phase runs per rank and differentiates twice: neither sync-BN autograd function supports double
    backward, and the ranks' phases need no collectives inside it.
    """
    swapped = [m for m in module.modules() if isinstance(m, (nn.SyncBatchNorm, SyncBatchNorm2d))]
    for m in swapped:
        m.forward = types.MethodType(_BatchNorm.forward, m)
    try:
        yield module
    finally:
        for m in swapped:
            del m.forward
