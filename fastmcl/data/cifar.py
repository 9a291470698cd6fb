"""CIFAR-100 from the standard python-pickle files, and an in-memory uint8 image dataset.

``load_cifar100`` returns uint8 images [N, 3, 32, 32] (NCHW, the files' own channel-planar layout, no copy) and
fine labels. Small enough to live on the GPU: feed them to ``DeviceBatchLoader`` (on-device crop/flip/normalise) or,
per item, to :class:`TensorImageDataset` for the DataLoader path. Both augment with the same rule
(RandomCrop(32, padding=4) zero-padded + horizontal flip), and with a seed they draw identical crops/flips per
(seed, epoch, dataset index).
"""
from __future__ import annotations

import io
import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ._epoch import KeyedEpochMixin
from .errors import DataError
from .transforms import cifar_augment, normalize

__all__ = ["CIFAR100_MEAN", "CIFAR100_STD", "load_cifar100", "find_cifar100", "TensorImageDataset"]

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
    """The folder holding ``train``/``test``: ``root`` itself or ``root/cifar-100-python``; DataError if neither."""
    root = Path(root).expanduser()
    for cand in (root, root / _FOLDER):
        if (cand / "train").is_file() and (cand / "test").is_file():
            return cand
    if not root.exists():
        raise DataError(f"CIFAR-100 folder not found: {root}")
    raise DataError(f"no CIFAR-100 pickles in {root}: expected {root}/train and {root}/test, or "
                    f"{root / _FOLDER}/train and test (the python version of CIFAR-100, cifar-100-python.tar.gz)")


def load_cifar100(root: str | Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 [N, 3, 32, 32], fine labels int64 [N]) from ``train`` or ``test`` under ``root``.

    ``root`` may be the ``cifar-100-python`` folder or its parent. DataError (naming the file) if missing/corrupt.
    """
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


def _as_nchw_uint8(images: torch.Tensor) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
        raise DataError("images: expected a uint8 tensor [N, C, H, W] or [N, H, W, C]")
    if images.shape[1] in (1, 3):
        return images
    if images.shape[-1] in (1, 3):
        return images.permute(0, 3, 1, 2)
    raise DataError(f"images: cannot tell the channel axis of shape {tuple(images.shape)} (expected 1 or 3 channels)")


class TensorImageDataset(KeyedEpochMixin, torch.utils.data.Dataset):
    """Per-item dataset over uint8 images held in memory; items are ``(float tensor [C, H, W], label, index)``.

    ``images``: uint8 [N, C, H, W] or [N, H, W, C]; ``labels``: [N] integers. ``train=True`` applies the CIFAR rule
    (random crop with ``padding`` zero-padding + horizontal flip) to each item, then normalises with mean/std.
    ``aug_seed``: if set, crops/flips are keyed by (aug_seed, epoch, index) exactly as
    ``cifar_augment(..., index=, seed=aug_seed, epoch=)`` draws them (call :meth:`set_epoch`); else the
    per-worker global RNG is used.
    """

    def __init__(self, images: torch.Tensor, labels, train: bool, mean: Sequence[float] = CIFAR100_MEAN,
                 std: Sequence[float] = CIFAR100_STD, *, padding: int = 4, aug_seed: int | None = None) -> None:
        self.images = _as_nchw_uint8(images)
        labels = torch.as_tensor(labels)
        if labels.dim() != 1 or labels.numel() != self.images.shape[0] or labels.is_floating_point():
            raise DataError(f"labels: expected {self.images.shape[0]} integer labels, got shape {tuple(labels.shape)}")
        self.labels = labels.long()
        self.targets = self.labels.tolist()
        self.train = bool(train)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        if len(self.mean) != self.images.shape[1] or len(self.std) != self.images.shape[1]:
            raise DataError(f"mean/std: expected {self.images.shape[1]} values, got {len(self.mean)}/{len(self.std)}")
        self.padding = int(padding)
        self._init_keyed(aug_seed)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int):
        index = int(index)
        x = self.images[index]
        if self.train:
            if self.aug_seed is not None:
                x = cifar_augment(x[None], index=torch.tensor([index]), seed=self.aug_seed, epoch=self.epoch,
                                  padding=self.padding)[0]
            else:
                x = cifar_augment(x[None], padding=self.padding)[0]
        return normalize(x, self.mean, self.std), int(self.targets[index]), index

