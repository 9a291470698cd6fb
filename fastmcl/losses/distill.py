"""Logit-level terms: cross-entropy and the T²-scaled KD KL (docs/official_mcl.md §1.4, `DistillKL`)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from . import checks
from .rows import compute_dtype


def kd_kl(student: Tensor, teacher: Tensor, T: float = 3.0, *, detach_teacher: bool = True) -> Tensor:
    """T² · KL(softmax(teacher/T) ‖ softmax(student/T)), mean over the batch ('batchmean').

    student, teacher: [B, C] logits. The teacher is detached unless `detach_teacher=False` (MCL's ImageNet ensemble
    and OKDDip's attention targets are not detached).
    """
    if student.dim() != 2 or student.shape != teacher.shape:
        raise ValueError(f"student and teacher must be [B, C] logits of one shape, got {tuple(student.shape)} "
                         f"and {tuple(teacher.shape)}")
    checks.check_positive("T", T)
    if detach_teacher:
        teacher = teacher.detach()
    dtype = compute_dtype(student)
    log_p_s = F.log_softmax(student.to(dtype) / T, dim=1)
    log_p_t = F.log_softmax(teacher.to(dtype) / T, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (T * T)


def cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy, computed in fp32 whatever the logits' dtype."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, C], got shape {tuple(logits.shape)}")
    checks.check_labels(labels, logits.shape[0], logits.device)
    return F.cross_entropy(logits.to(compute_dtype(logits)), labels.long())
