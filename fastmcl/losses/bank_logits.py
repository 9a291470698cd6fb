"""E · Mem[idx]ᵀ for all embeddings and all banks at once, plain or K-streamed (docs/official_mcl.md §4.2; docs/losses.md "Contracts")."""
from __future__ import annotations

import torch
from torch import Tensor


def bank_logits_all(E: Tensor, banks: Tensor, idx: Tensor, k_chunk: int | None = None) -> Tensor:
    """E [NE, B, D], banks [n, N, D] (never differentiated), idx [B, K] → L [NE, n, B, K] with
    L[u, m, b, k] = E[u, b] · banks[m][idx[b, k]].

    Every bank is gathered once and scored against all NE embeddings (docs/official_mcl.md §4.2: 2 gathers instead of 128), straight
    into one output (no stacking copy). k_chunk=None keeps each bank's gather [B, K, D] for backward; k_chunk=c
    streams the gather in chunks of c columns and gathers again in backward, so nothing [B, K, D] stays alive.
    """
    return _BankLogits.apply(E, banks.detach(), idx, k_chunk)


def _column_chunks(K: int, k_chunk: int | None):
    step = K if k_chunk is None else k_chunk
    return [slice(lo, lo + step) for lo in range(0, K, step)]


def _gather(bank: Tensor, idx: Tensor, buf: Tensor | None) -> Tensor:
    """bank[idx] [B, c, D], written into `buf` when given. Streaming reuses one buffer for every chunk: a fresh
    [B, c, D] tensor per chunk leaves holes in the heap that the next chunk does not fit (the chunk before is still
    alive, the small matmul results split the freed one), and resident memory grows chunk by chunk."""
    flat = idx.reshape(-1)
    out = None if buf is None else buf.view(-1)[:flat.numel() * bank.shape[1]].view(flat.numel(), bank.shape[1])
    return torch.index_select(bank, 0, flat, out=out).view(*idx.shape, bank.shape[1])


class _BankLogits(torch.autograd.Function):
    # Hand-written rather than einsum + autograd: einsum's backward materialises permuted copies of its operands, and
    # the output is written block by block into L. ∂L/∂E is linear in the bank rows, so the backward below is itself
    # differentiable in grad_out (the meta phase differentiates twice).
    @staticmethod
    def forward(ctx, E: Tensor, banks: Tensor, idx: Tensor, k_chunk: int | None) -> Tensor:
        n, K = banks.shape[0], idx.shape[1]
        L = E.new_empty(E.shape[0], n, E.shape[1], K)
        Et = E.transpose(0, 1)                                                  # [B, NE, D]
        buf = _chunk_buffer(banks, idx, k_chunk)
        kept = []
        for m in range(n):
            for cols in _column_chunks(K, k_chunk):
                rows = _gather(banks[m], idx[:, cols], buf).to(E.dtype)         # [B, c, D]
                L[:, m, :, cols] = torch.matmul(Et, rows.transpose(1, 2)).transpose(0, 1)
                if k_chunk is None:
                    kept.append(rows)
        ctx.k_chunk = k_chunk
        ctx.save_for_backward(banks, idx, *kept)
        return L

    @staticmethod
    def backward(ctx, grad_L: Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        banks, idx, *kept = ctx.saved_tensors
        # a twice-differentiated backward (create_graph: the meta phase) saves each chunk's rows: no buffer reuse then
        buf = None if kept or torch.is_grad_enabled() else _chunk_buffer(banks, idx, ctx.k_chunk)
        grad_E = None
        chunks = [(m, cols) for m in range(banks.shape[0]) for cols in _column_chunks(idx.shape[1], ctx.k_chunk)]
        for i, (m, cols) in enumerate(chunks):
            rows = kept[i] if kept else _gather(banks[m], idx[:, cols], buf).to(grad_L.dtype)  # streamed: again
            part = torch.matmul(grad_L[:, m, :, cols].transpose(0, 1), rows).transpose(0, 1)   # [NE, B, D]
            grad_E = part if grad_E is None else grad_E + part
        return grad_E, None, None, None


def _chunk_buffer(banks: Tensor, idx: Tensor, k_chunk: int | None) -> Tensor | None:
    """One [B, k_chunk, D] gather buffer for the streamed path; None (a fresh, kept tensor per bank) otherwise."""
    if k_chunk is None:
        return None
    return banks.new_empty(idx.shape[0], min(k_chunk, idx.shape[1]), banks.shape[2])
