"""CIFAR-100 from the standard python-pickle files, as uint8 tensors small enough to live on the GPU."""
from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import torch

from .errors import DataError

__all__ = ["CIFAR100_MEAN", "CIFAR100_STD", "load_cifar100", "find_cifar100"]

CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
_FOLDER = "cifar-100-python"

# The pickles hold numpy arrays and python lists/dicts only: refuse anything else instead of executing it.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"), ("builtins", "bytearray"),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def find_cifar100(root: str | Path) -> Path:
    """The folder holding `train`/`test`: `root` itself or `root/cifar-100-python`; DataError if neither."""
    root = Path(root).expanduser()
    for cand in (root, root / _FOLDER):
        if (cand / "train").is_file() and (cand / "test").is_file():
            return cand
    if not root.exists():
        raise DataError(f"CIFAR-100 folder not found: {root}")
    raise DataError(f"no CIFAR-100 pickles in {root}: expected {root}/train and {root}/test, or "
                    f"{root / _FOLDER}/train and test (the python version of CIFAR-100, cifar-100-python.tar.gz)")


def load_cifar100(root: str | Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 [N, 3, 32, 32] in the files' own layout, fine labels int64 [N]) from `train` or `test` under
    `root` (the `cifar-100-python` folder or its parent); DataError naming the file if it is missing or corrupt."""
    path = find_cifar100(root) / ("train" if train else "test")
    try:
        with open(path, "rb") as f:
            entry = _SafeUnpickler(io.BufferedReader(f), encoding="bytes").load()
    except OSError as e:
        raise DataError(f"cannot read CIFAR-100 file {path}: {e.strerror or e}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError) as e:
        raise DataError(f"corrupt CIFAR-100 file {path}: {e}") from None
    if not isinstance(entry, dict):
        raise DataError(f"corrupt CIFAR-100 file {path}: expected a dict, got {type(entry).__name__}")
    data = entry.get(b"data", entry.get("data"))
    labels = entry.get(b"fine_labels", entry.get("fine_labels"))
    if data is None or labels is None:
        raise DataError(f"corrupt CIFAR-100 file {path}: missing b'data' or b'fine_labels'")
    data = np.asarray(data)
    labels = np.asarray(labels, dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise DataError(f"corrupt CIFAR-100 file {path}: data {data.dtype} {data.shape}, "
                        f"{len(labels)} labels (expected uint8 [N, 3072] and N labels)")
    if len(labels) and (labels.min() < 0 or labels.max() > 99):
        raise DataError(f"corrupt CIFAR-100 file {path}: fine labels outside 0..99")
    images = torch.from_numpy(np.ascontiguousarray(data).reshape(-1, 3, 32, 32))
    return images, torch.from_numpy(labels)
