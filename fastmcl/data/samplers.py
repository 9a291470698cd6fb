"""Samplers whose output depends only on (seed, epoch), never on the number of processes.

Every rank builds the same global sampler and `ShardedSampler` hands rank r the contiguous slice [r*B/W, (r+1)*B/W)
of every global batch of B indices, so 1 process with batch B and W processes with B/W see the same global batches.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

from . import _keyhash as kh
from .errors import DataError, check_int, check_labels

__all__ = ["MPerClassSampler", "ShuffleSampler", "ShardedSampler"]


def _epoch_generator(seed: int, epoch: int, tag: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(kh.seed64(seed, epoch, tag))
    return g


class MPerClassSampler(Sampler[int]):
    """Class-balanced global batches with pytorch-metric-learning's `MPerClassSampler` semantics (the official CIFAR
    code, m=2): every chunk of `batch_size` indices holds `batch_size // m` distinct random classes with `m` samples
    each (without replacement within a class, with replacement for a class smaller than `m`); batches are independent
    draws. `len(self)`: `length` (default `len(labels)`) rounded down to a multiple of `batch_size`."""

    def __init__(self, labels, m: int, batch_size: int, *, seed: int = 0, length: int | None = None) -> None:
        labels = check_labels(labels).detach().cpu()
        self.m = check_int(m, "m")
        self.batch_size = check_int(batch_size, "batch_size")
        if self.batch_size % self.m:
            raise DataError(f"batch_size: must be a multiple of m={self.m}, got {self.batch_size}")
        classes, inverse = torch.unique(labels, return_inverse=True)
        self.num_classes = int(classes.numel())
        self.classes_per_batch = self.batch_size // self.m
        if self.classes_per_batch > self.num_classes:
            b, c, m = self.batch_size, self.num_classes, self.m
            fits = next(k for k in range(-(-b // c), b + 1) if b % k == 0)   # the smallest m that divides b and fits
            raise DataError(f"--batch-size {b} / --m-per-class {m} = {self.classes_per_batch} classes per batch, but "
                            f"the data has only {c} classes: use --batch-size {c * m} (or a smaller multiple of {m}) "
                            f"or --m-per-class {fits}")
        self.seed = int(seed)
        self.epoch = 0
        total = len(labels) if length is None else check_int(length, "length")
        self.length = total // self.batch_size * self.batch_size
        if self.length == 0:
            raise DataError(f"length: {total} indices per epoch is fewer than one batch of {self.batch_size}")
        self._counts = torch.bincount(inverse, minlength=self.num_classes)
        self._order = torch.argsort(inverse, stable=True)
        self._start = torch.cumsum(self._counts, 0) - self._counts

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def batches(self) -> torch.Tensor:
        """This epoch's global batches as a LongTensor [len // batch_size, batch_size] of dataset indices."""
        g = _epoch_generator(self.seed, self.epoch, kh.TAG_MPERCLASS)
        nb, cpb, m = self.length // self.batch_size, self.classes_per_batch, self.m
        cls = torch.rand(nb, self.num_classes, generator=g).argsort(dim=1)[:, :cpb].reshape(-1)   # [P]
        n = self._counts[cls]
        norep = n >= m
        picks = []
        taken = torch.empty(cls.numel(), 0, dtype=torch.long)          # sorted slots already drawn (no-replacement)
        for j in range(m):
            upper = torch.where(norep, n - j, n)
            r = (torch.rand(cls.numel(), generator=g, dtype=torch.float64) * upper).long()
            r = torch.minimum(r, upper - 1)
            for k in range(taken.shape[1]):                             # map r to the r-th untaken slot
                r = r + (norep & (r >= taken[:, k])).long()
            picks.append(r)
            taken = torch.sort(torch.cat([taken, r[:, None]], dim=1), dim=1).values
        slots = torch.stack(picks, dim=1)                                # [P, m]
        idx = self._order[self._start[cls][:, None] + slots]
        return idx.reshape(nb, self.batch_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.batches().reshape(-1).tolist())


class ShuffleSampler(Sampler[int]):
    """A permutation of `range(num_samples)` that depends only on (seed, epoch)."""

    def __init__(self, num_samples: int, *, seed: int = 0) -> None:
        self.num_samples = check_int(num_samples, "num_samples")
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        g = _epoch_generator(self.seed, self.epoch, kh.TAG_SHUFFLE)
        return iter(torch.randperm(self.num_samples, generator=g).tolist())


class ShardedSampler(Sampler[int]):
    """Rank `rank`'s contiguous slice of every global batch of `batch_size` = B indices (default
    `sampler.batch_size`); the ranks' batches concatenated in rank order are the global batch. A trailing partial
    global batch is dropped with `drop_last` (every rank steps alike), else split into near-equal contiguous parts
    (the first ranks get one more), so evaluation covers every index once."""

    def __init__(self, sampler: Sampler | Sequence[int], rank: int, world_size: int, *,
                 batch_size: int | None = None, drop_last: bool = True) -> None:
        self.world_size = check_int(world_size, "world_size")
        self.rank = check_int(rank, "rank", 0)
        if self.rank >= self.world_size:
            raise DataError(f"rank: must be < world_size={self.world_size}, got {self.rank}")
        if batch_size is None:
            batch_size = getattr(sampler, "batch_size", None)
            if batch_size is None:
                raise DataError("batch_size: give the global batch size (the wrapped sampler has no batch_size)")
        self.batch_size = check_int(batch_size, "batch_size")
        if self.batch_size % self.world_size:
            raise DataError(f"batch_size: global batch {self.batch_size} is not divisible by "
                            f"world_size={self.world_size}")
        self.per_rank = self.batch_size // self.world_size
        self.sampler = sampler
        self.drop_last = bool(drop_last)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def _tail(self, r: int) -> tuple[int, int]:
        base, extra = divmod(r, self.world_size)
        lo = self.rank * base + min(self.rank, extra)
        return lo, lo + base + (1 if self.rank < extra else 0)

    def __len__(self) -> int:
        total = len(self.sampler)
        full, r = divmod(total, self.batch_size)
        n = full * self.per_rank
        if r and not self.drop_last:
            lo, hi = self._tail(r)
            n += hi - lo
        return n

    def __iter__(self) -> Iterator[int]:
        idx = list(iter(self.sampler))
        full, r = divmod(len(idx), self.batch_size)
        out: list[int] = []
        a = self.rank * self.per_rank
        for k in range(full):
            base = k * self.batch_size + a
            out.extend(idx[base:base + self.per_rank])
        if r and not self.drop_last:
            lo, hi = self._tail(r)
            out.extend(idx[full * self.batch_size + lo:full * self.batch_size + hi])
        return iter(out)
