"""`make gpu-check`: everything a first GPU should prove, in one run within a time budget, as one Markdown report.

Steps (each a subprocess with its own time limit, all within `--budget-s`, default 8 minutes):
1. the GPU-marked tests (`pytest -m gpu tests`);
2. the Triton kernel tests run natively on the GPU (the files the interpreter runs on CPU: every kernel against the
   reference in value and gradient);
3. the bank kernels at ImageNet shapes (`benchmarks/bench_bank_kernel.py`: time and peak memory of the fused op at
   both precisions, of the streamed reference, of `torch.compile` of the reference and of the gather + `bmm`
   reference, each against the byte floor, beside the performance model's prediction);
4. the training-throughput benchmark with few rounds (`benchmarks/bench_throughput.py`).

Without a CUDA GPU it runs nothing, says why and exits 0. `--list` prints the planned steps and exits.
Report: `benchmarks/results/gpu_check.md` (override with `--report`). Exit status 1 when a step failed or timed out.
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_REPORT = REPO / "benchmarks/results/gpu_check.md"
OUTPUT_TAIL_LINES = 60


@dataclass
class Step:
    title: str
    args: list[str]                        # after `python -m`
    limit_s: int
    env: dict = field(default_factory=dict)
    files: list[str] = field(default_factory=list)   # repository files the step runs (checked by `--list`)


def steps() -> list[Step]:
    pytest = ["pytest", "-q", "-p", "no:cacheprovider"]
    return [
        Step("GPU-marked tests", pytest + ["-m", "gpu", "tests"], 120, files=["tests"]),
        Step("Triton kernels vs reference, natively on the GPU",
             pytest + ["tests/test_kernel_inbatch.py", "tests/test_kernel_bank.py"], 90,
             files=["tests/test_kernel_inbatch.py", "tests/test_kernel_bank.py"]),
        Step("Bank kernels vs reference, torch.compile(reference) and gather + bmm at ImageNet shapes (time, peak "
             "memory, against the byte floor and the model)",
             pytest + ["benchmarks/bench_bank_kernel.py", "--benchmark-only", "-s"], 90,
             files=["benchmarks/bench_bank_kernel.py"]),
        Step("Training throughput (few rounds)",
             pytest + ["benchmarks/bench_throughput.py", "--benchmark-only", "-s"], 170,
             env={"FASTMCL_BENCH_ROUNDS": "2",
                  "FASTMCL_BENCH_SPEEDS": "eager fp32,channels_last + bf16,channels_last + bf16 + compile + triton"},
             files=["benchmarks/bench_throughput.py"]),
    ]


def gpu_absent_reason() -> str | None:
    """Why this machine cannot run the check, or None when one CUDA GPU is usable."""
    import torch
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None)"
    if not torch.cuda.is_available():
        return (f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no usable CUDA device "
                f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')})")
    return None


def run_step(step: Step, limit_s: float) -> dict:
    env = {**os.environ, **step.env}
    env.pop("TRITON_INTERPRET", None)                 # natively on the GPU
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", *step.args], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=limit_s)
        status = "passed" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        output = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as timeout:
        status = f"timed out after {limit_s:.0f} s"
        output = "".join(x.decode() if isinstance(x, bytes) else (x or "") for x in (timeout.stdout, timeout.stderr))
    return {"status": status, "seconds": time.perf_counter() - start, "output": output}


def device_lines() -> list[str]:
    import torch
    import triton
    props = torch.cuda.get_device_properties(0)
    return [f"- device: {props.name}, compute capability {props.major}.{props.minor}, {props.multi_processor_count} "
            f"SMs, {props.total_memory / 2**30:.0f} GiB",
            f"- torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, "
            f"python {platform.python_version()}"]


def report(results: list[tuple[Step, dict]], budget_s: float, total_s: float) -> str:
    lines = ["# GPU check", "", *device_lines(), f"- total {total_s:.0f} s of a {budget_s:.0f} s budget", "",
             "| step | status | seconds |", "|---|---|---|"]
    lines += [f"| {step.title} | {r['status']} | {r['seconds']:.0f} |" for step, r in results]
    for step, r in results:
        tail = "\n".join(r["output"].rstrip().splitlines()[-OUTPUT_TAIL_LINES:])
        lines += ["", f"## {step.title}", "", f"`python -m {' '.join(step.args)}`"
                  + (f" with {' '.join(f'{k}={v}' for k, v in step.env.items())}" if step.env else ""),
                  f"— {r['status']} in {r['seconds']:.0f} s", "", "```", tail, "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget for all steps (seconds)")
    parser.add_argument("--report", type=Path, default=DEFAULT_REPORT, help="Markdown report to write")
    parser.add_argument("--list", action="store_true", help="print the planned steps and exit")
    args = parser.parse_args(argv)

    plan = steps()
    if args.list:
        for step in plan:
            missing = [f for f in step.files if not (REPO / f).exists()]
            print(f"{step.limit_s:4d} s  python -m {' '.join(step.args)}"
                  + (f"  [MISSING: {', '.join(missing)}]" if missing else ""))
        return 1 if any(not (REPO / f).exists() for step in plan for f in step.files) else 0

    reason = gpu_absent_reason()
    if reason:
        print(f"gpu-check skipped: {reason}. It needs a machine with one NVIDIA GPU; nothing was run and no report "
              f"was written.")
        return 0

    start = time.perf_counter()
    results = []
    for step in plan:
        left = args.budget_s - (time.perf_counter() - start)
        if left < 10:
            results.append((step, {"status": "not run (budget spent)", "seconds": 0.0, "output": ""}))
            continue
        print(f"gpu-check: {step.title} (limit {min(step.limit_s, left):.0f} s)", flush=True)
        results.append((step, run_step(step, min(step.limit_s, left))))
        print(f"  {results[-1][1]['status']} in {results[-1][1]['seconds']:.0f} s", flush=True)
    total = time.perf_counter() - start
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(report(results, args.budget_s, total))
    print(f"gpu-check: report written to {args.report}")
    return 0 if all(r["status"] == "passed" for _, r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
