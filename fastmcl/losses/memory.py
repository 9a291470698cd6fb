"""Momentum memory banks, one per network (the paper's memory-bank contrast, Eq. 6–7; docs/losses.md)."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

BANK_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class MemoryBank(nn.Module):
    """`memory` [n, N, D] holds network i's memory at [i] (a buffer: checkpointed, moved with `.to`, never
    differentiated; one tensor so the fused kernels read every bank without a copy), stored in `dtype` ("fp32" or
    "bf16": half the bytes every step gathers; docs/kernels/bank.md "bf16 banks").

    Initialised U(−s, s) with s = 1/sqrt(D/3) as the official code; `update` writes
    m ← normalize(momentum·m + (1−momentum)·e) for the own indices under no_grad, computed in fp32 and rounded once
    to the storage dtype.
    """

    def __init__(self, num_nets: int, num_samples: int, dim: int = 128, momentum: float = 0.5,
                 generator: torch.Generator | None = None, dtype: str = "fp32"):
        super().__init__()
        if num_nets < 1 or num_samples < 1 or dim < 1:
            raise ValueError(f"num_nets, num_samples and dim must be >= 1, got {num_nets}, {num_samples}, {dim}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if dtype not in BANK_DTYPES:
            raise ValueError(f"bank dtype must be one of {', '.join(BANK_DTYPES)}, got {dtype!r}")
        self.momentum = momentum
        stdv = 1.0 / math.sqrt(dim / 3)
        init = torch.rand(num_nets, num_samples, dim, generator=generator) * (2 * stdv) - stdv
        self.register_buffer("memory", init.to(BANK_DTYPES[dtype]))
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
        mixed = bank[index].float() * self.momentum + embedding.detach().float() * (1 - self.momentum)
        mixed = mixed / mixed.pow(2).sum(1, keepdim=True).pow(0.5)
        bank.index_copy_(0, index, mixed.to(bank.dtype))
