"""Keyed-augmentation mixin: the epoch lives in a shared-memory tensor so DataLoader workers (persistent or not)
see ``set_epoch`` calls made in the main process before the epoch's iterator is created."""
from __future__ import annotations

import torch

from . import _keyhash as kh


class KeyedEpochMixin:
    aug_seed: int | None

    def _init_keyed(self, aug_seed: int | None) -> None:
        self.aug_seed = None if aug_seed is None else int(aug_seed)
        self._epoch = torch.zeros(1, dtype=torch.int64)
        try:
            self._epoch.share_memory_()
        except (RuntimeError, OSError):  # no usable shared memory: set_epoch reaches only workers started later
            pass

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream for keyed mode (call before iterating the epoch's DataLoader)."""
        self._epoch[0] = int(epoch)

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    def _item_generator(self, index: int, view: int = 0) -> torch.Generator | None:
        """Keyed by (aug_seed, epoch, index); member view v > 0 (KDCL/PCL) uses the seed `view_seed(aug_seed, v)`."""
        if self.aug_seed is None:
            return None
        g = torch.Generator()
        g.manual_seed(kh.item_seed(kh.view_seed(self.aug_seed, view), self.epoch, index))
        return g
