"""DataLoader construction with deterministic worker seeding, and an on-device batch loader for in-memory data."""
from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, SequentialSampler

from . import _keyhash as kh
from .errors import DataError
from .samplers import ShuffleSampler
from .transforms import cifar_augment, normalize

__all__ = ["build_dataloader", "seed_worker", "DeviceBatchLoader"]


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn``: seed python ``random`` and numpy from the worker's torch seed (set by the DataLoader to
    base_seed + worker_id, base_seed drawn from the loader's seeded generator)."""
    s = torch.initial_seed() % 2 ** 32
    random.seed(s)
    np.random.seed(s)


def build_dataloader(dataset: Dataset, *, batch_size: int, train: bool, sampler: Sampler | None = None,
                     num_workers: int = 0, seed: int = 0, drop_last: bool | None = None, pin_memory: bool = False,
                     persistent_workers: bool = False, rank: int = 0,
                     prefetch_factor: int | None = None) -> DataLoader:
    """A torch DataLoader whose randomness is a function of ``seed`` (and ``rank``).

    ``batch_size`` is this process's batch (B / world_size under DDP with a :class:`ShardedSampler`).
    Default sampler: :class:`ShuffleSampler` (seeded, call ``loader.sampler.set_epoch(e)``) when ``train``, else
    sequential. ``drop_last`` defaults to ``train``. Workers are seeded by ``seed_worker`` and a torch.Generator
    seeded from (seed, rank), so the global-RNG transforms are reproducible; for results independent of worker and
    process counts, give the dataset an ``aug_seed`` (keyed augmentation) instead.
    ``persistent_workers`` is ignored when ``num_workers == 0``.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise DataError(f"num_workers: expected an integer >= 0, got {num_workers!r}")
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
    """Batches from uint8 images that already live on one device (CIFAR on the GPU): no workers, no host copies.

    Each batch: indices from ``sampler`` (chunks of ``batch_size``; a ``ShardedSampler`` under DDP) -> gather images
    and labels -> (train) zero-pad-4 random crop + flip keyed by (aug_seed, epoch, dataset index) -> normalise to
    ``dtype`` (optionally channels_last). Yields ``(x, labels, index)`` with ``index`` a LongTensor on the device;
    with ``views`` = V > 1 (train only) ``x`` is a list of V independently augmented views (KDCL/PCL members).
    The crops/flips equal those of ``TensorImageDataset(..., aug_seed=aug_seed)`` for the same epoch.
    ``set_epoch`` selects the epoch and forwards to the sampler.
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
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise DataError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
        if isinstance(views, bool) or not isinstance(views, int) or views < 1:
            raise DataError(f"views: expected an integer >= 1, got {views!r}")
        self.views = views
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
        """Augment (member view `view`: keyed by `view_seed(aug_seed, view)`) and normalise one batch."""
        x = raw
        if self.train:
            x = cifar_augment(x, index=idx, seed=kh.view_seed(self.aug_seed, view), epoch=self.epoch,
                              padding=self.padding)
        x = normalize(x, self.mean, self.std, dtype=self.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x
