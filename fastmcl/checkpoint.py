"""Checkpoints that a kill never tears, loaded without running code from the file, and the RNG state they carry.

A checkpoint is a `dict` of tensors, numbers, strings, `None` and lists/tuples/dicts of those (state dicts are; store
configs with `dataclasses.asdict`), so `torch.load(..., weights_only=True)` reads it back. One writer per target path
(rank 0 alone checkpoints).
"""
from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

LAST = "last.pt"  # `RUN/checkpoints/last.pt`: what `--resume RUN` continues from
BEST = "best.pt"  # `RUN/checkpoints/best.pt`: the best deployed top-1 so far (what evaluate and export read)


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or not a checkpoint; the message is one line naming the path."""


def save_checkpoint(path: str | Path, state: dict) -> None:
    """Write `state` to `path` atomically (parents are created): a temp file beside it, fsynced, then `os.replace`.

    A kill at any instant leaves the previous file or the new one, and at worst the temp file, which the next save of
    the same target overwrites.
    """
    if not isinstance(state, dict):
        raise TypeError(f"checkpoint state must be a dict, got {type(state).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the rename can expose it
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict:
    """Load a checkpoint with `weights_only=True`; `CheckpointError` if it is missing, torn, corrupt or not a dict."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # RuntimeError, EOFError, UnpicklingError, ... depending on the damage
        raise CheckpointError(f"cannot load checkpoint {path}: {_reason(e)}") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"cannot load checkpoint {path}: holds a {type(state).__name__}, expected a dict")
    return state


def _reason(e: BaseException) -> str:
    """The sentence of torch's multi-paragraph load error that says what is wrong."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # torch makes some words bold
    lines = [ln.strip() for ln in text.split("WeightsUnpickler error:")[-1].splitlines() if ln.strip()]
    if not lines:
        return f"file is empty or truncated ({type(e).__name__})"
    if lines[0].startswith("Unsupported global"):
        return lines[0].split(" was not an allowed global")[0] + " (checkpoints hold only tensors and plain containers)"
    return f"corrupt or not written by torch.save ({type(e).__name__}: {lines[0].split('. ')[0][:200]})"


def find_checkpoint(run_or_file: str | Path, *, best: bool = False) -> Path:
    """A checkpoint file as given, or a run folder's `checkpoints/best.pt` (with `best`, when there is one), else its
    `checkpoints/last.pt` (what `--resume` continues from)."""
    path = Path(run_or_file)
    if path.is_file():
        return path
    names = (BEST, LAST) if best else (LAST,)
    for name in names:
        if (path / "checkpoints" / name).is_file():
            return path / "checkpoints" / name
    if not path.exists():
        raise CheckpointError(f"no checkpoint in {path}: no such run folder or checkpoint file")
    raise CheckpointError(f"no checkpoint in {path}: no {' or '.join('checkpoints/' + n for n in names)} in this "
                          f"folder (expected a checkpoint file or a run folder)")


def run_dir_of(checkpoint: str | Path) -> Path:
    """The run folder a checkpoint belongs to: `RUN` for `RUN/checkpoints/*.pt`, else the file's own folder."""
    folder = Path(checkpoint).parent
    return folder.parent if folder.name == "checkpoints" else folder


def capture_rng_state() -> dict:
    """Snapshot python `random`, global numpy, torch CPU and every CUDA generator, loadable under `weights_only`.

    The Mersenne-Twister states of `random` and numpy (625 words below 2**32) become int64 tensors.
    """
    py_version, py_internal, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state(legacy=True)
    return {
        "python": {"version": int(py_version), "state": torch.tensor(py_internal, dtype=torch.int64),
                   "gauss_next": None if py_gauss is None else float(py_gauss)},
        "numpy": {"bit_generator": str(np_name), "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict) -> None:
    """Restore a `capture_rng_state` snapshot; CUDA states for as many devices as both the snapshot and this machine
    have (a GPU checkpoint resumes on a CPU-only machine and vice versa)."""
    py, npst = state["python"], state["numpy"]
    random.setstate((int(py["version"]), tuple(py["state"].tolist()), py["gauss_next"]))
    np.random.set_state((str(npst["bit_generator"]), npst["keys"].cpu().numpy().astype(np.uint32), int(npst["pos"]),
                         int(npst["has_gauss"]), float(npst["cached_gaussian"])))
    # set_rng_state wants a CPU uint8 tensor; map_location may have moved it to a GPU
    torch.set_rng_state(state["torch"].to(device="cpu", dtype=torch.uint8))
    if torch.cuda.is_available():
        for device, s in enumerate(state.get("cuda", [])[:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s.to(device="cpu", dtype=torch.uint8), device)
