"""The default path (`--meta-derivatives differences`): the hypergradient by one reverse sweep over the recorded
virtual steps, every derivative of the networks read off one shifted evaluation per step with the pieces held fixed.
Derivation, cost and accuracy: docs/meta_phase.md.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

from .pieces import Pieces
from .unrolled import Unroll, dense


class _Capture(list):
    """`student_out` for the inner loss: the captured student tensors c (items) and the KL teachers' τ (`teachers`)."""

    def __init__(self):
        super().__init__()
        self.teachers: list[Tensor] = []


class _Cut:
    """Splits a forward's graph at the cohort's outputs: the loss tail (heads, meta-network, loss) is built on detached
    leaves, so one backward of the networks frees their activations while the tail's graphs stay for the sweep."""

    def __init__(self):
        self.outputs: list[Tensor] = []
        self.leaves: list[Tensor] = []

    def __call__(self, outputs):
        flat, spec = tree_flatten(outputs)
        for i, t in enumerate(flat):
            if isinstance(t, Tensor) and t.requires_grad:
                self.outputs.append(t)
                self.leaves.append(t.detach().requires_grad_(True))
                flat[i] = self.leaves[-1]
        return tree_unflatten(flat, spec)

    def grads(self, outs: list[Tensor], cotangents, theta: dict[str, Tensor], retain_tail: bool) -> list[Tensor]:
        """∂⟨cotangents, outs⟩/∂θ (zeros where unreached): the tail's backward to the heads and the leaves, then one
        backward of the networks from the leaves' gradients."""
        params = list(theta.values())
        first = torch.autograd.grad(outs, params + self.leaves, cotangents, retain_graph=retain_tail,
                                    allow_unused=True)
        pairs = [(o, g) for o, g in zip(self.outputs, first[len(params):]) if g is not None]
        second = torch.autograd.grad([o for o, _ in pairs], params, [g for _, g in pairs], allow_unused=True) \
            if pairs else [None] * len(params)
        return dense([a if b is None else (b if a is None else a + b) for a, b in zip(first, second)], params)


@dataclass
class _Record:
    """One recorded step: its base point θ_t, g_t, its pieces and, for an inner step, the loss tail."""
    theta: dict[str, Tensor]        # θ_t, detached
    grads: list[Tensor]             # g_t at θ_t, no graph
    pieces: Pieces | None           # replayed at the shifted points (None: never replayed)
    capture: _Capture | None = None  # inner step: c(θ_t) and τ(θ_t), with their loss-tail graphs
    tail: tuple = ()                # inner step: (k, q_k = ∂L/∂c_k) with a graph to φ and τ
    teacher_tail: tuple = ()        # inner step: (k, ∂L/∂τ_k) with a graph to c


class _Point(NamedTuple):
    """A shifted evaluation θ_t ± h·u of a recorded step."""
    theta: dict[str, Tensor]
    loss: Tensor
    capture: _Capture | None        # inner step: c and τ there, graph to φ (and to θ' when its gradient is wanted)
    cut: _Cut | None                # set when its gradient is wanted


def _direction(v: list[Tensor]) -> tuple[float, list[Tensor]]:
    """(‖v‖, v/‖v‖) over all tensors: differences are taken along a unit direction, with step h in θ's units."""
    norm = float(torch.sqrt(sum((vv.double() ** 2).sum() for vv in v)))
    return norm, ([vv / norm for vv in v] if norm > 0 else v)


def _accumulate(total: list[Tensor], grads) -> None:
    for acc, g in zip(total, grads):
        if g is not None:
            acc += g


