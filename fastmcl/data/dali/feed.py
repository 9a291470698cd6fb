"""What DALI reads: the file list, and the training index feed (DALI's external source).

The feed hands DALI this rank's dataset indices in the sampler's order with the encoded files and the crop + flip of
every view keyed by (view seed, epoch, index), so the batches and augmentation are those of the PIL path
(docs/data.md "DALI").
"""
from __future__ import annotations

import functools
import io
import os
import warnings
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .. import _keyhash as kh
from ..errors import DataError
from ..imagefolder import ImageFolderDataset
from ..transforms import RandomResizedCrop, crop_flip_params


@dataclass(frozen=True)
class FileList:
    """The dataset as DALI reads it: `paths[i]` is sample `i` with class `labels[i]` (LongTensor [N])."""

    paths: tuple[str, ...]
    labels: torch.Tensor
    classes: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if len(self.paths) == 0:
            raise DataError("file list: it is empty")
        if not isinstance(self.labels, torch.Tensor) or self.labels.dim() != 1 or \
                self.labels.numel() != len(self.paths):
            raise DataError(f"file list: expected {len(self.paths)} labels (one per file)")
        if int(self.labels.min()) < 0:
            raise DataError("file list: labels must be non-negative")

    def __len__(self) -> int:
        return len(self.paths)

    @classmethod
    def from_imagefolder(cls, root: str | Path) -> FileList:
        """`root/<class>/**/<image>` with the classes, files and order of `ImageFolderDataset`."""
        ds = ImageFolderDataset(root)
        return cls(tuple(p for p, _ in ds.samples), ds.labels.clone(), tuple(ds.classes))

    @classmethod
    def from_file(cls, list_file: str | Path, root: str | Path | None = None) -> FileList:
        """DALI's `file_list` format: `<path> <label>` lines (the label is the last field, so a path may hold spaces;
        blank lines and `#` comments skipped); relative paths are taken from `root` (default: the list's folder)."""
        list_file = Path(list_file)
        try:
            lines = list_file.read_text().splitlines()
        except OSError as e:
            raise DataError(f"file list: cannot read {list_file}: {e.strerror or e}") from None
        base = Path(root) if root is not None else list_file.parent
        paths: list[str] = []
        labels: list[int] = []
        for n, line in enumerate(lines, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.rsplit(None, 1)
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise DataError(f"file list {list_file}:{n}: expected '<path> <integer label>', got {line[:80]!r}")
            paths.append(str(base / parts[0]))      # an absolute path stays itself
            labels.append(int(parts[1]))
        if not paths:
            raise DataError(f"file list {list_file}: no entries")
        return cls(tuple(paths), torch.tensor(labels, dtype=torch.long))

    @classmethod
    def of(cls, files: FileList | str | Path) -> FileList:
        """A FileList as given, or from an ImageFolder root or a file-list path."""
        if isinstance(files, FileList):
            return files
        if isinstance(files, (str, Path)):
            return cls.from_file(files) if Path(files).is_file() else cls.from_imagefolder(files)
        raise DataError(f"files: expected a FileList, an ImageFolder root or a file-list path, "
                        f"got {type(files).__name__}")

    def write(self, list_file: str | Path, *, label_is_index: bool = False) -> Path:
        """Write DALI's `file_list` format (absolute paths); `label_is_index` writes the sample index as the label
        (the class is then `self.labels[index]`)."""
        list_file = Path(list_file)
        column = range(len(self)) if label_is_index else self.labels.tolist()
        list_file.write_text("".join(f"{os.path.abspath(p)} {int(c)}\n" for p, c in zip(self.paths, column)))
        return list_file


def read_encoded(path: str) -> np.ndarray:
    """The bytes of an image file; DataError naming it when it is missing, unreadable or empty."""
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except FileNotFoundError:
        raise DataError(f"image file not found: {path}") from None
    except OSError as e:
        raise DataError(f"cannot read image file {path}: {e.strerror or e}") from None
    if data.size == 0:
        raise DataError(f"cannot decode image file {path}: the file is empty")
    return data


@functools.cache
def _nvimgcodec():
    try:
        from nvidia import nvimgcodec   # DALI's decoding library, installed with it
        return nvimgcodec
    except Exception:
        return None


def stored_size(path: str, data: np.ndarray) -> tuple[int, int]:
    """(width, height) from the image header as stored (no EXIF rotation, like the PIL path), without decoding pixels:
    by nvImageCodec, or PIL for what it cannot read; DataError naming a file neither reads."""
    codec = _nvimgcodec()
    if codec is not None:
        try:
            stream = codec.CodeStream(data)
            return stream.width, stream.height
        except Exception:
            pass
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:
                return im.size
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"cannot decode image file {path}: {reason}") from None


