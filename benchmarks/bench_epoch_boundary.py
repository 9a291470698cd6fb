"""The epoch boundary, part by part: the time from the last step of one epoch to the first step of the next.

A small synthetic DML run (EPOCHS epochs of 16 steps, batch 20, 32 px, `--workers 2`, the DataLoader path) through
`fastmcl.train.main`; the trainer's evaluation, checkpoint saves and the logger's epoch end (table, fsync, curves.png)
are timed by wrapping them, the rest of the gap is the loader's start (DataLoader workers, first batch) and the loop.
Median over the boundaries; wall seconds and this process's CPU seconds.

Run: `.venv/bin/python -m pytest benchmarks/bench_epoch_boundary.py -s` (or run the file). Writes
benchmarks/results/epoch_boundary.json. Results and the machine: docs/performance.md.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

EPOCHS = 4
ARGV = ["--data", "synthetic", "--synthetic-samples", "320", "--num-classes", "10", "--image-size", "32",
        "--batch-size", "20", "--workers", "2", "--method", "dml", "--epochs", str(EPOCHS), "--no-progress",
        "--log-every", "16"]


def measure(out: Path) -> dict:
    from fastmcl import run_log, train, trainer

    parts: dict[str, list[tuple[float, float]]] = defaultdict(list)     # (start, end) of every call
    steps: list[tuple[float, float, int]] = []       # (start, end, epoch) of every step

    def timed(owner, name, key):
        original = getattr(owner, name)

        def wrapper(self, *args, **kwargs):
            start = time.perf_counter()
            try:
                return original(self, *args, **kwargs)
            finally:
                parts[key].append((start, time.perf_counter()))
        setattr(owner, name, wrapper)
        return original

    originals = [(trainer.Trainer, "evaluate", timed(trainer.Trainer, "evaluate", "evaluation")),
                 (trainer.Trainer, "save", timed(trainer.Trainer, "save", "checkpoints (best.pt, last.pt)")),
                 (run_log.RunLogger, "end_epoch", timed(run_log.RunLogger, "end_epoch",
                                                         "epoch end: table, fsync, curves.png"))]
    step = trainer.Trainer.train_step

    def timed_step(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return step(self, *args, **kwargs)
        finally:
            steps.append((start, time.perf_counter(), self.epoch))
    trainer.Trainer.train_step = timed_step
    cpu = time.process_time()
    try:
        assert train.main(ARGV + ["--out", str(out)]) == 0
    finally:
        trainer.Trainer.train_step = step
        for owner, name, original in originals:
            setattr(owner, name, original)
    cpu = time.process_time() - cpu
    gaps = [(a[1], b[0]) for a, b in zip(steps, steps[1:]) if b[2] != a[2]]
    within = {k: [sum(e - s for s, e in calls if lo <= s and e <= hi) for lo, hi in gaps] for k, calls in parts.items()}
    rest = [hi - lo - sum(v[i] for v in within.values()) for i, (lo, hi) in enumerate(gaps)]
    return {"boundaries": len(gaps), "gap_median_s": statistics.median(hi - lo for lo, hi in gaps),
            "step_median_s": statistics.median(b - a for a, b, _ in steps),
            **{f"{k}_s": statistics.median(v) for k, v in within.items()},
            "loader start, first batch and the loop_s": statistics.median(rest),
            "process_cpu_s": cpu, "python": sys.version.split()[0]}


def test_epoch_boundary(tmp_path):
    result = measure(tmp_path / "run")
    for k, v in result.items():
        print(f"{k:<45} {v:.3f}" if isinstance(v, float) else f"{k:<45} {v}")
    path = Path(__file__).parent / "results" / "epoch_boundary.json"
    runs = json.loads(path.read_text()) if path.exists() else []
    path.write_text(json.dumps(runs + [result], indent=1) + "\n")


if __name__ == "__main__":
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        print(json.dumps(measure(Path(d) / "run"), indent=1))
