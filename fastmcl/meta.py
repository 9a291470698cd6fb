"""L-MCL meta-optimisation of the layer-matching weights (spec/lmcl.md §2.3–2.4), functional instead of
copy-and-restore: the virtual SGD steps run on detached copies of the parameters through
`torch.func.functional_call`, so no model is deep-copied and nothing a virtual step does can leak into the real
networks, heads, BN statistics, optimizer state or memory banks.

One meta phase on a batch (x, y), at the current learning rate lr:
  θ₀ = networks + projection heads;  MetaSGD momentum starts at zero (the official MetaSGD state is rolled back after
  every phase, so its buffers are always empty), momentum μ = 0.9, weight decay as the real optimizer, no Nesterov.
  t = 0 .. inner−1:  θ_{t+1} = SGD(θ_t, ∇θ L_inner(θ_t; w = MetaNet_φ(features(θ_t))))   (weights WITH gradient)
  θ_{inner+1}     = SGD(θ_inner, ∇θ L_outer(θ_inner))                                    (Σ stage CE)
  hypergradient   = ∂ L_outer(θ_{inner+1}) / ∂φ
then φ ← the meta optimizer's step (SGD, Nesterov, momentum 0.9, lr on the main schedule).

Modes: `second-order` differentiates through every step (Hessian-vector products included); `first-order` takes
each update's Jacobian ∂θ_{t+1}/∂θ_t as the identity (drops the Hessian and weight-decay terms, keeps momentum as a
scalar factor) but keeps the mixed term ∂²L_inner/∂θ∂φ through which the weights act at all:
hypergradient ≈ −Σ_t c_t ∂/∂φ ⟨∇θ L_inner(θ_t, φ), ∇θ L_outer(θ_T)⟩ with c_t = lr·Σ_{s=t}^{T−1} μ^{s−t}.

Both run as one reverse sweep over the recorded steps (`_reverse_sweep`); no network is differentiated twice. Each
step's forward records its base point (g_t, the loss tail, and the ReLU masks / max-pool winners / dropout masks,
fastmcl/kinks.py), and the reverse sweep reads every derivative of the networks off one shifted evaluation along
u = v/‖v‖ with step `fd_step` h = 1e-3, the pieces replayed:
  - mixed term ∂/∂φ ⟨g_t, v⟩: with c the tensors the inner loss sees from θ (student logits, matching weights) and
    q = ∂L_inner/∂c (a graph through the loss tail and the meta-network only), ⟨g_t, v⟩ = ⟨q, J_c v⟩, and J_c v is
    the difference of the captured tensors;
  - J_tᵀ v (second-order, t ≥ 1; θ̄₀ is not needed): the difference of gradients gives J_t v; an inner step holds
    the KL teachers τ fixed, so J_t = S + J_cᵀ L_cτ J_τ is not symmetric, and Jᵀv = Jv − J_cᵀ L_cτ J_τ v +
    J_τᵀ L_τc J_c v is completed in the same backward from loss-tail double backwards (`_step_terms`).
So a second-order phase is 7 forwards + 6 backwards of the cohort (4 recorded steps, 2 shifted forward+backward, one
shifted forward for step 0's mixed term); first-order is 4 forward+backward + one shifted forward per inner step.
Differences are one-sided against the recorded base point when the phase runs in fp32 (O(h)), central under
autocast (two fp32 evaluations, O(h²)), because the recorded step is bf16 there. `fd_step=None` differentiates through the networks everywhere (the
plain unrolled form; the tests check both agree, and the FD check of the hypergradient holds for both).

Why the pieces are held fixed: the networks are ReLU networks, so ∇θ L jumps where a unit changes sign, and autograd's
second derivatives are those of the network with every unit's state frozen. Free differences of gradients picked up
the jumps (2×ResNet-32, fp32, B=32: 450× / 42× / 6× off at h = 1e-3 / 1e-2 / 1e-1); with the pieces replayed the
hypergradient agrees with the exact unrolled form in fp32 to 0.6 % at B=32 and 1.6 % at B=128 (cosine ≥ 0.9998)
at h = 1e-3; h = 1e-2 gives 3.5 % / 9.5 %, h = 1e-4 5.8 % at B=32 (roundoff).
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from operator import attrgetter
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils._pytree import tree_flatten, tree_unflatten

from .kinks import Pieces

META_MODES = ("second-order", "first-order", "off")
FD_STEP = 1e-3      # the difference path's step h along a unit direction (`--meta-derivatives differences`)

# the backends whose fp32 math mode (torch >= 2.9 API) `ieee_fp32` pins, after torch.backends' global default
_FP32_PRECISION_SCOPES = ("cuda.matmul", "cudnn", "cudnn.conv", "cudnn.rnn", "mkldnn", "mkldnn.conv",
                          "mkldnn.matmul", "mkldnn.rnn")


@contextmanager
def ieee_fp32():
    """fp32 convolutions and matmuls in full IEEE precision, the settings restored after. The meta phase's
    differences at h = 1e-3 along a unit direction over ~10⁶ parameters resolve relative changes of ~1e-5 in the
    activations; TF32, which cuDNN uses for fp32 convolutions by default on Ampere and later GPUs, rounds their
    inputs to 10 mantissa bits (~5e-4) and would bury them, as would oneDNN's bf16/tf32 fp32-math modes on CPUs
    that have them (`torch.set_float32_matmul_precision("high")` turns those on)."""
    scopes = [torch.backends] + [attrgetter(name)(torch.backends) for name in _FP32_PRECISION_SCOPES]
    saved = [scope.fp32_precision for scope in scopes]
    try:
        for scope in scopes:
            scope.fp32_precision = "ieee"
        yield
    finally:
        for scope, value in zip(scopes, saved):
            scope.fp32_precision = value


class _Capture(list):
    """`student_out` for the inner loss: the captured student tensors (items) and the KL teachers' (`teachers`)."""

    def __init__(self):
        super().__init__()
        self.teachers: list[Tensor] = []


