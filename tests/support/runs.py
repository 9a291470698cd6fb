"""What several test modules share about runs: tiny training flags, reading a run's events, writing a YAML config,
and one small trained run per cohort layout (the `runs` fixture in conftest.py)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

TINY = ["--data", "synthetic", "--synthetic-samples", "48", "--num-classes", "4", "--batch-size", "16",
        "--image-size", "16", "--workers", "0", "--m-per-class", "4", "--no-progress", "--deterministic", "--log-every", "1"]

# one small run per layout: independent members with auxiliary branches (L-MCL, memory banks sized by the dataset,
# no meta phase), branches over a shared trunk (ONE) and a temporal-mean copy of a shared-trunk cohort (PCL);
# one epoch of 4 steps, so PCL's temporal mean is no longer a copy of its peer and best.pt is written
RUNS = {"lmcl": ["--meta-mode", "off", "--memory-bank", "--neg-k", "4"], "one": [], "pcl": []}
CLASSES = 10
SAMPLES = 64          # train images (the validation set of --data synthetic: a quarter, 16)


def events(run: Path, kind: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == kind]


def write_yaml(tmp: Path, data: dict) -> Path:
    p = tmp / "c.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def train_runs(root: Path) -> dict[str, Path]:
    """Train every run of `RUNS` under `root` (one intra-op thread); method → run folder."""
    from fastmcl import train
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = {}
        for method, extra in RUNS.items():
            run = root / method
            argv = ["--method", method, "--data", "synthetic", "--num-classes", str(CLASSES), "--image-size", "32",
                    "--synthetic-samples", str(SAMPLES), "--batch-size", "16", "--epochs", "1", "--no-progress",
                    "--workers", "0", "--out", str(run), *extra]
            assert train.main(argv) == 0
            out[method] = run
        return out
    finally:
        torch.set_num_threads(threads)
