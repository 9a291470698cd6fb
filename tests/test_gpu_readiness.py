"""GPU readiness on a machine without a GPU: every Triton kernel, launched as its op really launches it, compiled
ahead of time for sm_80 (A100) and sm_90 (H100/H200) with the bundled ptxas (`tests/support/aot.py`).

For each scenario (plan, batch, dtype) and target, every kernel of one forward + backward call must compile, fit the
target's per-block shared memory, spill no registers and, if it has a `tl.dot`, run it on tensor cores at the
default precision. For the ImageNet bank scenarios (32 and 256 rows per GPU) the bank kernels must also keep the GPU
busy (docs/kernels/performance_model.md): the pass that gathers from the bank hides latency (≥ 16 resident warps
per SM, or a software pipeline with asynchronous copies); every bank kernel's grid fills every resident block slot
of every SM at least once; a row's target-bank groups are adjacent in launch order. Every point of the
configuration space compiles and fits too. Results are cached under `.cache/aot/` by kernel source hash and launch configuration (cold: a
few minutes on 2 cores; warm: seconds). How it works: docs/kernels/gpu_readiness.md. The full sweep over more plans, batches and dtypes: `benchmarks/aot_sweep.py`.
"""
from __future__ import annotations

import importlib
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from triton.runtime.jit import create_function_from_signature

from fastmcl.kernels import inbatch_contrastive
from fastmcl.kernels.launch import KernelLaunch
from fastmcl.losses import lmcl_plan, mcl_plan
from support.aot import TARGETS, DoesNotFit, compile_launches

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
META = torch.device("meta")
CPU = torch.device("cpu")
D = 128
BANK_K = 8194                 # own + 1 positive + 8,192 negatives per anchor (ImageNet memory-bank setting)
BANK_N = 1_281_167            # ImageNet-1k training images: bank rows
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SM_COUNT = {80: 108, 90: 132}  # A100, H100 / H200

# (name, plan factory, batch rows per launch)
INBATCH_SCENARIOS = [
    ("cifar-lmcl-B128", lambda: lmcl_plan([4, 4]), 128),
    ("cifar-lmcl-B256", lambda: lmcl_plan([4, 4]), 256),
    ("cifar-mcl4-B128", lambda: mcl_plan(4), 128),
    ("cifar-mcl4-B256", lambda: mcl_plan(4), 256),
]
BANK_SCENARIOS = [
    ("imagenet-lmcl-B32", lambda: lmcl_plan([4, 4]), 32),       # B = 256 global over 8 GPUs
    ("imagenet-lmcl-B256", lambda: lmcl_plan([4, 4]), 256),
    ("lmcl-4x4-B256", lambda: lmcl_plan([4, 4, 4, 4]), 256),
    ("mcl8-B256", lambda: mcl_plan(8), 256),
]
INBATCH_IDX = ("ce_u", "ce_v", "kl_su", "kl_sv", "kl_tu", "kl_tv")


def inbatch_launches(plan, B: int, dtype: torch.dtype, cc: int = 90) -> list[KernelLaunch]:
    """The in-batch op's launches (its configuration does not depend on the target `cc`)."""
    ix = plan.index_tables(CPU)
    E = torch.empty((plan.num_embeddings, B, D), dtype=dtype, device=META)
    labels = torch.empty(B, dtype=torch.int64, device=META)
    return inbatch_contrastive.launches(E, labels, *(ix[k] for k in INBATCH_IDX), 0.1, 3.0)


def bank_module():
    return importlib.import_module("fastmcl.kernels.bank_contrastive")


def bank_launches(plan, B: int, dtype: torch.dtype, cc: int, tuning=None, precision=None) -> list[KernelLaunch]:
    """The bank op's launches for the arguments `cohort_bank_contrastive_terms` passes it, on a GPU of capability
    `cc` with that GPU's SM count (the bank op splits K by it); `tuning`: a point of the configuration space for the
    fp32 dots' `precision` (None: the default, torch's "highest" → tf32x3)."""
    return bank_module().launches((plan.num_embeddings, B, D), max(plan.net_of) + 1, BANK_N, BANK_K,
                                  len(plan.ce_blocks), len(plan.kl_blocks), dtype=dtype, pos_k=1, tau=0.07, kd_T=3.0,
                                  device_capability=divmod(cc, 10), sm_count=SM_COUNT[cc], tuning=tuning,
                                  input_precision=precision)


PRECISIONS = ("tf32x3", "tf32")      # torch's "highest" (the default) and "high"


def space_cases() -> list[tuple[str, str, int, str, int]]:
    """(scenario, dtype name, cc, precision, candidate number) for every configuration-space point a bank scenario
    can use besides the default one (which `cases()` covers)."""
    out = []
    for name, _, _ in BANK_SCENARIOS:
        for dtype_name in DTYPES:
            for cc in TARGETS:
                for prec in PRECISIONS:
                    n = len(space_candidates(name, dtype_name, cc, prec))
                    out += [(name, dtype_name, cc, prec, i) for i in range(int(prec == PRECISIONS[0]), n)]
    return out


