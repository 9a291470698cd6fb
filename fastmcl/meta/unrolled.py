"""The meta phase's virtual SGD steps as functions of detached copies of θ (docs/official_mcl.md §2.3–2.4), and the
hypergradient differentiated through them by autograd: the exact form (`--meta-derivatives autograd`) that the
default difference path is checked against (docs/meta_phase.md).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call


class Joint(nn.Module):
    """Cohort + objective under one parameter namespace, so one `functional_call` swaps both. `capture` receives the
    tensors the inner loss sees from θ (`student_out`); `cut` splits the graph at the cohort's outputs."""

    def __init__(self, cohort: nn.Module, objective: nn.Module):
        super().__init__()
        self.cohort = cohort
        self.objective = objective

    def forward(self, x: Tensor, labels: Tensor, contrast_idx: Tensor | None, kind: str, capture: list | None = None,
                cut=None) -> Tensor:
        outputs = self.cohort(x)
        if cut is not None:
            outputs = cut(outputs)
        if kind == "inner":
            return self.objective.inner_loss(outputs, labels, contrast_idx, student_out=capture)
        return self.objective.outer_loss(outputs, labels)


@dataclass
class Unroll:
    """One phase's fixed context: θ₀ (detached copies of the networks and heads), φ (the meta-network, live), a copy
    of the cohort's mutable buffers, the batch, the learning rate, and the real optimizer's momentum and weight decay
    (MetaSGD's momentum starts at zero every phase, no Nesterov)."""
    joint: Joint
    theta0: dict[str, Tensor]
    phi: dict[str, Tensor]
    buffers: dict[str, Tensor]
    x: Tensor
    y: Tensor
    idx: Tensor | None
    lr: float
    momentum: float
    weight_decay: float

    def loss(self, theta: dict[str, Tensor], kind: str, capture: list | None = None, cut=None) -> Tensor:
        """`inner` (weighted by φ) or `outer` (Σ stage CE) loss at θ."""
        return functional_call(self.joint, ({**theta, **self.phi}, self.buffers),
                               (self.x, self.y, self.idx, kind, capture, cut), strict=False)

    def inner_grad(self, theta: dict[str, Tensor]) -> list[Tensor | None]:
        """∇θ L_inner with the KL teachers held fixed (the regular step's semantics), differentiable in θ and φ. The
        backward is split at the student logits (v = ∂L/∂c with the teachers attached, then ∇θ = J_cᵀ v) so that the
        teachers' dependence on θ stays in every second derivative, which autograd through `.detach()` would drop."""
        capture: list[Tensor] = []
        loss = self.loss(theta, "inner", capture)
        v = torch.autograd.grad(loss, capture, create_graph=True, allow_unused=True)
        pairs = [(c, g) for c, g in zip(capture, v) if g is not None]
        return list(torch.autograd.grad([c for c, _ in pairs], list(theta.values()), [g for _, g in pairs],
                                        create_graph=True, allow_unused=True))

    def sgd(self, theta: dict[str, Tensor], bufs: dict[str, Tensor], grads) -> tuple[dict, dict]:
        """`torch.optim.SGD`'s update (momentum, weight decay, no dampening, no Nesterov), out of place."""
        new_theta, new_bufs = {}, {}
        for (n, p), g in zip(theta.items(), grads):
            g = (torch.zeros_like(p) if g is None else g) + self.weight_decay * p
            b = g if n not in bufs else self.momentum * bufs[n] + g
            new_bufs[n] = b
            new_theta[n] = p - self.lr * b
        return new_theta, new_bufs


def dense(grads, like) -> list[Tensor]:
    """Gradients with zeros for the inputs (`like`, in order) a loss does not reach."""
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, like)]


def exact_hypergradient(u: Unroll, inner_steps: int, second_order: bool) -> tuple[list[Tensor], Tensor]:
    """(∂ L_outer(θ_{inner+1}) / ∂φ, L_outer) by autograd through the unrolled steps. First-order takes each update's
    Jacobian as the identity but keeps the mixed term: −Σ_t c_t ∂/∂φ ⟨∇θ L_inner(θ_t, φ), ∇θ L_outer(θ_T)⟩."""
    theta, phi = u.theta0, u.phi
    bufs: dict[str, Tensor] = {}
    mixed = []                                     # first-order: the ∇θ L_inner(θ_t, φ) with graphs to φ
    for _ in range(inner_steps):
        grads = u.inner_grad(theta)
        if not second_order:
            mixed.append(grads)
            grads = [None if g is None else g.detach() for g in grads]
            theta = {n: p.detach() for n, p in theta.items()}
        theta, bufs = u.sgd(theta, bufs, grads)
        if not second_order:
            theta = {n: p.detach().requires_grad_(True) for n, p in theta.items()}
            bufs = {n: b.detach() for n, b in bufs.items()}
    loss = u.loss(theta, "outer")
    grads = torch.autograd.grad(loss, list(theta.values()), create_graph=second_order, allow_unused=True)
    theta, bufs = u.sgd(theta, bufs, grads)
    if not second_order:
        theta = {n: p.detach().requires_grad_(True) for n, p in theta.items()}
    outer = u.loss(theta, "outer")
    phi_list = list(phi.values())
    if second_order:
        hyper = torch.autograd.grad(outer, phi_list, allow_unused=True)
    else:
        v = torch.autograd.grad(outer, list(theta.values()), allow_unused=True)
        total_steps = inner_steps + 1
        surrogate = 0.0
        for t, g_t in enumerate(mixed):
            c_t = u.lr * sum(u.momentum ** s for s in range(total_steps - t))
            surrogate = surrogate - c_t * sum((g * vv).sum() for g, vv in zip(g_t, v)
                                              if g is not None and vv is not None)
        hyper = torch.autograd.grad(surrogate, phi_list, allow_unused=True)
    return dense(hyper, phi_list), outer.detach()
