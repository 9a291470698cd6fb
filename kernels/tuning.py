"""A timed choice among an op's launch configurations, made once per GPU and shapes and kept in a JSON file: the
GPU-side half of a configuration space whose CPU-side half is the performance model's ranking
(docs/kernels/bank.md, "Configuration space").

`FASTMCL_TUNING`: "auto" (default) times on a CUDA device unless `torch.use_deterministic_algorithms` is on (a run
that must repeat itself keeps the model's first candidate) or a CUDA graph is being captured; "off" never times;
"always" times on any device (the Triton interpreter included: for tests). `FASTMCL_TUNING_CACHE`: the file
(default `~/.cache/fastmcl/tuning.json`).
"""
from __future__ import annotations

import json
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

__all__ = ["cache_path", "timed_choice", "wants_timing"]

_MODES = ("auto", "off", "always")
_memory: dict[str, int] = {}          # this process's choices (the file's, once read, and its own)
_read_from: Path | None = None


def cache_path() -> Path:
    return Path(os.environ.get("FASTMCL_TUNING_CACHE") or Path.home() / ".cache" / "fastmcl" / "tuning.json")


def wants_timing(device: torch.device) -> bool:
    """Whether a launch on `device` chooses its configuration by timing (`FASTMCL_TUNING`, module docstring)."""
    mode = os.environ.get("FASTMCL_TUNING", "auto")
    if mode not in _MODES:
        raise ValueError(f"FASTMCL_TUNING={mode!r}: expected one of {', '.join(_MODES)}")
    if mode != "auto":
        return mode == "always"
    return (device.type == "cuda" and not torch.are_deterministic_algorithms_enabled()
            and not torch.cuda.is_current_stream_capturing())


def timed_choice(key: str, candidates: Sequence, run: Callable[[object], None], device: torch.device) -> int:
    """The index of the fastest of `candidates` for `key` (name the GPU, the shapes and the candidates in it):
    read from this process's memory or the cache file, else timed now, `run(candidate)` issuing the work once,
    and saved."""
    _read_cache()
    chosen = _memory.get(key)
    if chosen is not None and 0 <= chosen < len(candidates):
        return chosen
    times = [_time_ms(lambda c=c: run(c), device) for c in candidates]
    chosen = min(range(len(candidates)), key=times.__getitem__)
    _memory[key] = chosen
    _write_cache(key, chosen)
    return chosen


def _time_ms(fn: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))
    fn()                                  # the interpreter: one warm run, then the best of two
    best = float("inf")
    for _ in range(2):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def _read_cache() -> None:
    global _read_from
    path = cache_path()
    if _read_from == path:
        return
    _read_from = path
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return                            # none yet, or unreadable: time again
    if isinstance(saved, dict):
        _memory.update({k: v for k, v in saved.items() if isinstance(v, int) and k not in _memory})


def _write_cache(key: str, chosen: int) -> None:
    """Merge the choice into the file (re-read first: other processes may have added theirs), written atomically."""
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            saved = json.loads(path.read_text())
            saved = saved if isinstance(saved, dict) else {}
        except (OSError, ValueError):
            saved = {}
        saved[key] = chosen
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(saved, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as e:                  # e.g. a read-only home: the choice stays in this process
        warnings.warn(f"fastmcl: kernel configuration not saved to {path}: {e}", stacklevel=2)