class _Point(NamedTuple):
    """A shifted evaluation θ_t ± h·u of a recorded step (`MetaPhase._shifted_forward`)."""
    theta: dict[str, Tensor]
    loss: Tensor
    capture: _Capture | None        # inner step: c and τ there, graph to φ (and to θ' when its gradient is wanted)
    cut: "_Cut | None"              # set when its gradient is wanted


@dataclass
class _Base:
    """One recorded step, for the reverse sweep."""
    theta: dict[str, Tensor]        # θ_t, detached
    grads: list[Tensor]             # g_t at θ_t, no graph
    pieces: Pieces | None           # ReLU masks etc. of its forward, replayed at the shifted points (None: never)
    capture: _Capture | None = None  # inner step: c(θ_t) and the teachers τ(θ_t), with their loss-tail graphs
    tail: tuple = ()                # inner step: (k, q_k = ∂L/∂c_k) with a graph to φ and τ
    teacher_tail: tuple = ()        # inner step: (k, ∂L/∂τ_k) with a graph to c


class _Cut:
    """Splits a forward's graph at the cohort's outputs: the loss tail (heads, meta-network, loss) is built on detached
    leaves, so one backward of the networks frees their activations while the tail's graphs stay for the reverse
    sweep (retaining whole graphs held ~3 GB more than a regular step at B=128 on 2×ResNet-32)."""

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
        return _dense([a if b is None else (b if a is None else a + b) for a, b in zip(first, second)], params)


def _dense(grads, like) -> list[Tensor]:
    """Gradients with zeros for the inputs (`like`, in order) a loss does not reach."""
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, like)]


def _accumulate(total: list[Tensor], grads) -> None:
    for acc, g in zip(total, grads):
        if g is not None:
            acc += g


def _direction(v: list[Tensor]) -> tuple[float, list[Tensor]]:
    """(‖v‖, v/‖v‖) over all tensors: differences are taken along a unit direction, with step h in θ's units."""
    norm = float(torch.sqrt(sum((vv.double() ** 2).sum() for vv in v)))
    return norm, ([vv / norm for vv in v] if norm > 0 else v)


class _Joint(nn.Module):
    """Cohort + objective under one parameter namespace, so one functional_call swaps both."""

    def __init__(self, cohort: nn.Module, objective: nn.Module):
        super().__init__()
        self.cohort = cohort
        self.objective = objective

    def forward(self, x: Tensor, labels: Tensor, contrast_idx: Tensor | None, kind: str,
                capture: list | None = None, cut: "_Cut | None" = None) -> Tensor:
        outputs = self.cohort(x)
        if cut is not None:
            outputs = cut(outputs)
        if kind == "inner":
            return self.objective.inner_loss(outputs, labels, contrast_idx, student_out=capture)
        return self.objective.outer_loss(outputs, labels)


