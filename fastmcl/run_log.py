"""Run logging: ``metrics.jsonl`` (the record), TensorBoard scalars (a mirror) and ``curves.png`` (a picture).

``metrics.jsonl`` holds one JSON object per line, appended and flushed line by line, each with an ``"event"`` key:

* ``train``: epoch, step, loss, lr, images_per_sec, extras
* ``eval``:  epoch, step, member, top1, top5 (percent), extras
* ``epoch``: epoch, step (the last step seen), train_loss (epoch mean) and, when the epoch had evals,
  best_member / best_top1. Written by :meth:`RunLogger.end_epoch`; it is what rebuilds the loss curve on resume.

Every line also gets ``"time"`` (Unix seconds) unless the event carries one. Tensors and numpy scalars/arrays become
Python numbers/lists. **Non-finite floats are written as the JSON strings "nan", "inf" and "-inf"** (not null: a
diverged loss stays distinguishable from a missing value, and bare NaN is not valid JSON). Read them back with
``float(value)``.

Only rank 0 logs: construct with ``enabled=False`` elsewhere and every method is a no-op that creates no files.

On resume the logger appends to the existing ``metrics.jsonl`` and replays it to rebuild the curve history, so
``curves.png`` shows the whole run. Where a resumed run repeats epochs it had logged before the crash (those after the
last checkpoint), the later values win in the curves; the file keeps both. A torn last line left by a crash is
dropped with a warning (the file is truncated before it) before anything is appended.

This module imports nothing else of fastmcl.
"""
from __future__ import annotations

import json
import math
import os
import secrets
import time
import warnings
from numbers import Number
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["RunLogger", "to_jsonable"]

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
# keys that locate an event rather than measure something: never mirrored to TensorBoard
_NOT_SCALARS = frozenset({"event", "epoch", "step", "time", "member"})


def to_jsonable(value: Any) -> Any:
    """Plain JSON types: tensors/numpy → numbers/lists, non-finite floats → "nan"/"inf"/"-inf"."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        value = value.item() if value.numel() == 1 else value.tolist()
    elif isinstance(value, (np.generic, np.ndarray)):
        value = value.item() if value.size == 1 else value.tolist()
    if isinstance(value, bool) or value is None or isinstance(value, (str, int)):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Number):  # e.g. fractions, decimals
        return to_jsonable(float(value))
    return str(value)  # paths, enums, dtypes, ...: a log line must never crash the run


def _number(value: Any) -> float | None:
    """A logged value as a float for plotting/TensorBoard (accepts the "nan"/"inf" strings), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if value in ("nan", "inf", "-inf"):
        return float(value)
    return None


