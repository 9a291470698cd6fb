"""Whether DALI imports, and the one check of the DALI options (`--dali-device`, `--dali-threads`, `--dali-prefetch`,
`--hw-decoder-load`). Imports no DALI module of ours, so `reader` and `diagnosis` use it without a cycle."""
from __future__ import annotations

import functools

import torch

from ..errors import DataError, check_int


@functools.cache
def dali_import_error() -> str | None:
    """Why `nvidia.dali` does not import (None when it does)."""
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except Exception as e:  # ImportError, or a broken install (missing shared libraries)
        return f"{type(e).__name__}: {e}"
    return None


def dali_available() -> bool:
    """True when `nvidia.dali` imports (the CPU backend then works; `mixed` also needs a CUDA GPU)."""
    return dali_import_error() is None


def require_dali() -> None:
    if not dali_available():
        raise DataError(f"--dali: NVIDIA DALI does not import ({dali_import_error()}); install it with "
                        f"`pip install nvidia-dali-cuda130` (or `pip install -e '.[dali]'`) or run without --dali")


def dali_version() -> str:
    require_dali()
    import nvidia.dali
    return nvidia.dali.__version__


def _check_device(device: str) -> None:
    if device not in ("gpu", "cpu"):
        raise DataError(f"--dali-device: expected gpu or cpu, got {device!r}")
    if device == "gpu" and not torch.cuda.is_available():
        raise DataError("--dali-device gpu: CUDA is not available on this machine (use --dali-device cpu)")


def check_options(device: str | None, num_threads: int, prefetch: int, hw_decoder_load: float) -> None:
    """The one check of the DALI options (`--dali-device`, `--dali-threads`, `--dali-prefetch`, `--hw-decoder-load`);
    `device=None` means "pick from the training device"."""
    if device is not None:
        _check_device(device)
    check_int(num_threads, "--dali-threads")
    check_int(prefetch, "--dali-prefetch")
    if not 0.0 <= float(hw_decoder_load) <= 1.0:
        raise DataError(f"--hw-decoder-load: expected a fraction in [0, 1], got {hw_decoder_load!r}")


def resolve_dali_device(device: str | None, torch_device: torch.device | str | None = None) -> str:
    """`"gpu"` or `"cpu"`. `None`: gpu when the training device is CUDA (with none given: when CUDA is available).
    `"gpu"` needs CUDA and, when a training device is given, training on it."""
    if device is None:
        on_cuda = torch.device(torch_device).type == "cuda" if torch_device is not None else torch.cuda.is_available()
        return "gpu" if on_cuda else "cpu"
    _check_device(device)
    if device == "gpu" and torch_device is not None and torch.device(torch_device).type != "cuda":
        raise DataError(f"--dali-device gpu: the model trains on {torch_device}; "
                        f"use --device cuda or --dali-device cpu")
    return device
