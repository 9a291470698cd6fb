"""torchrun / DDP building blocks for multi-process training.

Everything here depends on ``torch`` only (no other fastmcl module) and is an
identity / no-op when no process group is running, so single-process code can
call it unconditionally.

Launch contract
---------------
The trainer runs under ``torchrun``; :func:`init_distributed` reads only the
environment variables torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``) -- never a ``--local_rank`` argument.
Backend: NCCL when the device is CUDA, gloo otherwise.

Gradient contract (the reason a W-process run reproduces the 1-process run)
-------------------------------------------------------------------------
Each of the W ranks receives B/W samples of the same global batch of B.

* The cohort is wrapped in ``DistributedDataParallel``, which **averages**
  parameter gradients over ranks (sum / W).
* Losses that are per-sample means over the local batch: with DDP averaging
  the result is the gradient of the global mean -- the standard DDP identity.
* In-batch (contrastive) losses gather embeddings across ranks with
  :func:`all_gather_with_grad` and compute the **full global loss L on every
  rank**.  The gather's backward SUMS the incoming gradients of all ranks for
  the local slice, so every rank holds ``W * dL/de_local`` for its own
  embeddings; after DDP divides by W the parameter gradient equals the
  single-process ``dL/dtheta``.  (Mixing the two: a per-rank local-mean loss
  term ``l_r`` plus a global term ``L`` gives, after DDP averaging, the
  gradient of ``mean_r l_r + L`` -- exactly the single-process objective.)
* Parameters that are *not* inside DDP (small heads, the meta-network) must
  follow the same rule: call :func:`all_reduce_mean_grads` on them after
  ``backward()``.
* Memory banks are updated from an all-gather of ``(indices, embeddings)``
  under no_grad (the trainer hands the objective :func:`all_gather_with_grad`,
  which records nothing there), so every rank holds the identical bank.
* BatchNorm statistics are synchronised over ranks (``--sync-bn``) with
  :func:`convert_sync_batchnorm`: torch's ``nn.SyncBatchNorm`` on CUDA,
  :class:`SyncBatchNorm2d` on CPU/gloo (torch's SyncBatchNorm rejects CPU
  tensors -- its forward raises ``ValueError("SyncBatchNorm expected input
  tensor to be on GPU ...")`` -- and uses the CUDA-only ``batch_norm_stats``
  kernels).  Both have the same gradient contract as the gather above: the
  statistics' all-reduce backward sums over ranks, so input gradients are
  ``W * dL/dx_local`` and DDP's average makes parameter gradients exact.

Collectives are blocking and must be called by every rank in the same order
with tensors of the same shape (see each function).
"""

from __future__ import annotations

import contextlib
import os
import types
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterable, Optional, Union

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "DistEnv",
    "init_distributed",
    "shutdown",
    "is_dist_active",
    "get_rank",
    "get_world_size",
    "all_gather_with_grad",
    "all_gather_no_grad",
    "all_reduce_mean_grads",
    "all_reduce_sum",
    "all_reduce_mean_scalar",
    "broadcast_module_",
    "SyncBatchNorm2d",
    "convert_sync_batchnorm",
]


# --------------------------------------------------------------------------
# environment / process group
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job.  ``backend`` is None when not distributed."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: Optional[str] = None

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the process that logs, evaluates and checkpoints)."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1


