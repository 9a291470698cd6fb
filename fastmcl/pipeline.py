"""From a config to batches: which data source, which sampler, which loader (docs/data.md).

Every source yields `(x, labels, dataset_index)` batches for the same global batches (this rank's slice of the
sampler's order) with augmentation keyed by (seed, view, epoch, index): CIFAR-100 pickles and small (<= 64 px) trees
as uint8 tensors on the device, ImageNet-style trees and synthetic data through a DataLoader, and with `--dali` every
ImageFolder tree through NVIDIA DALI.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from PIL import Image
from torch.utils.data import Sampler

from .config import TrainConfig
from .data import (CIFAR100_MEAN, CIFAR100_STD, IMAGENET_MEAN, IMAGENET_STD, DataError, DeviceBatchLoader,
                   ImageFolderDataset, MPerClassSampler, ShardedSampler, ShuffleSampler, SyntheticDataset,
                   build_dataloader, dali, decode_tree, ensure_digits_imagefolder, find_cifar100,
                   imagenet_train_transform, imagenet_val_transform, load_cifar100, tree_stats)
from .data.imagefolder import IMG_EXTENSIONS

SMALL_IMAGE_MAX = 64  # an ImageFolder at or below this size is "CIFAR-style": decoded once, held on the device


@dataclass
class DataSource:
    kind: str                     # digits | imagefolder | cifar100 | synthetic
    root: Path | None
    cifar_style: bool             # 32-px recipe (pad-4 crop + flip, cosine, in-batch contrast by default)
    demo: bool


def detect_source(cfg: TrainConfig, splits: tuple[str, ...] = ("train", "val")) -> DataSource:
    """What `--data` names: nothing (the digits demo), `synthetic`, CIFAR-100 pickles or an ImageFolder tree (with
    the `splits` folders: fastmcl.evaluate needs only val/)."""
    if cfg.data in ("", "digits"):
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
    for split in splits:
        if not (root / split).is_dir():
            raise DataError(f"--data: {root} holds neither CIFAR-100 pickles nor an ImageFolder tree "
                            f"(missing {root / split}/)")
    if cfg.image_size:
        return DataSource("imagefolder", root, cfg.image_size <= SMALL_IMAGE_MAX, False)
    with Image.open(_first_image(root / splits[0])) as im:
        return DataSource("imagefolder", root, max(im.size) <= SMALL_IMAGE_MAX, False)


def _first_image(split: Path) -> str:
    """The first image of a tree's first class folder, without listing the whole tree (ImageNet: 1.28 M files)."""
    for cls in sorted(d for d in os.listdir(split) if (split / d).is_dir()):
        for dirpath, dirnames, filenames in os.walk(split / cls, followlinks=True):
            dirnames.sort()
            images = sorted(f for f in filenames if f.lower().endswith(IMG_EXTENSIONS))
            if images:
                return os.path.join(dirpath, images[0])
    return str(ImageFolderDataset(split).samples[0][0])     # no image: its one-line error names the problem


def _same_classes(root: Path, train: Iterable[str], val: Iterable[str]) -> None:
    if list(val) != list(train):
        raise DataError(f"--data: {root}/val has classes {list(val)[:5]}… that differ from train/")


@dataclass
class _Run:
    """What every source needs to know about the run."""
    cfg: TrainConfig
    device: torch.device
    rank: int
    world_size: int
    local_batch: int
    views: int      # > 1: one independently augmented view per member (KDCL, PCL); x is then a list
    train: bool = True                                       # False: the validation set alone (fastmcl.evaluate)
    stats: tuple[list[float] | None, list[float] | None] | None = None   # the training data's mean, std, if known


class Batches(Protocol):
    """The one interface of the sources: what `TrainData` asks of each."""
    labels: torch.Tensor            # [N] class of every training sample
    num_classes: int
    classes: list[str]              # class names, in label order
    mean: list[float] | None        # the normalisation the batches carry (None: not normalised)
    std: list[float] | None
    loader_name: str
    val_sharded: bool               # each rank gets only its shard of the val set

    def train_batches(self, indices: list[int], epoch: int) -> Iterable: ...     # this rank's indices, in order

    def val_batches(self) -> Iterable: ...


