"""Methods (objectives): each a plain function of the cohort members' outputs plus the modules it owns."""
from __future__ import annotations

from .base import MethodNeeds, Objective, StepOutput
from .dml import DML
from .lmcl import LMCL
from .mcl import MCL
from .weights import ContrastWeights

METHODS = ("dml", "mcl", "lmcl")

#: what each method needs before its cohort exists (auxiliary branches)
NEEDS_AUX = {"dml": False, "mcl": False, "lmcl": True}


def build_method(name: str, *, feature_dims: list[int], num_stages: list[int], num_classes: int,
                 memory_bank: bool = False, num_samples: int = 0, weights: ContrastWeights | None = None,
                 feat_dim: int = 128, pos_k: int = 1, nce_m: float = 0.5, kd_T: float = 3.0,
                 logit_kd: bool = False, backend: str = "reference", k_chunk: int | None = None) -> Objective:
    if name not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {name!r}")
    if len(feature_dims) < 2:
        raise ValueError(f"method {name!r} is mutual: it needs a cohort of at least 2 members, got {len(feature_dims)}")
    if memory_bank and num_samples < 2:
        raise ValueError(f"memory_bank needs num_samples >= 2 (the dataset size), got {num_samples}")
    if name == "dml":
        return DML(len(feature_dims), kd_T=kd_T)
    weights = weights or ContrastWeights.defaults(name, memory_bank)
    common = dict(weights=weights, memory_bank=memory_bank, num_samples=num_samples, feat_dim=feat_dim, pos_k=pos_k,
                  nce_m=nce_m, backend=backend, k_chunk=k_chunk)
    if name == "mcl":
        return MCL(feature_dims, logit_kd=logit_kd, detach_ensemble=not memory_bank, **common)
    return LMCL(feature_dims, num_stages, num_classes, **common)


__all__ = ["METHODS", "NEEDS_AUX", "ContrastWeights", "DML", "LMCL", "MCL", "MethodNeeds", "Objective", "StepOutput",
           "build_method"]
