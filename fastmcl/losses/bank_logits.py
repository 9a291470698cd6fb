"""E · Mem[idx]ᵀ for all embeddings at once, plain or K-streamed (spec §4.2; DESIGN.md "Kernels")."""
from __future__ import annotations

import torch
from torch import Tensor


def bank_logits_all(E: Tensor, bank: Tensor, idx: Tensor, k_chunk: int | None = None) -> Tensor:
    """E [NE, B, D], bank [N, D] (never differentiated), idx [B, K] → [NE, B, K] with out[u, b, k] = E[u,b]·bank[idx[b,k]].

    k_chunk=None: one gather [B, K, D] kept by autograd for backward. k_chunk=c: the gather is streamed in chunks of
    c columns in forward and done again in backward, so only the [NE, B, K] result stays alive.
    """
    bank = bank.detach()
    if k_chunk is None or k_chunk >= idx.shape[1]:
        return torch.einsum("ubd,bkd->ubk", E, bank[idx])
    return _StreamedBankLogits.apply(E, bank, idx, k_chunk)


class _StreamedBankLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, E: Tensor, bank: Tensor, idx: Tensor, k_chunk: int) -> Tensor:
        ctx.save_for_backward(bank, idx)
        ctx.k_chunk = k_chunk
        out = E.new_empty(E.shape[0], E.shape[1], idx.shape[1])
        for start in range(0, idx.shape[1], k_chunk):
            cols = slice(start, start + k_chunk)
            out[:, :, cols] = torch.einsum("ubd,bkd->ubk", E, bank[idx[:, cols]])
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        bank, idx = ctx.saved_tensors
        grad_E = None
        if ctx.needs_input_grad[0]:
            grad_E = grad_out.new_zeros(grad_out.shape[0], grad_out.shape[1], bank.shape[1])
            for start in range(0, idx.shape[1], ctx.k_chunk):
                cols = slice(start, start + ctx.k_chunk)
                grad_E += torch.einsum("ubk,bkd->ubd", grad_out[:, :, cols], bank[idx[:, cols]].to(grad_out.dtype))
        return grad_E, None, None, None
