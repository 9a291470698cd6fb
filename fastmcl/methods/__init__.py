"""Methods (objectives): each a plain function of the cohort members' outputs plus the modules it owns. Each file
registers its class (`base.register`); importing them here, in this order, fills the table of names."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

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


@dataclass(frozen=True)
class ResolvedMethod:
    """A method resolved for one run, once: its class, whether it contrasts against memory banks, what it needs
    before its cohort exists, and its contrast weights (None for a method without contrastive terms)."""
    cls: type[Objective]
    memory_bank: bool
    needs: MethodNeeds
    weights: ContrastWeights | None


def resolve_method(name: str, *, memory_bank: bool | None = None, cifar_style: bool = True,
                   **weights: float | None) -> ResolvedMethod:
    """The one resolution of `name`: the memory bank (None: on for ImageNet-style data where the method has one),
    its needs, and its contrast weights — the method's defaults (docs/official_mcl.md §0) with every given value of
    `weights` (tau, alpha, gamma, beta, lam, kd_T) on top. A memory bank the method does not have is a ValueError."""
    cls = get_method(name)
    bank = cls.supports_memory_bank and not cifar_style if memory_bank is None else bool(memory_bank)
    if bank and not cls.supports_memory_bank:
        banked = ", ".join(n for n in METHODS if get_method(n).supports_memory_bank)
        raise ValueError(f"method {name!r} has no memory bank; memory_bank is only for {banked}")
    w = cls.default_weights(bank)
    if w is not None:
        w = dataclasses.replace(w, **{k: v for k, v in weights.items() if v is not None})
    return ResolvedMethod(cls, bank, cls.needs_for(bank), w)


def method_needs(name: str, *, memory_bank: bool = False) -> MethodNeeds:
    """What `name` needs before its cohort exists (layout, views, EMA copy, sizes)."""
    return resolve_method(name, memory_bank=memory_bank).needs


def build_method(method: str | ResolvedMethod, **settings) -> Objective:
    """The objective for a cohort, from a resolved method (or a name, resolved here with `memory_bank` and
    `kd_T` from `settings`) and the other fields of `MethodContext` (feature_dims, num_stages, num_classes,
    num_samples, ...)."""
    if not isinstance(method, ResolvedMethod):
        method = resolve_method(method, memory_bank=settings.pop("memory_bank", False), kd_T=settings.get("kd_T"))
    ctx = MethodContext(memory_bank=method.memory_bank, weights=method.weights, **settings)
    if ctx.members < 2:
        raise ValueError(f"method {method.cls.name!r} is mutual: it needs a cohort of at least 2 members, got "
                         f"{ctx.members}")
    if ctx.memory_bank and ctx.num_samples < 2:
        raise ValueError(f"memory_bank needs num_samples >= 2 (the dataset size), got {ctx.num_samples}")
    objective = method.cls.create(ctx)
    objective.needs = method.needs
    return objective


__all__ = ["METHODS", "Baseline", "CLILR", "ContrastWeights", "DML", "KDCL", "LMCL", "MCL", "MethodContext",
           "MethodNeeds", "OKDDip", "ONE", "Objective", "PCL", "ResolvedMethod", "StepOutput", "build_method",
           "get_method", "method_needs", "resolve_method"]
