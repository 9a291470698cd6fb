"""Cost of one L-MCL meta phase in regular training steps of the same cohort and batch (docs/official_mcl.md §4.3; expected
cost and recorded figures: docs/meta_phase.md "Cost"). Regular steps and meta phases alternate (regular, meta,
regular, ...) so that a drift of the machine's speed hits both. `exact` is `--meta-derivatives autograd`.

    .venv/bin/python -m pytest benchmarks/bench_meta.py -s
    (env: FASTMCL_BENCH_BATCH, default 128; FASTMCL_BENCH_REPEATS, default 5)
"""
import json
import os
import statistics
import time
from pathlib import Path

import pytest
import torch

from fastmcl.build import build_trainer
from fastmcl.config import TrainConfig

BATCH = int(os.environ.get("FASTMCL_BENCH_BATCH", "128"))
REPEATS = int(os.environ.get("FASTMCL_BENCH_REPEATS", "5"))


def _seconds(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


@pytest.mark.parametrize("mode,path", [("second-order", "default"), ("second-order", "exact"),
                                       ("first-order", "default")])
@pytest.mark.parametrize("speed", ["fp32", "bf16+channels_last"])
def test_meta_phase_cost_in_regular_steps(tmp_path, mode, path, speed):
    fast = speed != "fp32"
    cfg = TrainConfig(data="synthetic", num_classes=100, synthetic_samples=BATCH * 4, image_size=32,
                      batch_size=BATCH, arch=["resnet32", "resnet32"], method="lmcl", meta_mode=mode,
                      amp="bf16" if fast else "off", channels_last=fast, out=str(tmp_path), progress=False,
                      workers=0)
    trainer = build_trainer(cfg)
    if path == "exact":                 # the plain unrolled form: every second derivative by double backward
        trainer.meta.fd_step = None
    x, y, index = next(iter(trainer.data.train_batches(0)))
    if fast:
        x = x.contiguous(memory_format=torch.channels_last)
    trainer.step_in_epoch = 1          # regular steps without a meta phase

    def regular_step():
        trainer.train_step(x, y, index)

    def meta_phase():
        with trainer.autocast:
            trainer.meta.step(x, y, None, lr=0.1)

    regular_step()                      # warm-up
    meta_phase()
    regulars, metas = [_seconds(regular_step)], []
    for _ in range(REPEATS):
        metas.append(_seconds(meta_phase))
        regulars.append(_seconds(regular_step))
    regular, meta = statistics.median(regulars), statistics.median(metas)
    ratio = meta / regular
    row = {"mode": mode, "path": path, "speed": speed, "batch": BATCH, "regular_step_s": round(regular, 4),
           "meta_phase_s": round(meta, 4), "meta_in_regular_steps": round(ratio, 2),
           "regular_steps_s": [round(t, 3) for t in regulars], "meta_phases_s": [round(t, 3) for t in metas],
           "amortised_overhead_per_step_at_freq_50": round(ratio / 50, 4), "threads": torch.get_num_threads()}
    print("\n" + json.dumps(row))
    out = Path(__file__).parent / "results" / "meta.jsonl"
    out.parent.mkdir(exist_ok=True)
    with open(out, "a") as f:
        f.write(json.dumps(row) + "\n")