@dataclass
class MetaResult:
    outer_loss: float
    hypergrad_norm: float


class MetaPhase:
    def __init__(self, cohort: nn.Module, objective: nn.Module, meta_optimizer: torch.optim.Optimizer | None, *,
                 inner_steps: int = 2, mode: str = "second-order", momentum: float = 0.9,
                 weight_decay: float = 5e-4, reduce_grads=None, fd_step: float | None = FD_STEP):
        if mode not in META_MODES:
            raise ValueError(f"meta mode must be one of {', '.join(META_MODES)}, got {mode!r}")
        if inner_steps < 1:
            raise ValueError(f"meta inner steps must be >= 1, got {inner_steps}")
        self.joint = _Joint(cohort, objective)
        self.meta_optimizer = meta_optimizer
        self.inner_steps, self.mode = inner_steps, mode
        if fd_step is not None and not fd_step > 0:
            raise ValueError(f"fd_step must be > 0 or None, got {fd_step}")
        self.fd_step = fd_step
        # under DDP: each rank unrolls on its own slice of the batch (no cross-rank gather inside the double
        # backward) and the hypergradients are averaged by `reduce_grads` before the meta optimizer's step
        self.reduce_grads = reduce_grads
        self.momentum, self.weight_decay = momentum, weight_decay
        meta_ids = {id(p) for p in objective.meta_parameters()}
        virtual = set(objective.virtual_parameter_prefixes())
        named = dict(self.joint.named_parameters())
        self.meta_names = [n for n, p in named.items() if id(p) in meta_ids]
        self.theta_names = [n for n, p in named.items() if p.requires_grad and id(p) not in meta_ids and
                            (n.startswith("cohort.") or any(n.startswith("objective." + v) for v in virtual))]

    # -- the unrolled virtual steps ---------------------------------------------------------------------------------
    def _fresh_state(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Detached copies of θ and of the cohort's mutable buffers (BN statistics); other buffers are read-only."""
        params = dict(self.joint.named_parameters())
        theta = {n: params[n].detach().clone().requires_grad_(True) for n in self.theta_names}
        buffers = {n: (b.detach().clone() if n.startswith("cohort.") else b)
                   for n, b in self.joint.named_buffers()}
        return theta, buffers

    def _loss(self, theta, phi, buffers, x, y, idx, kind, capture=None, cut=None) -> Tensor:
        return functional_call(self.joint, ({**theta, **phi}, buffers), (x, y, idx, kind, capture, cut), strict=False)

    def _inner_grad(self, theta, phi, buffers, x, y, idx) -> list[Tensor | None]:
        """∇θ L_inner with the KL teachers held fixed (the regular step's semantics), as a differentiable function of
        θ and φ. Autograd through `.detach()` would drop the teachers' dependence on θ from every second derivative,
        so the backward is split at the student logits instead: v = ∂L/∂(student logits, weights) with the teacher
        attached, then ∇θ = Jᵀv. (The official MetaSGD differentiates through the detach and misses those terms.)"""
        capture: list[Tensor] = []
        loss = self._loss(theta, phi, buffers, x, y, idx, "inner", capture)
        v = torch.autograd.grad(loss, capture, create_graph=True, allow_unused=True)
        pairs = [(c, g) for c, g in zip(capture, v) if g is not None]
        return list(torch.autograd.grad([c for c, _ in pairs], list(theta.values()), [g for _, g in pairs],
                                        create_graph=True, allow_unused=True))

    def _sgd(self, theta, bufs, grads, lr):
        """torch.optim.SGD's update (momentum, weight decay, no dampening, no Nesterov), out of place."""
        new_theta, new_bufs = {}, {}
        for (n, p), g in zip(theta.items(), grads):
            g = (torch.zeros_like(p) if g is None else g) + self.weight_decay * p
            b = g if n not in bufs else self.momentum * bufs[n] + g
            new_bufs[n] = b
            new_theta[n] = p - lr * b
        return new_theta, new_bufs

    def hypergradient(self, x: Tensor, y: Tensor, contrast_idx: Tensor | None, lr: float) -> tuple[list[Tensor], Tensor]:
        params = dict(self.joint.named_parameters())
        phi = {n: params[n] for n in self.meta_names}
        theta, buffers = self._fresh_state()
        if self.fd_step is not None:
            with ieee_fp32():
                return self._reverse_sweep(theta, phi, buffers, x, y, contrast_idx, lr)
        second = self.mode == "second-order"
        bufs: dict[str, Tensor] = {}
        mixed = []                                     # first-order: the ∇θ L_inner(θ_t, φ) with graphs to φ
        for _ in range(self.inner_steps):
            grads = self._inner_grad(theta, phi, buffers, x, y, contrast_idx)
            if not second:
                mixed.append(grads)
                grads = [None if g is None else g.detach() for g in grads]
                theta = {n: p.detach() for n, p in theta.items()}
            theta, bufs = self._sgd(theta, bufs, grads, lr)
            if not second:
                theta = {n: p.detach().requires_grad_(True) for n, p in theta.items()}
                bufs = {n: b.detach() for n, b in bufs.items()}
        loss = self._loss(theta, phi, buffers, x, y, contrast_idx, "outer")
        grads = torch.autograd.grad(loss, list(theta.values()), create_graph=second, allow_unused=True)
        theta, bufs = self._sgd(theta, bufs, grads, lr)
        if not second:
            theta = {n: p.detach().requires_grad_(True) for n, p in theta.items()}
        outer = self._loss(theta, phi, buffers, x, y, contrast_idx, "outer")
        phi_list = list(phi.values())
        if second:
            hyper = torch.autograd.grad(outer, phi_list, allow_unused=True)
        else:
            v = torch.autograd.grad(outer, list(theta.values()), allow_unused=True)
            total_steps = self.inner_steps + 1
            surrogate = 0.0
            for t, g_t in enumerate(mixed):
                c_t = lr * sum(self.momentum ** s for s in range(total_steps - t))
                surrogate = surrogate - c_t * sum((g * vv).sum() for g, vv in zip(g_t, v)
                                                  if g is not None and vv is not None)
            hyper = torch.autograd.grad(surrogate, phi_list, allow_unused=True)
        return _dense(hyper, phi_list), outer.detach()

    # -- the default path: every derivative of the networks by differences with the pieces held fixed -------------
    def _record(self, theta, phi, buffers, x, y, idx, kind: str, replayed: bool = True) -> _Base:
        """One step's base point: g_t (no graph; the virtual step), its piecewise-linear pieces when the sweep will
        replay them (`replayed`; not for the CE step in first-order, which has no shifted evaluation) and, for an
        inner step, the loss tail (q = ∂L/∂c and ∂L/∂τ with graphs) for the mixed term and the transpose correction.
        Inner: g_t = J_cᵀ q with the teachers fixed."""
        pieces, cut = Pieces() if replayed else None, _Cut()
        theta_detached = {n: p.detach() for n, p in theta.items()}
        if kind != "inner":
            with pieces or nullcontext():
                loss = self._loss(theta, phi, buffers, x, y, idx, kind, cut=cut)
            return _Base(theta_detached, cut.grads([loss], None, theta, retain_tail=False), pieces)
        capture = _Capture()
        with pieces or nullcontext():
            loss = self._loss(theta, phi, buffers, x, y, idx, "inner", capture, cut)
        tails = torch.autograd.grad(loss, list(capture) + capture.teachers, create_graph=True, allow_unused=True)
        q, q_teacher = tails[:len(capture)], tails[len(capture):]
        used = [k for k, qk in enumerate(q) if qk is not None]
        # retain the tail: q's graph to φ runs through the meta-network, which this backward to θ also traverses
        grads = cut.grads([capture[k] for k in used], [q[k].detach() for k in used], theta, retain_tail=True)
        return _Base(theta_detached, grads, pieces, capture, tuple((k, q[k]) for k in used),
                     tuple((k, g) for k, g in enumerate(q_teacher) if g is not None))

    def _shifted_forward(self, base: _Base, step: list[Tensor], phi, buffers, x, y, idx, with_grads: bool) -> _Point:
        """An fp32 forward at θ_t + step with the base point's pieces replayed."""
        theta = {n: p + s for (n, p), s in zip(base.theta.items(), step)}
        if with_grads:
            theta = {n: p.requires_grad_(True) for n, p in theta.items()}
        capture = _Capture() if base.capture is not None else None
        cut = _Cut() if with_grads else None
        with torch.autocast(x.device.type, enabled=False), base.pieces.replay():
            loss = self._loss(theta, phi, buffers, x, y, idx, "inner" if capture is not None else "outer", capture,
                              cut)
        return _Point(theta, loss, capture, cut)

    def _shifted_grads(self, base: _Base, point: _Point, sign: float, r_c, r_t) -> list[Tensor]:
        """g at a shifted point θ_t ± h·u, as at the base point, plus the transpose correction ∓h(J_cᵀ r_c − J_τᵀ r_τ)
        folded into the same backward (r = loss-tail second derivatives along the differences; see _step_terms)."""
        if point.capture is None:
            return point.cut.grads([point.loss], None, point.theta, retain_tail=False)
        students = [point.capture[k] for k, _ in base.tail]
        teachers = [point.capture.teachers[k] for k, _ in base.teacher_tail]
        q = torch.autograd.grad(point.loss, students, retain_graph=True)
        h = sign * self.fd_step
        cot = [qk - h * r.to(qk.dtype) for qk, r in zip(q, r_c)] + [h * r.to(t.dtype) for t, r in zip(teachers, r_t)]
        return point.cut.grads(students + teachers, cot, point.theta, retain_tail=False)

    def _step_terms(self, base: _Base, v: list[Tensor], phi, buffers, x, y, idx, one_sided: bool, hyper,
                    with_jvp: bool) -> list[Tensor] | None:
        """Adds the mixed term ∂/∂φ ⟨g_t(θ_t, φ), v⟩ to `hyper` and, with `with_jvp`, returns J_tᵀ v (J_t = ∂g_t/∂θ_t),
        all from differences along u = v/‖v‖ with the pieces held fixed.
        Mixed: with g = J_cᵀ q, ⟨g, v⟩ = ⟨q, J_c v⟩, and J_c v is a difference of the captured tensors (graph to φ
        through the weights). J_tᵀ v: a difference of gradients gives J_t v; J_t is not symmetric because the KL
        teachers τ are held fixed in g (J_t = S + J_cᵀ L_cτ J_τ, S symmetric), so
            J_tᵀ v = J_t v − J_cᵀ (L_cτ J_τ v) + J_τᵀ (L_τc J_c v),
        with J_c v, J_τ v from the same differences, the L_cτ / L_τc products by double backward of the loss tail
        alone, and the outer J_cᵀ, J_τᵀ taken in the shifted point's own backward. The CE step's J is its Hessian.
        One-sided against the recorded base point when that is fp32 (O(h)), else central (two fp32 points, O(h²))."""
        if not with_jvp and not base.tail:
            return None
        norm, u = _direction(v)
        if norm == 0.0:
            return [torch.zeros_like(vv) for vv in v] if with_jvp else None
        h = self.fd_step
        plus = self._shifted_forward(base, [h * uu for uu in u], phi, buffers, x, y, idx, with_jvp)
        minus = None if one_sided else self._shifted_forward(base, [-h * uu for uu in u], phi, buffers, x, y, idx,
                                                             with_jvp)
        ref = base.capture if one_sided else minus.capture
        coef = 1.0 / h if one_sided else 1.0 / (2 * h)
        r_c = r_t = ()
        if base.tail:
            phi_list = list(phi.values())
            t_nodes = [base.capture.teachers[k] for k, _ in base.teacher_tail] if with_jvp else []
            d_c = [(plus.capture[k] - ref[k]).to(q.dtype) * coef for k, q in base.tail]    # J_c u, graph to φ
            # ⟨q, J_c u⟩: its φ-gradient is the mixed term, its τ-gradient L_τc J_c u (d_c does not depend on τ)
            out = torch.autograd.grad(sum((q * d).sum() for (_, q), d in zip(base.tail, d_c)), phi_list + t_nodes,
                                      retain_graph=with_jvp, allow_unused=True)
            _accumulate(hyper, [None if g is None else g * norm for g in out[:len(phi_list)]])
            if with_jvp:
                r_t = _dense(out[len(phi_list):], t_nodes)
                d_t = [((plus.capture.teachers[k] - ref.teachers[k]) * coef).detach().to(g.dtype)
                       for k, g in base.teacher_tail]                                        # J_τ u
                c_nodes = [base.capture[k] for k, _ in base.tail]
                r_c = _dense(torch.autograd.grad(sum((g * d).sum() for (_, g), d in zip(base.teacher_tail, d_t)),
                                                 c_nodes, allow_unused=True), c_nodes)        # L_cτ J_τ u
        if not with_jvp:
            return None
        g_plus = self._shifted_grads(base, plus, 1.0, r_c, r_t)
        g_ref = base.grads if one_sided else self._shifted_grads(base, minus, -1.0, r_c, r_t)
        return [(gp - gr.to(gp.dtype)) * (coef * norm) for gp, gr in zip(g_plus, g_ref)]

    def _reverse_sweep(self, theta, phi, buffers, x, y, idx, lr) -> tuple[list[Tensor], Tensor]:
        """The hypergradient by a reverse sweep over the recorded virtual steps. Adjoints of
        b_{t+1} = μ b_t + g_t + wd θ_t, θ_{t+1} = θ_t − lr b_{t+1}:
            b̄_{t+1} = −lr θ̄_{t+1} + μ b̄_{t+2},   θ̄_t = θ̄_{t+1} + wd b̄_{t+1} + J_tᵀ b̄_{t+1},
            φ̄ += ∂φ ⟨g_t, b̄_{t+1}⟩.
        second-order: J_tᵀ b̄ for t ≥ 1 (θ̄₀ is not needed); first-order: θ̄_t = θ̄_T. Each step costs one shifted
        forward (mixed term only) or forward+backward (with J_tᵀ b̄) on top of its recorded base point."""
        second = self.mode == "second-order"
        one_sided = not torch.is_autocast_enabled(x.device.type)
        bufs: dict[str, Tensor] = {}
        records: list[_Base | None] = []
        for kind in ["inner"] * self.inner_steps + ["outer"]:
            records.append(self._record(theta, phi, buffers, x, y, idx, kind, replayed=second or kind == "inner"))
            theta, bufs = self._sgd(records[-1].theta, bufs, records[-1].grads, lr)     # no graph: new leaves
            theta = {n: p.requires_grad_(True) for n, p in theta.items()}
        outer = self._loss(theta, phi, buffers, x, y, idx, "outer")
        theta_bar = _dense(torch.autograd.grad(outer, list(theta.values()), allow_unused=True), theta.values())
        hyper = [torch.zeros_like(p) for p in phi.values()]
        b_bar = None
        for t in reversed(range(self.inner_steps + 1)):
            prev, b_bar = b_bar, [-lr * tb for tb in theta_bar]
            if prev is not None:
                b_bar = [b + self.momentum * p for b, p in zip(b_bar, prev)]
            record, records[t] = records[t], None                 # its graphs are freed after this step
            with_jvp = second and t > 0
            jv = self._step_terms(record, b_bar, phi, buffers, x, y, idx, one_sided, hyper, with_jvp)
            if with_jvp:
                theta_bar = [tb + self.weight_decay * bb + j for tb, bb, j in zip(theta_bar, b_bar, jv)]
        return hyper, outer.detach()

    @torch.no_grad()
    def outer_loss(self, x: Tensor, y: Tensor, contrast_idx: Tensor | None, lr: float) -> Tensor:
        """L_outer after the virtual steps, with no graph (for finite-difference checks of `hypergradient`)."""
        params = dict(self.joint.named_parameters())
        phi = {n: params[n] for n in self.meta_names}
        theta, buffers = self._fresh_state()
        bufs: dict[str, Tensor] = {}
        for kind in ["inner"] * self.inner_steps + ["outer"]:
            with torch.enable_grad():
                theta = {n: p.detach().requires_grad_(True) for n, p in theta.items()}
                loss = self._loss(theta, phi, buffers, x, y, contrast_idx, kind)
                grads = torch.autograd.grad(loss, list(theta.values()), allow_unused=True)
            theta, bufs = self._sgd({n: p.detach() for n, p in theta.items()}, bufs, grads, lr)
        return self._loss(theta, phi, buffers, x, y, contrast_idx, "outer")

    def step(self, x: Tensor, y: Tensor, contrast_idx: Tensor | None, lr: float) -> MetaResult:
        """One meta phase: hypergradient, then the meta optimizer's step at `lr`. The networks are untouched."""
        if self.mode == "off" or self.meta_optimizer is None:
            return MetaResult(float("nan"), 0.0)
        objective = self.joint.objective
        gather, objective.gather = objective.gather, None
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
