"""Ahead-of-time compilation of `KernelLaunch`es for real GPU targets, on a machine without a GPU.

`triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", cc, 32), options=...)` runs the
whole pipeline down to a cubin with the wheel's bundled ptxas; from it we read what decides whether the kernel will
launch and run well on that GPU:
- `shared`: `compiled.metadata.shared`, the bytes the launcher checks against the device's per-block opt-in limit;
- `registers`, `spill_stores`, `spill_loads`, `stack`: ptxas' own report (`-v`, printed under TRITON_DUMP_PTXAS_LOG);
- `mma`: the tensor-core instructions in the PTX (`mma.sync` on sm_80, `wgmma.mma_async` on sm_90), beside `dots`,
  the `tt.dot` operations of the kernel's Triton IR (a kernel without one has nothing to put on tensor cores);
- `async_copies`: asynchronous copies in the PTX (`cp.async` on sm_80+, TMA `cp.async.bulk` on sm_90);
- `loops`, `skips`, `cold`, `mma_sass`: the SASS (`cuobjdump -sass` of the cubin, both bundled with the wheel) as
  control flow (`_control_flow`), and `sass_count` the kernel's instructions, for the issue model (`resident_blocks`
  applies the CUDA occupancy rules: docs/kernels/performance_model.md).

Compiling costs seconds per kernel, so results are cached on disk under `<repo>/.cache/aot/` (git-ignored; override
with FASTMCL_AOT_CACHE), keyed by the kernel's source hash (Triton's `cache_key`, which covers every `triton.jit`
function it calls), the launch's signature, constexprs, attrs, warps, stages, the target and the Triton version.
Distinct launches compile in parallel worker processes (`compile_launches`).
"""
from __future__ import annotations

import ast
import contextlib
import hashlib
import io
import json
import multiprocessing
import os
import re
import subprocess
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from importlib import import_module
from pathlib import Path

import triton

REPO = Path(__file__).resolve().parents[2]
CACHE_DIR = Path(os.environ.get("FASTMCL_AOT_CACHE", REPO / ".cache" / "aot"))

# Per-block shared memory a kernel may opt into (cudaDevAttrMaxSharedMemoryPerBlockOptin).
SHARED_LIMIT = {80: 166_912, 86: 101_376, 89: 101_376, 90: 232_448}
TARGETS = (80, 90)
ARCH = {80: "sm_80", 86: "sm_86", 89: "sm_89", 90: "sm_90"}

_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_MMA = re.compile(r"^\s*(wgmma\.mma_async|mma\.sync)\S*", re.MULTILINE)
_TT_DOT = re.compile(r"\btt\.dot\b")
_RESULT_SCHEMA = 7                  # bump when the cached fields change
_ASYNC = re.compile(r"\bcp\.async\.(?:bulk\.)?(?:cg|ca|tensor|shared)\S*")
_SASS_INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);", re.MULTILINE)
_BRANCH = re.compile(r"\bBRA\b.*?(0x[0-9a-f]+)")
_CONDITIONAL = re.compile(r"^@!?U?P\d")
_TENSOR_CORE = re.compile(r"\b(?:HMMA|HGMMA|IMMA)\b")
# per SM: registers, warps, blocks, shared memory (bytes; 1 KB of it reserved per block)
SM_LIMITS = {80: (65_536, 64, 32, 167_936), 90: (65_536, 64, 32, 233_472)}


class DoesNotFit(Exception):
    """A kernel whose compiled resources exceed what the target GPU gives one block."""