def space_candidates(name: str, dtype_name: str, cc: int, prec: str) -> tuple:
    """The configuration space's candidates for a bank scenario: for the padded combo count its default launch uses."""
    _, plan, B = next(s for s in BANK_SCENARIOS if s[0] == name)
    k = bank_launches(plan(), B, DTYPES[dtype_name], cc, precision=prec)[0].constexprs
    return bank_module().tunings(divmod(cc, 10), DTYPES[dtype_name], k["NE_P"] * k["N_P"], prec)


def bank_missing_reason() -> str | None:
    if not hasattr(bank_module(), "launches"):
        return ("fastmcl.kernels.bank_contrastive has no `launches(...)` yet (the agreed entry point: the bank op's "
                "KernelLaunch list for bank_rows' arguments)")
    return None


def cases() -> list[tuple[str, str, str, int]]:
    """(kind, scenario, dtype name, cc) for every parametrisation."""
    out = []
    for kind, scenarios in (("inbatch", INBATCH_SCENARIOS), ("bank", BANK_SCENARIOS)):
        for name, _, _ in scenarios:
            for dtype_name in DTYPES:
                for cc in TARGETS:
                    out.append((kind, name, dtype_name, cc))
    return out


def launches_for(kind: str, name: str, dtype_name: str, cc: int) -> list[KernelLaunch]:
    scenarios = INBATCH_SCENARIOS if kind == "inbatch" else BANK_SCENARIOS
    _, plan, B = next(s for s in scenarios if s[0] == name)
    build = inbatch_launches if kind == "inbatch" else bank_launches
    return build(plan(), B, DTYPES[dtype_name], cc)


@pytest.fixture(scope="module")
def compiled() -> dict:
    """Every scenario's launches compiled for every target at once (distinct compiles in parallel, cached). A case
    whose op refuses the configuration maps to that exception (its own test fails with it, the others run)."""
    skip_bank = bank_missing_reason()
    keys, pairs, out = [], [], {}
    for case in cases():
        if case[0] == "bank" and skip_bank:
            continue
        try:
            launches = launches_for(*case)
        except Exception as error:                                    # reported by that case's test
            out[case] = error
            continue
        for launch in launches:
            keys.append(case)
            pairs.append((launch, case[3]))
    for name, dtype_name, cc, prec, i in space_cases():
        _, plan, B = next(s for s in BANK_SCENARIOS if s[0] == name)
        tuning = space_candidates(name, dtype_name, cc, prec)[i]
        for launch in bank_launches(plan(), B, DTYPES[dtype_name], cc, tuning, prec):
            keys.append(("space", name, dtype_name, cc, prec, i))
            pairs.append((launch, cc))
    for key, result in zip(keys, compile_launches(pairs)):
        out.setdefault(key, []).append(result)
    return out


def launched(kind, name, dtype_name, cc, compiled) -> list[tuple[KernelLaunch, object]]:
    results = compiled.get((kind, name, dtype_name, cc))
    if isinstance(results, Exception):
        raise results
    return list(zip(launches_for(kind, name, dtype_name, cc), results))


@pytest.mark.parametrize("kind,name,dtype_name,cc", cases())
def test_kernels_fit_the_gpu(compiled, kind, name, dtype_name, cc):
    if kind == "bank" and (reason := bank_missing_reason()):
        pytest.skip(reason)
    results = compiled.get((kind, name, dtype_name, cc))
    if isinstance(results, Exception):
        raise results
    assert results, f"{kind} op launches no kernel for {name}"
    for r in results:
        assert r.shared <= r.shared_limit, r.describe()
        assert r.spill_stores == 0 and r.spill_loads == 0, r.describe()
        assert r.tensor_cores or not r.dots, f"tl.dot without tensor cores at the default precision: {r.describe()}"


IMAGENET = [c for c in cases() if c[0] == "bank" and c[1].startswith("imagenet-")]


@pytest.mark.parametrize("kind,name,dtype_name,cc", IMAGENET)
def test_bank_kernels_keep_the_gpu_busy(compiled, kind, name, dtype_name, cc):
    """Items the compile alone decides (docs/kernels/performance_model.md): the kernel gathering from the bank hides
    DRAM latency (≥ 16 resident warps per SM, or num_stages ≥ 2 with cp.async / TMA in its PTX); every kernel's grid
    has at least one block for every resident block slot of every SM (32 rows per GPU too); the target-bank groups of
    one row are adjacent in launch order (the fastest-varying part of the program id)."""
    for launch, r in launched(kind, name, dtype_name, cc, compiled):
        blocks = math.prod(launch.grid)
        assert r.resident_blocks >= 1, r.describe()
        if launch.name == "bank.pass":
            assert r.resident_warps >= 16 or r.pipelined, (
                f"{r.describe()}: {r.resident_warps} resident warps per SM, {r.async_copies} async copies")
            assert launch.order[0] == "group", launch.order
        assert blocks >= SM_COUNT[cc] * r.resident_blocks, (
            f"{launch.name} on {r.arch}: grid of {blocks} blocks < {SM_COUNT[cc]} SMs × {r.resident_blocks} resident "
            f"blocks")


