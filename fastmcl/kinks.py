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

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.overrides import TorchFunctionMode

_RELUS = {F.relu, F.relu_, torch.relu, torch.relu_, Tensor.relu, Tensor.relu_}
_MAX_POOL_2D = {F.max_pool2d}
_DROPOUT = {F.dropout}
# random or piecewise ops whose pieces are not recorded: refuse instead of returning silently wrong differences
_UNSUPPORTED = {F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
                F.max_pool1d, F.max_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
                F.relu6, F.hardtanh, F.leaky_relu, F.rrelu, F.threshold}


class _HeldRelu(torch.autograd.Function):
    """ReLU with a recorded on/off pattern: x where the mask is set, else 0, forward and backward one aten op each
    (threshold_backward reading the bool mask as uint8). Against `x.mul_(mask)` and its MulBackward this measured
    19.7 → 18.2 s per B=128 phase here (paired runs); on CPU aten still converts the uint8 mask to float inside the op
    (≈ 0.3 s per phase), which a float mask would avoid at 4× the memory."""

    @staticmethod
    def forward(ctx, x: Tensor, on: Tensor, inplace: bool) -> Tensor:
        on = on.view(torch.uint8)
        ctx.save_for_backward(on)
        if inplace:
            ctx.mark_dirty(x)
            return torch.ops.aten.threshold_backward.grad_input(x, on, 0, grad_input=x)
        return torch.ops.aten.threshold_backward(x, on, 0)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        (on,) = ctx.saved_tensors
        return torch.ops.aten.threshold_backward(grad, on, 0), None, None


class _Piece(NamedTuple):
    kind: str           # "relu" (bool on/off mask), "max_pool" (winner indices), "dropout" (x's scale)
    tensor: Tensor


class Pieces(TorchFunctionMode):
    """`with Pieces() as p: forward(...)` records the pieces; `with p.replay(): forward(...)` replays them, in call
    order, in a forward of the same structure (any parameters). A ReLU's piece is a bool mask (1 byte per unit; its
    recorded output would save the `> 0` pass but hold 4 bytes per unit, +0.9 GB at the peak of a B=128 phase)."""

    def __init__(self):
        super().__init__()
        self.pieces: list[_Piece] = []
        self._replaying = False
        self._cursor = 0

    def replay(self) -> "Pieces":
        self._replaying, self._cursor = True, 0
        return self

    def __exit__(self, exc_type, exc, tb):
        replaying, used = self._replaying, self._cursor
        self._replaying = False
        out = super().__exit__(exc_type, exc, tb)
        if replaying and exc_type is None and used != len(self.pieces):
            raise RuntimeError(f"the replayed forward used {used} of {len(self.pieces)} recorded pieces: it did not "
                               "take the recorded forward's path")
        return out

    def _record(self, kind: str, tensor: Tensor) -> None:
        self.pieces.append(_Piece(kind, tensor))

    def _next(self, kind: str, fits) -> Tensor:
        """The next recorded piece, which must be of `kind` and which `fits(piece)` must accept."""
        if self._cursor >= len(self.pieces):
            raise RuntimeError("the replayed forward has more piecewise-linear ops than the recorded one")
        piece = self.pieces[self._cursor]
        self._cursor += 1
        if piece.kind != kind or not fits(piece.tensor):
            raise RuntimeError(f"recorded piece {piece.kind} of shape {tuple(piece.tensor.shape)} "
                               f"({piece.tensor.dtype}) does not fit the replayed {kind}: the forward took a "
                               "different path")
        return piece.tensor

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
            self._record("relu", out > 0)
            return out
        on = self._next("relu", lambda m: m.dtype == torch.bool and m.shape == x.shape)
        # in place, like the op it replays, except where autograd forbids it (a leaf that requires grad, with grad on)
        return _HeldRelu.apply(x, on, inplace and not (x.is_leaf and x.requires_grad and torch.is_grad_enabled()))

    def _max_pool2d(self, args, kwargs):
        x = args[0]
        if not self._replaying:
            out, idx = F.max_pool2d_with_indices(*args, **{k: v for k, v in kwargs.items() if k != "return_indices"})
            self._record("max_pool", idx)
            return out
        idx = self._next("max_pool", lambda i: i.shape[:2] == x.shape[:2])
        return x.flatten(2).gather(2, idx.flatten(2)).view(idx.shape)

    def _dropout(self, args, kwargs):
        x = args[0]
        p = args[1] if len(args) > 1 else kwargs.get("p", 0.5)
        training = args[2] if len(args) > 2 else kwargs.get("training", True)
        if not training or p == 0.0:
            return x
        if not self._replaying:
            scale = torch.empty_like(x).bernoulli_(1.0 - p).div_(1.0 - p)
            self._record("dropout", scale)
        else:
            scale = self._next("dropout", lambda m: m.shape == x.shape)
        return x * scale
