"""ImageFolder dataset (the PIL DataLoader path): ``root/<class>/**/<image>``, classes = sorted subfolder names."""
from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ._epoch import KeyedEpochMixin
from .errors import DataError
from .transforms import ToTensorNormalize

__all__ = ["IMG_EXTENSIONS", "ImageFolderDataset", "find_classes", "load_rgb"]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp")


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def find_classes(root: str | Path) -> list[str]:
    """Sorted names of the class folders under ``root`` (hidden folders ignored); DataError if there are none."""
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
    """Decode an image file to an 8-bit RGB PIL image (grayscale, CMYK, palette, alpha, 16-bit handled).

    Raises DataError naming the file when it cannot be read or decoded (truncated/corrupt data included).
    """
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


class ImageFolderDataset(KeyedEpochMixin, torch.utils.data.Dataset):
    """Items are ``(image_tensor, label: int, index: int)``.

    Classes are the sorted subfolders of ``root``; a class folder is searched recursively (symlinks followed) for
    files with an image extension (case-insensitive), in sorted order. Attributes: ``classes``, ``class_to_idx``,
    ``samples`` (list of (path, label)), ``targets`` (list[int]) and ``labels`` (LongTensor [N]).

    ``transform(img, generator=None)`` turns the RGB PIL image into a tensor (default: ToTensorNormalize(None, None),
    i.e. float in [0, 1]). ``aug_seed``: if set, every item's transform gets a torch.Generator seeded by
    (aug_seed, epoch, index) — augmentation then does not depend on worker or process counts; call
    :meth:`set_epoch` each epoch. Otherwise the transform uses the (per-worker seeded) global RNG.

    Errors (DataError): missing folder, no class folders, a class folder with no images (named), and, when an item is
    loaded, an unreadable/corrupt image (named).
    """

    def __init__(self, root: str | Path, transform: Callable | None = None, *, aug_seed: int | None = None,
                 views: int = 1) -> None:
        if isinstance(views, bool) or not isinstance(views, int) or views < 1:
            raise DataError(f"views: expected an integer >= 1, got {views!r}")
        self.views = views
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
        self._init_keyed(aug_seed)

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
        g = self._item_generator(index, view)
        return self.transform(img, generator=g) if g is not None else self.transform(img)

    def __repr__(self) -> str:
        return f"ImageFolderDataset(root={str(self.root)!r}, classes={len(self.classes)}, images={len(self)})"
