"""From a config to batches: which dataset, which sampler, which loader (DESIGN.md "Data").

Small images (CIFAR-100 pickles, and ImageFolder trees at <= 64 px such as the digits demo) are decoded once into a
uint8 tensor that lives on the training device; batches are gathered, cropped/flipped and normalised there, with the
augmentation keyed by (seed, epoch, dataset index). ImageNet-style trees go through a torch DataLoader with PIL
decode and keyed per-item augmentation. Every batch is `(x, labels, dataset_index)`.

With `--dali` every ImageFolder tree (the digits demo included, whatever its image size) is decoded by NVIDIA DALI
(`fastmcl.data.dali`): on the GPU (`mixed` decoder) when training on CUDA, else on DALI's CPU backend. Training feeds
DALI this rank's indices from `_epoch_indices` (an external-source index feed), so the global batches, the sampler
(MPerClassSampler included) and mid-epoch resume are exactly those of the PIL path, and the crops/flips are keyed by
(seed, epoch, dataset index) as there: RandomResizedCrop + flip for ImageNet-style trees, zero-pad-4 crop + flip
after a resize to `image_size` for <= 64 px trees (the CIFAR recipe, normalised with the tree's own mean/std as the
in-memory path). Validation uses DALI's sharded file reader (shard_id=rank, num_shards=world_size,
pad_last_batch, exact un-padded counts). CIFAR-100 pickles and synthetic data are not files to decode: `--dali`
refuses them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .config import TrainConfig
from .data import (CIFAR100_MEAN, CIFAR100_STD, IMAGENET_MEAN, IMAGENET_STD, DataError, DeviceBatchLoader,
                   ImageFolderDataset, MPerClassSampler, ShuffleSampler, SyntheticDataset, build_dataloader,
                   ensure_digits_imagefolder, find_cifar100, imagenet_train_transform, imagenet_val_transform,
                   load_cifar100, load_rgb)
from .data import dali as _dali

SMALL_IMAGE_MAX = 64  # an ImageFolder at or below this size is "CIFAR-style": decoded once, held on the device


@dataclass
class DataSource:
    kind: str                     # digits | imagefolder | cifar100 | synthetic
    root: Path | None
    cifar_style: bool             # 32-px recipe (pad-4 crop + flip, cosine, in-batch contrast by default)
    demo: bool


def detect_source(cfg: TrainConfig) -> DataSource:
    if not cfg.data:
        cache = Path(cfg.cache_dir or os.environ.get("FASTMCL_CACHE", "~/.cache/fastmcl")).expanduser()
        return DataSource("digits", ensure_digits_imagefolder(cache), True, True)
    if cfg.data == "synthetic":
        return DataSource("synthetic", None, (cfg.image_size or 32) <= SMALL_IMAGE_MAX, False)
    root = Path(cfg.data).expanduser()
    if not root.exists():
        raise DataError(f"--data: no such folder {root}")
    if not root.is_dir():
        raise DataError(f"--data: {root} is not a folder")
    try:
        return DataSource("cifar100", find_cifar100(root), True, False)
    except DataError:
        pass
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise DataError(f"--data: {root} holds neither CIFAR-100 pickles nor an ImageFolder tree "
                            f"(missing {root / split}/)")
    small = cfg.image_size <= SMALL_IMAGE_MAX if cfg.image_size else _first_image_side(root / "train") <= SMALL_IMAGE_MAX
    return DataSource("imagefolder", root, small, False)


def _first_image_side(train_root: Path) -> int:
    ds = ImageFolderDataset(train_root)
    with Image.open(ds.samples[0][0]) as im:
        return max(im.size)


class TrainData:
    """Train and val batches for one run. `train_batches(epoch, skip)` resumes mid-epoch by skipping batches."""

    def __init__(self, cfg: TrainConfig, source: DataSource, device: torch.device, *, m_per_class: int,
                 rank: int = 0, world_size: int = 1, views: int = 1):
        self.cfg, self.source, self.device = cfg, source, device
        self.rank, self.world_size = rank, world_size
        self.views = views  # > 1: one independently augmented view per member (KDCL, PCL); x is then a list
        self.m_per_class = m_per_class
        if cfg.batch_size % world_size:
            raise ValueError(f"--batch-size {cfg.batch_size} must be divisible by the {world_size} processes")
        self.local_batch = cfg.batch_size // world_size
        self.dali_train: _dali.DaliIndexLoader | None = None
        self.dali_val: _dali.DaliReaderLoader | None = None
        self.loader_name = ("DataLoader (synthetic)" if source.kind == "synthetic" else
                            "in-memory tensors on the device" if source.cifar_style else "DataLoader (PIL)")
        if cfg.dali:
            self._init_dali(cfg, source, device)
        elif source.kind == "synthetic":
            size = cfg.image_size
            self.train_set = SyntheticDataset(cfg.synthetic_samples, cfg.num_classes, size, seed=cfg.seed)
            self.val_set = SyntheticDataset(max(cfg.synthetic_samples // 4, 1), cfg.num_classes, size,
                                            seed=cfg.seed + 1)
            self.labels = torch.arange(cfg.synthetic_samples) % cfg.num_classes
            self.num_classes = cfg.num_classes
            self.resident = None
        elif source.cifar_style:
            images, labels, val_images, val_labels, self.num_classes, mean, std = self._load_small(cfg, source)
            self.labels = labels
            self.resident = (images.to(device), labels.to(device), val_images.to(device), val_labels.to(device),
                             mean, std)
        else:
            self.train_set = ImageFolderDataset(source.root / "train", imagenet_train_transform(cfg.image_size),
                                                aug_seed=cfg.seed, views=views)
            self.val_set = ImageFolderDataset(source.root / "val", imagenet_val_transform(cfg.image_size,
                                                                                          cfg.val_resize))
            if self.val_set.classes != self.train_set.classes:
                raise DataError(f"--data: {source.root}/val has classes {self.val_set.classes[:5]}… that differ from "
                                f"train/")
            self.labels = self.train_set.labels
            self.num_classes = len(self.train_set.classes)
            self.resident = None
        if self.num_classes < 2:
            raise DataError(f"--data: {self.num_classes} class found; classification needs at least 2")
        self.sampler = self._train_sampler()

    # -- loading ----------------------------------------------------------------------------------------------------
    def _init_dali(self, cfg: TrainConfig, source: DataSource, device: torch.device) -> None:
        if source.kind not in ("imagefolder", "digits"):
            raise DataError(f"--dali decodes image files (ImageFolder trees, the digits demo); {source.kind} data is "
                            f"already decoded tensors: drop --dali")
        if not _dali.dali_available():
            raise DataError(f"--dali: NVIDIA DALI does not import ({_dali.dali_import_error()}); install it with "
                            f"`pip install nvidia-dali-cuda130` or run without --dali")
        dali_device = _dali.resolve_dali_device(cfg.dali_device, device)
        if dali_device == "gpu" and device.type != "cuda":
            raise DataError(f"--dali-device gpu: the model trains on {device}; use --device cuda or --dali-device cpu")
        train = _dali.FileList.from_imagefolder(source.root / "train")
        val = _dali.FileList.from_imagefolder(source.root / "val")
        if val.classes != train.classes:
            raise DataError(f"--data: {source.root}/val has classes {list(val.classes[:5])}… that differ from train/")
        style = "cifar" if source.cifar_style else "imagenet"
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if style == "imagenet" else _tree_stats(train.paths, cfg.image_size)
        common = dict(size=cfg.image_size, style=style, mean=mean, std=std, device=dali_device,
                      device_id=device.index if device.type == "cuda" else None, num_threads=cfg.dali_threads,
                      prefetch=cfg.dali_prefetch, hw_decoder_load=cfg.hw_decoder_load,
                      channels_last=cfg.channels_last, seed=cfg.seed)
        self.dali_train = _dali.DaliIndexLoader(train, batch_size=self.local_batch, views=self.views, **common)
        val_batch = max(self.local_batch, 64 if style == "imagenet" else 256)
        self.dali_val = _dali.DaliReaderLoader(val, batch_size=val_batch, resize=cfg.val_resize, train=False,
                                               shard_id=self.rank, num_shards=self.world_size, **common)
        self.labels = train.labels
        self.num_classes = len(train.classes)
        self.resident = None
        self.loader_name = (f"DALI {_dali.DALI_VERSION} {dali_device} ({'mixed' if dali_device == 'gpu' else 'cpu'} "
                            f"decoder, {cfg.dali_threads} threads, {style} augmentation)")

    @staticmethod
    def _load_small(cfg: TrainConfig, source: DataSource):
        if source.kind == "cifar100":
            x, y = load_cifar100(source.root, train=True)
            vx, vy = load_cifar100(source.root, train=False)
            return x, y, vx, vy, 100, CIFAR100_MEAN, CIFAR100_STD
        train = _decode_tree(source.root / "train", cfg.image_size)
        val = _decode_tree(source.root / "val", cfg.image_size)
        if val[2] != train[2]:
            raise DataError(f"--data: {source.root}/val has classes that differ from train/")
        x = train[0].float().div(255)
        mean = x.mean((0, 2, 3)).tolist()
        std = x.std((0, 2, 3)).clamp_min(1e-3).tolist()
        return train[0], train[1], val[0], val[1], len(train[2]), mean, std

    def _train_sampler(self):
        if self.m_per_class:
            return MPerClassSampler(self.labels, self.m_per_class, self.cfg.batch_size, seed=self.cfg.seed)
        return ShuffleSampler(len(self.labels), seed=self.cfg.seed)

    # -- batches ----------------------------------------------------------------------------------------------------
    def steps_per_epoch(self) -> int:
        return len(self.sampler) // self.cfg.batch_size

    def _epoch_indices(self, epoch: int, skip_batches: int) -> list[int]:
        """This rank's slice of every global batch of the epoch, after `skip_batches` global batches."""
        self.sampler.set_epoch(epoch)
        order = list(iter(self.sampler))
        B, b = self.cfg.batch_size, self.local_batch
        out = []
        for step in range(skip_batches, len(order) // B):
            lo = step * B + self.rank * b
            out.extend(order[lo:lo + b])
        return out

    def train_batches(self, epoch: int, skip_batches: int = 0):
        indices = self._epoch_indices(epoch, skip_batches)
        if self.dali_train is not None:
            return self.dali_train.epoch_batches(indices, epoch)
        if self.resident is not None:
            images, labels, _, _, mean, std = self.resident
            loader = DeviceBatchLoader(images, labels, batch_size=self.local_batch, sampler=indices, train=True,
                                       mean=mean, std=std, aug_seed=self.cfg.seed,
                                       channels_last=self.cfg.channels_last, views=self.views)
            loader.set_epoch(epoch)
            return loader
        if hasattr(self.train_set, "set_epoch"):
            self.train_set.set_epoch(epoch)
        loader = build_dataloader(self.train_set, batch_size=self.local_batch, train=True, sampler=indices,
                                  num_workers=self.cfg.workers, seed=self.cfg.seed, rank=self.rank,
                                  pin_memory=self.device.type == "cuda")
        return loader if self.views == 1 else _as_views(loader, self.views)

    @property
    def val_sharded(self) -> bool:
        """True when each rank sees only its shard of the val set (DALI's reader): sum the counts over ranks."""
        return self.dali_val is not None

    def val_batches(self):
        """Validation batches; under DALI this rank's shard only (sum correct counts and totals over the ranks)."""
        if self.dali_val is not None:
            return self.dali_val
        if self.resident is not None:
            _, _, images, labels, mean, std = self.resident
            return DeviceBatchLoader(images, labels, batch_size=max(self.local_batch, 256), sampler=range(len(labels)),
                                     train=False, mean=mean, std=std, channels_last=self.cfg.channels_last)
        return build_dataloader(self.val_set, batch_size=max(self.local_batch, 64), train=False,
                                num_workers=self.cfg.workers, seed=self.cfg.seed)


def _as_views(loader, views: int):
    """[B, V, C, H, W] from a multi-view dataset → a list of V [B, C, H, W] views; synthetic data (no augmentation)
    repeats its one tensor."""
    for x, y, index in loader:
        yield (list(x.unbind(1)) if x.dim() == 5 else [x] * views), y, index


def _decode_tree(root: Path, size: int | None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Decode a small ImageFolder tree once into uint8 [N, 3, S, S] (resized to `size` if given), labels, classes."""
    ds = ImageFolderDataset(root)
    arrays = []
    for path, _ in ds.samples:
        img = load_rgb(path)
        if size and img.size != (size, size):
            img = img.resize((size, size), Image.BILINEAR)
        arrays.append(np.asarray(img, dtype=np.uint8))
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise DataError(f"--data: images under {root} have different sizes {sorted(shapes)[:3]}…; pass --image-size")
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return x, ds.labels.clone(), list(ds.classes)


def _tree_stats(paths, size: int | None, limit: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean/std (of [0, 1] values) of a small-image tree as the in-memory path computes them: every image
    (resized to `size`), or `limit` evenly spaced ones for a larger tree."""
    n = len(paths)
    pick = range(n) if n <= limit else np.linspace(0, n - 1, limit).round().astype(int)
    total, sq, count = np.zeros(3), np.zeros(3), 0
    for i in pick:
        img = load_rgb(paths[int(i)])
        if size and img.size != (size, size):
            img = img.resize((size, size), Image.BILINEAR)
        a = np.asarray(img, dtype=np.float64).reshape(-1, 3) / 255.0
        total += a.sum(0)
        sq += (a * a).sum(0)
        count += a.shape[0]
    mean = total / count
    var = np.maximum(sq - count * mean * mean, 0.0) / max(count - 1, 1)
    return mean.tolist(), np.maximum(np.sqrt(var), 1e-3).tolist()
