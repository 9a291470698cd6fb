"""The pieces of piecewise-linear ops (ReLU on/off masks, max-pool winners, dropout masks) recorded in one forward and
replayed in another, so that differences of the networks' gradients converge to autograd's second derivatives even
where a unit changes sign (docs/meta_phase.md "Held pieces"). Ops are intercepted by a `TorchFunctionMode`: modules and
functional forms alike, no module touched; a forward that takes another path fails loudly.
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
    (`threshold_backward` reading the bool mask as uint8; cheaper than `x * mask` and its backward)."""

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
    kind: str           # "relu" (bool on/off mask: 1 byte per unit), "max_pool" (winner indices), "dropout" (scale)
    tensor: Tensor


class Pieces(TorchFunctionMode):
    """`with Pieces() as p: forward(...)` records the pieces; `with p.replay(): forward(...)` replays them, in call
    order, in a forward of the same structure (any parameters)."""

    def __init__(self):
        super().__init__()
        self._pieces: list[_Piece] = []
        self._replaying = False
        self._cursor = 0

    def replay(self) -> "Pieces":
        self._replaying, self._cursor = True, 0
        return self

    def __exit__(self, exc_type, exc, tb):
        replaying, used = self._replaying, self._cursor
        self._replaying = False
        out = super().__exit__(exc_type, exc, tb)
        if replaying and exc_type is None and used != len(self._pieces):
            raise RuntimeError(f"the replayed forward used {used} of {len(self._pieces)} recorded pieces: it did not "
                               "take the recorded forward's path")
        return out

    def _next(self, kind: str, fits) -> Tensor:
        """The next recorded piece, which must be of `kind` and which `fits(piece)` must accept."""
        if self._cursor >= len(self._pieces):
            raise RuntimeError("the replayed forward has more piecewise-linear ops than the recorded one")
        piece = self._pieces[self._cursor]
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
                                      "pieces are held fixed (fastmcl.meta.pieces)")
        return func(*args, **kwargs)

    def _relu(self, func, args, kwargs):
        x = args[0]
        inplace = func in (F.relu_, torch.relu_, Tensor.relu_) or kwargs.get("inplace", False) or \
            (func is F.relu and len(args) > 1 and args[1])
        if not self._replaying:
            out = func(*args, **kwargs)
            self._pieces.append(_Piece("relu", out > 0))
            return out
        on = self._next("relu", lambda m: m.dtype == torch.bool and m.shape == x.shape)
        # in place, like the op it replays, except where autograd forbids it (a leaf that requires grad, with grad on)
        return _HeldRelu.apply(x, on, inplace and not (x.is_leaf and x.requires_grad and torch.is_grad_enabled()))

    def _max_pool2d(self, args, kwargs):
        x = args[0]
        if not self._replaying:
            out, idx = F.max_pool2d_with_indices(*args, **{k: v for k, v in kwargs.items() if k != "return_indices"})
            self._pieces.append(_Piece("max_pool", idx))
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
            self._pieces.append(_Piece("dropout", scale))
        else:
            scale = self._next("dropout", lambda m: m.shape == x.shape)
        return x * scale
