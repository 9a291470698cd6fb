"""Memory-bank L-MCL objective on the reference path: naive per-pair vs deduplicated vs K-streamed (CPU, fp32,
forward + backward; docs/official_mcl.md §4.2). The setting, the measurement method and the recorded results:
docs/losses.md "Benchmark: the bank reference".

  naive     `bank_contrastive_terms` once per ordered stage pair (32 calls, 4 kept [B, K, D] gathers each)
  dedup     `cohort_bank_contrastive_terms(..., k_chunk=None)`: each bank gathered once, each distinct block once
  streamed  `cohort_bank_contrastive_terms(..., k_chunk=1024 | 2048 | 4096)`: K in chunks, re-gathered in backward

Every case runs in a fresh subprocess (this file with `--case`); peak = the first step's resident high-water mark
above its inputs, time = median of the following steps.
Run: `.venv/bin/python -m pytest benchmarks/bench_bank_reference.py --benchmark-only -s` (or `make bench`, or
`python benchmarks/bench_bank_reference.py`), which writes benchmarks/results/bank_reference.json.
`--cases dedup,streamed_1024 --reuse-naive` runs only those cases with the naive row from the recorded JSON and
writes nothing.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

NUM_STAGES = [4, 4]
B, K, D, POS_K = 32, 8194, 128, 1
N_BANK = 1_281_167
TAU, KD_T = 0.07, 3.0
COEF = {"vcl": 0.01, "soft_vcl": 1.0, "icl": 0.01, "soft_icl": 1.0}      # L-MCL ImageNet defaults (docs/official_mcl.md §0)
CASES = {"naive": None, "dedup": None, "streamed_1024": 1024, "streamed_2048": 2048, "streamed_4096": 4096}
MAIN_STREAMED = "streamed_1024"
RESULTS = Path(__file__).resolve().parent / "results" / "bank_reference.json"
TARGETS = {"dedup_mem_ratio": 40.0, "dedup_time_ratio": 30.0, "streamed_mem_ratio": 100.0}
NAIVE_BYTES = 32 * 4 * B * K * D * 4              # 32 pair calls x 4 kept gathers [B, K, D] fp32 = 16 GiB


# ---------------------------------------------------------------------------------------------------------------------
# child: one case in a fresh process
# ---------------------------------------------------------------------------------------------------------------------

def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M).group(1))


def _run_case(case: str) -> dict:
    import torch
    import torch.nn.functional as F

    from fastmcl.losses import bank_contrastive_terms, cohort_bank_contrastive_terms, layer_pairs, lmcl_plan

    torch.manual_seed(0)
    NE = sum(NUM_STAGES)
    pairs = layer_pairs(NUM_STAGES)
    offs = [sum(NUM_STAGES[:i]) for i in range(len(NUM_STAGES))]
    banks = torch.empty(len(NUM_STAGES), N_BANK, D)
    for i in range(len(NUM_STAGES)):                                    # in place: no transient 2× bank peak
        for start in range(0, N_BANK, 1 << 18):
            rows = banks[i, start:start + (1 << 18)]
            rows.copy_(F.normalize(torch.randn(rows.shape), dim=-1))
    idx = torch.randint(0, N_BANK, (B, K))
    weights = torch.rand(len(pairs), B)
    base = F.normalize(torch.randn(NE, B, D), dim=-1)
    plan = lmcl_plan(NUM_STAGES)

    def step(rows=B, cols=K):
        embs = [e[:rows].clone().requires_grad_() for e in base.unbind(0)]
        idx_, weights_ = idx[:rows, :cols], weights[:, :rows]
        if case == "naive":
            loss = 0.0
            for r, (i, k, j, z) in enumerate(pairs):
                t = bank_contrastive_terms(embs[offs[i] + k], embs[offs[j] + z], banks[i], banks[j], idx_,
                                           tau=TAU, kd_T=KD_T, pos_k=POS_K, weight=weights_[r])
                loss = loss + sum(COEF[name] * getattr(t, name) for name in COEF)
        else:
            t = cohort_bank_contrastive_terms(embs, banks, idx_, plan, weights=weights_, tau=TAU, kd_T=KD_T,
                                              pos_k=POS_K, k_chunk=CASES[case])
            loss = sum(COEF[name] * getattr(t, name) for name in COEF)
        loss.backward()
        return loss.detach(), torch.stack([e.grad for e in embs])

    # Memory: one warm-up step pays one-time lazy initialisation (thread pools, library workspaces); malloc_trim then
    # hands every freed page back to the OS, so memory retained by the allocator cannot hide part of the measured
    # step's peak (naive: skipped, its 16 GiB would not fit twice and lazy initialisation is a small part of it).
    if case != "naive":
        step()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                                                    # reset VmHWM to the current RSS
    baseline_kb = _status_kb("VmRSS")
    t0 = time.perf_counter()
    first_loss, grad = step()
    cold_s = time.perf_counter() - t0
    peak_kb = _status_kb("VmHWM")
    del grad
    # Time: median of the following steps (naive: 1 more step, others: 5).
    times, cpu_times = [], []
    for _ in range(1 if case == "naive" else 5):
        t0, c0 = time.perf_counter(), time.process_time()
        loss, grad = step()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        del grad
    return {"case": case, "k_chunk": CASES[case], "time_s": statistics.median(times), "times_s": times,
            "cpu_s": statistics.median(cpu_times), "first_step_s": cold_s,
            "peak_bytes": (peak_kb - baseline_kb) * 1024,
            "baseline_rss_bytes": baseline_kb * 1024,
            "loss": float(loss), "first_loss": float(first_loss), "torch_threads": torch.get_num_threads()}


# ---------------------------------------------------------------------------------------------------------------------
# parent: one subprocess per case, table, JSON
# ---------------------------------------------------------------------------------------------------------------------

def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        return int(re.search(r"^MemAvailable:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024


def _spawn(case: str) -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    repo = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, __file__, "--case", case], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"case": case, "error": f"exit {proc.returncode}: {proc.stderr.strip()[-2000:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_all(cases=tuple(CASES), naive_row: dict | None = None) -> dict:
    rows = {} if naive_row is None else {"naive": dict(naive_row, reused_from=str(RESULTS))}
    bank_bytes = len(NUM_STAGES) * N_BANK * D * 4
    for case in cases:
        if case == "naive":
            need = NAIVE_BYTES + bank_bytes + (2 << 30)
            avail = _mem_available()
            if avail < need:
                rows[case] = {"case": case, "error": f"does not fit: needs ≈{need / 2**30:.1f} GiB "
                                                     f"(128 kept [B,K,D] gathers + banks + 2 GiB margin), "
                                                     f"MemAvailable {avail / 2**30:.1f} GiB; nothing was reduced"}
                continue
        load0 = os.getloadavg()[0]
        rows[case] = _spawn(case)
        rows[case]["loadavg_1min_before_after"] = (load0, os.getloadavg()[0])
    naive = rows.get("naive", {})
    ratios = {}
    if "error" not in naive and naive:
        for case, r in rows.items():
            if case != "naive" and "error" not in r:
                r["mem_ratio_vs_naive"] = naive["peak_bytes"] / r["peak_bytes"]
                r["time_ratio_vs_naive"] = naive["time_s"] / r["time_s"]
                r["cpu_ratio_vs_naive"] = naive["cpu_s"] / r["cpu_s"]
        ratios = {"dedup_mem_ratio": rows.get("dedup", {}).get("mem_ratio_vs_naive"),
                  "dedup_time_ratio": rows.get("dedup", {}).get("time_ratio_vs_naive"),
                  "streamed_mem_ratio": rows.get(MAIN_STREAMED, {}).get("mem_ratio_vs_naive"),
                  "streamed_time_ratio": rows.get(MAIN_STREAMED, {}).get("time_ratio_vs_naive"),
                  "dedup_cpu_time_ratio": rows.get("dedup", {}).get("cpu_ratio_vs_naive"),
                  "streamed_cpu_time_ratio": rows.get(MAIN_STREAMED, {}).get("cpu_ratio_vs_naive")}
    met = {k: (ratios.get(k) is not None and ratios[k] >= v) for k, v in TARGETS.items()}
    losses = [r["loss"] for r in rows.values() if "loss" in r]
    return {
        "setting": {"nets_x_stages": NUM_STAGES, "B": B, "K": K, "D": D, "pos_k": POS_K, "N_bank": N_BANK,
                    "tau": TAU, "kd_T": KD_T, "dtype": "float32", "device": "cpu", "pass": "forward+backward"},
        "method": "fresh subprocess per case; peak = VmHWM - VmRSS around the process's first step after "
                  "clear_refs=5 (the step's own resident peak above its inputs); time = median perf_counter of the "
                  "fwd+bwd steps after it (naive: 1, others: 5)",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "loadavg_at_end": os.getloadavg()},
        "cases": rows, "ratios": ratios, "targets": TARGETS, "targets_met": met,
        "loss_spread": (max(losses) - min(losses)) / abs(losses[0]) if losses else None,
    }


def format_table(result: dict) -> str:
    lines = [f"memory-bank L-MCL objective, reference path: 2 nets x 4 stages, B={B}, K={K}, D={D}, fp32, CPU, "
             f"fwd+bwd, N_bank={N_BANK}",
             f"{'case':<15}{'k_chunk':>8}{'time [s]':>10}{'cpu [s]':>9}{'peak [MiB]':>12}{'mem ratio':>11}"
             f"{'time ratio':>12}{'cpu ratio':>11}{'load 1m':>13}"]
    for case, r in result["cases"].items():
        if "error" in r:
            lines.append(f"{case:<15}  ERROR: {r['error']}")
            continue
        mr, tr, cr = r.get("mem_ratio_vs_naive"), r.get("time_ratio_vs_naive"), r.get("cpu_ratio_vs_naive")
        load = "{:.1f}->{:.1f}".format(*r["loadavg_1min_before_after"])
        lines.append(f"{case:<15}{str(r['k_chunk']):>8}{r['time_s']:>10.3f}{r['cpu_s']:>9.2f}"
                     f"{r['peak_bytes'] / 2**20:>12.1f}{(f'{mr:.1f}x' if mr else '-'):>11}"
                     f"{(f'{tr:.1f}x' if tr else '-'):>12}{(f'{cr:.1f}x' if cr else '-'):>11}{load:>13}")
    lines.append("ratios are naive / case (time: wall; cpu: process CPU time of the step, all threads, less "
                 "sensitive to other jobs on the machine); targets " + ", ".join(
        f"{k} >= {v:g}: {'met' if result['targets_met'][k] else 'NOT met'}" for k, v in result["targets"].items()))
    lines.append(f"load average at end: {tuple(round(x, 2) for x in result['machine']['loadavg_at_end'])}; "
                 f"relative spread of the loss across cases: {result['loss_spread']}")
    return "\n".join(lines)


def write_result(result: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")


def test_bank_reference_naive_vs_dedup_vs_streamed(benchmark):
    """One run of all cases (each in its own subprocess); the targets are asserted."""
    result = benchmark.pedantic(run_all, rounds=1, iterations=1)
    benchmark.extra_info.update({"ratios": result["ratios"], "targets_met": result["targets_met"],
                                 "cases": {c: {k: r.get(k) for k in ("time_s", "peak_bytes", "error")}
                                           for c, r in result["cases"].items()}})
    write_result(result)
    print("\n" + format_table(result))
    errors = {c: r["error"] for c, r in result["cases"].items() if "error" in r}
    assert not errors, errors
    assert result["loss_spread"] < 1e-4, "the three computations must give the same objective"
    assert all(result["targets_met"].values()), result["ratios"]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=tuple(CASES), help="run one case in this process and print JSON")
    parser.add_argument("--cases", help="comma-separated subset of cases to run (the record is not written)")
    parser.add_argument("--reuse-naive", action="store_true",
                        help="take the naive row from the recorded JSON instead of running it (not written)")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(_run_case(args.case)))
    else:
        cases = tuple(args.cases.split(",")) if args.cases else tuple(CASES)
        unknown = set(cases) - set(CASES)
        if unknown:
            parser.error(f"unknown cases {sorted(unknown)}; choose from {list(CASES)}")
        naive_row = json.loads(RESULTS.read_text())["cases"]["naive"] if args.reuse_naive else None
        if naive_row is not None:
            cases = tuple(c for c in cases if c != "naive")
        res = run_all(cases, naive_row)
        if cases == tuple(CASES):
            write_result(res)
        print(format_table(res))
