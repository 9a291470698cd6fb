"""Image transforms without torchvision (PIL in, float CHW tensor out) and tensor-level CIFAR augmentation.

The PIL transforms follow torchvision's algorithms with the same torch RNG calls; each is called as
`t(img, generator=None)`, where a generator keyed by (seed, epoch, index) replaces the global RNG (keyed mode).
`cifar_augment` is the zero-pad crop + flip vectorised on the batch's device.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import _keyhash as kh
from .errors import DataError

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "Transform", "Compose", "RandomResizedCrop", "RandomHorizontalFlip", "Resize",
    "CenterCrop", "ToTensorNormalize", "imagenet_train_transform", "imagenet_val_transform", "cifar_augment",
    "normalize",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_BILINEAR = Image.Resampling.BILINEAR


def _pair(size, name: str) -> tuple[int, int]:
    """(h, w) from an int or a 2-sequence of positive ints."""
    if isinstance(size, numbers.Integral) and not isinstance(size, bool):
        size = (int(size), int(size))
    elif isinstance(size, Sequence) and len(size) == 2:
        size = (int(size[0]), int(size[1]))
    else:
        raise DataError(f"{name}: expected an int or (height, width), got {size!r}")
    if size[0] <= 0 or size[1] <= 0:
        raise DataError(f"{name}: sizes must be positive, got {size!r}")
    return size


def _check_image(img, who: str) -> None:
    if not isinstance(img, Image.Image):
        raise DataError(f"{who}: expected a PIL image, got {type(img).__name__}")


class Transform:
    """Base class: `__call__(img, generator=None)`."""

    def __call__(self, img, generator: torch.Generator | None = None):  # pragma: no cover - interface
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class Compose(Transform):
    """Apply transforms in order; the generator goes to every `Transform` (plain callables get only img)."""

    def __init__(self, transforms: Sequence) -> None:
        self.transforms = list(transforms)

    def __call__(self, img, generator: torch.Generator | None = None):
        for t in self.transforms:
            img = t(img, generator=generator) if isinstance(t, Transform) else t(img)
        return img


class RandomResizedCrop(Transform):
    """torchvision's RandomResizedCrop: random area fraction in `scale` and log-uniform aspect ratio in `ratio`,
    10 tries, then the fallback central crop (clamped to `ratio`); resized to `size` bilinearly."""

    def __init__(self, size, scale=(0.08, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0)) -> None:
        self.size = _pair(size, "RandomResizedCrop size")
        scale = tuple(float(s) for s in scale)
        ratio = tuple(float(r) for r in ratio)
        if len(scale) != 2 or not 0 < scale[0] <= scale[1]:
            raise DataError(f"RandomResizedCrop scale: expected 0 < min <= max, got {scale!r}")
        if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
            raise DataError(f"RandomResizedCrop ratio: expected 0 < min <= max, got {ratio!r}")
        self.scale = scale
        self.ratio = ratio

    @staticmethod
    def get_params(width: int, height: int, scale, ratio, generator=None) -> tuple[int, int, int, int]:
        """(top, left, h, w) of the crop, exactly torchvision's algorithm and RNG calls."""
        area = height * width
        log_ratio = torch.log(torch.tensor(ratio))
        for _ in range(10):
            target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
            aspect_ratio = torch.exp(
                torch.empty(1).uniform_(log_ratio[0].item(), log_ratio[1].item(), generator=generator)).item()
            w = int(round(math.sqrt(target_area * aspect_ratio)))
            h = int(round(math.sqrt(target_area / aspect_ratio)))
            if 0 < w <= width and 0 < h <= height:
                i = int(torch.randint(0, height - h + 1, size=(1,), generator=generator).item())
                j = int(torch.randint(0, width - w + 1, size=(1,), generator=generator).item())
                return i, j, h, w
        # Fallback to a central crop.
        in_ratio = float(width) / float(height)
        if in_ratio < min(ratio):
            w = width
            h = int(round(w / min(ratio)))
        elif in_ratio > max(ratio):
            h = height
            w = int(round(h * max(ratio)))
        else:
            w = width
            h = height
        i = (height - h) // 2
        j = (width - w) // 2
        return i, j, h, w

    def __call__(self, img, generator: torch.Generator | None = None):
        _check_image(img, "RandomResizedCrop")
        width, height = img.size
        i, j, h, w = self.get_params(width, height, self.scale, self.ratio, generator)
        oh, ow = self.size
        return img.resize((ow, oh), _BILINEAR, box=(j, i, j + w, i + h))


