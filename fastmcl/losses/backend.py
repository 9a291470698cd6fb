"""Backend choice for the contrastive losses: `reference` (plain PyTorch, the oracle) or `triton` (fused kernels)."""
from __future__ import annotations

import os
import sys

import torch

BACKENDS = ("auto", "reference", "triton")
_NOTICED: set[str] = set()


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype | None = None, *,
                    twice_differentiable: bool = False, bank_shape: tuple[int, int, int] | None = None) -> str:
    """`auto` → `triton` for CUDA tensors when the kernels import, else `reference` (also for fp64, which the kernels
    do not take, for the meta phase's twice-differentiated inner loss, and — with one notice line — for a bank plan
    of `bank_shape` = (embeddings, banks, D) beyond the bank kernel's limit). `triton` on CPU tensors runs only under
    `TRITON_INTERPRET=1` (the interpreter, for tests); otherwise it is refused loudly rather than falling back."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "reference":
        return "reference"
    ok, why = triton_usable(device)
    if backend == "auto":
        fits = dtype != torch.float64 and not twice_differentiable
        if not (ok and fits and device.type == "cuda"):
            return "reference"
        if bank_shape is not None and (beyond := _bank_limit(*bank_shape)):
            if beyond not in _NOTICED:                 # one line per distinct plan, not one per step
                _NOTICED.add(beyond)
                print(f"fastmcl: backend auto uses the reference path for the memory-bank terms: {beyond}",
                      file=sys.stderr)
            return "reference"
        return "triton"
    if not ok:
        raise NotImplementedError(f"backend='triton' cannot run here: {why}; use backend='reference' or 'auto'")
    return "triton"


def _bank_limit(num_embeddings: int, num_banks: int, dim: int) -> str | None:
    from fastmcl.kernels.bank_contrastive import beyond_limit
    return beyond_limit(num_embeddings, num_banks, dim)


def triton_usable(device: torch.device) -> tuple[bool, str]:
    """(whether the kernels can run on `device`, why not)."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False, f"tensors are on {device.type} (set TRITON_INTERPRET=1 to run the kernels in the interpreter)"
    try:
        import fastmcl.kernels  # noqa: F401
    except ImportError as e:  # triton missing or broken
        return False, f"the kernels do not import ({e})"
    return True, ""
