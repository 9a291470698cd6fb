"""Deterministic synthetic images for unit tests (no files, no big memory)."""
from __future__ import annotations

import torch

from . import _keyhash as kh
from .errors import check_int
from .transforms import _pair

__all__ = ["SyntheticDataset"]


class SyntheticDataset(torch.utils.data.Dataset):
    """`num_samples` float32 images [channels, H, W], label `index % num_classes`, items (tensor, label, index): noise
    keyed by (seed, index) plus `signal` times a per-class pattern keyed by (seed, class), made on demand."""

    def __init__(self, num_samples: int, num_classes: int, image_size, seed: int = 0, *, channels: int = 3,
                 signal: float = 1.0) -> None:
        self.num_samples = check_int(num_samples, "num_samples")
        self.num_classes = check_int(num_classes, "num_classes")
        self.channels = check_int(channels, "channels")
        self.image_size = _pair(image_size, "image_size")
        self.seed = int(seed)
        self.signal = float(signal)
        self.labels = torch.arange(self.num_samples, dtype=torch.long) % self.num_classes
        self.targets = self.labels.tolist()
        self.classes = [str(c) for c in range(self.num_classes)]

    def __len__(self) -> int:
        return self.num_samples

    def _randn(self, tag: int, key: int) -> torch.Tensor:
        g = torch.Generator()
        g.manual_seed(kh.seed64(self.seed, tag, key))
        return torch.randn(self.channels, *self.image_size, generator=g)

    def __getitem__(self, index: int):
        index = int(index)
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        label = index % self.num_classes
        x = self._randn(0, index)
        if self.signal:
            x.add_(self._randn(1, label), alpha=self.signal)
        return x, label, index