class IndexFeed:
    """DALI's external source for training: per call one batch `(encoded files, indices, *view_0 params, …)`.

    View params: cifar `[start (x, y), flip]`; imagenet `[(x, y) start, (w, h) shape, flip]` with `roi_decode`, else
    `[(y, x) ROI start, ROI end, flip]`. Batches handed to DALI stay in `pending` until the loader yields them: when
    DALI fails, those are the files it was decoding.
    """

    def __init__(self, paths: tuple[str, ...], *, style: str, view_seeds: tuple[int, ...], scale: tuple[float, float],
                 ratio: tuple[float, float], padding: int, roi_decode: bool) -> None:
        self.paths, self.style, self.view_seeds = paths, style, view_seeds
        self.scale, self.ratio, self.padding, self.roi_decode = scale, ratio, padding, roi_decode
        self.batches: list[np.ndarray] = []
        self.cursor = self.epoch = 0
        self.pending: deque[np.ndarray] = deque()

    def start(self, batches: list[np.ndarray], epoch: int) -> None:
        self.batches, self.cursor, self.epoch = batches, 0, int(epoch)
        self.pending.clear()

    def suspects(self) -> list[str]:
        """The files of the batches DALI holds."""
        return [self.paths[int(i)] for batch in self.pending for i in batch]

    def __iter__(self):
        return self

    def __next__(self) -> tuple:
        if self.cursor >= len(self.batches):
            raise StopIteration
        idx = self.batches[self.cursor]
        self.cursor += 1
        self.pending.append(idx)
        encoded = [read_encoded(self.paths[int(i)]) for i in idx]
        sizes = None if self.style == "cifar" else [stored_size(self.paths[int(i)], d) for i, d in zip(idx, encoded)]
        out: list = [encoded, idx.astype(np.int64)[:, None]]
        for seed in self.view_seeds:
            out += self._view_params(idx, sizes, seed)
        return tuple(out)

    def _view_params(self, idx: np.ndarray, sizes: list[tuple[int, int]] | None, seed: int) -> list[np.ndarray]:
        if self.style == "cifar":       # the offsets of `cifar_augment` (the in-memory path)
            dy, dx, flip = crop_flip_params(len(idx), self.padding, "cpu", index=torch.from_numpy(idx.astype(np.int64)),
                                            seed=seed, epoch=self.epoch)
            start = (torch.stack([dx, dy], 1) - self.padding).to(torch.int32).numpy()
            return [start, flip.to(torch.int32).numpy()]
        box = np.empty((len(idx), 4), np.int32)                         # top, left, height, width
        flip = np.empty(len(idx), np.int32)
        g = torch.Generator()
        for k, (i, (width, height)) in enumerate(zip(idx, sizes)):     # the PIL path's keyed draws, in its order
            g.manual_seed(kh.item_seed(seed, self.epoch, int(i)))
            box[k] = RandomResizedCrop.get_params(width, height, self.scale, self.ratio, g)
            flip[k] = torch.rand(1, generator=g).item() < 0.5
        if self.roi_decode:
            return [box[:, 1::-1].copy(), box[:, :1:-1].copy(), flip]
        start = box[:, :2].astype(np.float32)
        return [start, start + box[:, 2:].astype(np.float32), flip]
