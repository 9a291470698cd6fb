"""The sigmoid-shaped consistency ramp-up of Laine & Aila (arXiv 1610.02242) used by ONE, OKDDip, CL-ILR and PCL
(docs/official_baselines.md §1.3): w(t) = exp(−5·(1 − t/L)²) for epoch t < L, 1 after, with L = 80 by default.

This is the correct formula (OKDDip `train_GL.py` `get_current_consistency_weight`). The shaoeric PCL reproduction
divides by the loss weight instead of L, which keeps w ≈ 0 for 80 epochs; that bug is not reproduced here.
"""
from __future__ import annotations

import math


def sigmoid_rampup(epoch: float, length: float) -> float:
    """w(epoch) for a ramp of `length` epochs; `length` = 0 switches the ramp off (w = 1)."""
    if length < 0:
        raise ValueError(f"rampup length must be >= 0 epochs, got {length}")
    if length == 0:
        return 1.0
    t = min(max(float(epoch), 0.0), float(length))
    phase = 1.0 - t / length
    return math.exp(-5.0 * phase * phase)