class LoaderBatches:
    """Synthetic data and ImageNet-style trees: a torch DataLoader (PIL decode, keyed per-item augmentation)."""
    val_sharded = False

    def __init__(self, run: _Run, source: DataSource):
        cfg = run.cfg
        self.run = run
        self.train_set = None
        if source.kind == "synthetic":
            if run.train:
                self.train_set = SyntheticDataset(cfg.synthetic_samples, cfg.num_classes, cfg.image_size,
                                                  seed=cfg.seed)
            self.val_set = SyntheticDataset(max(cfg.synthetic_samples // 4, 1), cfg.num_classes, cfg.image_size,
                                            seed=cfg.seed + 1)
            self.loader_name = "DataLoader (synthetic)"
            self.mean = self.std = None
        else:
            if run.train:
                self.train_set = ImageFolderDataset(source.root / "train", imagenet_train_transform(cfg.image_size),
                                                    aug_seed=cfg.seed, views=run.views)
            self.val_set = ImageFolderDataset(source.root / "val", imagenet_val_transform(cfg.image_size,
                                                                                          cfg.val_resize))
            if run.train:
                _same_classes(source.root, self.train_set.classes, self.val_set.classes)
            self.loader_name = "DataLoader (PIL)"
            self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        named = self.train_set if run.train else self.val_set
        self.labels = named.labels
        self.classes = [str(c) for c in named.classes]
        self.num_classes = len(self.classes)
        self._train_loader = self._val_loader = None

    def train_batches(self, indices: list[int], epoch: int) -> Iterable:
        """One DataLoader for the whole run, its workers kept from epoch to epoch (`persistent_workers`): the
        epoch's indices go through a sampler read in this process, the epoch to the workers through the dataset's
        shared `set_epoch`."""
        run = self.run
        if hasattr(self.train_set, "set_epoch"):
            self.train_set.set_epoch(epoch)
        if self._train_loader is None:
            self._indices = _Indices(indices)
            self._train_loader = build_dataloader(self.train_set, batch_size=run.local_batch, train=True,
                                                  sampler=self._indices, num_workers=run.cfg.workers,
                                                  seed=run.cfg.seed, rank=run.rank, persistent_workers=True,
                                                  pin_memory=run.device.type == "cuda")
        self._indices.indices = indices
        return self._train_loader if run.views == 1 else _as_views(self._train_loader, run.views)

    def val_batches(self) -> Iterable:
        if self._val_loader is None:    # evaluated every epoch: its workers are kept too
            self._val_loader = build_dataloader(self.val_set, batch_size=max(self.run.local_batch, 64), train=False,
                                                num_workers=self.run.cfg.workers, seed=self.run.cfg.seed,
                                                persistent_workers=True)
        return self._val_loader


class _Indices(Sampler):
    """The indices of the current epoch, replaced each epoch (a sampler that a persistent DataLoader keeps)."""
    def __init__(self, indices: list[int]):
        self.indices = indices

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _as_views(loader: Iterable, views: int) -> Iterator:
    """[B, V, C, H, W] batches → a list of V views; synthetic data (no augmentation) repeats its one tensor."""
    for x, y, index in loader:
        yield (list(x.unbind(1)) if x.dim() == 5 else [x] * views), y, index


class ResidentBatches:
    """CIFAR-100 pickles and small trees: uint8 images on the device, cropped/flipped and normalised there."""
    loader_name = "in-memory tensors on the device"
    val_sharded = False

    def __init__(self, run: _Run, source: DataSource):
        self.run = run
        if source.kind == "cifar100":
            val_images, val_labels = load_cifar100(source.root, train=False)
            images, labels = load_cifar100(source.root, train=True) if run.train else (None, val_labels)
            self.num_classes, self.mean, self.std = 100, CIFAR100_MEAN, CIFAR100_STD
            self.classes = [str(c) for c in range(100)]
        else:
            val_images, val_labels, classes = decode_tree(source.root / "val", run.cfg.image_size)
            images, labels = None, val_labels
            if run.train or not (run.stats and run.stats[0]):     # the normalisation comes from the train images
                images, labels, train_classes = decode_tree(source.root / "train", run.cfg.image_size)
                _same_classes(source.root, train_classes, classes)
                x = images.float().div(255)
                self.mean, self.std = x.mean((0, 2, 3)).tolist(), x.std((0, 2, 3)).clamp_min(1e-3).tolist()
            else:
                self.mean, self.std = run.stats
            self.num_classes, self.classes = len(classes), [str(c) for c in classes]
        self.labels = labels
        if run.train:
            self.images, self.device_labels = images.to(run.device), labels.to(run.device)
        self.val_images, self.val_labels = val_images.to(run.device), val_labels.to(run.device)

    def train_batches(self, indices: list[int], epoch: int) -> Iterable:
        run = self.run
        loader = DeviceBatchLoader(self.images, self.device_labels, batch_size=run.local_batch, sampler=indices,
                                   train=True, mean=self.mean, std=self.std, aug_seed=run.cfg.seed,
                                   channels_last=run.cfg.channels_last, views=run.views)
        loader.set_epoch(epoch)
        return loader

    def val_batches(self) -> Iterable:
        return DeviceBatchLoader(self.val_images, self.val_labels, batch_size=max(self.run.local_batch, 256),
                                 sampler=range(len(self.val_labels)), train=False, mean=self.mean, std=self.std,
                                 channels_last=self.run.cfg.channels_last)


class DaliBatches:
    """`--dali`: ImageFolder trees decoded by DALI; training fed this rank's indices, validation sharded by DALI's
    reader (each rank sees its shard: sum the counts over ranks)."""
    val_sharded = True

    def __init__(self, run: _Run, source: DataSource):
        cfg = run.cfg
        dali.check_options(cfg.dali_device, cfg.dali_threads, cfg.dali_prefetch, cfg.hw_decoder_load)
        if source.kind not in ("imagefolder", "digits"):
            raise DataError(f"--dali decodes image files (ImageFolder trees, the digits demo); {source.kind} data is "
                            f"already decoded tensors: drop --dali")
        dali.require_dali()
        device = dali.resolve_dali_device(cfg.dali_device, run.device)
        val = dali.FileList.from_imagefolder(source.root / "val")
        style = "cifar" if source.cifar_style else "imagenet"
        known = run.stats if run.stats and run.stats[0] else None
        train = val
        if run.train or (style == "cifar" and known is None):
            train = dali.FileList.from_imagefolder(source.root / "train")
            _same_classes(source.root, train.classes, val.classes)
        self.mean, self.std = (IMAGENET_MEAN, IMAGENET_STD) if style == "imagenet" else \
            known or tree_stats(train.paths, cfg.image_size)
        common = dict(size=cfg.image_size, style=style, mean=self.mean, std=self.std, device=device,
                      device_id=run.device.index if run.device.type == "cuda" else None,
                      num_threads=cfg.dali_threads, prefetch=cfg.dali_prefetch, hw_decoder_load=cfg.hw_decoder_load,
                      channels_last=cfg.channels_last, seed=cfg.seed)
        self.train = dali.DaliIndexLoader(train, batch_size=run.local_batch, views=run.views, **common) \
            if run.train else None
        self.val = dali.DaliReaderLoader(val, batch_size=max(run.local_batch, 64 if style == "imagenet" else 256),
                                         resize=cfg.val_resize, train=False, shard_id=run.rank,
                                         num_shards=run.world_size, **common)
        self.labels, self.num_classes, self.classes = train.labels, len(train.classes), [str(c) for c in train.classes]
        self.loader_name = (f"DALI {dali.dali_version()} {device} ({'mixed' if device == 'gpu' else 'cpu'} decoder, "
                            f"{cfg.dali_threads} threads, {style} augmentation)")

    def train_batches(self, indices: list[int], epoch: int) -> Iterable:
        return self.train.epoch_batches(indices, epoch)

    def val_batches(self) -> Iterable:
        return self.val


class TrainData:
    """Train and val batches for one run: the sampler and this rank's indices here, the batches from the source.

    `train_batches(epoch, skip)` resumes mid-epoch by skipping `skip` global batches; `val_sharded`: each rank sees
    only its shard of the val set (sum the counts over ranks). `val_only` (fastmcl.evaluate): the validation set alone,
    normalised with `stats`, the (mean, std) the networks were trained with, where the data's own statistics are used.
    """

    def __init__(self, cfg: TrainConfig, source: DataSource, device: torch.device, *, m_per_class: int = 0,
                 rank: int = 0, world_size: int = 1, views: int = 1, val_only: bool = False,
                 stats: tuple[list[float] | None, list[float] | None] | None = None):
        if cfg.batch_size % world_size:
            raise ValueError(f"--batch-size {cfg.batch_size} must be divisible by the {world_size} processes")
        self.cfg, self.source, self.device = cfg, source, device
        self.local_batch = cfg.batch_size // world_size
        kind = DaliBatches if cfg.dali else ResidentBatches if source.cifar_style and source.kind != "synthetic" \
            else LoaderBatches
        self.batches: Batches = kind(_Run(cfg, device, rank, world_size, self.local_batch, views, train=not val_only,
                                          stats=stats), source)
        self.labels, self.num_classes = self.batches.labels, self.batches.num_classes
        self.loader_name, self.val_sharded = self.batches.loader_name, self.batches.val_sharded
        if self.num_classes < 2:
            raise DataError(f"--data: {self.num_classes} class found; classification needs at least 2")
        if val_only:
            return
        order = MPerClassSampler(self.labels, m_per_class, cfg.batch_size, seed=cfg.seed) if m_per_class else \
            ShuffleSampler(len(self.labels), seed=cfg.seed)
        self.sampler = ShardedSampler(order, rank, world_size, batch_size=cfg.batch_size)

    def steps_per_epoch(self) -> int:
        return len(self.sampler) // self.local_batch

    def train_batches(self, epoch: int, skip_batches: int = 0) -> Iterable:
        self.sampler.set_epoch(epoch)
        return self.batches.train_batches(list(self.sampler)[skip_batches * self.local_batch:], epoch)

    def val_batches(self) -> Iterable:
        return self.batches.val_batches()

    def card(self) -> dict:
        """What a trained network needs to be used on new images: classes, input size and normalisation."""
        b, cfg = self.batches, self.cfg
        return {"num_classes": self.num_classes, "class_names": list(b.classes), "image_size": cfg.image_size,
                "val_resize": None if self.source.cifar_style else cfg.val_resize,
                "mean": None if b.mean is None else [float(v) for v in b.mean],
                "std": None if b.std is None else [float(v) for v in b.std]}
