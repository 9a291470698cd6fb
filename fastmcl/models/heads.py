"""Heads on top of the stage features: the contrastive projection head and the L-MCL stage aggregator."""
from __future__ import annotations

import torch
from torch import Tensor, nn


class EmbedHead(nn.Module):
    """Projection head ("Embed", docs/official_mcl.md §1.1): Linear(d_in→D) → ReLU → Linear(D→D) → x / ‖x‖₂.

    The norm is `sum(x²)^(1/2)` with no eps, exactly as the official code (a zero row gives NaN, as there).
    Input is flattened first (the ImageNet variant does so; a no-op for `[B, d]`).
    """

    def __init__(self, dim_in: int, dim_out: int = 128):
        super().__init__()
        self.dim_in = dim_in
        self.dim_out = dim_out
        self.proj = nn.Sequential(nn.Linear(dim_in, dim_out), nn.ReLU(), nn.Linear(dim_out, dim_out))

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x.flatten(1))
        return x / x.pow(2).sum(1, keepdim=True).pow(0.5)


class Aggregator(nn.Module):
    """L-MCL stage aggregator of one network (docs/official_mcl.md §1.4, [L] models/aggregator.py:7-29).

    `concat(raw stage features) → Linear(S·d→d) → ReLU → Linear(d→S) → softmax over stages` gives per-sample
    weights `a[b, s]`; the output is the convex combination `Σ_s a[b, s] · logits[s][b]`.
    """

    def __init__(self, num_stages: int, dim: int, num_classes: int):
        super().__init__()
        if num_stages < 1:
            raise ValueError(f"num_stages: must be >= 1, got {num_stages}")
        self.num_stages = num_stages
        self.dim = dim
        self.num_classes = num_classes
        self.gate = nn.Sequential(nn.Linear(num_stages * dim, dim), nn.ReLU(), nn.Linear(dim, num_stages))

    def stage_weights(self, features: list[Tensor]) -> Tensor:
        """Per-sample stage weights `[B, S]` (rows sum to 1)."""
        return torch.softmax(self.gate(torch.cat(list(features), dim=1)), dim=1)

    def forward(self, features: list[Tensor], logits: list[Tensor]) -> Tensor:
        if len(features) != self.num_stages or len(logits) != self.num_stages:
            raise ValueError(f"features/logits: expected {self.num_stages} stages each, "
                             f"got {len(features)} features and {len(logits)} logits")
        if logits[0].shape[-1] != self.num_classes:
            raise ValueError(f"logits: expected {self.num_classes} classes, got {logits[0].shape[-1]}")
        w = self.stage_weights(features)                                  # [B, S]
        return (torch.stack(list(logits), dim=1) * w.unsqueeze(-1)).sum(1)  # [B, S, C] → [B, C]
