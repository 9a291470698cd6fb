"""Methods (objectives): each a plain function of the cohort members' outputs plus the modules it owns."""
from __future__ import annotations

from .base import MethodNeeds, Objective, StepOutput
from .clilr import CLILR
from .contrastive import ContrastiveObjective
from .dml import DML
from .kdcl import KDCL
from .lmcl import LMCL
from .mcl import MCL
from .okddip import OKDDip
from .one import ONE
from .pcl import PCL
from .weights import ContrastWeights

_CLASSES: dict[str, type[Objective]] = {"dml": DML, "one": ONE, "okddip": OKDDip, "kdcl": KDCL, "clilr": CLILR,
                                        "pcl": PCL, "mcl": MCL, "lmcl": LMCL}
METHODS = tuple(_CLASSES)


def _check_name(name: str) -> type[Objective]:
    if name not in _CLASSES:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {name!r}")
    return _CLASSES[name]


def method_needs(name: str, *, memory_bank: bool = False) -> MethodNeeds:
    """What `name` needs before its cohort exists (layout, views, EMA copy, sizes).

    The baselines declare it as a class attribute. MCL / L-MCL set theirs per instance because it depends on the
    memory bank (in-batch contrast needs 2 samples per class, `ContrastiveObjective`); pass `memory_bank` to match.
    """
    cls = _check_name(name)
    if issubclass(cls, ContrastiveObjective):
        return MethodNeeds(aux=name == "lmcl", memory_bank=memory_bank, m_per_class=0 if memory_bank else 2)
    return cls.needs


def build_method(name: str, *, feature_dims: list[int], num_stages: list[int], num_classes: int,
                 memory_bank: bool = False, num_samples: int = 0, weights: ContrastWeights | None = None,
                 feat_dim: int = 128, pos_k: int = 1, nce_m: float = 0.5, kd_T: float = 3.0,
                 logit_kd: bool = False, backend: str = "reference", k_chunk: int | None = None,
                 trunk_dim: int | None = None, rampup_epochs: int = 80) -> Objective:
    """`trunk_dim`: the shared trunk's width (`cohort.trunk_dim`, ONE's gate); `rampup_epochs`: length L of the
    sigmoid ramp-up of ONE / OKDDip / CL-ILR / PCL (0: no ramp)."""
    _check_name(name)
    if len(feature_dims) < 2:
        raise ValueError(f"method {name!r} is mutual: it needs a cohort of at least 2 members, got {len(feature_dims)}")
    if memory_bank and num_samples < 2:
        raise ValueError(f"memory_bank needs num_samples >= 2 (the dataset size), got {num_samples}")
    m = len(feature_dims)
    if name == "dml":
        return DML(m, kd_T=kd_T)
    if name in ("mcl", "lmcl"):
        weights = weights or ContrastWeights.defaults(name, memory_bank)
        common = dict(weights=weights, memory_bank=memory_bank, num_samples=num_samples, feat_dim=feat_dim,
                      pos_k=pos_k, nce_m=nce_m, backend=backend, k_chunk=k_chunk)
        if name == "mcl":
            return MCL(feature_dims, logit_kd=logit_kd, detach_ensemble=not memory_bank, **common)
        return LMCL(feature_dims, num_stages, num_classes, **common)
    # the online-KD baselines (spec/pcl_baselines.md §2, §1): logit-level, no memory bank
    if memory_bank:
        raise ValueError(f"method {name!r} has no memory bank; memory_bank is only for mcl / lmcl")
    if name == "one":
        return ONE(m, trunk_dim, kd_T=kd_T, rampup_epochs=rampup_epochs)
    if name == "okddip":
        if len(set(feature_dims[:-1])) != 1:
            raise ValueError(f"method 'okddip' shares Q/K over the peers: their feature dims must be equal, "
                             f"got {list(feature_dims[:-1])}")
        return OKDDip(m, feature_dims[0], kd_T=kd_T, rampup_epochs=rampup_epochs)
    if name == "kdcl":
        return KDCL(m, kd_T=kd_T)
    if name == "clilr":
        return CLILR(m, kd_T=kd_T, rampup_epochs=rampup_epochs)
    return PCL(feature_dims, num_classes, kd_T=kd_T, rampup_epochs=rampup_epochs)


__all__ = ["METHODS", "CLILR", "ContrastWeights", "DML", "KDCL", "LMCL", "MCL", "MethodNeeds", "OKDDip",
           "ONE", "Objective", "PCL", "StepOutput", "build_method", "method_needs"]
