"""Backend choice for the contrastive losses: `reference` (plain PyTorch, the oracle) or `triton` (fused kernels)."""
from __future__ import annotations

import torch

BACKENDS = ("auto", "reference", "triton")


def resolve_backend(backend: str, device: torch.device) -> str:
    """`auto` picks `triton` on CUDA once the fused kernels exist, `reference` otherwise."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "triton":
        # Loud, not a silent fallback: the fused kernels are not part of the package yet.
        raise NotImplementedError("backend='triton' is not available yet (fused kernels are not built); "
                                  "use backend='reference' or 'auto'")
    return "reference"