@pytest.mark.parametrize("name,dtype_name,cc,prec,i", space_cases())
def test_every_configuration_of_the_space_fits(compiled, name, dtype_name, cc, prec, i):
    """Every other candidate of the configuration space (and every candidate for torch's "high" precision, tf32)
    compiles, fits, does not spill and uses tensor cores: what `tuning=` or a GPU sweep may pick is launchable."""
    results = compiled[("space", name, dtype_name, cc, prec, i)]
    for r in results:
        assert r.shared <= r.shared_limit, r.describe()
        assert r.spill_stores == 0 and r.spill_loads == 0, r.describe()
        assert r.tensor_cores or not r.dots, r.describe()


def jit_specialisation(launch: KernelLaunch) -> tuple[dict, dict, dict]:
    """(signature, constexprs by name, non-empty attrs) exactly as Triton's JIT launcher derives them for a CUDA
    target from the same arguments (its binder and argument packing)."""
    fn = launch.fn
    backend = make_backend(GPUTarget("cuda", 90, 32))
    declared = {p.name for p in fn.params if p.is_constexpr}
    kwargs = {k: v for k, v in launch.constexprs.items() if k in declared}
    options = {"num_warps": launch.num_warps, "num_stages": launch.num_stages}
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, opts = binder(*launch.args, **kwargs, **options)
    _, signature, constexprs, attrs = fn._pack_args(backend, {**kwargs, **options}, bound, specialization, opts)
    constexprs = {fn.arg_names[path[0]]: value for path, value in constexprs.items()}
    return signature, constexprs, {k: v for k, v in attrs.items() if v}


@pytest.mark.parametrize("kind", ["inbatch", "bank"])
def test_launch_specialisation_matches_tritons_launcher(kind):
    """What the harness compiles is what Triton's JIT would compile for the same launch: the same argument types,
    the same ints specialised to constexpr (== 1) and the same divisibility-by-16 attributes."""
    if kind == "bank" and (reason := bank_missing_reason()):
        pytest.skip(reason)
    name = INBATCH_SCENARIOS[0][0] if kind == "inbatch" else BANK_SCENARIOS[0][0]
    launches = launches_for(kind, name, "fp32", 90)
    assert launches
    for launch in launches:
        signature, constexprs, attrs = jit_specialisation(launch)
        assert launch.signature == signature, launch.name
        assert launch.constexprs == constexprs, launch.name
        assert launch.attrs == attrs, launch.name


def test_an_oversized_configuration_is_caught():
    """A tile configuration that cannot fit on either target: the harness reports it over the limit and
    `check_fits` refuses it with one error naming the kernel, the target and both byte counts."""
    launch = inbatch_launches(lmcl_plan([1, 1]), 256, torch.float32)[0]
    big = KernelLaunch.of(launch.name, launch.fn, launch.grid, launch.args,
                          {**launch.constexprs, "BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_DK": 128, "PREC": "ieee"},
                          num_warps=4, num_stages=6)
    for result in compile_launches([(big, cc) for cc in TARGETS]):
        assert result.shared > result.shared_limit
        assert "shared memory" in result.problems()[0]
        with pytest.raises(DoesNotFit, match=rf"{launch.name} on {result.arch} .* needs [\d,]+ B of shared memory "
                                             rf"per block; {result.arch} allows {result.shared_limit:,} B"):
            result.check_fits()
    for result in compile_launches([(launch, cc) for cc in TARGETS]):
        result.check_fits()                                          # the op's own configuration passes


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: `make gpu-check` runs for real")
def test_gpu_check_skips_cleanly_without_a_gpu(tmp_path):
    """`make gpu-check` on a machine without a GPU: runs nothing, says why, writes no report and exits 0; and every
    step it would run on a GPU exists (`--list` flags a missing file and then exits 1)."""
    script = REPO / "benchmarks" / "gpu_check.py"
    report = tmp_path / "results/gpu_check.md"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run([sys.executable, str(script), "--report", str(report)], env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.startswith("gpu-check skipped: ")
    assert ("CPU-only build" in run.stdout) or ("no usable CUDA device" in run.stdout)
    assert not report.exists()
    listing = subprocess.run([sys.executable, str(script), "--list"], capture_output=True, text=True, timeout=120)
    assert listing.returncode == 0 and "MISSING" not in listing.stdout, listing.stdout
    assert "-m gpu" in listing.stdout and "bench_bank_kernel.py" in listing.stdout
