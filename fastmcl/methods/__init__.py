"""Methods (objectives): each a plain function of the cohort members' outputs plus the modules it owns. Each file
registers its class (`base.register`); importing them here, in this order, fills the table of names."""
from __future__ import annotations

from .base import MethodContext, MethodNeeds, Objective, StepOutput, get_method, registered
from .baseline import Baseline
from .dml import DML
from .one import ONE
from .okddip import OKDDip
from .kdcl import KDCL
from .clilr import CLILR
from .pcl import PCL
from .mcl import MCL
from .lmcl import LMCL
from .weights import ContrastWeights

#: every `--method`, in the order of the documentation
METHODS = registered()


def method_needs(name: str, *, memory_bank: bool = False) -> MethodNeeds:
    """What `name` needs before its cohort exists (layout, views, EMA copy, sizes)."""
    return get_method(name).needs_for(memory_bank)


def build_method(name: str, **settings) -> Objective:
    """The objective `name` for a cohort, from the fields of `MethodContext` (feature_dims, num_stages, num_classes,
    memory_bank, num_samples, weights, kd_T, ...)."""
    cls = get_method(name)
    ctx = MethodContext(**settings)
    if ctx.members < 2:
        raise ValueError(f"method {name!r} is mutual: it needs a cohort of at least 2 members, got {ctx.members}")
    if ctx.memory_bank and not cls.supports_memory_bank:
        banked = ", ".join(n for n in METHODS if get_method(n).supports_memory_bank)
        raise ValueError(f"method {name!r} has no memory bank; memory_bank is only for {banked}")
    if ctx.memory_bank and ctx.num_samples < 2:
        raise ValueError(f"memory_bank needs num_samples >= 2 (the dataset size), got {ctx.num_samples}")
    return cls.create(ctx)


__all__ = ["METHODS", "Baseline", "CLILR", "ContrastWeights", "DML", "KDCL", "LMCL", "MCL", "MethodContext",
           "MethodNeeds", "OKDDip", "ONE", "Objective", "PCL", "StepOutput", "build_method", "get_method",
           "method_needs"]
