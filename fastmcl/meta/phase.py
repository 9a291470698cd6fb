"""One L-MCL meta phase (docs/official_mcl.md §2.3–2.4): virtual SGD steps on detached copies of the networks and heads, the
hypergradient of the outer loss with respect to the meta-network, then the meta optimizer's step. Nothing a virtual
step does reaches the real networks, BN statistics, optimizer state or memory banks (docs/meta_phase.md).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from operator import attrgetter

import torch
from torch import Tensor, nn

from .differences import difference_hypergradient
from .unrolled import Joint, Unroll, exact_hypergradient

FD_STEP = 1e-3      # the difference path's step h along a unit direction (`--meta-derivatives differences`)

# the backends whose fp32 math mode `ieee_fp32` pins, after torch.backends' global default
_FP32_PRECISION_SCOPES = ("cuda.matmul", "cudnn", "cudnn.conv", "cudnn.rnn", "mkldnn", "mkldnn.conv",
                          "mkldnn.matmul", "mkldnn.rnn")


@contextmanager
def ieee_fp32():
    """fp32 convolutions and matmuls in full IEEE precision, the settings restored after: the differences resolve
    relative changes far below what TF32 (cuDNN's default for fp32 convolutions on Ampere+) or oneDNN's reduced fp32
    modes keep (docs/meta_phase.md "IEEE fp32")."""
    scopes = [torch.backends] + [attrgetter(name)(torch.backends) for name in _FP32_PRECISION_SCOPES]
    saved = [scope.fp32_precision for scope in scopes]
    try:
        for scope in scopes:
            scope.fp32_precision = "ieee"
        yield
    finally:
        for scope, value in zip(scopes, saved):
            scope.fp32_precision = value


@dataclass
class MetaResult:
    outer_loss: float
    hypergrad_norm: float


class MetaPhase:
    """`mode` (`--meta-mode`, checked with the config): `second-order` differentiates through every virtual step,
    `first-order` takes each step's Jacobian as the identity, `off` leaves the meta-network as it is. `fd_step`: the
    difference path's step h (default), or None for the exact autograd form. Under DDP each rank unrolls on its own
    slice and `reduce_grads` averages the hypergradients before the meta step."""

    def __init__(self, cohort: nn.Module, objective: nn.Module, meta_optimizer: torch.optim.Optimizer | None, *,
                 inner_steps: int = 2, mode: str = "second-order", momentum: float = 0.9,
                 weight_decay: float = 5e-4, reduce_grads=None, fd_step: float | None = FD_STEP):
        if inner_steps < 1:
            raise ValueError(f"meta inner steps must be >= 1, got {inner_steps}")
        if fd_step is not None and not fd_step > 0:
            raise ValueError(f"fd_step must be > 0 or None, got {fd_step}")
        self.joint = Joint(cohort, objective)
        self.meta_optimizer = meta_optimizer
        self.inner_steps, self.mode, self.fd_step = inner_steps, mode, fd_step
        self.reduce_grads = reduce_grads
        self.momentum, self.weight_decay = momentum, weight_decay
        meta_ids = {id(p) for p in objective.meta_parameters()}
        virtual = set(objective.virtual_parameter_prefixes())
        named = dict(self.joint.named_parameters())
        self.meta_names = [n for n, p in named.items() if id(p) in meta_ids]
        self.theta_names = [n for n, p in named.items() if p.requires_grad and id(p) not in meta_ids and
                            (n.startswith("cohort.") or any(n.startswith("objective." + v) for v in virtual))]

    def unroll(self, x: Tensor, y: Tensor, contrast_idx: Tensor | None, lr: float) -> Unroll:
        """The phase's context at the current parameters: fresh detached copies of θ and of the cohort's mutable
        buffers (BN statistics; other buffers are read-only)."""
        params = dict(self.joint.named_parameters())
        theta = {n: params[n].detach().clone().requires_grad_(True) for n in self.theta_names}
        buffers = {n: (b.detach().clone() if n.startswith("cohort.") else b) for n, b in self.joint.named_buffers()}
        return Unroll(self.joint, theta, {n: params[n] for n in self.meta_names}, buffers, x, y, contrast_idx, lr,
                      self.momentum, self.weight_decay)

    def hypergradient(self, x: Tensor, y: Tensor, contrast_idx: Tensor | None,
                      lr: float) -> tuple[list[Tensor], Tensor]:
        """(∂ L_outer / ∂φ per meta parameter, L_outer) after `inner_steps` virtual steps and the outer step."""
        u = self.unroll(x, y, contrast_idx, lr)
        second_order = self.mode == "second-order"
        if self.fd_step is None:
            return exact_hypergradient(u, self.inner_steps, second_order)
        with ieee_fp32():
            return difference_hypergradient(u, self.inner_steps, second_order, self.fd_step)

    def step(self, x: Tensor, y: Tensor, contrast_idx: Tensor | None, lr: float) -> MetaResult:
        """One meta phase: hypergradient, then the meta optimizer's step at `lr`. The networks are untouched."""
        if self.mode == "off" or self.meta_optimizer is None:
            return MetaResult(float("nan"), 0.0)
        objective = self.joint.objective
        gather, objective.gather = objective.gather, None      # each rank unrolls on its own slice
        try:
            hyper, outer = self.hypergradient(x, y, contrast_idx, lr)
        finally:
            objective.gather = gather
        params = dict(self.joint.named_parameters())
        for n, h in zip(self.meta_names, hyper):
            params[n].grad = h.detach()
        if self.reduce_grads is not None:
            self.reduce_grads([params[n] for n in self.meta_names])
        for group in self.meta_optimizer.param_groups:
            group["lr"] = lr
        self.meta_optimizer.step()
        self.meta_optimizer.zero_grad(set_to_none=True)
        return MetaResult(float(outer), float(torch.sqrt(sum((h.float() ** 2).sum() for h in hyper))))
