"""What the commands print: a status line before slow work, one progress bar over the steps this invocation runs (or a
line every `--log-every` steps when the output is not a terminal), text that does not break the bar, the final line of
a run; and the Unix behaviour of every command when its output is closed early (`| head`): a quiet exit."""
from __future__ import annotations

import functools
import os
import sys
from typing import Callable

from tqdm import tqdm

#: the exit status of a command whose output was closed early (128 + SIGPIPE, as a shell reports such a tool)
BROKEN_PIPE_EXIT = 141


def quiet_on_closed_output(main: Callable[..., int]) -> Callable[..., int]:
    """Wrap a command's `main`: when stdout is closed early, exit quietly (no traceback) with status 141."""
    @functools.wraps(main)
    def wrapped(*args, **kwargs) -> int:
        try:
            rc = main(*args, **kwargs)
            sys.stdout.flush()      # inside the try: a late flush at interpreter exit would print a traceback
            return rc
        except BrokenPipeError:
            try:                    # later writes (and Python's own flush at exit) go nowhere
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            except (OSError, ValueError):   # stdout is not a file (captured in-process)
                pass
            return BROKEN_PIPE_EXIT
    return wrapped


def status(text: str, enabled: bool = True) -> None:
    """One line saying what the command is doing before something slow (data preparation, the first step)."""
    if enabled:
        print(f"fastmcl: {text}", flush=True)


class Progress:
    """A tqdm bar over the `total` steps this invocation runs, or, when the bar is off (`--no-progress`, output not a
    terminal), one line every `log_every` steps. `write` prints above the bar."""

    def __init__(self, total: int, *, enabled: bool, bar: bool):
        self.enabled = enabled
        self.bar = tqdm(total=total, disable=not (enabled and bar and sys.stderr.isatty()), unit="step",
                        dynamic_ncols=True, leave=False)

    def step(self, epoch: int, step: int, loss: float, lr: float, images_per_sec: float | None) -> None:
        """Advance by one step; `images_per_sec` is given on the steps that are logged."""
        if not self.bar.disable:
            self.bar.update(1)
            self.bar.set_postfix(epoch=epoch, loss=f"{loss:.3f}", refresh=False)
        elif self.enabled and images_per_sec is not None:
            print(f"epoch {epoch} step {step} loss {loss:.4f} lr {lr:.4g} {images_per_sec:.0f} img/s", flush=True)

    def write(self, text: str) -> None:
        if self.enabled:
            if self.bar.disable:
                print(text, flush=True)
            else:
                self.bar.write(text)

    def close(self) -> None:
        self.bar.close()


def final_line(result: dict) -> str:
    """The run's last line: the deployed network's top-1 at the last step, and the checkpoint `fastmcl.evaluate` and
    `fastmcl.export` use (`best.pt`: the step of the deployed network's best evaluation, and its top-1)."""
    line = (f"fastmcl: done at step {result['step']}; deployed {result['deployed']} top-1 "
            f"{result['deployed_top1']:.2f}% at this step")
    if result.get("best") is not None:
        step, top1 = result["best"]
        line += f"; evaluate and export use checkpoints/best.pt (step {step}, top-1 {top1:.2f}%)"
    return line + f"; run {result['out']}"
