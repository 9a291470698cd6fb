"""How an op launches each of its Triton kernels, as data: what `triton.compile` needs to build the same kernel ahead
of time for a GPU target (the GPU-readiness test compiles these for sm_80 / sm_90 on a machine without a GPU)."""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import triton.language as tl
from triton._C.libtriton import native_specialize_impl
from triton.backends.nvidia.compiler import CUDABackend


@dataclass(frozen=True)
class KernelLaunch:
    """One kernel as the op's launcher really issues it: `fn` (a `triton.jit` function), `signature` (argument name →
    Triton type such as `"*fp32"`, `"i32"`, `"fp32"`, `"constexpr"`), `constexprs` (name → value), `attrs` (the
    divisibility-by-16 specialisations the launcher would apply), warps, stages and the grid it launches.
    `args`: the runtime values of the non-constexpr arguments, in order (empty when built by hand); `launch()` issues
    the kernel with them."""
    name: str
    fn: object
    signature: dict
    constexprs: dict
    num_warps: int
    num_stages: int
    grid: tuple = ()
    attrs: dict = field(default_factory=dict)
    args: tuple = ()
    order: tuple = ()           # what the program id enumerates, fastest-varying first (e.g. ("group", "split", "row"))

    @classmethod
    def of(cls, name: str, fn, grid: tuple, args: tuple, constexprs: dict, *, num_warps: int,
           num_stages: int, order: tuple = ()) -> KernelLaunch:
        """The launch of `fn[grid](*args, **constexprs)`, specialised exactly as Triton's launcher specialises it
        (Triton's own `native_specialize_impl`): an int equal to 1 becomes a constexpr, an int divisible by 16 and a
        pointer aligned to 16 bytes get `tt.divisibility = 16`. Tensors may live on the `meta` device (shape and
        dtype only; their address counts as aligned, as a CUDA allocation is)."""
        names, is_constexpr = _parameters(fn)
        runtime = [i for i, c in enumerate(is_constexpr) if not c]
        if len(runtime) != len(args):
            raise TypeError(f"{fn.__name__} takes {len(runtime)} runtime arguments, got {len(args)}")
        signature = {name: "constexpr" for name in names}
        specialised, attrs = {}, {}
        for i, value in zip(runtime, args):
            ty, spec = native_specialize_impl(CUDABackend, value, False, True, True)
            signature[names[i]] = ty
            if ty == "constexpr":
                specialised[names[i]] = spec
            elif isinstance(spec, str) and spec:
                attrs[(i,)] = CUDABackend.parse_attr(spec)
        return cls(name=name, fn=fn, signature=signature, constexprs={**constexprs, **specialised},
                   num_warps=num_warps, num_stages=num_stages, grid=tuple(grid), attrs=attrs, args=tuple(args),
                   order=tuple(order))

    def launch(self) -> None:
        """Issue the kernel on its runtime arguments (Triton re-derives the same specialisation)."""
        names, is_constexpr = _parameters(self.fn)
        declared = {name for name, c in zip(names, is_constexpr) if c}
        self.fn[self.grid](*self.args, **{k: v for k, v in self.constexprs.items() if k in declared},
                           num_warps=self.num_warps, num_stages=self.num_stages)


def _parameters(fn) -> tuple[list[str], list[bool]]:
    """Argument names of a `triton.jit` function and which are `tl.constexpr` (also for the interpreter's wrapper)."""
    params = inspect.signature(getattr(fn, "fn", fn)).parameters.values()
    return [p.name for p in params], [p.annotation is tl.constexpr or "constexpr" in str(p.annotation) for p in params]
