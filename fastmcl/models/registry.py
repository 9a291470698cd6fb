"""Architecture registry: name → builder (re-exported by `fastmcl.models`)."""
from __future__ import annotations

from typing import Callable

from .base import StagedBackbone
from .resnet_cifar import resnet32, resnet56, resnet110
from .resnet_imagenet import resnet18, resnet34, resnet50
from .wrn_cifar import wrn_16_2, wrn_40_2

_CIFAR_BUILDERS: dict[str, Callable[..., StagedBackbone]] = {
    "resnet32": resnet32,
    "resnet56": resnet56,
    "resnet110": resnet110,
    "wrn_16_2": wrn_16_2,
    "wrn_40_2": wrn_40_2,
}
_IMAGENET_BUILDERS: dict[str, Callable[..., StagedBackbone]] = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
}
_BUILDERS = {**_CIFAR_BUILDERS, **_IMAGENET_BUILDERS}

ARCHS: tuple[str, ...] = tuple(_BUILDERS)


def _check_arch(arch: object) -> str:
    if not isinstance(arch, str) or arch not in _BUILDERS:
        raise ValueError(f"arch: unknown architecture {arch!r}; valid names: {', '.join(ARCHS)}")
    return arch


def is_imagenet_arch(arch: str) -> bool:
    """True for the ImageNet (224², 4-stage) ResNets, False for the CIFAR (32², 3-stage) nets."""
    return _check_arch(arch) in _IMAGENET_BUILDERS


def build_backbone(arch: str, num_classes: int, *, aux: bool = False) -> StagedBackbone:
    """Build one backbone; with `aux=True` it carries the L-MCL auxiliary branches (docs/official_mcl.md §2.1)."""
    _check_arch(arch)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes: must be an integer >= 2, got {num_classes!r}")
    return _BUILDERS[arch](num_classes, aux=bool(aux))