@dataclass(frozen=True)
class Compiled:
    """What ptxas and Triton report for one launch on one target."""
    name: str
    cc: int
    num_warps: int
    num_stages: int
    shared: int
    registers: int
    spill_stores: int
    spill_loads: int
    stack: int
    mma: tuple[str, ...]              # distinct tensor-core instruction kinds in the PTX (empty: FMA only)
    dots: int                         # `tt.dot` operations in the kernel's Triton IR (0: nothing for tensor cores)
    compile_s: float                  # seconds the compile took when it was not cached
    async_copies: int = 0             # cp.async / TMA instructions in the PTX
    sass_count: int = 0               # SASS instructions of the kernel
    loops: tuple = ()                 # SASS loops as (first, last) instruction indices, outermost first
    skips: tuple = ()                 # conditional forward branches as (branch, target) instruction indices
    cold: tuple = ()                  # out-of-line blocks as (first, last, return target) instruction indices
    mma_sass: tuple = ()              # indices of the SASS tensor-core instructions

    @property
    def resident_blocks(self) -> int:
        """Blocks of this kernel one SM holds at once (CUDA occupancy rules: registers allocated per warp in units of
        256 with registers per thread rounded up to 8, the warp and block limits, shared memory + 1 KB per block)."""
        regs, max_warps, max_blocks, smem = SM_LIMITS[self.cc]
        per_warp = -(-(-(-max(self.registers, 1) // 8) * 8) * 32 // 256) * 256
        by_regs = (regs // per_warp) // self.num_warps
        return max(0, min(by_regs, max_warps // self.num_warps, max_blocks, smem // (self.shared + 1024)))

    @property
    def resident_warps(self) -> int:
        return self.resident_blocks * self.num_warps

    @property
    def pipelined(self) -> bool:
        """A software pipeline really issues asynchronous copies: num_stages ≥ 2 and cp.async / TMA in the PTX."""
        return self.num_stages >= 2 and self.async_copies > 0

    @property
    def arch(self) -> str:
        return ARCH.get(self.cc, f"sm_{self.cc}")

    @property
    def shared_limit(self) -> int:
        return SHARED_LIMIT[self.cc]

    @property
    def tensor_cores(self) -> bool:
        return bool(self.mma)

    def problems(self) -> list[str]:
        """Why this kernel would fail to launch (shared memory) or run slowly (spills); empty when it is fine."""
        out = []
        if self.shared > self.shared_limit:
            out.append(f"needs {self.shared:,} B of shared memory per block; {self.arch} allows "
                       f"{self.shared_limit:,} B (the launch would raise OutOfResources)")
        if self.spill_stores or self.spill_loads:
            out.append(f"spills registers: {self.spill_stores} B stores / {self.spill_loads} B loads at "
                       f"{self.registers} registers per thread")
        return out

    def describe(self) -> str:
        return (f"{self.name} on {self.arch} (num_warps={self.num_warps}, num_stages={self.num_stages}): "
                f"{self.registers} registers, {self.spill_stores} B spilled, {self.shared:,} B shared, "
                f"{self.dots} tl.dot, tensor cores: {', '.join(self.mma) or 'none'}")

    def check_fits(self) -> None:
        """Raise `DoesNotFit` naming the kernel, the target and the numbers when the block cannot launch."""
        if self.shared > self.shared_limit:
            raise DoesNotFit(f"{self.name} on {self.arch} (num_warps={self.num_warps}, num_stages={self.num_stages}) "
                             f"{self.problems()[0]}")


def _job(launch, cc: int) -> dict:
    """Plain, picklable description of one compile (the worker re-imports the kernel by module and name)."""
    fn = launch.fn
    return {"name": launch.name, "module": fn.__module__, "fn": fn.__name__, "cc": cc,
            "signature": dict(launch.signature), "constexprs": dict(launch.constexprs),
            "attrs": {repr(k): v for k, v in launch.attrs.items()}, "num_warps": launch.num_warps,
            "num_stages": launch.num_stages, "source": fn.cache_key}


def _key(job: dict) -> str:
    text = json.dumps({**job, "name": None, "triton": triton.__version__, "schema": _RESULT_SCHEMA}, sort_keys=True,
                      default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _compile_job(job: dict) -> dict:
    """Compile one job in this process with a private Triton cache (so ptxas always runs and prints its report)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(import_module(job["module"]), job["fn"])
    attrs = {ast.literal_eval(k): v for k, v in job["attrs"].items()}   # keys are repr'd int tuples
    with tempfile.TemporaryDirectory() as cache:
        saved = {k: os.environ.get(k) for k in ("TRITON_CACHE_DIR", "TRITON_DUMP_PTXAS_LOG")}
        os.environ.update(TRITON_CACHE_DIR=cache, TRITON_DUMP_PTXAS_LOG="1")
        log = io.StringIO()
        start = time.perf_counter()
        try:
            with contextlib.redirect_stdout(log):
                compiled = triton.compile(ASTSource(fn, job["signature"], job["constexprs"], attrs),
                                          target=GPUTarget("cuda", job["cc"], 32),
                                          options={"num_warps": job["num_warps"], "num_stages": job["num_stages"]})
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        seconds = time.perf_counter() - start
    text = log.getvalue()
    regs = _PTXAS_REGS.search(text)
    spills = _PTXAS_SPILLS.search(text)
    if regs is None or spills is None:
        raise RuntimeError(f"no ptxas report for {job['name']} on sm_{job['cc']}:\n{text[-2000:]}")
    sass = _sass(compiled.asm["cubin"])
    return {"shared": int(compiled.metadata.shared), "registers": int(regs.group(1)),
            "async_copies": len(_ASYNC.findall(compiled.asm["ptx"])), "sass_count": len(sass),
            **_control_flow(sass),
            "stack": int(spills.group(1)), "spill_stores": int(spills.group(2)), "spill_loads": int(spills.group(3)),
            "mma": sorted(set(_MMA.findall(compiled.asm["ptx"]))),
            "dots": len(_TT_DOT.findall(compiled.asm["ttir"])), "compile_s": round(seconds, 2)}


def _sass(cubin: bytes) -> list[tuple[int, str]]:
    """(address, instruction) of every SASS instruction, from the wheel's bundled `cuobjdump -sass`."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    return [(int(a, 16), ins.strip()) for a, ins in _SASS_INSN.findall(text)]


def _branches(sass: list[tuple[int, str]]) -> list[tuple[int, int, bool]]:
    """(index of the branch, index of its target, conditional) of every branch whose target is an instruction
    (`BRA.DIV`, taken only by a divergent warp, counts as conditional)."""
    where = {addr: i for i, (addr, _) in enumerate(sass)}
    out = []
    for i, (addr, ins) in enumerate(sass):
        m = _BRANCH.search(ins)
        if m and int(m.group(1), 16) in where:
            out.append((i, where[int(m.group(1), 16)], bool(_CONDITIONAL.match(ins)) or "BRA.DIV" in ins))
    return out


def _control_flow(sass: list[tuple[int, str]]) -> dict:
    """The SASS's loops, skipped regions, out-of-line blocks and tensor-core instructions (indices into `sass`):
    - `cold`: (first, last, return target) of each block placed out of line after an `EXIT` (where ptxas puts the
      path of a divergent warp): straight code entered by a conditional forward branch, ending with a branch back;
    - `loops`: (branch target, backward branch) of each other backward branch, widest first;
    - `skips`: (branch, target) of each conditional forward branch (the code in between runs when not taken);
    - `mma_sass`: the indices of tensor-core instructions (HMMA, HGMMA, IMMA)."""
    branches = _branches(sass)
    entered = {t for i, t, conditional in branches if conditional and t > i}
    exits = {i for i, (_, ins) in enumerate(sass) if "EXIT" in ins}
    ends = {i for i, _, _ in branches} | exits                       # where straight code ends
    final_exits = exits - {i for i, (_, ins) in enumerate(sass) if _CONDITIONAL.match(ins)}
    cold, loops = [], []
    for i, t, conditional in branches:
        if t > i:
            continue
        first = i
        while first - 1 > t and first - 1 not in ends:
            first -= 1
        if not conditional and first in entered and first - 1 in final_exits:
            cold.append((first, i, t))
        else:
            loops.append((t, i))
    return {"loops": sorted(loops, key=lambda ab: ab[0] - ab[1]), "cold": cold,
            "skips": [(i, t) for i, t, conditional in branches if conditional and t > i],
            "mma_sass": [i for i, (_, ins) in enumerate(sass) if _TENSOR_CORE.search(ins)]}


def _result(job: dict, data: dict) -> Compiled:
    return Compiled(name=job["name"], cc=job["cc"], num_warps=job["num_warps"], num_stages=job["num_stages"],
                    shared=data["shared"], registers=data["registers"], spill_stores=data["spill_stores"],
                    spill_loads=data["spill_loads"], stack=data["stack"], mma=tuple(data["mma"]), dots=data["dots"],
                    compile_s=data["compile_s"], async_copies=data["async_copies"], sass_count=data["sass_count"],
                    loops=tuple(tuple(x) for x in data["loops"]), skips=tuple(tuple(x) for x in data["skips"]),
                    cold=tuple(tuple(x) for x in data["cold"]), mma_sass=tuple(data["mma_sass"]))


def compile_launches(pairs: list[tuple[object, int]], *, processes: int | None = None,
                     use_cache: bool = True) -> list[Compiled]:
    """Compile each (KernelLaunch, cc) pair (identical compiles once) and return one `Compiled` per pair, in order.
    Uncached compiles run in `processes` worker processes (default: the CPU count, at most the number of compiles)."""
    jobs = [_job(launch, cc) for launch, cc in pairs]
    keys = [_key(j) for j in jobs]
    found: dict[str, dict] = {}
    if use_cache:
        for k in set(keys):
            path = CACHE_DIR / f"{k}.json"
            if path.exists():
                found[k] = json.loads(path.read_text())
    todo = {k: j for k, j in zip(keys, jobs) if k not in found}
    if todo:
        workers = max(1, min(processes or os.cpu_count() or 1, len(todo)))
        if workers == 1:
            results = map(_compile_job, todo.values())
        else:
            pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
            results = pool.map(_compile_job, todo.values())
        for k, data in zip(todo, results):             # each cached as soon as it is in
            found[k] = data
            if use_cache:
                CACHE_DIR.mkdir(parents=True, exist_ok=True)
                tmp = CACHE_DIR / f".{k}.{os.getpid()}.tmp"
                tmp.write_text(json.dumps(data))
                tmp.replace(CACHE_DIR / f"{k}.json")
        if workers > 1:
            pool.shutdown()
    return [_result(j, found[k]) for j, k in zip(jobs, keys)]


def as_row(c: Compiled) -> dict:
    """A flat dict for tables and JSON."""
    return {**asdict(c), "arch": c.arch, "shared_limit": c.shared_limit, "mma": ",".join(c.mma)}