class RandomHorizontalFlip(Transform):
    def __init__(self, p: float = 0.5) -> None:
        if not 0.0 <= p <= 1.0:
            raise DataError(f"RandomHorizontalFlip p: expected a probability in [0, 1], got {p!r}")
        self.p = float(p)

    def __call__(self, img, generator: torch.Generator | None = None):
        if torch.rand(1, generator=generator).item() < self.p:
            if isinstance(img, torch.Tensor):
                return img.flip(-1)
            return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return img


class Resize(Transform):
    """An int resizes the shorter side to `size` keeping the aspect ratio (long side truncated, as torchvision);
    an (h, w) pair resizes to exactly that. Bilinear (PIL's, antialiased)."""

    def __init__(self, size) -> None:
        if isinstance(size, numbers.Integral) and not isinstance(size, bool):
            if size <= 0:
                raise DataError(f"Resize size: must be positive, got {size!r}")
            self.size: int | tuple[int, int] = int(size)
        else:
            self.size = _pair(size, "Resize size")

    @staticmethod
    def output_size(width: int, height: int, size) -> tuple[int, int]:
        """(w, h) after resizing."""
        if isinstance(size, int):
            short, long = (width, height) if width <= height else (height, width)
            new_short, new_long = size, int(size * long / short)
            return (new_short, new_long) if width <= height else (new_long, new_short)
        return size[1], size[0]

    def __call__(self, img, generator: torch.Generator | None = None):
        _check_image(img, "Resize")
        ow, oh = self.output_size(*img.size, self.size)
        if (ow, oh) == img.size:
            return img
        return img.resize((ow, oh), _BILINEAR)


class CenterCrop(Transform):
    """Central crop (offsets rounded as torchvision); an image smaller than the crop is zero-padded first."""

    def __init__(self, size) -> None:
        self.size = _pair(size, "CenterCrop size")

    def __call__(self, img, generator: torch.Generator | None = None):
        _check_image(img, "CenterCrop")
        ch, cw = self.size
        width, height = img.size
        if cw > width or ch > height:
            pad_l = (cw - width) // 2 if cw > width else 0
            pad_t = (ch - height) // 2 if ch > height else 0
            canvas = Image.new(img.mode, (max(width, cw), max(height, ch)))
            canvas.paste(img, (pad_l, pad_t))
            img = canvas
            width, height = img.size
            if (width, height) == (cw, ch):
                return img
        top = int(round((height - ch) / 2.0))
        left = int(round((width - cw) / 2.0))
        return img.crop((left, top, left + cw, top + ch))


class ToTensorNormalize(Transform):
    """PIL image (converted to RGB unless RGB or L) -> float32 [C, H, W] in [0, 1], then `(x - mean) / std` per channel
    (skipped when mean is None)."""

    def __init__(self, mean: Sequence[float] | None = IMAGENET_MEAN, std: Sequence[float] | None = IMAGENET_STD):
        if (mean is None) != (std is None):
            raise DataError("ToTensorNormalize: give both mean and std, or neither")
        if std is not None and any(float(s) <= 0 for s in std):
            raise DataError(f"ToTensorNormalize std: must be positive, got {tuple(std)!r}")
        self.mean = None if mean is None else tuple(float(m) for m in mean)
        self.std = None if std is None else tuple(float(s) for s in std)

    def __call__(self, img, generator: torch.Generator | None = None):
        _check_image(img, "ToTensorNormalize")
        if img.mode not in ("RGB", "L"):
            img = img.convert("RGB")
        arr = np.array(img, dtype=np.uint8, copy=True)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        x = torch.from_numpy(arr).permute(2, 0, 1).contiguous()
        if self.mean is None:
            return x.float().div_(255.0)
        return normalize(x, self.mean, self.std)


def imagenet_train_transform(size: int = 224, *, scale=(0.08, 1.0), mean=IMAGENET_MEAN, std=IMAGENET_STD) -> Compose:
    """RandomResizedCrop(size) + RandomHorizontalFlip + ToTensorNormalize (ImageNet mean/std by default)."""
    return Compose([RandomResizedCrop(size, scale=scale), RandomHorizontalFlip(), ToTensorNormalize(mean, std)])


