"""A per-item dataset over uint8 images in memory: the DataLoader-path twin of `DeviceBatchLoader` that tests use to
check that keyed CIFAR augmentation is the same per item as per batch."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from fastmcl.data import CIFAR100_MEAN, CIFAR100_STD, DataError, cifar_augment, normalize


class TensorImageDataset(torch.utils.data.Dataset):
    """Items `(float tensor [C, H, W], label, index)` from uint8 `images` [N, C, H, W] or [N, H, W, C]; `train=True`
    applies the CIFAR rule (zero-pad crop + flip) keyed by (`aug_seed`, epoch, index) when `aug_seed` is set."""

    def __init__(self, images: torch.Tensor, labels, train: bool, mean: Sequence[float] = CIFAR100_MEAN,
                 std: Sequence[float] = CIFAR100_STD, *, padding: int = 4, aug_seed: int | None = None) -> None:
        if images.shape[1] not in (1, 3) and images.shape[-1] in (1, 3):
            images = images.permute(0, 3, 1, 2)
        self.images = images
        labels = torch.as_tensor(labels)
        if labels.dim() != 1 or labels.numel() != images.shape[0] or labels.is_floating_point():
            raise DataError(f"labels: expected {images.shape[0]} integer labels, got shape {tuple(labels.shape)}")
        self.labels, self.train, self.mean, self.std = labels.long(), train, tuple(mean), tuple(std)
        self.padding, self.aug_seed, self.epoch = padding, aug_seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int):
        x = self.images[int(index)]
        if self.train:
            keyed = {} if self.aug_seed is None else dict(index=torch.tensor([int(index)]), seed=self.aug_seed,
                                                          epoch=self.epoch)
            x = cifar_augment(x[None], padding=self.padding, **keyed)[0]
        return normalize(x, self.mean, self.std), int(self.labels[int(index)]), int(index)
