"""Crash-safe checkpoints and RNG state capture.

A checkpoint is a plain ``dict`` of tensors and Python containers, written atomically and always read back with
``torch.load(..., weights_only=True)`` so that loading a checkpoint never executes code from the file. Everything a
caller puts into a checkpoint must therefore be tensors, numbers, strings, ``None`` and lists/tuples/dicts of those
(state dicts of modules and optimizers are; store configs with ``dataclasses.asdict``).

Atomicity: :func:`save_checkpoint` writes the whole file under a unique temporary name in the target's directory,
fsyncs it, renames it onto the target (``os.replace`` is atomic on POSIX within a filesystem) and fsyncs the directory
so the rename itself is durable. A process killed at any instant leaves the target either absent (first save), the
previous complete version or the new complete version, plus at worst a stray temp file, which the next save removes.

One writer per target path (rank 0 alone checkpoints); independent targets in one directory never disturb each other.

This module imports nothing else of fastmcl.
"""
from __future__ import annotations

import errno
import os
import random
import re
import secrets
import socket
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "find_checkpoint",
    "capture_rng_state",
    "restore_rng_state",
]

# Temp files are named ".<target name>.<host>.<pid>.<token>.tmp": hidden, tied to their target, and carrying enough to
# tell whether their writer is dead (same host, pid no longer running) and the file can be removed.
_TMP_SUFFIX = ".tmp"
_HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"
_in_flight: set[str] = set()  # temp files this process is writing right now (never clean those up)
_in_flight_lock = threading.Lock()


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or not a checkpoint; the message is one line naming the path."""


# --------------------------------------------------------------------------------------------------------- save


def save_checkpoint(path: str | Path, state: dict) -> None:
    """Atomically write ``state`` to ``path`` (parents are created).

    Write to a unique temp file beside ``path``, flush + fsync it, ``os.replace`` it onto ``path``, fsync the
    directory. Stray temp files of dead writers of the same target are removed first.
    """
    if not isinstance(state, dict):
        raise TypeError(f"checkpoint state must be a dict, got {type(state).__name__}")
    path = Path(path)
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)

    tmp = directory / f".{path.name}.{_HOST}.{os.getpid()}.{secrets.token_hex(4)}{_TMP_SUFFIX}"
    with _in_flight_lock:
        _in_flight.add(tmp.name)
    try:
        # O_EXCL: the name is ours alone; mode 0o666 lets the umask decide permissions like any ordinary file
        # (mkstemp would leave the final checkpoint readable by its owner only).
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())  # data on disk before the rename can expose it
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    finally:
        with _in_flight_lock:
            _in_flight.discard(tmp.name)
    _fsync_dir(directory)  # make the rename itself survive a power loss


def _remove_stale_temps(path: Path) -> None:
    """Delete temp files left by killed writers of ``path`` (same host, writer pid gone, or our own pid reused)."""
    prefix = f".{path.name}."
    try:
        entries = list(os.scandir(path.parent))
    except FileNotFoundError:
        return
    for entry in entries:
        name = entry.name
        if not (name.startswith(prefix) and name.endswith(_TMP_SUFFIX)):
            continue
        parts = name[len(prefix) : -len(_TMP_SUFFIX)].rsplit(".", 2)  # host, pid, token (host may hold no dots)
        if len(parts) != 3 or parts[0] != _HOST or not parts[1].isdigit():
            continue  # another host's writer (shared filesystem) or not ours: leave it alone, it is ignored anyway
        pid = int(parts[1])
        with _in_flight_lock:
            if name in _in_flight:
                continue
        # Our own pid can only be on a leftover if a killed earlier process had the same pid (containers restart
        # with the same pids): every failed save in this process removes its own temp file.
        if pid != os.getpid() and _pid_alive(pid):
            continue
        try:
            os.unlink(entry.path)
        except FileNotFoundError:
            pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    except OSError:
        return True  # cannot tell (e.g. platform without signal 0): keep the file, it is ignored anyway
    return True


def _fsync_dir(directory: Path) -> None:
    if os.name != "posix":
        return  # directories cannot be opened for fsync on Windows; os.replace is still atomic there
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        # Some filesystems (network, FUSE) do not support fsync on a directory; the rename is still atomic.
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------------------- load


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` with ``weights_only=True``.

    Raises :class:`CheckpointError` (one line, naming ``path``) if the file is missing, truncated, corrupt, holds
    objects that ``weights_only`` refuses, or is not a dict.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError, ... depending on the damage
        raise CheckpointError(f"cannot load checkpoint {path}: {_one_line_reason(e)}") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"cannot load checkpoint {path}: holds a {type(state).__name__}, expected a dict")
    return state


def _one_line_reason(e: BaseException) -> str:
    """Boil torch's multi-paragraph load errors down to the sentence that says what is wrong."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # torch decorates some messages with ANSI bold
    marker = "WeightsUnpickler error:"
    if marker in text:  # weights_only refusal: the useful part follows the marker, after a page of advice
        detail = next((ln.strip() for ln in text.split(marker, 1)[1].splitlines() if ln.strip()), "")
        if detail.startswith("Unsupported global"):
            detail = detail.split(" was not an allowed global", 1)[0]
            return f"{detail} (checkpoints may hold only tensors and plain Python containers)"
        return f"not a valid checkpoint (corrupt or not written by torch.save): {detail}"
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    if isinstance(e, EOFError) or not first:
        return f"file is empty or truncated ({type(e).__name__})"
    if "central directory" in first or "zip archive" in first:
        return "file is truncated or corrupt (incomplete zip archive)"
    return f"{type(e).__name__}: {first[:200]}"


