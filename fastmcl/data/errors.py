"""The one exception type of the data layer, and the one integer-argument check."""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["DataError", "check_int", "check_labels"]

_WORKER_PREFIX = "Caught DataError in DataLoader worker"


class DataError(ValueError):
    """Bad data or a bad data argument; `str(e)` is ONE line naming the path or argument, so a command line can print
    it without a traceback. torch's re-raise of a DataLoader worker's DataError is reduced to the original line (plus
    which worker); the full text stays in `detail`."""

    def __init__(self, message: str = "") -> None:
        message = str(message)
        self.detail = message
        if message.startswith(_WORKER_PREFIX):
            lines = [ln for ln in message.strip().splitlines() if ln.strip()]
            where = lines[0][len("Caught DataError "):].rstrip(".")
            last = lines[-1].split("DataError: ", 1)[-1]
            message = f"{last} (raised {where})"
        else:
            message = " ".join(message.split("\n")).strip()
        super().__init__(message)


def check_int(value, name: str, minimum: int = 1) -> int:
    """`value` as an int when it is an integer (not a bool) >= `minimum`; else a DataError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise DataError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return int(value)


def check_labels(labels) -> torch.Tensor:
    """`labels` as a non-empty 1-D int64 tensor (on its device); else a DataError naming `labels`."""
    try:
        t = labels if isinstance(labels, torch.Tensor) else torch.as_tensor(np.asarray(labels))
    except (TypeError, ValueError) as e:
        raise DataError(f"labels: expected a 1-D sequence of integer labels ({e})") from None
    if t.dim() != 1 or t.numel() == 0:
        raise DataError(f"labels: expected a non-empty 1-D sequence of labels, got shape {tuple(t.shape)}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise DataError(f"labels: expected integer labels, got {t.dtype}")
    return t.long()
