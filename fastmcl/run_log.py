"""The run's record: `metrics.jsonl`, mirrored to TensorBoard, drawn in `curves.png`, and the per-epoch member table.

`metrics.jsonl` holds one JSON object per line with an `"event"`: `train` (epoch, step, loss, lr, images_per_sec,
extras), `eval` (epoch, step, member, top1, top5 in percent, extras) and `epoch` (epoch, last step, mean train_loss,
best_member/best_top1 when the epoch had evals), each with a `"time"`. Non-finite floats are written as the strings
"nan", "inf", "-inf" (bare NaN is not JSON; `float(value)` reads them back). On resume the file is appended to and
replayed, so the curves show the whole run (a repeated step's later values win) and a torn last line is cut off.
Only rank 0 logs: with `enabled=False` every method is a no-op that creates no files.
"""
from __future__ import annotations

import json
import math
import os
import time
import warnings
from numbers import Number
from pathlib import Path
from typing import Any

import numpy as np
import torch

NOT_SCALARS = frozenset({"event", "epoch", "step", "time", "member"})  # keys that locate an event: not plotted
#: the folder of the runs made without `--out`, beside their `latest` link
RUNS = Path("runs")


def tensorboard_dir(run: str | Path) -> Path:
    """Where a run's TensorBoard events go: `runs/tensorboard/NAME` for a run folder in `runs/`, the run folder itself
    elsewhere. TensorBoard follows links, so events inside `runs/NAME` would be listed twice, once through
    `runs/latest` (`docs/runtime.md`, the run's record)."""
    run = Path(run).resolve()
    return run.parent / "tensorboard" / run.name if run.parent == RUNS.resolve() else run


def jsonable(value: Any) -> Any:
    """Plain JSON types: tensors and numpy values become numbers/lists, non-finite floats "nan"/"inf"/"-inf"."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        value = value.item() if value.numel() == 1 else value.tolist()
    elif isinstance(value, (np.generic, np.ndarray)):
        value = value.item() if value.size == 1 else value.tolist()
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else "nan" if math.isnan(value) else "inf" if value > 0 else "-inf"
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return jsonable(float(value)) if isinstance(value, Number) else str(value)  # a log line never crashes the run


def _finite(value: float) -> float:
    return value if math.isfinite(value) else math.nan


def _number(value: Any) -> float | None:
    """A logged value as a float for curves and TensorBoard (the "nan"/"inf" strings included), else None."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return float(value) if value in ("nan", "inf", "-inf") else None


