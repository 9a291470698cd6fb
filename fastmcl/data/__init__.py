"""fastmcl.data: datasets, transforms, samplers, the on-device negative sampler, and the optional DALI loaders.

Imports nothing else from fastmcl. Every bad-input problem raises :class:`DataError` with a one-line message.
Randomness that must not depend on the number of processes (global batches, negatives, keyed augmentation) is a
function of (seed, epoch/step, dataset index), never of a per-rank generator.
"""
from .cifar import CIFAR100_MEAN, CIFAR100_STD, TensorImageDataset, find_cifar100, load_cifar100
from .digits import ensure_digits_imagefolder
from .errors import DataError
from .imagefolder import IMG_EXTENSIONS, ImageFolderDataset, find_classes, load_rgb
from .loader import DeviceBatchLoader, build_dataloader, seed_worker
from .negatives import NegativeSampler
from .samplers import MPerClassSampler, ShardedSampler, ShuffleSampler
from .synthetic import SyntheticDataset
from .transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CenterCrop,
    Compose,
    RandomHorizontalFlip,
    RandomResizedCrop,
    Resize,
    ToTensorNormalize,
    Transform,
    cifar_augment,
    imagenet_train_transform,
    imagenet_val_transform,
    normalize,
)

try:  # the DALI loaders: the module imports without nvidia.dali (dali_available() says whether DALI works)
    from .dali import (DaliIndexLoader, DaliReaderLoader, FileList, dali_available, find_undecodable,
                       resolve_dali_device)
except ImportError:  # pragma: no cover - only if the module itself is missing from a stripped install
    DaliIndexLoader = DaliReaderLoader = FileList = find_undecodable = resolve_dali_device = None  # type: ignore

    def dali_available() -> bool:
        return False

__all__ = [
    "DataError",
    "ensure_digits_imagefolder",
    "IMAGENET_MEAN", "IMAGENET_STD", "Transform", "Compose", "RandomResizedCrop", "RandomHorizontalFlip", "Resize",
    "CenterCrop", "ToTensorNormalize", "imagenet_train_transform", "imagenet_val_transform", "cifar_augment",
    "normalize",
    "IMG_EXTENSIONS", "ImageFolderDataset", "find_classes", "load_rgb",
    "CIFAR100_MEAN", "CIFAR100_STD", "load_cifar100", "find_cifar100", "TensorImageDataset",
    "SyntheticDataset",
    "MPerClassSampler", "ShuffleSampler", "ShardedSampler",
    "NegativeSampler",
    "build_dataloader", "seed_worker", "DeviceBatchLoader",
    "dali_available", "resolve_dali_device", "FileList", "DaliIndexLoader", "DaliReaderLoader", "find_undecodable",
]