class _Sweep:
    """The reverse sweep of one phase with step `h` (one-sided against the recorded base point in fp32, central under
    autocast, where the recorded step is not fp32)."""

    def __init__(self, u: Unroll, h: float, one_sided: bool):
        self.u, self.h, self.one_sided = u, h, one_sided

    def record(self, theta: dict[str, Tensor], kind: str, replayed: bool) -> _Record:
        """One step's base point: g_t (no graph), its pieces when the sweep replays them and, for an inner step, the
        loss tail q = ∂L/∂c and ∂L/∂τ with graphs (g_t = J_cᵀ q with the teachers fixed)."""
        pieces, cut = Pieces() if replayed else None, _Cut()
        theta_detached = {n: p.detach() for n, p in theta.items()}
        if kind != "inner":
            with pieces or nullcontext():
                loss = self.u.loss(theta, kind, cut=cut)
            return _Record(theta_detached, cut.grads([loss], None, theta, retain_tail=False), pieces)
        capture = _Capture()
        with pieces or nullcontext():
            loss = self.u.loss(theta, "inner", capture, cut)
        tails = torch.autograd.grad(loss, list(capture) + capture.teachers, create_graph=True, allow_unused=True)
        q, q_teacher = tails[:len(capture)], tails[len(capture):]
        used = [k for k, qk in enumerate(q) if qk is not None]
        # retain the tail: q's graph to φ runs through the meta-network, which this backward to θ also traverses
        grads = cut.grads([capture[k] for k in used], [q[k].detach() for k in used], theta, retain_tail=True)
        return _Record(theta_detached, grads, pieces, capture, tuple((k, q[k]) for k in used),
                       tuple((k, g) for k, g in enumerate(q_teacher) if g is not None))

    def shifted_forward(self, base: _Record, step: list[Tensor], with_grads: bool) -> _Point:
        """An fp32 forward at θ_t + step with the base point's pieces replayed."""
        theta = {n: p + s for (n, p), s in zip(base.theta.items(), step)}
        if with_grads:
            theta = {n: p.requires_grad_(True) for n, p in theta.items()}
        capture = _Capture() if base.capture is not None else None
        cut = _Cut() if with_grads else None
        with torch.autocast(self.u.x.device.type, enabled=False), base.pieces.replay():
            loss = self.u.loss(theta, "inner" if capture is not None else "outer", capture, cut)
        return _Point(theta, loss, capture, cut)

    def shifted_grads(self, base: _Record, point: _Point, sign: float, r_c, r_t) -> list[Tensor]:
        """g at θ_t ± h·u plus the transpose correction ∓h(J_cᵀ r_c − J_τᵀ r_τ), folded into the same backward."""
        if point.capture is None:
            return point.cut.grads([point.loss], None, point.theta, retain_tail=False)
        students = [point.capture[k] for k, _ in base.tail]
        teachers = [point.capture.teachers[k] for k, _ in base.teacher_tail]
        q = torch.autograd.grad(point.loss, students, retain_graph=True)
        h = sign * self.h
        cot = [qk - h * r.to(qk.dtype) for qk, r in zip(q, r_c)] + [h * r.to(t.dtype) for t, r in zip(teachers, r_t)]
        return point.cut.grads(students + teachers, cot, point.theta, retain_tail=False)

    def step_terms(self, base: _Record, v: list[Tensor], hyper: list[Tensor], with_jvp: bool) -> list[Tensor] | None:
        """Adds the mixed term ∂/∂φ ⟨g_t(θ_t, φ), v⟩ to `hyper` and, with `with_jvp`, returns J_tᵀ v (J_t = ∂g_t/∂θ_t),
        from differences along u = v/‖v‖: J_c v, J_τ v, J_t v, and Jᵀv = Jv − J_cᵀ L_cτ J_τ v + J_τᵀ L_τc J_c v."""
        if not with_jvp and not base.tail:
            return None
        norm, u = _direction(v)
        if norm == 0.0:
            return [torch.zeros_like(vv) for vv in v] if with_jvp else None
        h, one_sided = self.h, self.one_sided
        plus = self.shifted_forward(base, [h * uu for uu in u], with_jvp)
        minus = None if one_sided else self.shifted_forward(base, [-h * uu for uu in u], with_jvp)
        ref = base.capture if one_sided else minus.capture
        coef = 1.0 / h if one_sided else 1.0 / (2 * h)
        r_c = r_t = ()
        if base.tail:
            phi_list = list(self.u.phi.values())
            t_nodes = [base.capture.teachers[k] for k, _ in base.teacher_tail] if with_jvp else []
            d_c = [(plus.capture[k] - ref[k]).to(q.dtype) * coef for k, q in base.tail]    # J_c u, graph to φ
            # ⟨q, J_c u⟩: its φ-gradient is the mixed term, its τ-gradient L_τc J_c u (d_c does not depend on τ)
            out = torch.autograd.grad(sum((q * d).sum() for (_, q), d in zip(base.tail, d_c)), phi_list + t_nodes,
                                      retain_graph=with_jvp, allow_unused=True)
            _accumulate(hyper, [None if g is None else g * norm for g in out[:len(phi_list)]])
            if with_jvp:
                r_t = dense(out[len(phi_list):], t_nodes)
                d_t = [((plus.capture.teachers[k] - ref.teachers[k]) * coef).detach().to(g.dtype)
                       for k, g in base.teacher_tail]                                        # J_τ u
                c_nodes = [base.capture[k] for k, _ in base.tail]
                r_c = dense(torch.autograd.grad(sum((g * d).sum() for (_, g), d in zip(base.teacher_tail, d_t)),
                                                c_nodes, allow_unused=True), c_nodes)         # L_cτ J_τ u
        if not with_jvp:
            return None
        g_plus = self.shifted_grads(base, plus, 1.0, r_c, r_t)
        g_ref = base.grads if one_sided else self.shifted_grads(base, minus, -1.0, r_c, r_t)
        return [(gp - gr.to(gp.dtype)) * (coef * norm) for gp, gr in zip(g_plus, g_ref)]


