"""Teacher builders of the online-KD baselines (docs/official_baselines.md §3, "teacher builders as pluggable functions
over member outputs"), plus the small helpers their objectives share.

| builder            | used by        | parameters                  | output detached?                     |
|--------------------|----------------|-----------------------------|--------------------------------------|
| `mean_of_others`   | CL-ILR         | none                        | by the caller (CL-ILR detaches)      |
| `GatedEnsemble`    | ONE            | gate FC + BN over the trunk | no (CE-supervised; detached as KD target by ONE) |
| `PeerAttention`    | OKDDip         | shared Q, K (C → C/8)       | **no**: Q/K learn through the KD loss |
| `min_logit`        | KDCL-MinLogit  | none                        | yes                                  |
| `ConcatClassifier` | PCL            | one FC over m·C features    | no (CE-supervised; detached as KD target by PCL) |

Small heads run in fp32 outside autocast (fp64 stays fp64), like the MCL heads (`base.fp32`).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..losses import compute_dtype, kd_kl
from .base import fp32


def check_members(method: str, count: int, minimum: int) -> None:
    """One clear error when a cohort is too small for `method`."""
    if isinstance(count, bool) or not isinstance(count, int) or count < minimum:
        raise ValueError(f"method {method!r} needs a cohort of at least {minimum} members, got {count!r}")


def check_outputs(method: str, outputs, expected: int) -> list[Tensor]:
    """The members' final logits, after checking the cohort matches the objective it was built for."""
    if len(outputs) != expected:
        raise ValueError(f"method {method!r} was built for {expected} members but got outputs of {len(outputs)}")
    return [o.logits[-1] for o in outputs]


def distill_each(students: list[Tensor], teachers: list[Tensor], T: float, *, detach_teacher: bool = True) -> Tensor:
    """Σ_j KL_T(teachers[j] ‖ students[j]) with the T² factor (`kd_kl`)."""
    return torch.stack([kd_kl(s, t, T, detach_teacher=detach_teacher) for s, t in zip(students, teachers)]).sum()


def mean_logits(logits: list[Tensor]) -> Tensor:
    return torch.stack(logits).mean(0)


def mean_of_others(logits: list[Tensor]) -> list[Tensor]:
    """For each member j: mean_{l≠j} z_l (CL-ILR's `--avg` target, OKDDip `resnet_one.py` forward)."""
    m = len(logits)
    total = torch.stack(logits).sum(0)
    return [(total - z) / (m - 1) for z in logits]


def min_logit(logits: list[Tensor], labels: Tensor) -> Tensor:
    """KDCL-MinLogit: shift each member's logits so its ground-truth entry is 0 (z_k − z_k[y]), then take the
    element-wise min over members. The result is a parameter-free, detached teacher whose gt entry is 0."""
    with torch.no_grad():
        z = torch.stack(logits).to(compute_dtype(logits[0]))       # [m, B, C], fp32 under autocast
        gt = z.gather(2, labels.long().view(1, -1, 1).expand(z.shape[0], -1, 1))
        return (z - gt).min(0).values


class GatedEnsemble(nn.Module):
    """ONE's gate: g = softmax(ReLU(BN(FC(GAP(trunk))))) ∈ R^m, z_e = Σ_j g_j z_j (docs/official_baselines.md §2.2; official ONE and
    OKDDip `resnet_one.py` `control_v1`/`bn_v1`). `trunk` is the pooled shared-trunk output `[B, trunk_dim]`."""

    def __init__(self, trunk_dim: int, members: int):
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(trunk_dim, members), nn.BatchNorm1d(members), nn.ReLU(),
                                  nn.Softmax(dim=1))

    def forward(self, trunk: Tensor, logits: list[Tensor]) -> Tensor:
        g = fp32(self.gate, trunk)                                  # [B, m]
        z = torch.stack(logits, 1).to(g.dtype)                      # [B, m, C]
        return (g.unsqueeze(2) * z).sum(1)


class PeerAttention(nn.Module):
    """OKDDip's attention-based peer targets (docs/official_baselines.md §2.3; official `models/model_cifar/resnet_GL.py` forward):
    shared Q, K = Linear(C, C//8, bias=False) over each peer's pooled branch feature h_j; per sample
    A = softmax_row(Q(h)·K(h)ᵀ) (no 1/√d scaling, `energy = bmm(proj_q, proj_k^T)`), t_j = Σ_l A_jl z_l
    (`x_m = bmm(pro, attention^T)`). Nothing is detached, so Q, K (and the peers) get gradients through the targets.
    """

    def __init__(self, feature_dim: int, factor: int = 8):
        super().__init__()
        d = max(feature_dim // factor, 1)
        self.query = nn.Linear(feature_dim, d, bias=False)
        self.key = nn.Linear(feature_dim, d, bias=False)

    def forward(self, features: list[Tensor], logits: list[Tensor]) -> list[Tensor]:
        h = torch.stack(features, 1)                                # [B, n, C]
        q, k = fp32(self.query, h), fp32(self.key, h)               # [B, n, d]
        attention = torch.softmax(q @ k.transpose(1, 2), dim=2)     # [B, n, n], rows sum to 1
        targets = attention @ torch.stack(logits, 1).to(attention.dtype)   # [B, n, C]
        return list(targets.unbind(1))


class ConcatClassifier(nn.Module):
    """PCL's peer ensemble teacher: one linear classifier over the concatenated pooled features of the m peers
    (docs/official_baselines.md §1.1, a learned feature-level fusion, not a logit sum)."""

    def __init__(self, feature_dims: list[int], num_classes: int):
        super().__init__()
        self.fc = nn.Linear(sum(feature_dims), num_classes)

    def forward(self, features: list[Tensor]) -> Tensor:
        return fp32(self.fc, torch.cat(features, 1))
