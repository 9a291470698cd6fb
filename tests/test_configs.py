"""The parity configs under configs/ are valid configs that name the paper number they should reproduce."""
from pathlib import Path

import pytest

from fastmcl.config import TrainConfig, load_yaml

CONFIGS = sorted((Path(__file__).parent.parent / "configs").rglob("*.yaml"))


def test_parity_configs_exist_for_the_published_tables():
    names = {p.relative_to(p.parent.parent).with_suffix("").as_posix() for p in CONFIGS}
    for want in ("cifar100/pcl_resnet32", "cifar100/pcl_resnet110", "cifar100/lmcl_wrn_40_2", "imagenet/pcl_resnet18",
                 "imagenet/lmcl_resnet34"):
        assert want in names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_parity_config_is_valid_and_cites_its_number(path):
    cfg = TrainConfig(**load_yaml(path))
    cfg.validate()
    text = path.read_text()
    assert "Expected top-1" in text and "NOT YET REPRODUCED" in text
    assert cfg.method in path.stem
