"""DataLoader construction with deterministic worker seeding, and an on-device batch loader for in-memory data."""
from __future__ import annotations

import os
import random
import signal
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, SequentialSampler

from . import _keyhash as kh
from .errors import DataError, check_int
from .samplers import ShuffleSampler
from .transforms import cifar_augment, normalize

__all__ = ["build_dataloader", "seed_worker", "DeviceBatchLoader"]


def seed_worker(worker_id: int) -> None:
    """`worker_init_fn`: seed python `random` and numpy from the worker's torch seed (the loader's seeded generator's
    base seed + worker id); leave the main process's process group and ignore SIGINT, so that only the main process
    decides when to stop (`docs/runtime.md`, signals)."""
    s = torch.initial_seed() % 2 ** 32
    random.seed(s)
    np.random.seed(s)
    if hasattr(os, "setpgid"):          # POSIX
        os.setpgid(0, 0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def build_dataloader(dataset: Dataset, *, batch_size: int, train: bool, sampler: Sampler | None = None,
                     num_workers: int = 0, seed: int = 0, drop_last: bool | None = None, pin_memory: bool = False,
                     persistent_workers: bool = False, rank: int = 0,
                     prefetch_factor: int | None = None) -> DataLoader:
    """A torch DataLoader whose randomness is a function of `seed` and `rank`: this process's `batch_size`, by default
    a `ShuffleSampler` (train) or the sequential order, `drop_last` = `train`. Results independent of worker and
    process counts come from a dataset with an `aug_seed` (keyed augmentation)."""
    check_int(batch_size, "batch_size")
    check_int(num_workers, "num_workers", 0)
    n = len(dataset)
    if n == 0:
        raise DataError("dataset: it is empty")
    if drop_last is None:
        drop_last = bool(train)
    if sampler is None:
        sampler = ShuffleSampler(n, seed=seed) if train else SequentialSampler(range(n))
    if drop_last and len(sampler) < batch_size:
        raise DataError(f"batch_size: {batch_size} is larger than the {len(sampler)} samples per epoch "
                        f"(with drop_last there would be no batch)")
    g = torch.Generator()
    g.manual_seed(kh.seed64(seed, rank, kh.TAG_WORKER))
    kwargs = {}
    if num_workers > 0:
        kwargs["persistent_workers"] = bool(persistent_workers)
        if prefetch_factor is not None:
            kwargs["prefetch_factor"] = prefetch_factor
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      drop_last=drop_last, pin_memory=pin_memory, worker_init_fn=seed_worker, generator=g,
                      **kwargs)


class DeviceBatchLoader:
    """Batches from uint8 images that live on one device (CIFAR on the GPU): no workers, no host copies.

    Per chunk of `batch_size` indices from `sampler`: gather, (train) zero-pad crop + flip keyed by
    (`view_seed(aug_seed, view)`, epoch, index), normalise to `dtype`. Yields `(x, labels, index)` on the device;
    with `views` = V > 1 (train only) `x` is a list of V views (KDCL/PCL members).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int, sampler: Sampler | Sequence,
                 train: bool, mean: Sequence[float], std: Sequence[float], aug_seed: int = 0,
                 drop_last: bool | None = None, padding: int = 4, dtype: torch.dtype = torch.float32,
                 channels_last: bool = False, views: int = 1) -> None:
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
            raise DataError("images: expected a uint8 tensor [N, C, H, W]")
        if images.shape[1] not in (1, 3) and images.shape[-1] in (1, 3):
            images = images.permute(0, 3, 1, 2).contiguous()
        labels = torch.as_tensor(labels)
        if labels.dim() != 1 or labels.numel() != images.shape[0]:
            raise DataError(f"labels: expected {images.shape[0]} labels, got shape {tuple(labels.shape)}")
        self.views = check_int(views, "views")
        check_int(batch_size, "batch_size")
        self.images = images
        self.labels = labels.to(images.device, torch.long)
        self.batch_size = batch_size
        self.sampler = sampler
        self.train = bool(train)
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.aug_seed = int(aug_seed)
        self.drop_last = self.train if drop_last is None else bool(drop_last)
        self.padding = int(padding)
        self.dtype = dtype
        self.channels_last = bool(channels_last)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        all_idx = torch.as_tensor(list(iter(self.sampler)), dtype=torch.long)
        n = all_idx.numel()
        stop = n - n % self.batch_size if self.drop_last else n
        all_idx = all_idx.to(self.images.device)
        for lo in range(0, stop, self.batch_size):
            idx = all_idx[lo:lo + self.batch_size]
            raw = self.images[idx]
            xs = [self._prepare(raw, idx, v) for v in range(self.views if self.train else 1)]
            yield (xs[0] if len(xs) == 1 else xs), self.labels[idx], idx

    def _prepare(self, raw: torch.Tensor, idx: torch.Tensor, view: int) -> torch.Tensor:
        """Augment (member view `view`) and normalise one batch."""
        x = raw
        if self.train:
            x = cifar_augment(x, index=idx, seed=kh.view_seed(self.aug_seed, view), epoch=self.epoch,
                              padding=self.padding)
        x = normalize(x, self.mean, self.std, dtype=self.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x
