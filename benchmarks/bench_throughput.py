"""Training throughput of the fast trainer (issue 7): images/sec of one L-MCL training step, of the meta phase, and
of the amortised L-MCL iteration (regular step + meta phase / meta_freq), against the backbone-only step of the SAME
cohort in the SAME configuration (Σ CE over the cohort's classifiers, one SGD step: the yardstick of what the
method adds).

Cases: 2×ResNet-32 L-MCL, B=128, 32 px, in-batch contrast (CIFAR-style, meta every 50) and 2×ResNet-18 L-MCL, B=32,
224 px, memory bank K = 1 + 1 + 8192 (ImageNet-style, meta every 500; the ratio at 50 is reported too).
Configurations: eager fp32; channels_last + bf16; + torch.compile; on a GPU also fp16 (GradScaler) and the Triton
backend. Every number of one case comes from one process, in one run.

    make bench                                   # all benchmarks, pytest-benchmark JSON in benchmarks/results.json
    .venv/bin/python -m pytest benchmarks/bench_throughput.py --benchmark-only -s   # this file only
    env: FASTMCL_BENCH_ROUNDS (default 3), FASTMCL_BENCH_CASES (default "cifar,imagenet"),
         FASTMCL_BENCH_SPEEDS (comma-separated config names, default all)

Results: benchmarks/results/throughput.jsonl (one line per case × config) and throughput.md (the table).
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import pytest
import torch

from fastmcl.config import TrainConfig
from fastmcl.losses import cross_entropy
from fastmcl.meta import MetaPhase
from fastmcl.build import build_trainer

ROUNDS = int(os.environ.get("FASTMCL_BENCH_ROUNDS", "3"))
CASES = os.environ.get("FASTMCL_BENCH_CASES", "cifar,imagenet").split(",")
RESULTS = Path(__file__).parent / "results"
GPU = torch.cuda.is_available()

CASE_CONFIGS = {
    "cifar": dict(arch=["resnet32", "resnet32"], batch_size=128, image_size=32, num_classes=100,
                  synthetic_samples=1024, memory_bank=False),
    "imagenet": dict(arch=["resnet18", "resnet18"], batch_size=32, image_size=224, num_classes=1000,
                     synthetic_samples=9000, memory_bank=True, neg_k=8192, pos_k=1),
}
SPEEDS = {
    "eager fp32": dict(),
    "channels_last + bf16": dict(channels_last=True, amp="bf16"),
    "channels_last + bf16 + compile": dict(channels_last=True, amp="bf16", compile=True),
}
if GPU:
    SPEEDS["channels_last + fp16"] = dict(channels_last=True, amp="fp16")
    SPEEDS["channels_last + bf16 + compile + triton"] = dict(channels_last=True, amp="bf16", compile=True,
                                                            backend="triton")


def _median(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        if GPU:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if GPU:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _backbone_step(trainer):
    """The yardstick: the same cohort, Σ CE over all its classifiers, one SGD step (the trainer's optimizer kind),
    the same autocast / channels_last / compile."""
    cohort = trainer.cohort
    opt = type(trainer.optimizer)(cohort.parameters(), **{k: v for k, v in trainer.optimizer.defaults.items()
                                                          if k in ("lr", "momentum", "nesterov", "weight_decay",
                                                                   "foreach", "fused")})

    def loss_fn(x, y):
        with trainer.autocast:
            outs = cohort(x)
            return torch.stack([cross_entropy(z, y) for o in outs for z in o.logits]).sum()

    if trainer.cfg.compile:
        loss_fn = torch.compile(loss_fn, backend=trainer.cfg.compile_backend)

    def step(x, y):
        cohort.train()
        loss = loss_fn(x, y)
        opt.zero_grad(set_to_none=True)
        trainer.scaler.scale(loss).backward()
        trainer.scaler.step(opt)
        trainer.scaler.update()
        return loss
    return step


def _machine() -> str:
    if GPU:
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU threads, no GPU"


SELECTED = os.environ.get("FASTMCL_BENCH_SPEEDS")


@pytest.mark.parametrize("speed", [s for s in SPEEDS if not SELECTED or s in SELECTED.split(",")])
@pytest.mark.parametrize("case", [c for c in CASE_CONFIGS if c in CASES])
def test_throughput(benchmark, tmp_path, case, speed):
    cfg = TrainConfig(data="synthetic", method="lmcl", out=str(tmp_path), progress=False, workers=0,
                      **CASE_CONFIGS[case], **SPEEDS[speed])
    trainer = build_trainer(cfg)
    x, y, index = next(iter(trainer.data.train_batches(0)))
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    B = x.shape[0]
    backbone = _backbone_step(trainer)
    backbone(x, y)                                       # warm-up (and compile)
    backbone_s = _median(lambda: backbone(x, y), ROUNDS)

    trainer.step_in_epoch = 1                            # a regular step (no meta phase)
    trainer.train_step(x, y, index)                      # warm-up (and compile)
    benchmark.pedantic(lambda: trainer.train_step(x, y, index), rounds=ROUNDS, iterations=1)
    stats = getattr(benchmark, "stats", None)
    step_s = stats.stats.median if stats else _median(lambda: trainer.train_step(x, y, index), ROUNDS)

    contrast_idx = trainer.negatives(index, 0) if trainer.negatives is not None else None

    def meta_phase(meta):
        with trainer.meta_autocast:
            meta.step(x, y, contrast_idx, lr=0.1)

    first_order = MetaPhase(trainer.cohort, trainer.objective, trainer.meta_optimizer, inner_steps=cfg.meta_inner,
                            mode="first-order", momentum=cfg.momentum, weight_decay=trainer.cfg.weight_decay)
    meta_s, meta_fo_s = [], []
    for meta, times in ((trainer.meta, meta_s), (first_order, meta_fo_s)):
        meta_phase(meta)                                 # warm-up
        times.append(_median(lambda: meta_phase(meta), max(1, ROUNDS - 1)))
    meta_s, meta_fo_s = meta_s[0], meta_fo_s[0]
    freq = trainer.cfg.meta_freq
    amortised = step_s + meta_s / freq
    row = {"case": case, "config": speed, "batch": B, "image_size": cfg.image_size, "meta_freq": freq,
           "backbone_step_s": round(backbone_s, 4), "lmcl_step_s": round(step_s, 4), "meta_phase_s": round(meta_s, 3),
           "meta_in_regular_steps": round(meta_s / step_s, 2),
           "amortised_iter_s": round(amortised, 4), "amortised_vs_backbone": round(amortised / backbone_s, 3),
           "amortised_vs_backbone_meta50": round((step_s + meta_s / 50) / backbone_s, 3),
           "meta_first_order_s": round(meta_fo_s, 3), "meta_first_order_in_regular_steps": round(meta_fo_s / step_s, 2),
           "amortised_first_order_vs_backbone": round((step_s + meta_fo_s / freq) / backbone_s, 3),
           "backbone_img_s": round(B / backbone_s, 1), "lmcl_amortised_img_s": round(B / amortised, 1),
           "optimizer": trainer.optimizer_name, "machine": _machine(), "torch": torch.__version__,
           "threads": torch.get_num_threads()}
    benchmark.extra_info.update(row)
    print("\n" + json.dumps(row))
    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / "throughput.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    _write_table()


def _write_table() -> None:
    rows = [json.loads(line) for line in (RESULTS / "throughput.jsonl").read_text().splitlines() if line.strip()]
    latest = {}
    for r in rows:                                       # the newest measurement of each (case, config)
        latest[(r["case"], r["config"])] = r
    lines = ["| case | config | backbone step s (img/s) | L-MCL step s | meta phase s, 2nd order (regular steps) | "
             "amortised img/s | amortised / backbone | meta 1st order s (steps) | amortised / backbone, 1st order |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in latest.values():
        lines.append(f"| {r['case']} B={r['batch']} | {r['config']} | {r['backbone_step_s']} ({r['backbone_img_s']}) | "
                     f"{r['lmcl_step_s']} | {r['meta_phase_s']} ({r['meta_in_regular_steps']}) | "
                     f"{r['lmcl_amortised_img_s']} (meta every {r['meta_freq']}) | {r['amortised_vs_backbone']} | "
                     f"{r.get('meta_first_order_s', '-')} ({r.get('meta_first_order_in_regular_steps', '-')}) | "
                     f"{r.get('amortised_first_order_vs_backbone', '-')} |")
    machine = next(iter(latest.values()))["machine"]
    (RESULTS / "throughput.md").write_text(f"Measured on: {machine}\n\n" + "\n".join(lines) + "\n")
