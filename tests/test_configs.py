"""The parity configs under configs/ load, resolve and build the cohort they describe."""
from pathlib import Path

import pytest

from fastmcl.build import build_networks, resolve
from fastmcl.config import TrainConfig, load_yaml

CONFIGS = sorted((Path(__file__).parent.parent / "configs").rglob("*.yaml"))


def test_parity_configs_exist_for_the_published_tables():
    names = {p.relative_to(p.parent.parent).with_suffix("").as_posix() for p in CONFIGS}
    for want in ("cifar100/pcl_resnet32", "cifar100/pcl_resnet110", "cifar100/lmcl_wrn_40_2", "imagenet/pcl_resnet18",
                 "imagenet/lmcl_resnet34"):
        assert want in names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_parity_config_resolves_and_builds(path):
    cifar = path.parent.name == "cifar100"
    run = resolve(TrainConfig(**load_yaml(path)), cifar_style=cifar, demo=False)
    cfg = run.cfg
    assert cfg.method in path.stem and cfg.memory_bank == (not cifar and cfg.method in ("mcl", "lmcl"))
    nets = build_networks(run, num_classes=100 if cifar else 1000, num_samples=64)
    assert nets.cohort.members == len(cfg.members()) and nets.objective.name == cfg.method
