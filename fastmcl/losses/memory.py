"""Momentum memory banks, one per network (spec/lmcl.md §1.3)."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class MemoryBank(nn.Module):
    """`memory` [n, N, D] holds network i's memory at [i] (a buffer: checkpointed, moved with `.to`, never
    differentiated; one tensor so the fused kernels read every bank without a copy).

    Initialised U(−s, s) with s = 1/sqrt(D/3) as the official code; `update` writes
    m ← normalize(momentum·m + (1−momentum)·e) for the own indices under no_grad.
    """

    def __init__(self, num_nets: int, num_samples: int, dim: int = 128, momentum: float = 0.5,
                 generator: torch.Generator | None = None):
        super().__init__()
        if num_nets < 1 or num_samples < 1 or dim < 1:
            raise ValueError(f"num_nets, num_samples and dim must be >= 1, got {num_nets}, {num_samples}, {dim}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum
        stdv = 1.0 / math.sqrt(dim / 3)
        init = torch.rand(num_nets, num_samples, dim, generator=generator) * (2 * stdv) - stdv
        self.register_buffer("memory", init)
        self.num_nets = num_nets

    @property
    def banks(self) -> list[Tensor]:
        """Views of `memory`, one [N, D] per network."""
        return list(self.memory.unbind(0))

    @torch.no_grad()
    def update(self, net: int, index: Tensor, embedding: Tensor) -> None:
        """index [B] long, embedding [B, D]; duplicate indices in one call keep one of the writes."""
        bank = self.banks[net]
        if index.dim() != 1 or embedding.shape != (index.shape[0], bank.shape[1]):
            raise ValueError(f"update needs index [B] and embedding [B, {bank.shape[1]}], got {tuple(index.shape)} "
                             f"and {tuple(embedding.shape)}")
        index = index.long()
        mixed = bank[index] * self.momentum + embedding.detach().to(bank.dtype) * (1 - self.momentum)
        mixed = mixed / mixed.pow(2).sum(1, keepdim=True).pow(0.5)
        bank.index_copy_(0, index, mixed)