def is_dist_active() -> bool:
    """True when a process group is initialised and has more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _env_int(name: str, *, required: bool, default: int = 0) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        if required:
            raise ValueError(
                f"distributed launch: environment variable {name} is not set "
                "(launch with torchrun, which sets RANK, WORLD_SIZE, LOCAL_RANK, "
                "MASTER_ADDR and MASTER_PORT)"
            )
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"distributed launch: {name}={raw!r} is not an integer") from None


def _resolve_device(device: Union[str, torch.device]) -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {device!r}") from e


def init_distributed(
    device: Union[str, torch.device] = "auto",
    *,
    timeout: Optional[timedelta] = None,
) -> tuple[DistEnv, torch.device]:
    """Read the torchrun environment, start the process group, pick the device.

    ``device``: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``,
    ``"cuda"`` or any torch device string.  Under a multi-process launch on
    CUDA the device index is always ``LOCAL_RANK`` (an explicit index is
    replaced) and ``torch.cuda.set_device`` is called with it.

    ``WORLD_SIZE`` unset or 1: no process group is created and the result is
    rank 0 of 1 (``backend=None``).  Otherwise every one of ``RANK``,
    ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` must be set and
    consistent, else ``ValueError``; the group is created with
    ``init_method="env://"`` and backend NCCL (CUDA) or gloo (anything else).
    If a group is already initialised it is reused after checking that it
    agrees with the environment.  ``timeout`` is passed to
    ``init_process_group`` (it also bounds every later collective).
    """
    world_size = _env_int("WORLD_SIZE", required=False, default=1)
    if world_size < 1:
        raise ValueError(f"distributed launch: WORLD_SIZE={world_size} must be >= 1")
    dev = _resolve_device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")

    if world_size == 1:
        rank = _env_int("RANK", required=False, default=0)
        local_rank = _env_int("LOCAL_RANK", required=False, default=0)
        if rank != 0:
            raise ValueError(f"distributed launch: RANK={rank} with WORLD_SIZE=1")
        if local_rank != 0:
            raise ValueError(f"distributed launch: LOCAL_RANK={local_rank} with WORLD_SIZE=1")
        if dev.type == "cuda" and dev.index is not None:
            torch.cuda.set_device(dev)
        return DistEnv(0, 1, 0, None), dev

    if not dist.is_available():
        raise ValueError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    rank = _env_int("RANK", required=True)
    local_rank = _env_int("LOCAL_RANK", required=True)
    if not 0 <= rank < world_size:
        raise ValueError(f"distributed launch: RANK={rank} outside [0, WORLD_SIZE={world_size})")
    if not 0 <= local_rank <= rank:
        raise ValueError(
            f"distributed launch: LOCAL_RANK={local_rank} must lie in [0, RANK={rank}]"
        )
    local_world = os.environ.get("LOCAL_WORLD_SIZE")
    if local_world is not None and local_world.strip():
        lw = _env_int("LOCAL_WORLD_SIZE", required=True)
        if not 0 <= local_rank < lw <= world_size:
            raise ValueError(
                f"distributed launch: LOCAL_RANK={local_rank}, LOCAL_WORLD_SIZE={lw}, "
                f"WORLD_SIZE={world_size} are inconsistent"
            )
    addr = os.environ.get("MASTER_ADDR", "").strip()
    if not addr:
        raise ValueError("distributed launch: environment variable MASTER_ADDR is not set")
    port = _env_int("MASTER_PORT", required=True)
    if not 0 < port < 65536:
        raise ValueError(f"distributed launch: MASTER_PORT={port} is not a valid port")

    if dev.type == "cuda":
        n_gpu = torch.cuda.device_count()
        if local_rank >= n_gpu:
            raise ValueError(
                f"distributed launch: LOCAL_RANK={local_rank} but only {n_gpu} CUDA device(s) visible"
            )
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        backend = "gloo"

    if dist.is_initialized():
        if dist.get_rank() != rank or dist.get_world_size() != world_size:
            raise ValueError(
                f"a process group is already initialised as rank {dist.get_rank()} of "
                f"{dist.get_world_size()}, but the environment says {rank} of {world_size}"
            )
        return DistEnv(rank, world_size, local_rank, dist.get_backend()), dev

    kwargs = {} if timeout is None else {"timeout": timeout}
    dist.init_process_group(
        backend=backend, init_method="env://", rank=rank, world_size=world_size, **kwargs
    )
    return DistEnv(rank, world_size, local_rank, backend), dev


def shutdown() -> None:
    """Destroy the default process group if one is initialised (safe to call always)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _uses_gloo() -> bool:
    return dist.get_backend() == "gloo"


# --------------------------------------------------------------------------
# gathers
# --------------------------------------------------------------------------


def _gather_dim0(x: torch.Tensor) -> torch.Tensor:
    """Concatenate the equal-shaped ``x`` of all ranks along dim 0, rank order."""
    world = dist.get_world_size()
    x = x.contiguous()
    if _uses_gloo():
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x)
        return torch.cat(parts, dim=0)
    out = x.new_empty((world * x.shape[0],) + tuple(x.shape[1:]))
    dist.all_gather_into_tensor(out, x)
    return out


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.rank = dist.get_rank()
        ctx.world = dist.get_world_size()
        ctx.n = x.shape[0]
        return _gather_dim0(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        n = ctx.n
        if _uses_gloo():  # gloo has no reduce_scatter: all-reduce, keep own slice
            grad = grad.clone()
            dist.all_reduce(grad, op=dist.ReduceOp.SUM)
            return grad[ctx.rank * n : (ctx.rank + 1) * n]
        out = grad.new_empty((n,) + tuple(grad.shape[1:]))
        dist.reduce_scatter_tensor(out, grad, op=dist.ReduceOp.SUM)
        return out


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather ``x`` along dim 0 (rank order) keeping autograd.

    Every rank must pass a tensor of the same shape and dtype (dim 0 only;
    transpose to gather another dim).  Forward returns ``(W * n, ...)``.
    Backward SUMS the gradient flowing into the gathered tensor over all ranks
    and returns this rank's slice: if every rank computes the same global loss
    L from the gathered tensor, each rank gets ``W * dL/dx_local`` and DDP's
    average over ranks yields exactly the single-process gradient.  Every rank
    must therefore backpropagate through the gathered tensor (the backward is
    a collective).  Identity when not distributed.
    """
    if not is_dist_active():
        return x
    return _AllGatherWithGrad.apply(x)


@torch.no_grad()
def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather ``x`` along dim 0 without autograd (memory-bank updates).

    Same shape rules as :func:`all_gather_with_grad`; the result is detached.
    Identity (``x`` itself, not detached) when not distributed.
    """
    if not is_dist_active():
        return x
    return _gather_dim0(x.detach())


class _AllReduceSumWithGrad(torch.autograd.Function):
    """Differentiable SUM all-reduce (backward = SUM all-reduce of the grads).

    Same maths as ``torch.distributed.nn.functional.all_reduce`` (deprecated
    with a FutureWarning in torch 2.13), kept local so it stays quiet.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return _AllReduceSumWithGrad.apply(grad)


# --------------------------------------------------------------------------
# reductions / broadcast
# --------------------------------------------------------------------------


def _grouped(tensors: list[torch.Tensor]) -> dict[tuple, list[int]]:
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    return groups


@torch.no_grad()
def all_reduce_mean_grads(
    params: Iterable[torch.nn.Parameter], *, none_as_zero: bool = False
) -> None:
    """Average ``.grad`` over ranks for parameters that DDP does not handle.

    Use for small heads / the meta-network that live outside the DDP wrapper.
    One flattened all-reduce per (device, dtype).

    Contract (default): every rank passes the same parameters in the same
    order AND the same subset of them has a non-None ``.grad``; parameters
    whose grad is None are skipped.  A mismatch is not detected and hangs or
    corrupts gradients.  With ``none_as_zero=True`` every parameter takes part
    and a None grad is materialised as zeros first (use when some ranks may
    produce no gradient for a parameter; note it turns "no grad" into "zero
    grad" for the optimiser).  No-op when not distributed.
    """
    params = list(params)
    if not is_dist_active():
        return
    if none_as_zero:
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    if any(g.is_sparse for g in grads):
        raise ValueError("all_reduce_mean_grads: sparse gradients are not supported")
    world = dist.get_world_size()
    for idx in _grouped(grads).values():
        flat = torch.cat([grads[i].reshape(-1) for i in idx])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(world)
        off = 0
        for i in idx:
            g = grads[i]
            g.copy_(flat[off : off + g.numel()].view_as(g))
            off += g.numel()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """SUM-all-reduce ``t`` in place over ranks and return it (no autograd).

    Identity when not distributed.
    """
    if is_dist_active():
        with torch.no_grad():
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_mean_scalar(x: float, device: Union[str, torch.device] = "cpu") -> float:
    """Mean of a Python number over ranks (logging, metrics).

    ``device`` must be one the backend can communicate on (a CUDA device for
    NCCL).  Returns ``float(x)`` when not distributed.
    """
    if not is_dist_active():
        return float(x)
    t = torch.tensor([float(x)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item()) / dist.get_world_size()


@torch.no_grad()
def broadcast_module_(module: nn.Module, src: int = 0) -> nn.Module:
    """Overwrite every parameter and buffer with rank ``src``'s values (in place).

    All ranks must hold the same architecture.  One flattened broadcast per
    (device, dtype).  Returns ``module``; a no-op when not distributed.
    """
    if not is_dist_active():
        return module
    tensors = [p.data for p in module.parameters()] + [b for b in module.buffers()]
    tensors = [t for t in tensors if t.numel() > 0]
    for idx in _grouped(tensors).values():
        flat = torch.cat([tensors[i].reshape(-1) for i in idx])
        dist.broadcast(flat, src=src)
        off = 0
        for i in idx:
            t = tensors[i]
            t.copy_(flat[off : off + t.numel()].view_as(t))
            off += t.numel()
    return module


# --------------------------------------------------------------------------
# synchronised BatchNorm for CPU / gloo
# --------------------------------------------------------------------------


class SyncBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose training statistics span all ranks (works on CPU/gloo).

    In training mode with an active process group the per-channel mean and
    biased variance are those of the concatenation of every rank's batch
    (ranks may hold different batch sizes, including zero; the global count
    per channel must exceed 1).  They are computed in two differentiable
    SUM all-reduces -- ``[sum x, count]`` then ``sum (x - mean)^2`` -- in at
    least fp32 (fp64 input stays fp64), so a W-rank result matches
    single-process BatchNorm on the global batch to rounding.  The backward of
    those all-reduces sums over ranks, i.e. the input gradient is
    ``W * dL/dx_local`` under the DDP convention (see the module docstring).

    Running statistics are updated exactly as ``nn.BatchNorm2d`` would for
    the global batch: ``num_batches_tracked += 1``, factor = ``momentum`` (or
    ``1 / num_batches_tracked`` when ``momentum is None``), running_var takes
    the unbiased global variance (``* n / (n - 1)``).  Every rank ends up with
    identical running stats.

    Eval mode, or no process group / world size 1: plain ``nn.BatchNorm2d``
    (as torch's SyncBatchNorm, nothing is synchronised in eval mode, also not
    when ``track_running_stats=False``).  Channels-last input is supported and
    gives channels-last output.  Every rank must call each SyncBatchNorm2d the
    same number of times in training mode (each call is a collective).
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if not (self.training and is_dist_active()):
            return super().forward(input)
        c = input.shape[1]
        if c == 0:
            raise ValueError("SyncBatchNorm2d: number of input channels must be non-zero")
        stat_dtype = torch.promote_types(input.dtype, torch.float32)
        x = input.to(stat_dtype)
        local_count = input.numel() // c
        dims = (0, 2, 3)

        packed = torch.cat([x.sum(dim=dims), x.new_full((1,), float(local_count))])
        packed = _AllReduceSumWithGrad.apply(packed)
        n = float(packed[c].detach().item())
        if n <= 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got global count {int(n)}"
            )
        mean = packed[:c] / n
        diff = x - mean.view(1, c, 1, 1)
        var = _AllReduceSumWithGrad.apply((diff * diff).sum(dim=dims)) / n
        invstd = torch.rsqrt(var + self.eps)

        scale = invstd
        if self.weight is not None:
            scale = scale * self.weight.to(stat_dtype)
        out = diff * scale.view(1, c, 1, 1)
        if self.bias is not None:
            out = out + self.bias.to(stat_dtype).view(1, c, 1, 1)
        out = out.to(input.dtype)
        if input.is_contiguous(memory_format=torch.channels_last) and not input.is_contiguous():
            out = out.contiguous(memory_format=torch.channels_last)

        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                assert self.num_batches_tracked is not None
                self.num_batches_tracked.add_(1)
                if self.momentum is None:
                    factor = 1.0 / float(self.num_batches_tracked.item())
                else:
                    factor = float(self.momentum)
                m = mean.detach().to(self.running_mean.dtype)
                v = (var.detach() * (n / (n - 1.0))).to(self.running_var.dtype)
                self.running_mean.mul_(1.0 - factor).add_(m, alpha=factor)
                self.running_var.mul_(1.0 - factor).add_(v, alpha=factor)
        return out


def _to_sync_bn2d(bn: nn.BatchNorm2d) -> SyncBatchNorm2d:
    new = SyncBatchNorm2d(
        bn.num_features,
        eps=bn.eps,
        momentum=bn.momentum,
        affine=bn.affine,
        track_running_stats=bn.track_running_stats,
    )
    # share the very same Parameter / buffer objects (keeps requires_grad,
    # dtype, device and any optimiser references), as torch's converter does.
    if bn.affine:
        new.weight = bn.weight
        new.bias = bn.bias
    if bn.track_running_stats:
        new.running_mean = bn.running_mean
        new.running_var = bn.running_var
        new.num_batches_tracked = bn.num_batches_tracked
    new.train(bn.training)
    if hasattr(bn, "qconfig"):
        new.qconfig = bn.qconfig
    return new


def convert_sync_batchnorm(module: nn.Module, device: Union[str, torch.device]) -> nn.Module:
    """Make the BatchNorm layers of ``module`` synchronise over ranks.

    CUDA device: ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` (all
    BatchNorm*D).  Otherwise: every ``nn.BatchNorm2d`` (not already a
    :class:`SyncBatchNorm2d`) becomes a :class:`SyncBatchNorm2d` that shares
    its parameters and buffers (requires_grad kept).  ``nn.BatchNorm1d`` /
    ``BatchNorm3d`` are left alone on CPU and keep per-rank statistics (the
    projection heads' BatchNorm1d therefore only matches the single-process
    run approximately under gloo).  Returns the converted module (a new object
    when ``module`` itself is a BatchNorm2d), modified in place otherwise.
    """
    dev = _resolve_device(device)
    if dev.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, SyncBatchNorm2d):
        return _to_sync_bn2d(module)
    for name, child in module.named_children():
        new_child = convert_sync_batchnorm(child, dev)
        if new_child is not child:
            setattr(module, name, new_child)
    return module


@contextlib.contextmanager
def local_batchnorm(module: nn.Module):
    """Inside: every synchronised BN of `module` (torch's SyncBatchNorm or SyncBatchNorm2d) normalises with this
    rank's batch only, as plain BatchNorm. The L-MCL meta phase runs per rank and differentiates twice; neither
    sync-BN autograd function supports double backward, and the ranks' phases need no collectives inside it."""
    swapped = []
    for m in module.modules():
        if isinstance(m, (nn.SyncBatchNorm, SyncBatchNorm2d)):
            m.forward = types.MethodType(_BatchNorm.forward, m)
            swapped.append(m)
    try:
        yield module
    finally:
        for m in swapped:
            del m.forward
