"""`python -m fastmcl.evaluate RUN_OR_CHECKPOINT`: every classifier's top-1/top-5 on the validation set.

Classifiers are those the method evaluates during training (`Objective.eval_logits`: members `netN`, stage and
aggregate heads, ensembles, the temporal means `emaN`), the deployed one marked; printed as a table and written as
JSON (`--json FILE`, or `--json -` for stdout, the table then going to stderr). `evaluate_classifiers` is the one
evaluation loop, shared with the trainer. Bad input → one line on stderr, exit 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Iterable

import torch

from .accuracy import evaluate_classifiers
from .distributed import init_distributed
from .console import quiet_on_closed_output
from .pipeline import TrainData, detect_source
from .trained import TrainedRun, load_trained


class _Counted:
    """Iterates `batches`, counting the images it yields."""

    def __init__(self, batches: Iterable):
        self.batches, self.images = batches, 0

    def __iter__(self):
        for x, y, index in self.batches:
            self.images += int(y.shape[0])
            yield x, y, index


def evaluate_run(run: TrainedRun, *, data: str | None = None, batch_size: int | None = None,
                 device: str | None = None, amp: str | None = None) -> dict:
    """Evaluate a loaded run on its validation set (or `data`'s) with its own precision and memory format; the
    result as the JSON report (`classifiers`: name → top1, top5, deployed)."""
    cfg = run.cfg
    cfg = dataclasses.replace(cfg, data=cfg.data if data is None else data, device=device or cfg.device,
                              batch_size=batch_size or cfg.batch_size, amp=amp or cfg.amp)
    _, torch_device = init_distributed(cfg.device)
    trained = run.data
    val = TrainData(cfg, detect_source(cfg, splits=("val",)), torch_device, val_only=True,
                    stats=(trained["mean"], trained["std"]))
    here = val.card()
    if here["num_classes"] != trained["num_classes"]:
        raise ValueError(f"--data {cfg.data or '(digits demo)'}: {here['num_classes']} classes, but the networks were "
                         f"trained on {trained['num_classes']}")
    if trained["class_names"] is not None and here["class_names"] != trained["class_names"]:
        differ = next(i for i, (a, b) in enumerate(zip(here["class_names"], trained["class_names"])) if a != b)
        raise ValueError(f"--data {cfg.data or '(digits demo)'}: class {differ} is {here['class_names'][differ]!r}, "
                         f"but the networks were trained with {trained['class_names'][differ]!r} there")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
    autocast = torch.autocast(torch_device.type, dtype=amp_dtype) if amp_dtype is not None else None
    cohort, objective = run.cohort.to(torch_device), run.objective.to(torch_device)
    ema = run.ema.to(torch_device) if run.ema is not None else None
    if cfg.channels_last:
        cohort.to(memory_format=torch.channels_last)
        if ema is not None:
            ema.to(memory_format=torch.channels_last)
    batches = _Counted(val.val_batches())
    results = evaluate_classifiers(cohort, objective, ema, batches, torch_device, autocast=autocast,
                                   channels_last=cfg.channels_last)
    deployed = objective.deployed
    return {"checkpoint": str(run.checkpoint), "method": cfg.method, "step": int(run.state.get("step", 0)),
            "data": cfg.data or "digits", "images": batches.images, "amp": cfg.amp, "deployed": deployed,
            "classifiers": {n: {"top1": t1, "top5": t5, "deployed": n == deployed} for n, (t1, t5) in results.items()}}


def format_table(report: dict) -> str:
    """The report as the console table: one row per classifier, the deployed one marked."""
    lines = [f"fastmcl: {report['checkpoint']} ({report['method']}, step {report['step']}) on {report['data']}: "
             f"{report['images']} validation images", f"{'classifier':<14}{'top-1':>8}{'top-5':>8}"]
    for name, row in report["classifiers"].items():
        mark = "  <- deployed" if row["deployed"] else ""
        lines.append(f"{name:<14}{row['top1']:>8.2f}{row['top5']:>8.2f}{mark}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastmcl.evaluate",
                                description="Top-1/top-5 of every classifier of a trained run on the validation set, "
                                            "the deployed one marked.")
    p.add_argument("run", metavar="RUN_OR_CHECKPOINT", nargs="?", default="runs/latest",
                   help="a run folder (its checkpoints/best.pt, else last.pt) or a checkpoint file (default: "
                        "runs/latest, the newest run)")
    p.add_argument("--data", default=None, help="evaluate on this dataset's validation set instead of the run's "
                                                "(same forms as train's --data)")
    p.add_argument("--batch-size", type=int, default=None, help="validation batch size (default: the run's)")
    p.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N (default: the run's)")
    p.add_argument("--amp", default=None, choices=("off", "bf16", "fp16"), help="autocast (default: the run's)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON to FILE ('-': "
                                                                "stdout, the table then goes to stderr)")
    return p


@quiet_on_closed_output
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.batch_size is not None and args.batch_size < 1:
            raise ValueError(f"--batch-size: must be >= 1, got {args.batch_size}")
        report = evaluate_run(load_trained(args.run), data=args.data, batch_size=args.batch_size,
                              device=args.device, amp=args.amp)
    except ValueError as e:       # CheckpointError and DataError are ValueErrors
        print(f"fastmcl: error: {e}", file=sys.stderr)
        return 2
    print(format_table(report), file=sys.stderr if args.json == "-" else sys.stdout)
    if args.json == "-":
        print(json.dumps(report, indent=2))
    elif args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
