"""Holding the pieces of piecewise-linear ops fixed between forwards: ReLU on/off masks, max-pool winners, dropout
masks. Used by the meta phase (fastmcl/meta.py) to take derivatives of the networks by differences.

Why: a ReLU network's gradient jumps where a unit changes sign, and autograd's second derivatives are those of the
network with every unit's state held where it was (relu'' = 0). A difference of gradients (or of forwards) taken with
the pieces recorded at the base point and replayed at the shifted point is the difference of one smooth function, so
it converges to exactly what autograd computes, with an O(h) error from the smooth ops (BN, softmax) alone. Without
this a unit that flips between the two points adds a jump that does not shrink with h (measured on 2×ResNet-32 in
fp32: 6–450× off at h = 1e-1…1e-3). Dropout is random per forward; replaying its mask makes the forwards comparable.

The ops are intercepted with a TorchFunctionMode, so nn.ReLU / nn.MaxPool2d / nn.Dropout modules and the functional
forms are covered without touching any module, and a forward that takes a different path fails loudly.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

_RELUS = {F.relu, F.relu_, torch.relu, torch.relu_, Tensor.relu, Tensor.relu_}
_MAX_POOL_2D = {F.max_pool2d}
_DROPOUT = {F.dropout}
# random or piecewise ops whose pieces are not recorded: refuse instead of returning silently wrong differences
_UNSUPPORTED = {F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
                F.max_pool1d, F.max_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
                F.relu6, F.hardtanh, F.leaky_relu, F.rrelu, F.threshold}


class Pieces(TorchFunctionMode):
    """`with Pieces() as p: forward(...)` records the pieces; `with p.replay(): forward(...)` replays them, in call
    order, in a forward of the same structure (any parameters)."""

    def __init__(self):
        super().__init__()
        self.masks: list[Tensor] = []
        self._replaying = False
        self._cursor = 0

    def replay(self) -> "Pieces":
        self._replaying, self._cursor = True, 0
        return self

    def __exit__(self, exc_type, exc, tb):
        replaying, used = self._replaying, self._cursor
        self._replaying = False
        out = super().__exit__(exc_type, exc, tb)
        if replaying and exc_type is None and used != len(self.masks):
            raise RuntimeError(f"the replayed forward used {used} of {len(self.masks)} recorded pieces: it did not take "
                               "the recorded forward's path")
        return out

    def _next(self, fits) -> Tensor:
        """The next recorded piece, which `fits(piece)` must accept."""
        if self._cursor >= len(self.masks):
            raise RuntimeError("the replayed forward has more piecewise-linear ops than the recorded one")
        piece = self.masks[self._cursor]
        self._cursor += 1
        if not fits(piece):
            raise RuntimeError(f"recorded piece of shape {tuple(piece.shape)} ({piece.dtype}) does not fit the replayed "
                               "input: the forward took a different path")
        return piece

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _RELUS:
            return self._relu(func, args, kwargs)
        if func in _MAX_POOL_2D and not kwargs.get("return_indices", False) and len(args) < 7:
            return self._max_pool2d(args, kwargs)
        if func in _DROPOUT:
            return self._dropout(args, kwargs)
        if func in _UNSUPPORTED:
            raise NotImplementedError(f"{getattr(func, '__name__', func)} is not supported inside a forward whose "
                                      "pieces are held fixed (fastmcl/kinks.py)")
        return func(*args, **kwargs)

    def _relu(self, func, args, kwargs):
        x = args[0]
        inplace = func in (F.relu_, torch.relu_, Tensor.relu_) or kwargs.get("inplace", False) or \
            (func is F.relu and len(args) > 1 and args[1])
        if not self._replaying:
            out = func(*args, **kwargs)
            self.masks.append(out > 0)
            return out
        # a multiply by the mask viewed as uint8 is ~6x faster here than masked_fill
        on = self._next(lambda m: m.dtype == torch.bool and m.shape == x.shape).view(torch.uint8)
        return x.mul_(on) if inplace else x * on

    def _max_pool2d(self, args, kwargs):
        x = args[0]
        if not self._replaying:
            out, idx = F.max_pool2d_with_indices(*args, **{k: v for k, v in kwargs.items() if k != "return_indices"})
            self.masks.append(idx)
            return out
        idx = self._next(lambda i: i.dtype == torch.int64 and i.shape[:2] == x.shape[:2])
        return x.flatten(2).gather(2, idx.flatten(2)).view(idx.shape)

    def _dropout(self, args, kwargs):
        x = args[0]
        p = args[1] if len(args) > 1 else kwargs.get("p", 0.5)
        training = args[2] if len(args) > 2 else kwargs.get("training", True)
        if not training or p == 0.0:
            return x
        if not self._replaying:
            scale = torch.empty_like(x).bernoulli_(1.0 - p).div_(1.0 - p)
            self.masks.append(scale)
        else:
            scale = self._next(lambda m: m.is_floating_point() and m.shape == x.shape)
        return x * scale