def find_checkpoint(run_dir: str | Path) -> Path:
    """Return ``run_dir/checkpoints/last.pt`` for ``--resume RUN``; :class:`CheckpointError` if there is none."""
    run_dir = Path(run_dir)
    candidate = run_dir / "checkpoints" / "last.pt"
    if not run_dir.is_dir():
        raise CheckpointError(f"no checkpoint in {run_dir}: run directory does not exist")
    if not candidate.is_file():
        raise CheckpointError(f"no checkpoint in {run_dir} (expected {candidate})")
    return candidate


# ---------------------------------------------------------------------------------------------------------- RNG


def capture_rng_state() -> dict:
    """Snapshot the python ``random``, global numpy, torch CPU and every CUDA device generator.

    Only tensors, ints, floats, strings, None, lists and dicts, so the result loads under ``weights_only=True``:
    the 625-word Mersenne-Twister states of ``random`` and numpy become int64 tensors.
    """
    py_version, py_internal, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {
            "version": int(py_version),
            "state": torch.tensor(py_internal, dtype=torch.int64),  # 624 uint32 words + position, all < 2**32
            "gauss_next": None if py_gauss is None else float(py_gauss),
        },
        "numpy": {
            "bit_generator": str(np_name),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def restore_rng_state(state: dict) -> None:
    """Restore a snapshot from :func:`capture_rng_state` (also after a ``weights_only`` round trip).

    CUDA states are restored for as many devices as both the snapshot and this machine have, so a GPU checkpoint
    resumes on a CPU-only machine (CUDA states ignored) and vice versa (CUDA generators keep their seeds).
    """
    py = state["python"]
    random.setstate(
        (int(py["version"]), tuple(int(v) for v in _as_list(py["state"])), py["gauss_next"])
    )
    npst = state["numpy"]
    np.random.set_state(
        (
            str(npst["bit_generator"]),
            np.asarray(_as_list(npst["keys"]), dtype=np.uint32),
            int(npst["pos"]),
            int(npst["has_gauss"]),
            float(npst["cached_gaussian"]),
        )
    )
    # set_rng_state wants a CPU uint8 tensor; map_location may have moved it to a GPU
    torch.set_rng_state(state["torch"].to(device="cpu", dtype=torch.uint8))
    cuda_states = state.get("cuda") or []
    if cuda_states and torch.cuda.is_available():
        for device, s in enumerate(cuda_states[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s.to(device="cpu", dtype=torch.uint8), device)


def _as_list(values: Any) -> list:
    return values.tolist() if isinstance(values, (torch.Tensor, np.ndarray)) else list(values)