class RunLogger:
    """Writes `metrics.jsonl` and `curves.png` into `out_dir`, TensorBoard events into `tensorboard_dir(out_dir)`."""

    def __init__(self, out_dir: str | Path, *, enabled: bool = True, tensorboard: bool = True):
        self.out_dir, self.enabled = Path(out_dir), enabled
        self.metrics_path, self.curves_path = self.out_dir / "metrics.jsonl", self.out_dir / "curves.png"
        self._train_loss: dict[int, float] = {}         # step -> train loss (every logged step)
        self._top: dict[str, dict[str, dict[int, float]]] = {"top1": {}, "top5": {}}  # key -> member -> step -> %
        self._epoch_top1: dict[str, tuple[float, float]] = {}   # member -> top-1, top-5 of this epoch's evaluation
        self._last_step: int | None = None
        self.deployed: str | None = None                 # the deployed classifier, as the eval events name it
        #: (step, top-1) of the deployed classifier's first best evaluation: what checkpoints/best.pt holds
        self.best: tuple[int, float] | None = None
        self._file = self._tb = None
        self._closed = False
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._replay()
        self._epoch_top1 = {}   # a replayed epoch's table is not this run's
        self._file = open(self.metrics_path, "a", buffering=1, encoding="utf-8")  # line-buffered: a crash tears 1 line
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            # a new events file on each start; TensorBoard merges the files of one folder
            self._tb = SummaryWriter(log_dir=str(tensorboard_dir(self.out_dir)))

    def log(self, event: dict) -> None:
        """Append `event` (it needs an `"event"` name) to metrics.jsonl and mirror its numbers to TensorBoard."""
        if not self.enabled:
            return
        if self._closed:
            raise RuntimeError(f"RunLogger for {self.out_dir} is closed")
        if "event" not in event:
            raise ValueError(f"log event needs an 'event' key, got keys {sorted(event)}")
        record = jsonable(event)
        record.setdefault("time", round(time.time(), 3))
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._absorb(record)
        if self._tb is not None:
            name = f"eval/{record['member']}" if record["event"] == "eval" and "member" in record else record["event"]
            step = record.get("step") if isinstance(record.get("step"), int) else None
            for key, value in record.items():
                if key not in NOT_SCALARS and _number(value) is not None:
                    self._tb.add_scalar(f"{name}/{key}", _number(value), global_step=step)

    def log_train(self, epoch: int, step: int, loss: float, lr: float, images_per_sec: float, **extra: Any) -> None:
        self.log({"event": "train", "epoch": epoch, "step": step, "loss": loss, "lr": lr,
                  "images_per_sec": images_per_sec, **extra})

    def log_eval(self, epoch: int, step: int, member: str, top1: float, top5: float, **extra: Any) -> None:
        """Top-1/top-5 accuracy of one classifier (a member or an ensemble), in percent."""
        self.log({"event": "eval", "epoch": epoch, "step": step, "member": member, "top1": top1, "top5": top5,
                  **extra})


    def end_epoch(self, epoch: int, train_loss: float) -> str:
        """Record the epoch's mean train loss, redraw curves.png, return the epoch's member table ("" if disabled)."""
        if not self.enabled:
            return ""
        rows, self._epoch_top1 = self._epoch_top1, {}     # member -> (top1, top5) of this epoch's evaluation
        finite = {m: top1 for m, (top1, _) in rows.items() if math.isfinite(top1)}
        best = max(finite, key=finite.get) if finite else None  # ties: the first member logged
        event: dict[str, Any] = {"event": "epoch", "epoch": epoch, "step": self._last_step, "train_loss": train_loss}
        if best is not None:
            event["best_member"], event["best_top1"] = best, rows[best][0]
        self.log(event)
        self._file.flush()
        os.fsync(self._file.fileno())  # once an epoch: the record survives a power loss too
        if self._tb is not None:
            self._tb.flush()
        self._draw_curves()
        loss = _number(jsonable(train_loss))
        lines = [f"epoch {epoch}" + ("" if loss is None else f"  train loss {loss:.4f}")]
        if not rows:
            return "\n".join(lines + ["  (no evaluation this epoch)"])
        width = max(len("member"), *map(len, rows))
        lines.append(f"  {'member':<{width}}  {'top1':>7}  {'top5':>7}")
        marks = {m: ", ".join(w for w, on in (("deployed", m == self.deployed), ("highest this epoch", m == best))
                              if on) for m in rows}
        lines += [f"  {m:<{width}}  {top1:7.2f}  {top5:7.2f}{f'  <- {marks[m]}' if marks[m] else ''}"
                  for m, (top1, top5) in rows.items()]
        if self.best is not None:
            lines.append(f"  checkpoints/best.pt (evaluate, export): {self.deployed} top-1 {self.best[1]:.2f} at "
                         f"step {self.best[0]}")
        return "\n".join(lines)

    def close(self) -> None:
        """Flush and close the files; idempotent."""
        if not self._closed:
            self._closed = True
            for f in (self._file, self._tb):
                if f is not None:
                    f.close()

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _absorb(self, event: dict) -> None:
        """Update the curve history from one new or replayed event."""
        step = event.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            return
        self._last_step = step
        if event.get("event") == "train" and _number(event.get("loss")) is not None:
            self._train_loss[step] = _number(event["loss"])
        elif event.get("event") == "eval" and "member" in event:
            member = str(event["member"])
            if event.get("deployed") is True:
                self.deployed = member
                top1 = _number(event.get("top1"))
                if top1 is not None and math.isfinite(top1) and (self.best is None or top1 > self.best[1]):
                    self.best = (step, top1)
            for key, by_member in self._top.items():
                if _number(event.get(key)) is not None:
                    by_member.setdefault(member, {})[step] = _number(event[key])
            top1, top5 = (_number(event.get(key)) for key in ("top1", "top5"))
            self._epoch_top1[member] = (math.nan if top1 is None else top1, math.nan if top5 is None else top5)

    def _replay(self) -> None:
        """Rebuild the history from an existing metrics.jsonl (resume); cut off a torn last line left by a crash."""
        if not self.metrics_path.exists():
            return
        data = self.metrics_path.read_bytes()
        lines = data.split(b"\n")
        last = max((i for i, raw in enumerate(lines) if raw.strip()), default=-1)
        offset = 0
        for i, raw in enumerate(lines):
            start, offset = offset, offset + len(raw) + 1
            if not raw.strip():
                continue
            try:
                event = json.loads(raw)
                if not isinstance(event, dict):
                    raise ValueError("not a JSON object")
            except ValueError:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                if i == last:
                    warnings.warn(f"{self.metrics_path}: dropping torn last line {raw[:80]!r} (interrupted write)")
                    os.truncate(self.metrics_path, start)
                    return
                warnings.warn(f"{self.metrics_path}:{i + 1}: skipping line that is not a JSON object")
                continue
            self._absorb(event)
        if not data.endswith(b"\n") and last >= 0:  # a complete last object whose newline never made it
            with open(self.metrics_path, "ab") as f:
                f.write(b"\n")

    def _draw_curves(self) -> None:
        """Redraw curves.png, atomically (temp file, then `os.replace`): the train loss of every logged step | the
        top-1 of every evaluation (markers) per classifier, both against the step."""
        try:
            from matplotlib.figure import Figure  # no pyplot: no global state, works headless and in any thread
            from matplotlib.ticker import MaxNLocator

            fig = Figure(figsize=(11, 4), dpi=100, layout="constrained")
            ax_loss, ax_acc = fig.subplots(1, 2, sharex=True)   # one step axis: an evaluation sits under its steps
            steps = sorted(self._train_loss)  # inf would wreck the axis limits; nan leaves a gap
            ax_loss.plot(steps, [_finite(self._train_loss[s]) for s in steps], linewidth=1.2,
                         marker="." if len(steps) < 50 else None, label="train loss")
            for label, by_step in self._top["top1"].items():
                steps = sorted(by_step)
                deployed, auxiliary = label == self.deployed, "." in label
                ax_acc.plot(steps, [_finite(by_step[s]) for s in steps], marker="o",
                            markersize=6 if deployed else 4, linewidth=2.8 if deployed else 1.2,
                            linestyle="--" if auxiliary else "-", zorder=3 if deployed else 2,
                            label=f"{label} (deployed)" if deployed else label)
            ax_loss.set(title="train loss", xlabel="step", ylabel="loss")
            ax_acc.set(title="top-1 accuracy (evaluations)", xlabel="step", ylabel="top-1 (%)")
            if self._top["top1"]:
                ax_acc.legend(loc="lower right", fontsize="small")
            for ax in (ax_loss, ax_acc):
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
                ax.grid(alpha=0.3)
            tmp = self.out_dir / f".{self.curves_path.name}.tmp"
            fig.savefig(tmp, format="png")
            os.replace(tmp, self.curves_path)  # readers never see a half-written PNG
        except Exception as e:  # a picture is not worth a crashed run; the data stays in metrics.jsonl
            warnings.warn(f"could not draw {self.curves_path}: {type(e).__name__}: {e}")
