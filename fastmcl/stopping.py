"""Stopping a run cleanly: SIGTERM (a scheduler, torchrun's agent) and the first Ctrl-C end it after the current step
with `last.pt` saved; a second Ctrl-C exits at once. Under torchrun the request rides on the step's all-reduce, so every
process stops at the same step (docs/runtime.md "Stopping and restarting")."""
from __future__ import annotations

import os
import signal
from pathlib import Path

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Whether a stop was asked for (`signum`, None until then), with the handlers `install`ed for the loop's span."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def install(self) -> None:
        self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signum is not None:
            raise KeyboardInterrupt   # a second Ctrl-C: do not wait for the step and the save
        self.request(signum)

    def request(self, signum: int = signal.SIGTERM) -> None:
        """Stop after the current step (another process asked for it: SIGTERM, as torchrun's agent would send)."""
        if self.signum is None:
            self.signum = signum

    def report(self, path: Path, step: int, epoch: int) -> None:
        """The one line said when the loop stopped and saved: the step, the checkpoint and the command that resumes."""
        launcher = "torchrun ... -m fastmcl.train" if os.environ.get("TORCHELASTIC_RUN_ID") else \
            "python -m fastmcl.train"
        print(f"fastmcl: {signal.Signals(self.signum).name} at step {step} (epoch {epoch}): saved {path}; resume with "
              f"`{launcher} --resume {path.parent.parent}`", flush=True)
