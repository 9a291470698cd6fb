"""Backend choice for the contrastive losses: `reference` (plain PyTorch, the oracle) or `triton` (fused kernels)."""
from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "reference", "triton")


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype | None = None, *,
                    twice_differentiable: bool = False) -> str:
    """`auto` → `triton` for CUDA tensors when the kernels import, else `reference` (also for fp64, which the kernels
    do not take, and for the meta phase's twice-differentiated inner loss). `triton` on CPU tensors runs only under
    `TRITON_INTERPRET=1` (the interpreter, for tests); otherwise it is refused loudly rather than falling back."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "reference":
        return "reference"
    ok, why = triton_usable(device)
    if backend == "auto":
        fits = dtype != torch.float64 and not twice_differentiable
        return "triton" if ok and fits and device.type == "cuda" else "reference"
    if not ok:
        raise NotImplementedError(f"backend='triton' cannot run here: {why}; use backend='reference' or 'auto'")
    return "triton"


def triton_usable(device: torch.device) -> tuple[bool, str]:
    """(whether the kernels can run on `device`, why not)."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False, f"tensors are on {device.type} (set TRITON_INTERPRET=1 to run the kernels in the interpreter)"
    try:
        import fastmcl.kernels  # noqa: F401
    except ImportError as e:  # triton missing or broken
        return False, f"the kernels do not import ({e})"
    return True, ""
