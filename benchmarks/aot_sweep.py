"""Full ahead-of-time sweep of the Triton kernels: plans × batch sizes × dtypes × precisions × GPU targets.

Each configuration's launches (the ops' own `launches(...)`) are compiled with the wheel's ptxas for each target
(`tests/support/aot.py`, cached under `.cache/aot/`), and one Markdown row per kernel says registers, spill bytes,
shared memory against the target's limit, tensor-core use and whether it would launch. A configuration the op
refuses appears as one row with the op's error. `make test` runs a subset (tests/test_gpu_readiness.py).

    .venv/bin/python benchmarks/aot_sweep.py                       # everything (tens of minutes cold on 2 cores)
    .venv/bin/python benchmarks/aot_sweep.py --ops inbatch --dtypes fp32 --targets 80
Results: benchmarks/results/aot_sweep.md (override with --out).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from fastmcl.kernels import bank_contrastive, inbatch_contrastive  # noqa: E402
from fastmcl.losses import lmcl_plan, mcl_plan  # noqa: E402
from fastmcl.losses import plan_indices  # noqa: E402
from support.aot import SHARED_LIMIT, compile_launches  # noqa: E402

PLANS = {                                  # "lmcl-NxS": N networks of S stages; "mcl-N": N members
    "lmcl-2x1": lambda: lmcl_plan([1, 1]), "lmcl-2x2": lambda: lmcl_plan([2, 2]),
    "lmcl-2x3": lambda: lmcl_plan([3, 3]), "lmcl-2x4": lambda: lmcl_plan([4, 4]),
    "lmcl-3x3": lambda: lmcl_plan([3, 3, 3]), "lmcl-4x4": lambda: lmcl_plan([4, 4, 4, 4]),
    "mcl-2": lambda: mcl_plan(2), "mcl-4": lambda: mcl_plan(4), "mcl-8": lambda: mcl_plan(8),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SM_COUNT = {80: 108, 86: 84, 89: 128, 90: 132}
BANK_K, BANK_N = 8194, 1_281_167
IDX = ("ce_u", "ce_v", "kl_su", "kl_sv", "kl_tu", "kl_tv")


def build(op: str, plan, B: int, D: int, dtype: torch.dtype, precision: str, cc: int) -> list:
    """The op's launches for one configuration; `precision` "default" means the op's own default."""
    if op == "inbatch":
        ix = plan_indices(plan, torch.device("cpu"))
        E = torch.empty((plan.num_embeddings, B, D), dtype=dtype, device="meta")
        labels = torch.empty(B, dtype=torch.int64, device="meta")
        kwargs = {} if precision == "default" else {"input_precision": precision}
        return inbatch_contrastive.launches(E, labels, *(ix[k] for k in IDX), 0.1, 3.0, **kwargs)
    return bank_contrastive.launches((plan.num_embeddings, B, D), max(plan.net_of) + 1, BANK_N, BANK_K,
                                     len(plan.ce_blocks), len(plan.kl_blocks), dtype=dtype, pos_k=1, tau=0.07,
                                     kd_T=3.0, input_precision=None if precision == "default" else precision,
                                     device_capability=divmod(cc, 10), sm_count=SM_COUNT.get(cc, 132))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", default="inbatch,bank", help="comma-separated: inbatch, bank")
    parser.add_argument("--plans", default=",".join(PLANS), help=f"comma-separated of {', '.join(PLANS)}")
    parser.add_argument("--batches", default="32,128,256", help="rows per launch (B), comma-separated")
    parser.add_argument("--dims", default="128", help="embedding dims (D), comma-separated")
    parser.add_argument("--dtypes", default="fp32,bf16,fp16")
    parser.add_argument("--precisions", default="default,ieee", help="'default' is the op's own")
    parser.add_argument("--targets", default="80,90", help=f"compute capabilities of {sorted(SHARED_LIMIT)}")
    parser.add_argument("--processes", type=int, default=None, help="parallel compiles (default: CPU count)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "aot_sweep.md")
    args = parser.parse_args(argv)

    configs, pairs, keys, refused = [], [], [], []
    for op in args.ops.split(","):
        for plan_name in args.plans.split(","):
            for B in map(int, args.batches.split(",")):
                for D in map(int, args.dims.split(",")):
                    for dtype_name in args.dtypes.split(","):
                        for precision in args.precisions.split(","):
                            for cc in map(int, args.targets.split(",")):
                                config = (op, plan_name, B, D, dtype_name, precision, cc)
                                try:
                                    launches = build(op, PLANS[plan_name](), B, D, DTYPES[dtype_name], precision, cc)
                                except (ValueError, TypeError) as error:
                                    refused.append((config, str(error)))
                                    continue
                                configs.append(config)
                                for launch in launches:
                                    pairs.append((launch, cc))
                                    keys.append(config)
    start = time.perf_counter()
    results = compile_launches(pairs, processes=args.processes)
    seconds = time.perf_counter() - start

    head = ("| op | plan | B | D | dtype | precision | target | kernel | warps/stages | registers | spill B "
            "| shared B (limit) | tensor cores | verdict |")
    command = " ".join(["python", "benchmarks/aot_sweep.py", *(sys.argv[1:] if argv is None else argv)])
    lines = [f"# Ahead-of-time sweep ({len(pairs)} launches, {seconds:.0f} s)", "", f"`{command}`", "", head,
             "|" + "---|" * 14]
    bad = 0
    for (op, plan_name, B, D, dtype_name, precision, cc), r in zip(keys, results):
        problems = r.problems()
        bad += bool(problems)
        lines.append(f"| {op} | {plan_name} | {B} | {D} | {dtype_name} | {precision} | {r.arch} | {r.name} | "
                     f"{r.num_warps}/{r.num_stages} | {r.registers} | {r.spill_stores} | {r.shared:,} "
                     f"({r.shared_limit:,}) | {', '.join(r.mma) or 'none'} | {'; '.join(problems) or 'ok'} |")
    for (op, plan_name, B, D, dtype_name, precision, cc), message in refused:
        lines.append(f"| {op} | {plan_name} | {B} | {D} | {dtype_name} | {precision} | sm_{cc} | — | — | — | — | — "
                     f"| — | refused: {message} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"{len(pairs)} launches compiled in {seconds:.0f} s: {bad} with problems, {len(refused)} configurations "
          f"refused by the op; table in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
