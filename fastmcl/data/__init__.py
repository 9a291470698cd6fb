"""fastmcl.data: datasets, transforms, samplers, the on-device negative sampler and the optional DALI loaders.

Imports nothing else from fastmcl. Every bad-input problem raises `DataError` with a one-line message. Randomness
that must not depend on the number of processes (global batches, negatives, keyed augmentation) is a function of
(seed, epoch/step, dataset index), never of a per-rank generator.
"""
from . import dali
from .cifar import CIFAR100_MEAN, CIFAR100_STD, find_cifar100, load_cifar100
from .dali import dali_available
from .digits import ensure_digits_imagefolder
from .errors import DataError
from .imagefolder import IMG_EXTENSIONS, ImageFolderDataset, decode_tree, find_classes, load_rgb, tree_stats
from .loader import DeviceBatchLoader, build_dataloader, seed_worker
from .negatives import NegativeSampler
from .samplers import MPerClassSampler, ShardedSampler, ShuffleSampler
from .synthetic import SyntheticDataset
from .transforms import (IMAGENET_MEAN, IMAGENET_STD, CenterCrop, Compose, RandomHorizontalFlip, RandomResizedCrop,
                         Resize, ToTensorNormalize, Transform, cifar_augment, imagenet_train_transform,
                         imagenet_val_transform, normalize)

__all__ = [
    "DataError", "ensure_digits_imagefolder",
    "IMAGENET_MEAN", "IMAGENET_STD", "Transform", "Compose", "RandomResizedCrop", "RandomHorizontalFlip", "Resize",
    "CenterCrop", "ToTensorNormalize", "imagenet_train_transform", "imagenet_val_transform", "cifar_augment",
    "normalize", "IMG_EXTENSIONS", "ImageFolderDataset", "find_classes", "load_rgb", "decode_tree", "tree_stats",
    "CIFAR100_MEAN", "CIFAR100_STD", "load_cifar100", "find_cifar100", "SyntheticDataset",
    "MPerClassSampler", "ShuffleSampler", "ShardedSampler", "NegativeSampler",
    "build_dataloader", "seed_worker", "DeviceBatchLoader", "dali", "dali_available",
]