class RunLogger:
    """Writes ``metrics.jsonl``, TensorBoard events and ``curves.png`` into ``out_dir`` (rank 0 only)."""

    def __init__(self, out_dir: str | Path, *, enabled: bool = True, tensorboard: bool = True):
        self.out_dir = Path(out_dir)
        self.enabled = enabled
        self.metrics_path = self.out_dir / METRICS_FILE
        self.curves_path = self.out_dir / CURVES_FILE
        # curve history, keyed by epoch so that a replayed epoch overwrites rather than duplicates
        self._train_loss: dict[int, float] = {}
        self._top1: dict[str, dict[int, float]] = {}  # member -> epoch -> top1 (members in order of first eval)
        self._top5: dict[str, dict[int, float]] = {}
        self._last_step: int | None = None
        self._file = None
        self._tb = None
        self._closed = False
        if not enabled:
            return

        self.out_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.out_dir.glob(f".{CURVES_FILE}.*.tmp"):  # left by a run killed mid-savefig
            stale.unlink(missing_ok=True)
        for event in self._read_existing():
            self._absorb(event)
        # line-buffered: every event reaches the OS as soon as it is logged, so a crash loses at most a partial line
        self._file = open(self.metrics_path, "a", buffering=1, encoding="utf-8")
        if tensorboard:
            self._tb = self._open_tensorboard()

    # ------------------------------------------------------------------------------------------------ logging

    def log(self, event: dict) -> None:
        """Append ``event`` (which must have an ``"event"`` name) to metrics.jsonl and mirror its numbers to TB."""
        if not self.enabled:
            return
        if self._closed:
            raise RuntimeError(f"RunLogger for {self.out_dir} is closed")
        if "event" not in event:
            raise ValueError(f"log event needs an 'event' key, got keys {sorted(event)}")
        record = to_jsonable(dict(event))
        record.setdefault("time", round(time.time(), 3))
        # allow_nan=False: to_jsonable already replaced non-finite floats; this guarantees valid JSON regardless
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._absorb(record)
        if self._tb is not None:
            self._mirror(record)

    def log_train(self, epoch: int, step: int, loss: float, lr: float, images_per_sec: float, **extra: Any) -> None:
        self.log(
            {"event": "train", "epoch": epoch, "step": step, "loss": loss, "lr": lr,
             "images_per_sec": images_per_sec, **extra}
        )

    def log_eval(self, epoch: int, step: int, member: str, top1: float, top5: float, **extra: Any) -> None:
        """Top-1/top-5 accuracy of one cohort member (or ensemble), in percent."""
        self.log({"event": "eval", "epoch": epoch, "step": step, "member": member, "top1": top1, "top5": top5,
                  **extra})

    def end_epoch(self, epoch: int, train_loss: float) -> str:
        """Record the epoch's mean train loss, redraw curves.png, return this epoch's member table ("" if disabled)."""
        if not self.enabled:
            return ""
        rows = self._epoch_rows(epoch)
        event: dict[str, Any] = {"event": "epoch", "epoch": epoch, "step": self._last_step, "train_loss": train_loss}
        best = self._best(rows)
        if best is not None:
            event["best_member"], event["best_top1"] = best, rows[best][0]
        self.log(event)
        self._file.flush()
        os.fsync(self._file.fileno())  # once an epoch: cheap, and the record survives a power loss too
        if self._tb is not None:
            self._tb.flush()
        self._draw_curves()
        return self._table(epoch, train_loss, rows, best)

    def close(self) -> None:
        """Flush and close the files; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def history(self) -> dict:
        """Copy of the curve history: {"train_loss": {epoch: v}, "top1": {member: {epoch: v}}, "top5": ...}."""
        return {
            "train_loss": dict(self._train_loss),
            "top1": {m: dict(v) for m, v in self._top1.items()},
            "top5": {m: dict(v) for m, v in self._top5.items()},
        }

    # ------------------------------------------------------------------------------------------------ history

    def _absorb(self, event: dict) -> None:
        """Update the curve history from one (new or replayed) event."""
        if isinstance(event.get("step"), int) and not isinstance(event.get("step"), bool):
            self._last_step = event["step"]
        kind, epoch = event.get("event"), event.get("epoch")
        if not isinstance(epoch, int):
            return
        if kind == "epoch" and _number(event.get("train_loss")) is not None:
            self._train_loss[epoch] = _number(event["train_loss"])
        elif kind == "eval" and "member" in event:
            member = str(event["member"])
            for key, store in (("top1", self._top1), ("top5", self._top5)):
                value = _number(event.get(key))
                if value is not None:
                    store.setdefault(member, {})[epoch] = value

    def _read_existing(self) -> list[dict]:
        """Parse an existing metrics.jsonl (resume). A torn last line is cut off the file; bad inner lines skipped."""
        if not self.metrics_path.exists():
            return []
        data = self.metrics_path.read_bytes()
        events: list[dict] = []
        offset = 0
        lines = data.split(b"\n")
        last = max((i for i, raw in enumerate(lines) if raw.strip()), default=-1)
        for i, raw in enumerate(lines):
            start, offset = offset, offset + len(raw) + 1
            if not raw.strip():
                continue
            is_last = i == last
            try:
                event = json.loads(raw.decode("utf-8"))
                if not isinstance(event, dict):
                    raise ValueError("not a JSON object")
            except ValueError:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                if is_last:
                    # A crash mid-write: cut the partial line off so appended lines start on a fresh line.
                    warnings.warn(f"{self.metrics_path}: dropping torn last line {raw[:80]!r} (interrupted write)")
                    os.truncate(self.metrics_path, start)
                    return events
                warnings.warn(f"{self.metrics_path}:{i + 1}: skipping line that is not a JSON object")
                continue
            events.append(event)
            if is_last and not data.endswith(b"\n"):
                # complete object but its newline never made it: add it, or the next event would join this line
                with open(self.metrics_path, "ab") as f:
                    f.write(b"\n")
                return events
        return events

    # ------------------------------------------------------------------------------------------------ outputs

    def _open_tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # tensorboard is optional at run time; the jsonl record is what matters
            warnings.warn(f"TensorBoard logging disabled: {e}")
            return None
        # A new events file beside any earlier one; TensorBoard merges all event files of a directory.
        return SummaryWriter(log_dir=str(self.out_dir))

    def _mirror(self, record: dict) -> None:
        name = record["event"]
        if name == "eval" and "member" in record:
            name = f"eval/{record['member']}"
        step = record.get("step") if isinstance(record.get("step"), int) else None
        for key, value in record.items():
            number = _number(value)
            if key not in _NOT_SCALARS and number is not None:
                self._tb.add_scalar(f"{name}/{key}", number, global_step=step)

    def _epoch_rows(self, epoch: int) -> dict[str, tuple[float, float]]:
        return {
            m: (by_epoch[epoch], self._top5.get(m, {}).get(epoch, math.nan))
            for m, by_epoch in self._top1.items()
            if epoch in by_epoch
        }

    @staticmethod
    def _best(rows: dict[str, tuple[float, float]]) -> str | None:
        finite = {m: r[0] for m, r in rows.items() if math.isfinite(r[0])}
        return max(finite, key=finite.get) if finite else None  # ties: the first member logged

    @staticmethod
    def _table(epoch: int, train_loss: Any, rows: dict[str, tuple[float, float]], best: str | None) -> str:
        loss = _number(to_jsonable(train_loss))
        lines = [f"epoch {epoch}  train loss {loss:.4f}" if loss is not None else f"epoch {epoch}"]
        if not rows:
            return "\n".join(lines + ["  (no evaluation this epoch)"])
        width = max(len("member"), *(len(m) for m in rows))
        lines.append(f"  {'member':<{width}}  {'top1':>7}  {'top5':>7}")
        for member, (top1, top5) in rows.items():
            mark = "  <- best" if member == best else ""
            lines.append(f"  {member:<{width}}  {top1:7.2f}  {top5:7.2f}{mark}")
        return "\n".join(lines)

    def _draw_curves(self) -> None:
        """Redraw curves.png: train loss per epoch | top-1 per member. Written atomically (temp + replace)."""
        try:
            # Figure + Agg canvas directly: no pyplot global state, no backend switch, works in any thread/headless.
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
            from matplotlib.ticker import MaxNLocator

            fig = Figure(figsize=(11, 4), dpi=100, layout="constrained")
            FigureCanvasAgg(fig)
            ax_loss, ax_acc = fig.subplots(1, 2)
            epochs = sorted(self._train_loss)
            ax_loss.plot(epochs, [_plottable(self._train_loss[e]) for e in epochs], marker="o", markersize=3)
            ax_loss.set(title="train loss", xlabel="epoch", ylabel="loss")
            for member, by_epoch in self._top1.items():
                es = sorted(by_epoch)
                ax_acc.plot(es, [_plottable(by_epoch[e]) for e in es], marker="o", markersize=3, label=member)
            ax_acc.set(title="top-1 accuracy", xlabel="epoch", ylabel="top-1 (%)")
            if self._top1:
                ax_acc.legend(loc="lower right", fontsize="small")
            for ax in (ax_loss, ax_acc):
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
                ax.grid(alpha=0.3)

            tmp = self.out_dir / f".{CURVES_FILE}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
            try:
                fig.savefig(tmp, format="png")
                os.replace(tmp, self.curves_path)  # readers never see a half-written PNG
            finally:
                if tmp.exists():
                    tmp.unlink()
        except Exception as e:  # a picture is not worth a crashed run; the data stays in metrics.jsonl
            warnings.warn(f"could not draw {self.curves_path}: {type(e).__name__}: {e}")


def _plottable(value: float) -> float:
    return value if math.isfinite(value) else math.nan  # inf would wreck the axis limits; nan leaves a gap
