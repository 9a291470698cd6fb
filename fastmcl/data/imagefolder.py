"""ImageFolder dataset (the PIL DataLoader path): `root/<class>/**/<image>`, classes = sorted subfolder names."""
from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import _keyhash as kh
from .errors import DataError, check_int
from .transforms import ToTensorNormalize

__all__ = ["IMG_EXTENSIONS", "ImageFolderDataset", "find_classes", "load_rgb", "decode_tree", "tree_stats"]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp")


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def find_classes(root: str | Path) -> list[str]:
    """Sorted names of the class folders under `root` (hidden folders ignored); DataError if there are none."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"image folder not found: {root}")
    if not root.is_dir():
        raise DataError(f"image folder is not a directory: {root}")
    try:
        classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    except OSError as e:
        raise DataError(f"cannot list image folder {root}: {e.strerror or e}") from None
    if not classes:
        raise DataError(f"no class folders in {root} (expected {root}/<class>/<image>)")
    return classes


def load_rgb(path: str | Path) -> Image.Image:
    """An image file as an 8-bit RGB PIL image (grayscale, CMYK, palette, alpha, 16-bit handled); DataError naming
    the file when it cannot be read or decoded (truncated or corrupt data included)."""
    try:
        with open(path, "rb") as f, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Palette images with Transparency ..." or EXIF warnings
            img = Image.open(f)
            img.load()
            mode = img.mode
            if mode == "RGB":
                return img
            if mode == "P" and "transparency" in img.info:
                img = img.convert("RGBA")
            if mode.startswith("I;16") or mode == "I":
                arr = np.asarray(img).astype(np.float64)
                peak = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
                img = Image.fromarray(np.clip(np.rint(arr * (255.0 / peak)), 0, 255).astype(np.uint8), mode="L")
            elif mode == "F":
                arr = np.asarray(img)
                img = Image.fromarray(np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8), mode="L")
            return img.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"image file not found: {path}") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, EOFError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"cannot decode image file {path}: {reason}") from None


class ImageFolderDataset(torch.utils.data.Dataset):
    """Items `(image_tensor, label, index)`; classes are the sorted subfolders of `root`, each searched recursively
    (symlinks followed) for image files in sorted order. Attributes: `classes`, `class_to_idx`, `samples`
    [(path, label)], `targets` and `labels` (LongTensor [N]).

    `transform(img, generator=None)` makes the tensor (default: float in [0, 1]). With `aug_seed`, each item's
    transform gets a generator keyed by (`view_seed(aug_seed, view)`, epoch, index), so augmentation does not depend on
    worker or process counts; `views` > 1 gives `[views, C, H, W]` items, decoded once.
    """

    def __init__(self, root: str | Path, transform: Callable | None = None, *, aug_seed: int | None = None,
                 views: int = 1) -> None:
        self.views = check_int(views, "views")
        self.root = Path(root)
        self.classes = find_classes(self.root)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        samples: list[tuple[str, int]] = []
        for label, cls in enumerate(self.classes):
            cls_dir = self.root / cls
            found = []
            for dirpath, dirnames, filenames in os.walk(cls_dir, followlinks=True):
                dirnames.sort()
                found.extend(os.path.join(dirpath, f) for f in sorted(filenames) if _is_image(f))
            if not found:
                raise DataError(f"class folder has no images: {cls_dir} "
                                f"(extensions: {' '.join(IMG_EXTENSIONS)})")
            samples.extend((p, label) for p in found)
        self.samples = samples
        self.targets = [lbl for _, lbl in samples]
        self.labels = torch.tensor(self.targets, dtype=torch.long)
        self.transform = transform if transform is not None else ToTensorNormalize(None, None)
        self.aug_seed = None if aug_seed is None else int(aug_seed)
        self._epoch = torch.zeros(1, dtype=torch.int64)     # shared with DataLoader workers, persistent or not
        try:
            self._epoch.share_memory_()
        except (RuntimeError, OSError):  # no usable shared memory: set_epoch reaches only workers started later
            pass

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream (call before iterating the epoch's DataLoader)."""
        self._epoch[0] = int(epoch)

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        index = int(index)
        if not 0 <= index < len(self.samples):
            raise IndexError(f"index {index} out of range for {len(self.samples)} images in {self.root}")
        path, label = self.samples[index]
        img = load_rgb(path)
        if self.views > 1:  # decode once, augment once per member view: x is [views, C, H, W]
            return torch.stack([self._transform(img, index, v) for v in range(self.views)]), label, index
        return self._transform(img, index, 0), label, index

    def _transform(self, img, index: int, view: int):
        if self.aug_seed is None:
            return self.transform(img)
        g = torch.Generator()
        g.manual_seed(kh.item_seed(kh.view_seed(self.aug_seed, view), self.epoch, index))
        return self.transform(img, generator=g)

    def __repr__(self) -> str:
        return f"ImageFolderDataset(root={str(self.root)!r}, classes={len(self.classes)}, images={len(self)})"


def _load_resized(path: str, size: int | None) -> Image.Image:
    img = load_rgb(path)
    return img.resize((size, size), Image.BILINEAR) if size and img.size != (size, size) else img


def decode_tree(root: str | Path, size: int | None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """A small ImageFolder tree as uint8 [N, 3, S, S] (resized to `size` if given), labels, classes."""
    ds = ImageFolderDataset(root)
    arrays = [np.asarray(_load_resized(path, size), dtype=np.uint8) for path, _ in ds.samples]
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise DataError(f"--data: images under {root} have different sizes {sorted(shapes)[:3]}…; pass --image-size")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous(), ds.labels.clone(), list(ds.classes)


def tree_stats(paths: Sequence[str], size: int | None, limit: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean/std of a small tree's [0, 1] values (resized to `size`) without holding the tree: every image,
    or `limit` evenly spaced ones for a larger tree."""
    n = len(paths)
    pick = range(n) if n <= limit else np.linspace(0, n - 1, limit).round().astype(int)
    total, sq, count = np.zeros(3), np.zeros(3), 0
    for i in pick:
        a = np.asarray(_load_resized(paths[int(i)], size), dtype=np.float64).reshape(-1, 3) / 255.0
        total += a.sum(0)
        sq += (a * a).sum(0)
        count += a.shape[0]
    mean = total / count
    var = np.maximum(sq - count * mean * mean, 0.0) / max(count - 1, 1)
    return mean.tolist(), np.maximum(np.sqrt(var), 1e-3).tolist()
