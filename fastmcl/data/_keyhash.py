"""Counter-based hashing in int64 torch ops and identical python-int arithmetic (docs/data.md "Keyed randomness").

Randomness that must not depend on the number of processes is a pure function of a key such as (seed, step, dataset
index, column): `uniform_int(cell(row_hash(index, stream(seed, step, tag)), column), n)`, on 32-bit values held in
int64 that never overflow.
"""
from __future__ import annotations

import torch

M32 = 0xFFFFFFFF
_IV = 0x6A09E667
_COL_OFFSET = 0x9E3779B9

# Stream tags: one independent stream per use.
TAG_POSITIVE = 1
TAG_NEGATIVE = 2
TAG_AUGMENT = 3
TAG_ITEM = 4
TAG_MPERCLASS = 5
TAG_SHUFFLE = 6
TAG_WORKER = 7
TAG_VIEW = 8


def _mul32(x, c: int):
    """(x * c) mod 2**32 for 0 <= x < 2**32 without int64 overflow (c >= 2**31 multiplies as c - 2**32)."""
    c = c & M32
    if c >= 2 ** 31:
        c -= 2 ** 32
    return (x * c) & M32


def mix32(x):
    """Chris Wellons' lowbias32 (a bijection on 32-bit words) on a python int or an int64 tensor in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    x = x ^ (x >> 16)
    return x


def stream(*words: int) -> tuple[int, int]:
    """Fold python-int words (each taken modulo 2**64, so negative values are fine) into two 32-bit state words."""
    h = _IV
    for w in words:
        w = int(w) & 0xFFFFFFFFFFFFFFFF
        h = mix32(h ^ (w & M32))
        h = mix32(h ^ (w >> 32))
    return mix32(h ^ 0x85EBCA6B), mix32(h ^ 0xC2B2AE35)


def row_hash(index, s: tuple[int, int]):
    """Per-row hash of a dataset index (python int or int64 tensor, 0 <= index < 2**32) under stream `s`."""
    return mix32(mix32((index + s[0]) & M32) ^ s[1])


def column_codes(k: int, device=None) -> torch.Tensor:
    """Fixed code per column 0..k-1 (int64, [k])."""
    return mix32((torch.arange(k, dtype=torch.int64, device=device) + _COL_OFFSET) & M32)


def column_code(c: int) -> int:
    return mix32((c + _COL_OFFSET) & M32)


def cell(row, codes):
    """Hash of (row, column): `row` [..., 1] (or int) and `codes` from `column_codes` (or an int)."""
    return mix32(row ^ codes)


def uniform_int(h, n):
    """Map 32-bit hashes `h` to [0, n) by multiply-high (1 <= n < 2**31; relative bias <= n / 2**32)."""
    return (h * n) >> 32


def seed64(*words: int) -> int:
    """A 63-bit seed for a torch.Generator, derived from python-int words."""
    s = stream(*words)
    return ((s[0] << 31) ^ s[1]) & 0x7FFFFFFFFFFFFFFF


def item_seed(seed: int, epoch: int, index: int) -> int:
    """63-bit generator seed for one dataset item, keyed by (seed, epoch, index) (the PIL keyed-augmentation path)."""
    r = row_hash(int(index) & M32, stream(seed, epoch, TAG_ITEM))
    hi = cell(r, column_code(0))
    lo = cell(r, column_code(1))
    return ((hi << 31) ^ lo) & 0x7FFFFFFFFFFFFFFF


def view_seed(seed: int, view: int) -> int:
    """Augmentation seed of member view `view` (KDCL/PCL per-member views): view 0 keeps `seed`, so a one-view run
    augments exactly as before; every other view gets an independent 31-bit seed keyed by (seed, view)."""
    if view == 0:
        return int(seed)
    return seed64(seed, view, TAG_VIEW) & 0x7FFFFFFF