def imagenet_val_transform(size: int = 224, resize: int | None = None, *, mean=IMAGENET_MEAN,
                           std=IMAGENET_STD) -> Compose:
    """Resize(shorter side = resize, default round(size / 0.875): 256 for 224) + CenterCrop(size) + normalise."""
    if resize is None:
        resize = int(round(size / 0.875))
    return Compose([Resize(resize), CenterCrop(size), ToTensorNormalize(mean, std)])


def _check_index(index, n: int, device) -> torch.Tensor:
    if not isinstance(index, torch.Tensor) or index.dtype != torch.int64 or index.dim() != 1:
        raise DataError("index: expected a 1-D torch.long tensor of dataset indices")
    if index.numel() != n:
        raise DataError(f"index: expected {n} entries (one per image), got {index.numel()}")
    index = index.to(device)
    if index.numel() and index.device.type == "cpu" and int(index.min()) < 0:
        raise DataError("index: dataset indices must be non-negative")
    return index


def crop_flip_params(batch: int, padding: int, device, generator: torch.Generator | None = None, *,
                     index: torch.Tensor | None = None, seed: int = 0, epoch: int = 0):
    """Per-sample (dy, dx, flip) for `cifar_augment`, offsets in [0, 2*padding]: with `index` a pure function of
    (seed, epoch, dataset index), the same on every device and batch split; else from `generator` or the global RNG."""
    span = 2 * padding + 1
    if index is not None:
        row = kh.row_hash(index.to(device)[:, None], kh.stream(seed, epoch, kh.TAG_AUGMENT))
        h = kh.cell(row, kh.column_codes(3, device))
        dy = kh.uniform_int(h[:, 0], span)
        dx = kh.uniform_int(h[:, 1], span)
        flip = kh.uniform_int(h[:, 2], 2).bool()
        return dy, dx, flip
    dy = torch.randint(0, span, (batch,), generator=generator, device=device)
    dx = torch.randint(0, span, (batch,), generator=generator, device=device)
    flip = torch.rand(batch, generator=generator, device=device) < 0.5
    return dy, dx, flip


def cifar_augment(x: torch.Tensor, generator: torch.Generator | None = None, *, index: torch.Tensor | None = None,
                  seed: int = 0, epoch: int = 0, padding: int = 4, flip: bool = True) -> torch.Tensor:
    """RandomCrop(H x W, padding) with ZERO padding (black, as the official `RandomCrop(32, padding=4)` on PIL
    images) + random horizontal flip, per sample, on x's device; x [B, C, H, W] of any dtype, channels_last kept.
    Randomness as in `crop_flip_params`: keyed by `index` ([B] long dataset indices), or `generator` on x's device."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise DataError(f"cifar_augment x: expected a [B, C, H, W] tensor, got "
                        f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if padding < 0:
        raise DataError(f"cifar_augment padding: must be >= 0, got {padding}")
    b, c, h, w = x.shape
    if index is not None:
        index = _check_index(index, b, x.device)
    dy, dx, fl = crop_flip_params(b, padding, x.device, generator, index=index, seed=seed, epoch=epoch)
    channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    xp = F.pad(x, (padding, padding, padding, padding)) if padding else x
    rows = dy[:, None] + torch.arange(h, device=x.device)             # [B, H]
    cols = dx[:, None] + torch.arange(w, device=x.device)             # [B, W]
    if flip:
        cols = torch.where(fl[:, None], cols.flip(1), cols)
    out = xp.gather(2, rows[:, None, :, None].expand(b, c, h, w + 2 * padding))
    out = out.gather(3, cols[:, None, None, :].expand(b, c, h, w))
    if channels_last:
        out = out.contiguous(memory_format=torch.channels_last)
    return out


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float], *,
              dtype: torch.dtype | None = None) -> torch.Tensor:
    """`(x - mean) / std` per channel for [C, H, W] or [B, C, H, W]; an integer tensor is first scaled by 1/255 to
    `dtype` (default float32)."""
    if not isinstance(x, torch.Tensor) or x.dim() not in (3, 4):
        raise DataError("normalize x: expected a [C, H, W] or [B, C, H, W] tensor")
    if not x.is_floating_point():
        x = x.to(dtype or torch.float32).div_(255.0)
    elif dtype is not None:
        x = x.to(dtype)
    ch = x.shape[-3]
    if len(mean) != ch or len(std) != ch:
        raise DataError(f"normalize mean/std: expected {ch} values (one per channel), got {len(mean)}/{len(std)}")
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(ch, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(ch, 1, 1)
    return (x - m) / s
