"""Contrast indices for the memory-bank setting (docs/official_mcl.md §1.3), vectorised on the device.

The official ImageNet code draws, per sample in Python, `[own index, pos_k same-class indices]` and `neg_k` indices
of other classes; `NegativeSampler` draws the same rows for a whole batch with a few int64 tensor ops.
"""
from __future__ import annotations

import torch

from . import _keyhash as kh
from .errors import DataError, check_int, check_labels

__all__ = ["NegativeSampler"]


class NegativeSampler:
    """`sampler(index, step)` -> LongTensor [B, 1 + pos_k + neg_k] of dataset indices, on `index.device`.

    Row b is `[index[b], pos_k same-class positives (never index[b], without replacement), neg_k other-class negatives
    (with replacement, uniform over the samples)]`, a pure function of (seed, step, index, column): the same on every
    device, batch split and process count (docs/data.md "Keyed randomness"). Small classes and range checks: docs/data.md
    "Negatives".
    """

    def __init__(self, labels: torch.Tensor, pos_k: int = 1, neg_k: int = 8192, seed: int = 0, *,
                 strict: bool = False) -> None:
        labels = check_labels(labels)
        n = labels.numel()
        if n >= 2 ** 31:
            raise DataError(f"labels: at most 2**31 - 1 samples are supported, got {n}")
        self.pos_k, self.neg_k = check_int(pos_k, "pos_k", 0), check_int(neg_k, "neg_k", 0)
        self.seed = int(seed)
        self.strict = bool(strict)
        self.num_samples = n
        device = labels.device
        classes, cls = torch.unique(labels, return_inverse=True)
        if classes.numel() < 2:
            raise DataError(f"labels: all {n} samples have one class ({int(classes[0])}); "
                            f"negatives need at least two classes")
        self.num_classes = int(classes.numel())
        count = torch.bincount(cls, minlength=self.num_classes)
        order = torch.argsort(cls, stable=True)
        start = torch.cumsum(count, 0) - count
        pos_in_class = torch.empty(n, dtype=torch.long, device=device)
        pos_in_class[order] = torch.arange(n, device=device) - start[cls[order]]
        self._tables = {"cls": cls, "count": count, "start": start, "order": order, "pos": pos_in_class}
        self._cache: dict[torch.device, dict[str, torch.Tensor]] = {}

    @property
    def device(self) -> torch.device:
        return self._tables["cls"].device

    @property
    def num_columns(self) -> int:
        return 1 + self.pos_k + self.neg_k

    @property
    def order(self) -> torch.Tensor:
        """Dataset indices sorted by class (stable)."""
        return self._tables["order"]

    @property
    def start(self) -> torch.Tensor:
        return self._tables["start"]

    @property
    def count(self) -> torch.Tensor:
        return self._tables["count"]

    def to(self, device) -> "NegativeSampler":
        """Move the tables to `device` (in place) and return self."""
        device = torch.device(device)
        self._tables = {k: v.to(device) for k, v in self._tables.items()}
        self._cache = {}
        return self

    def _tables_on(self, device: torch.device) -> dict[str, torch.Tensor]:
        if device == self.device or (device.type == self.device.type and device.index is None):
            return self._tables
        if device not in self._cache:
            self._cache[device] = {k: v.to(device) for k, v in self._tables.items()}
        return self._cache[device]

    def _check(self, index) -> None:
        if not isinstance(index, torch.Tensor):
            raise DataError(f"index: expected a torch.long tensor, got {type(index).__name__}")
        if index.dtype != torch.int64:
            raise DataError(f"index: expected dtype torch.long (int64), got {index.dtype}")
        if index.dim() != 1:
            raise DataError(f"index: expected a 1-D tensor [B], got shape {tuple(index.shape)}")
        if index.numel() == 0:
            return
        ok = (index >= 0) & (index < self.num_samples)
        if index.device.type == "cpu" or self.strict:
            if not bool(ok.all()):
                bad = int(index[~ok][0])
                raise DataError(f"index: value {bad} out of range [0, {self.num_samples})")
        else:
            torch._assert_async(ok.all(), f"index: values out of range [0, {self.num_samples})")

    def __call__(self, index: torch.Tensor, step: int) -> torch.Tensor:
        self._check(index)
        step = int(step)
        t = self._tables_on(index.device)
        dev = index.device
        b = index.numel()
        idx = index.clamp(0, self.num_samples - 1) if dev.type != "cpu" else index
        c = t["cls"][idx]
        n_c = t["count"][c]
        s_c = t["start"][c]
        cols = [index[:, None]]

        if self.pos_k > 0:
            cols.append(self._positives(idx, n_c, s_c, t, step))
        if self.neg_k > 0:
            row = kh.row_hash(idx[:, None], kh.stream(self.seed, step, kh.TAG_NEGATIVE))        # [B, 1]
            h = kh.cell(row, kh.column_codes(self.neg_k, dev)[None, :])                         # [B, neg_k]
            r = kh.uniform_int(h, (self.num_samples - n_c)[:, None])
            r = r + n_c[:, None] * (r >= s_c[:, None])
            cols.append(t["order"][r])
        out = torch.cat(cols, dim=1) if len(cols) > 1 else cols[0]
        return out.reshape(b, self.num_columns)

    def _positives(self, idx, n_c, s_c, t, step: int) -> torch.Tensor:
        """[B, pos_k] same-class indices ≠ own, without replacement (sequential draws from the shrinking set)."""
        dev = idx.device
        own = t["pos"][idx]                              # own slot within the class block
        n_other = n_c - 1
        norep = n_other >= self.pos_k
        row = kh.row_hash(idx[:, None], kh.stream(self.seed, step, kh.TAG_POSITIVE))
        h = kh.cell(row, kh.column_codes(self.pos_k, dev)[None, :])                             # [B, pos_k]
        big = torch.full_like(own, 2 ** 40)
        taken = own[:, None]                             # slots to skip, sorted ascending per row
        picks = []
        for j in range(self.pos_k):
            upper = torch.where(norep, n_other - j, n_other).clamp_min(1)
            r = kh.uniform_int(h[:, j], upper)
            for k in range(taken.shape[1]):              # r -> the r-th slot not yet taken
                r = r + (r >= taken[:, k]).long()
            picks.append(r)
            if j + 1 < self.pos_k:
                new = torch.where(norep, r, big)         # with replacement: only the own slot is ever skipped
                taken = torch.sort(torch.cat([taken, new[:, None]], dim=1), dim=1).values
        slots = torch.stack(picks, dim=1)
        slots = torch.where((n_c == 1)[:, None], own[:, None], slots)   # single-sample class: repeat own index
        return t["order"][s_c[:, None] + slots]
