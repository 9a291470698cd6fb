"""Memory-bank contrastive rows at ImageNet shape: a performance model of the fused Triton op read from its compiled
kernels, and (on CUDA) measured times beside the alternatives a user gets for free.

ImageNet L-MCL (the paper's Eq. 6–7 with memory banks; docs/kernels/bank.md): 2 networks × 4 stages (NE = 8
embeddings, n = 2 banks), K = 8194, D = 128, τ = 0.07, T = 3, pos_k = 1; forward + backward w.r.t. E (the bank is never
differentiated). B = 256 rows on one GPU, or 32 per GPU when 8 GPUs share a global batch of 256.

Model (runs anywhere, no GPU; docs/kernels/performance_model.md): every kernel of the launch configuration the op
really uses (`fastmcl.kernels.bank_contrastive.launches`) is compiled ahead of time for sm_80 / sm_90
(`tests/support/aot.py`); from the compile it takes resident blocks per SM (CUDA occupancy rules), waves and the tail
wave, the bytes each SM keeps in flight (Little's law gives the bandwidth that concurrency allows) and the SASS
instruction count of the K loop (issue time); predicted time = Σ over waves of max(memory time, issue time), plus the
launches. BEFORE: the same model applied to the previous kernels' compile (benchmarks/results/bank_model_before.json,
recorded from their AOT compile). `python benchmarks/bench_bank_kernel.py` prints the table and writes
benchmarks/results/bank_model.{md,json}; so does the `test_model` benchmark.
On CUDA (`make gpu-check` runs it): time and peak memory of the fused op at both precisions, of the streamed
reference, of `torch.compile` of the reference and of the gather + `bmm` reference (`k_chunk=None`), each against the
byte floor. Not part of `make test`; run `make bench BENCH=benchmarks/bench_bank_kernel.py`.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import triton.language as tl

from fastmcl.losses import lmcl_plan
from fastmcl.losses.cohort_terms import bank_rows_reference

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from support.aot import compile_launches  # noqa: E402

B, K, D, STAGES, N_ROWS = 256, 8194, 128, 4, 1_281_167
B_PER_GPU = 32                                          # 8 GPUs sharing a global batch of B
TAU, KD_T, POS_K, K_CHUNK = 0.07, 3.0, 1, 1024
CUDA = torch.cuda.is_available()
RESULTS = REPO / "benchmarks" / "results"
# Data-sheet HBM bandwidth (B/s), SM count and boost clock (Hz); DRAM latency under load (s) and the per-launch cost
# are the model's assumptions (docs/kernels/performance_model.md).
GPUS = {"A100 80GB SXM": dict(bw=2.039e12, sms=108, clock=1.41e9, cc=80),
        "H100 SXM": dict(bw=3.35e12, sms=132, clock=1.98e9, cc=90),
        "H200 SXM": dict(bw=4.8e12, sms=132, clock=1.98e9, cc=90)}
LATENCY_S = 700e-9                 # DRAM latency a gather sees under load
ISSUE_PER_CLOCK = 4                # warp instructions issued per SM per clock (4 schedulers)
LAUNCH_S = 3e-6                    # one kernel launch (or memset) on the stream, back to back
RESCALES_PER_PROGRAM = 6           # lazy softmax rescalings a program runs at most (unit-norm E and bank rows)
ROWS: list[tuple[str, str, str, str]] = []          # (path, time, peak memory, note) for the closing table


def _plan_sizes():
    plan = lmcl_plan([STAGES, STAGES])
    return plan.num_embeddings, 2, len(plan.ce_blocks), len(plan.kl_blocks)


def floor(rows: int, bank_bytes: int = 4) -> int:
    """Bytes no single-pass implementation avoids: each gathered bank row and index once, E in, dE out."""
    NE, n, _, _ = _plan_sizes()
    return n * rows * K * D * bank_bytes + rows * K * 8 + rows * NE * D * (bank_bytes + 4)


def launches(rows: int, bank_bytes: int, gpu: dict, precision: str | None = None):
    from fastmcl.kernels import bank_contrastive as bc
    NE, n, NC, NK = _plan_sizes()
    dtype = torch.float32 if bank_bytes == 4 else torch.bfloat16
    return bc.launches((NE, rows, D), n, N_ROWS, K, NC, NK, dtype=torch.float32, bank_dtype=dtype, pos_k=POS_K,
                       device_capability=divmod(gpu["cc"], 10), sm_count=gpu["sms"], input_precision=precision)


def k_loop(c) -> tuple[int, int] | None:
    """The K loop: the loop with the most tensor-core instructions (the narrowest of equals)."""
    if not c.loops:
        return None
    return max(c.loops, key=lambda ab: (sum(ab[0] <= i <= ab[1] for i in c.mma_sass), ab[0] - ab[1]))


def _within(inner, outer) -> bool:
    return outer[0] <= inner[0] and inner[1] <= outer[1] and tuple(inner) != tuple(outer)


def instructions(c, tiles: int = 0, merge_trips: tuple[int, int] = (1, 1), merges_per_block: float = 1.0) -> dict:
    """SASS instructions one warp issues (docs/kernels/performance_model.md "Instructions"): the K loop `tiles` times,
    less the code of its lazy softmax rescaling (what a conditional forward branch skips inside it, and any block
    placed out of line that returns into it), which runs at most RESCALES_PER_PROGRAM times; the other loops (the
    merge's, run by one program per row, `merges_per_block` of a block on average) `merge_trips` = (splits, row
    blocks) times: a loop holding loops once per row block, each loop it holds once per split per row block, every
    other loop once per split; the rest once."""
    kl = k_loop(c) if tiles else None
    cold = c.cold
    total = c.sass_count - sum(last - first + 1 for first, last, _ in cold)
    per_tile = rare = 0
    if kl:
        skipped = [(a, b) for a, b in c.skips if kl[0] <= a and b <= kl[1]]
        outermost = [x for x in skipped if not any(y[0] < x[0] and x[1] <= y[1] for y in skipped)]
        inline = sum(b - a - 1 for a, b in outermost)
        rare = inline + sum(last - first + 1 for first, last, back in cold if kl[0] <= back <= kl[1])
        per_tile = kl[1] - kl[0] + 1 - inline
        total += tiles * per_tile - (kl[1] - kl[0] + 1) + min(tiles, RESCALES_PER_PROGRAM) * rare
    splits, row_blocks = merge_trips
    others = [tuple(x) for x in c.loops if tuple(x) != kl and x[0] != x[1] and not (kl and _within(x, kl))]
    extra = 0
    for loop in (x for x in others if not any(_within(x, y) for y in others)):
        nested = [x for x in others if _within(x, loop)]
        trips = row_blocks if nested else splits
        extra += (trips - 1) * (loop[1] - loop[0] + 1) + trips * (splits - 1) * sum(b - a + 1 for a, b in nested)
    return dict(per_warp=total + extra * merges_per_block, k_loop=per_tile, rare=rare)


def kernel_model(kind: str, c, grid_blocks: int, gpu: dict, *, bytes_total: float, inflight_per_block: float,
                 insns: dict) -> dict:
    """Predicted time of one kernel from its compile `c`: waves of `resident` blocks per SM; per wave, memory time at
    the bandwidth the bytes in flight allow (Little's law) and issue time of the SASS; the larger, summed over waves."""
    resident = max(1, c.resident_blocks)
    slots = gpu["sms"] * resident
    waves = grid_blocks / slots
    per_block_bytes = bytes_total / grid_blocks
    per_warp_insns = insns["per_warp"]
    t = 0.0
    left = grid_blocks
    while left > 0:
        blocks = min(left, slots)
        per_sm = blocks / gpu["sms"]
        bw = min(gpu["bw"], gpu["sms"] * per_sm * inflight_per_block / LATENCY_S)
        mem = blocks * per_block_bytes / bw
        issue = math.ceil(per_sm) * c.num_warps * per_warp_insns / (ISSUE_PER_CLOCK * gpu["clock"])
        t += max(mem, issue)
        left -= blocks
    return dict(kernel=kind, arch=c.arch, grid=grid_blocks, warps=c.num_warps, stages=c.num_stages,
                registers=c.registers, spill=getattr(c, "spill_stores", 0), resident_blocks=c.resident_blocks, resident_warps=c.resident_warps,
                waves=waves, async_copies=c.async_copies, k_loop_sass=insns["k_loop"], rescale_sass=insns["rare"],
                sass_per_warp=insns["per_warp"],
                inflight_kb_per_sm=resident * inflight_per_block / 1e3, time_s=t)


def after_model(rows: int, bank_bytes: int, gpu: dict, precision: str | None = None) -> dict:
    """The op's kernels as compiled now (fused merge, groups adjacent: each row's gathered rows from DRAM once)."""
    L = launches(rows, bank_bytes, gpu, precision)
    comp = compile_launches([(x, gpu["cc"]) for x in L])
    NE, n, NC, NK = _plan_sizes()
    out, total = [], 0.0
    for launch, c in zip(L, comp):
        blocks = math.prod(launch.grid)
        if launch.name == "bank.pass":
            k = launch.constexprs
            splits = launch.args[launch_index(launch, "SPLITS")]
            C, rows_acc = k["NE_P"] * k["N_P"], k["NE_P"] * k["N_P"] * (1 + k["N_P"])
            gathered = n * rows * K * D * bank_bytes + rows * K * 8                # once per row: groups adjacent
            partial = rows * splits * (4 * C * 4 + rows_acc * k["D_P"] * 4) * (2 if splits > 1 else 1)
            merge = rows * (rows_acc * k["D_P"] * 4 + (6 * C + NC + NK) * 4 + n * (1 + POS_K) * D * bank_bytes)
            merge += blocks * k["E_PARTS"] * k["NE_P"] * k["D_P"] * (2 if k["PIECES"] else 4)   # parts of E, written
            tiles = math.ceil(K / splits / k["BLOCK_K"])
            inflight = max(1, c.num_stages - 1 if c.async_copies else 1) * k["BLOCK_K"] * k["NT"] * D * bank_bytes
            row_blocks = math.ceil(C * (1 + n) / k["ROW_BLOCK"])
            insns = instructions(c, tiles, (splits, row_blocks), rows / blocks)
            m = kernel_model("bank.pass (+ merge)", c, blocks, gpu, bytes_total=gathered + partial + merge,
                             inflight_per_block=inflight, insns=insns) | dict(block_k=k["BLOCK_K"])
        else:
            k = launch.constexprs
            C, rows_acc = k["NE_P"] * k["N_P"], k["NE_P"] * k["N_P"] * (1 + k["N_P"])
            nbytes = rows * (rows_acc * k["D_P"] * 4 + (6 * C + NC + NK) * 4 + NE * D * 4)
            # one step covers the plan's blocks, so each of its loops runs once and the count is exact
            assert k["J_CE"] >= NC and k["J_KL"] >= NK, (k, NC, NK)
            m = kernel_model(launch.name, c, blocks, gpu, bytes_total=nbytes,
                             inflight_per_block=k["D_BLOCK"] * 4 * 8, insns=instructions(c))
        out.append(m)
        total += m["time_s"] + LAUNCH_S
    return dict(kernels=out, time_s=total)


def launch_index(launch, name: str) -> int:
    """Position of runtime argument `name` in `launch.args` (every parameter not declared `tl.constexpr`)."""
    import inspect
    params = inspect.signature(getattr(launch.fn, "fn", launch.fn)).parameters.values()
    runtime = [p.name for p in params if not (p.annotation is tl.constexpr or "constexpr" in str(p.annotation))]
    return runtime.index(name)


def recorded_instructions(c, tiles: int, trips_inner: int) -> dict:
    """The BEFORE kernels' instructions per warp as recorded: the widest loop `tiles` times with its widest nested
    loop `trips_inner` times, plus the kernel's instructions once (other loops once: an undercount of their loops,
    which makes BEFORE look faster, not slower)."""
    per_tile = 0
    if c.loops:
        lo, hi = c.loops[0]
        per_tile = hi - lo + 1
        inner = [(a, b) for a, b in c.loops[1:] if lo <= a and b <= hi]
        if inner:
            per_tile += (trips_inner - 1) * (inner[0][1] - inner[0][0] + 1)
    return dict(per_warp=tiles * per_tile + c.sass_count, k_loop=per_tile, rare=0)


def before_model(rows: int, bank_bytes: int, gpu_name: str, gpu: dict) -> dict | None:
    """The previous kernels (pass grid (B, splits, groups), one stage, no async copy; merge and backward grid (B,)),
    from their recorded compile: benchmarks/results/bank_model_before.json."""
    path = RESULTS / "bank_model_before.json"
    if not path.exists():
        return None
    rec = json.loads(path.read_text()).get(f"{gpu['cc']}-{rows}-{bank_bytes}")
    if rec is None:
        return None
    from types import SimpleNamespace
    NE, n, NC, NK = _plan_sizes()
    total, out = 0.0, []
    for kern in rec:
        c = SimpleNamespace(**{k: v for k, v in kern.items() if k not in ("grid", "constexprs")})
        c.loops = tuple(tuple(x) for x in c.loops)
        k = kern["constexprs"]
        blocks = math.prod(kern["grid"])
        C = k["NE_P"] * k["N_P"]
        rows_acc = C * (1 + k["N_P"])
        if kern["name"] == "bank.pass":
            splits, groups = kern["grid"][1], kern["grid"][2]
            gathered = groups * n * rows * K * D * bank_bytes + groups * rows * K * 8   # groups far apart: no L2 reuse
            partial = rows * splits * (4 * C * 4 + rows_acc * k["D_P"] * 4)
            m = kernel_model("bank.pass", c, blocks, gpu, bytes_total=gathered + partial,
                             inflight_per_block=k["BLOCK_K"] * k["NT"] * D * bank_bytes,
                             insns=recorded_instructions(c, math.ceil(K / splits / k["BLOCK_K"]),
                                                         k["D_P"] // k["D_CHUNK"])) | dict(block_k=k["BLOCK_K"])
        elif kern["name"] == "bank.merge":
            splits = kern["splits"]
            nbytes = rows * (splits * (4 * C * 4 + rows_acc * k["D_P"] * 4) + rows_acc * k["D_P"] * 4
                             + (6 * C + NC + NK) * 4 + n * (1 + POS_K) * D * bank_bytes)
            m = kernel_model("bank.merge", c, blocks, gpu, bytes_total=nbytes, inflight_per_block=16 * k["D_P"] * 4,
                             insns=recorded_instructions(c, splits, 1))
        else:
            nbytes = rows * (rows_acc * k["D_P"] * 4 + (6 * C + NC + NK) * 4 + NE * D * 4)
            m = kernel_model("bank.backward", c, blocks, gpu, bytes_total=nbytes, inflight_per_block=16 * k["D_P"] * 4,
                             insns=recorded_instructions(c, 0, 1))
        out.append(m)
        total += m["time_s"] + LAUNCH_S
    return dict(kernels=out, time_s=total)


def model() -> list[dict]:
    """One record per (GPU, rows per GPU, bank dtype, fp32 dot precision): floor, BEFORE (the previous kernels at
    their default, tf32x3) and AFTER predictions and their kernels. tf32x3 is what torch's default
    float32_matmul_precision "highest" selects, tf32 what "high" selects."""
    out = []
    for name, g in GPUS.items():
        for rows in (B, B_PER_GPU):
            for bank_bytes, dname in ((4, "fp32"), (2, "bf16")):
                for prec in ("tf32x3", "tf32"):
                    fl = floor(rows, bank_bytes)
                    after = after_model(rows, bank_bytes, g, prec)
                    before = before_model(rows, bank_bytes, name, g) if prec == "tf32x3" else None
                    out.append(dict(gpu=name, rows=rows, bank=dname, precision=prec, floor_bytes=fl,
                                    floor_s=fl / g["bw"], after_s=after["time_s"], after_kernels=after["kernels"],
                                    before_s=before["time_s"] if before else None,
                                    before_kernels=before["kernels"] if before else None))
    return out


def markdown(records: list[dict]) -> str:
    lines = [f"# Memory-bank kernels, predicted: ImageNet L-MCL, {2 * STAGES} embeddings × 2 banks, K = {K}, "
             f"D = {D}, forward + backward, default precision",
             "",
             "A prediction from the compiled kernels, not a measurement (`benchmarks/bench_bank_kernel.py`; model and "
             "assumptions: docs/kernels/performance_model.md). Floor = each gathered bank row and index read once, E "
             "in, dE out, at the data-sheet bandwidth. BEFORE = the previous kernels (pass + merge + backward, "
             "groups far apart in launch order, one stage); AFTER = the current ones.",
             "",
             "| GPU | rows/GPU | bank | fp32 dots | floor ms | BEFORE ms | BEFORE/floor | AFTER ms | AFTER/floor |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        b = f"{r['before_s'] * 1e3:.3f} | {r['before_s'] / r['floor_s']:.2f}×" if r["before_s"] else "- | -"
        lines.append(f"| {r['gpu']} | {r['rows']} | {r['bank']} | {r['precision']} | {r['floor_s'] * 1e3:.3f} | {b} | "
                     f"{r['after_s'] * 1e3:.3f} | {r['after_s'] / r['floor_s']:.2f}× |")
    lines += ["", "Per kernel (AFTER, then BEFORE): resident blocks / warps per SM, waves, async copies, SASS "
              "instructions per warp per K tile of the given columns and of the lazy rescaling (charged at most 6 "
              "times per program), SASS instructions per warp in all, predicted µs.", "",
              "| GPU | rows | bank | fp32 dots | when | kernel | grid | warps × stages | regs | resident blocks / warps | "
              "waves | async copies | K tile | K-loop SASS | rescale SASS | SASS per warp | KB in flight / SM | µs |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        for when in ("after", "before"):
            for k in r[f"{when}_kernels"] or []:
                lines.append(f"| {r['gpu']} | {r['rows']} | {r['bank']} | {r['precision']} | {when.upper()} | "
                             f"{k['kernel']} | "
                             f"{k['grid']} | {k['warps']} × {k['stages']} | {k['registers']} | "
                             f"{k['resident_blocks']} / {k['resident_warps']} | {k['waves']:.2f} | "
                             f"{k['async_copies']} | {k.get('block_k') or '-'} | {k['k_loop_sass'] or '-'} | "
                             f"{k.get('rescale_sass') or '-'} | {k['sass_per_warp']:,.0f} | "
                             f"{k['inflight_kb_per_sm']:.1f} | "
                             f"{k['time_s'] * 1e6:.1f} |")
    return "\n".join(lines) + "\n"


def write_results(records: list[dict]) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bank_model.json").write_text(json.dumps(records, indent=1) + "\n")
    (RESULTS / "bank_model.md").write_text(markdown(records))


def test_model(benchmark):
    """Runs everywhere (also under --benchmark-only): the prediction a GPU run is compared with."""
    records = benchmark.pedantic(model, rounds=1, iterations=1)
    write_results(records)
    for r in records:
        assert r["after_s"] >= r["floor_s"], r                     # a prediction never beats the byte floor
    ROWS.extend((f"model {r['gpu']} B={r['rows']} {r['bank']} {r['precision']}", f"{r['after_s'] * 1e3:.3f} ms", "-",
                 f"{r['after_s'] / r['floor_s']:.2f}× floor (predicted)") for r in records if r["gpu"] == "H100 SXM")


@pytest.fixture(scope="module", autouse=True)
def table():
    yield
    print(f"\n\nbank rows, ImageNet shape: K={K} D={D}, {2 * STAGES} embeddings × 2 banks, fwd+bwd")
    print(f"  {'path':<34}{'time / step':>14}{'peak memory':>16}  note")
    for path, t, mem, note in ROWS:
        print(f"  {path:<34}{t:>14}{mem:>16}  {note}")


def _inputs(device):
    g = torch.Generator().manual_seed(0)
    plan = lmcl_plan([STAGES, STAGES])
    E = F.normalize(torch.randn(plan.num_embeddings, B, D, generator=g), dim=-1).to(device).requires_grad_()
    banks = F.normalize(torch.randn(2, N_ROWS, D, device=device), dim=-1)
    idx = torch.randint(0, N_ROWS, (B, K), device=device)
    ix = plan.index_tables(device)
    net_of = ix["net_of"]
    vecs = (ix["ce_u"], net_of[ix["ce_v"]], ix["ce_is_view"], ix["kl_su"], net_of[ix["kl_sv"]], ix["kl_tu"],
            net_of[ix["kl_tv"]], ix["kl_is_view"])
    gce = torch.rand(len(plan.ce_blocks), B, device=device)
    gkl = torch.rand(len(plan.kl_blocks), B, device=device)
    return E, banks, idx, vecs, gce, gkl


def _measure(benchmark, name, fn):
    torch.cuda.synchronize()
    fn()                                                      # warm-up / compile
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base

    def step():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(step, rounds=10, iterations=1, warmup_rounds=2)
    mean = benchmark.stats.stats.mean
    fl = floor(B, 4)
    ROWS.append((name, f"{mean * 1e3:.2f} ms", f"{peak / 1e6:.0f} MB",
                 f"{fl / mean / 1e12:.2f} TB/s of the byte floor ({fl / 1e9:.2f} GB)"))
    return mean


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (the model runs regardless)")
def test_reference_streamed(benchmark):
    E, banks, idx, vecs, gce, gkl = _inputs("cuda")

    def fn():
        ce, kl = bank_rows_reference(E, banks, idx, *vecs, TAU, KD_T, POS_K, k_chunk=K_CHUNK)
        torch.autograd.grad((ce * gce).sum() + (kl * gkl).sum(), E)

    _measure(benchmark, f"reference k_chunk={K_CHUNK}", fn)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (the model runs regardless)")
@pytest.mark.parametrize("precision", ["ieee", "default"])
def test_triton_fused(benchmark, precision):
    from fastmcl import kernels
    E, banks, idx, vecs, gce, gkl = _inputs("cuda")
    kw = {} if precision == "default" else {"input_precision": precision}

    def fn():
        ce, kl = kernels.bank_rows(E, banks, idx, *vecs, TAU, KD_T, POS_K, **kw)
        torch.autograd.grad((ce * gce).sum() + (kl * gkl).sum(), E)

    _measure(benchmark, f"triton ({precision})", fn)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (the model runs regardless)")
@pytest.mark.parametrize("variant", ["torch.compile(reference)", "gather + bmm"])
def test_reference_alternatives(benchmark, variant):
    """What a user gets without the kernels: Inductor's compile of the streamed reference, and the reference that
    gathers each bank once and scores it with one batched matmul (`k_chunk=None`)."""
    E, banks, idx, vecs, gce, gkl = _inputs("cuda")
    k_chunk = K_CHUNK if variant.startswith("torch.compile") else None

    def step(E):
        ce, kl = bank_rows_reference(E, banks, idx, *vecs, TAU, KD_T, POS_K, k_chunk=k_chunk)
        return (ce * gce).sum() + (kl * gkl).sum()

    run = torch.compile(step) if k_chunk else step
    _measure(benchmark, variant, lambda: torch.autograd.grad(run(E), E))


def bf16_bank_difference(rows: int = 64, k: int = 2049, n_rows: int = 20_000, seed: int = 0) -> dict:
    """The four bank terms and their gradient with one fixed bank stored in fp32 and in bf16 (the same values,
    rounded), ImageNet L-MCL plan, reference path on the CPU: relative differences (runs anywhere)."""
    from fastmcl.losses import cohort_bank_contrastive_terms
    g = torch.Generator().manual_seed(seed)
    plan = lmcl_plan([STAGES, STAGES])
    E = F.normalize(torch.randn(plan.num_embeddings, rows, D, generator=g), dim=-1)
    banks = F.normalize(torch.randn(2, n_rows, D, generator=g), dim=-1)
    idx = torch.randint(0, n_rows, (rows, k), generator=g)
    banks[:, idx[:, 0]] = F.normalize(E[0] + 0.3 * torch.randn(rows, D, generator=g), dim=-1)   # own rows ≈ anchor
    out = {}
    for name, bank in (("fp32", banks), ("bf16", banks.to(torch.bfloat16))):
        emb = [e.clone().requires_grad_() for e in E.unbind(0)]
        terms = cohort_bank_contrastive_terms(emb, bank, idx, plan, tau=TAU, kd_T=KD_T, pos_k=POS_K, k_chunk=512)
        grads = torch.autograd.grad(sum(terms), emb)
        out[name] = ([float(x) for x in terms], torch.stack(grads))
    (t32, g32), (t16, g16) = out["fp32"], out["bf16"]
    return dict(rows=rows, K=k, terms=dict(zip(("vcl", "soft_vcl", "icl", "soft_icl"), zip(t32, t16))),
                term_rel=max(abs(a - b) / abs(a) for a, b in zip(t32, t16)),
                grad_rel=float((g32 - g16).abs().max() / g32.abs().max()))


if __name__ == "__main__":
    if sys.argv[1:] == ["--bf16-bank"]:
        rec = bf16_bank_difference()
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "bank_bf16.json").write_text(json.dumps(rec, indent=1) + "\n")
        print(json.dumps(rec, indent=1))
    else:
        recs = model()
        write_results(recs)
        sys.stdout.write(markdown(recs))
