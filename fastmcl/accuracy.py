"""Top-1/top-5 of every classifier a method evaluates (`Objective.eval_logits`): the one evaluation loop, used by the
trainer after each epoch and by `fastmcl.evaluate`."""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from .methods import Objective


@torch.no_grad()
def evaluate_classifiers(cohort: nn.Module, objective: Objective, ema: nn.Module | None, batches: Iterable,
                         device: torch.device, *, autocast: AbstractContextManager | None = None,
                         channels_last: bool = False,
                         reduce_counts: Callable[[Tensor], Tensor] | None = None) -> dict[str, tuple[float, float]]:
    """Top-1/top-5 accuracy (percent) of every classifier `objective.eval_logits` names, over `batches` of
    `(x, y, index)`, sorted by name. The modules are put in eval mode. `reduce_counts` sums the `[3, n]` float64
    counts over processes when each sees a shard of the validation set (DDP with a sharded reader)."""
    cohort.eval()
    objective.eval()
    if ema is not None:
        ema.eval()
    autocast = autocast if autocast is not None else nullcontext()
    correct1: dict[str, Tensor] = {}
    correct5: dict[str, Tensor] = {}
    total = 0
    for x, y, _ in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast:
            extra = {"ema_outputs": ema(x)} if ema is not None else {}
            named = objective.eval_logits(cohort(x), **extra)
        for name, logits in named.items():
            top = logits.float().topk(min(5, logits.shape[1]), dim=1).indices
            hit = top == y[:, None]
            correct1[name] = correct1.get(name, 0) + hit[:, 0].sum()
            correct5[name] = correct5.get(name, 0) + hit.any(1).sum()
        total += y.shape[0]
    names = sorted(correct1)
    counts = torch.tensor([[float(correct1[n]) for n in names], [float(correct5[n]) for n in names],
                           [float(total)] * len(names)], dtype=torch.float64)
    if reduce_counts is not None:
        counts = reduce_counts(counts.to(device)).cpu()
    return {n: (100.0 * float(counts[0, i] / counts[2, i]), 100.0 * float(counts[1, i] / counts[2, i]))
            for i, n in enumerate(names)}
