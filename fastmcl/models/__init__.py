"""Model zoo: CIFAR ResNet/WRN and ImageNet ResNet backbones (with optional L-MCL auxiliary branches), projection
heads, the stage aggregator, the L-MCL meta-network and the cohort container. Plain torch, no torchvision."""
from .base import BackboneOutput, Branch, StagedBackbone, global_pool
from .cohort import Cohort, build_cohort
from .heads import Aggregator, EmbedHead
from .meta_network import MetaWeightNet
from .registry import ARCHS, build_backbone, is_imagenet_arch
from .resnet_cifar import CifarResNet
from .resnet_imagenet import ImageNetResNet
from .standalone import Classifier, extract_member, member_state_dict
from .wrn_cifar import WideResNet

__all__ = [
    "ARCHS",
    "Aggregator",
    "BackboneOutput",
    "Branch",
    "CifarResNet",
    "Classifier",
    "Cohort",
    "EmbedHead",
    "ImageNetResNet",
    "MetaWeightNet",
    "StagedBackbone",
    "WideResNet",
    "build_backbone",
    "build_cohort",
    "extract_member",
    "global_pool",
    "is_imagenet_arch",
    "member_state_dict",
]
