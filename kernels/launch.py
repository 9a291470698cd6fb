"""How an op launches each of its Triton kernels, as data: what `triton.compile` needs to build the same kernel ahead
of time for a GPU target (the GPU-readiness test compiles these for sm_80 / sm_90 on a machine without a GPU)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class KernelLaunch:
    """One kernel as the op's launcher really issues it: `fn` (a `triton.jit` function), `signature` (argument name →
    Triton type such as `"*fp32"`, `"i32"`, `"fp32"`, `"constexpr"`), `constexprs` (name → value), `attrs` (the
    divisibility-by-16 specialisations the launcher would apply), warps, stages and the grid it launches."""
    name: str
    fn: object
    signature: dict
    constexprs: dict
    num_warps: int
    num_stages: int
    grid: tuple = ()
    attrs: dict = field(default_factory=dict)
