"""Input validation for the loss API: one clear ValueError naming the argument.

Every backend checks that `idx` lies inside the bank, which synchronises a GPU; only a compiled graph skips it.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor


def check_embedding_pair(e_a: Tensor, e_b: Tensor) -> None:
    for name, e in (("e_a", e_a), ("e_b", e_b)):
        if not isinstance(e, Tensor) or e.dim() != 2 or not e.is_floating_point():
            raise ValueError(f"{name} must be a 2-D floating tensor [B, D], got {_describe(e)}")
        if e.shape[0] < 1 or e.shape[1] < 1:
            raise ValueError(f"{name} must have B >= 1 rows and D >= 1 columns, got shape {tuple(e.shape)}")
    if e_a.shape != e_b.shape:
        raise ValueError(f"e_a and e_b must have the same shape [B, D], got {tuple(e_a.shape)} and {tuple(e_b.shape)}")
    if e_a.device != e_b.device:
        raise ValueError(f"e_a and e_b must be on the same device, got {e_a.device} and {e_b.device}")


def check_embedding_groups(embeddings: list[list[Tensor]], name: str = "embeddings") -> tuple[int, int]:
    """embeddings[i][s]: [B, D] per network i and stage s; returns (B, D)."""
    if not embeddings or not all(isinstance(group, (list, tuple)) and group for group in embeddings):
        raise ValueError(f"{name} must be a non-empty list (per network) of non-empty lists (per stage) of tensors")
    first = embeddings[0][0]
    for i, group in enumerate(embeddings):
        for s, e in enumerate(group):
            if not isinstance(e, Tensor) or e.dim() != 2 or not e.is_floating_point():
                raise ValueError(f"{name}[{i}][{s}] must be a 2-D floating tensor [B, D], got {_describe(e)}")
            if e.shape != first.shape:
                raise ValueError(f"{name}[{i}][{s}] has shape {tuple(e.shape)}, expected {tuple(first.shape)} "
                                 f"like {name}[0][0]")
    return first.shape[0], first.shape[1]


def check_labels(labels: Tensor, batch: int, device: torch.device) -> None:
    if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.dtype not in _INT_DTYPES:
        raise ValueError(f"labels must be a 1-D integer tensor [B], got {_describe(labels)}")
    if labels.shape[0] != batch:
        raise ValueError(f"labels has {labels.shape[0]} entries but the batch has B={batch}")
    if labels.device != device:
        raise ValueError(f"labels is on {labels.device} but the embeddings are on {device}")


def check_positive(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise ValueError(f"{name} must be a number > 0, got {value!r}")


def check_weight(weight: Tensor | None, shape: tuple[int, ...], name: str = "weight") -> None:
    if weight is None:
        return
    if not isinstance(weight, Tensor) or not weight.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor of shape {list(shape)} or None, got {_describe(weight)}")
    if tuple(weight.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(weight.shape)}")


def check_banks(banks: list[Tensor], dim: int, names: list[str]) -> int:
    n_rows = None
    for name, bank in zip(names, banks):
        if not isinstance(bank, Tensor) or bank.dim() != 2 or not bank.is_floating_point():
            raise ValueError(f"{name} must be a 2-D floating tensor [N, D], got {_describe(bank)}")
        if bank.shape[1] != dim:
            raise ValueError(f"{name} has embedding size {bank.shape[1]} but the embeddings have D={dim}")
        if n_rows is not None and bank.shape[0] != n_rows:
            raise ValueError(f"{name} has {bank.shape[0]} rows but the other bank has {n_rows}")
        n_rows = bank.shape[0]
    return n_rows


def check_index(idx: Tensor, batch: int, pos_k: int, n_rows: int, *, check_range: bool = True) -> None:
    """Shape checks always; the value range (a host sync) when `check_range`, or under `FASTMCL_DEBUG=1`, outside
    compiled graphs."""
    if not isinstance(pos_k, int) or isinstance(pos_k, bool) or pos_k < 1:
        raise ValueError(f"pos_k must be an int >= 1, got {pos_k!r}")
    if not isinstance(idx, Tensor) or idx.dim() != 2 or idx.dtype not in _INT_DTYPES:
        raise ValueError(f"idx must be a 2-D integer tensor [B, K], got {_describe(idx)}")
    if idx.shape[0] != batch:
        raise ValueError(f"idx has {idx.shape[0]} rows but the batch has B={batch}")
    if idx.shape[1] < pos_k + 2:
        raise ValueError(f"idx needs K >= 1 + pos_k + 1 = {pos_k + 2} columns (own, positives, >= 1 negative), "
                         f"got K={idx.shape[1]}")
    if (check_range or os.environ.get("FASTMCL_DEBUG") == "1") and not torch.compiler.is_compiling():
        check_index_range(idx, n_rows)


def check_index_range(idx: Tensor, n_rows: int) -> None:
    """Reads the index range on the host: one device sync."""
    if not idx.numel():
        return
    lo, hi = torch.stack(torch.aminmax(idx)).tolist()
    if lo < 0 or hi >= n_rows:
        raise ValueError(f"idx has values in [{lo}, {hi}], outside the bank's range [0, {n_rows})")


_INT_DTYPES = (torch.int64, torch.int32)


def _describe(x) -> str:
    if isinstance(x, Tensor):
        return f"a tensor of shape {list(x.shape)} and dtype {x.dtype}"
    return f"{type(x).__name__}"