def difference_hypergradient(u: Unroll, inner_steps: int, second_order: bool, h: float) -> tuple[list[Tensor], Tensor]:
    """(∂ L_outer / ∂φ, L_outer) by the reverse sweep: record the steps forward, then adjoints backward
    (b̄_{t+1} = −lr θ̄_{t+1} + μ b̄_{t+2}, θ̄_t = θ̄_{t+1} + wd b̄_{t+1} + J_tᵀ b̄_{t+1}, φ̄ += ∂φ ⟨g_t, b̄_{t+1}⟩);
    first-order keeps θ̄_t = θ̄_T."""
    sweep = _Sweep(u, h, one_sided=not torch.is_autocast_enabled(u.x.device.type))
    theta, bufs = u.theta0, {}
    records: list[_Record | None] = []
    for kind in ["inner"] * inner_steps + ["outer"]:
        records.append(sweep.record(theta, kind, replayed=second_order or kind == "inner"))
        theta, bufs = u.sgd(records[-1].theta, bufs, records[-1].grads)     # no graph: new leaves
        theta = {n: p.requires_grad_(True) for n, p in theta.items()}
    outer = u.loss(theta, "outer")
    theta_bar = dense(torch.autograd.grad(outer, list(theta.values()), allow_unused=True), theta.values())
    hyper = [torch.zeros_like(p) for p in u.phi.values()]
    b_bar = None
    for t in reversed(range(inner_steps + 1)):
        prev, b_bar = b_bar, [-u.lr * tb for tb in theta_bar]
        if prev is not None:
            b_bar = [b + u.momentum * p for b, p in zip(b_bar, prev)]
        record, records[t] = records[t], None                 # its graphs are freed after this step
        with_jvp = second_order and t > 0                     # θ̄₀ is not needed
        jv = sweep.step_terms(record, b_bar, hyper, with_jvp)
        if with_jvp:
            theta_bar = [tb + u.weight_decay * bb + j for tb, bb, j in zip(theta_bar, b_bar, jv)]
    return hyper, outer.detach()
