"""What every method (objective) looks like to the trainer, and the registry of methods by name.

The trainer never branches on a method's name: it reads `needs` to build the cohort and the data path, calls the
objective on the members' outputs, and evaluates every classifier `eval_logits` names (docs/official_baselines.md §3).
Each method file registers its class with `@register("name")` and says how it builds (`create`), what it needs
(`needs_for`) and its default contrast weights (`default_weights`); `fastmcl.methods.resolve_method` calls both,
once per run.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor, nn

from ..losses import compute_dtype, cross_entropy

if TYPE_CHECKING:
    from .weights import ContrastWeights


@dataclass(frozen=True)
class MethodNeeds:
    aux: bool = False                # L-MCL auxiliary branches (per-stage features and classifiers)
    memory_bank: bool = False        # dataset indices + contrast indices from the negative sampler
    m_per_class: int = 0             # in-batch contrast needs m samples per class in every batch (0: any sampler)
    min_members: int = 2             # a mutual method needs at least two members
    default_members: int = 2         # cohort size when the user gives none (ONE/PCL 3, OKDDip 4)
    shared_trunk: bool = False       # multi-branch: members share stem + all residual stages but the last
    trunk_grad_scale: bool = False   # CL-ILR: the gradient into the shared trunk is scaled by 1/m
    views: bool = False              # one independently augmented view of each image per member (KDCL, PCL)
    ema: bool = False                # a temporal-mean (EMA) copy of the cohort (PCL mean teachers)


@dataclass(frozen=True)
class MethodContext:
    """What a method is built from: the cohort's shape, the data's size and the method's settings."""
    feature_dims: list[int]
    num_stages: list[int]
    num_classes: int
    memory_bank: bool = False
    num_samples: int = 0              # dataset size (memory banks)
    weights: ContrastWeights | None = None   # MCL / L-MCL: the resolved weights (`resolve_method`)
    feat_dim: int = 128
    pos_k: int = 1
    nce_m: float = 0.5
    kd_T: float = 3.0
    logit_kd: bool = False
    backend: str = "reference"
    k_chunk: int | None = None
    trunk_dim: int | None = None      # the shared trunk's width (`cohort.trunk_dim`, ONE's gate)
    rampup_epochs: int = 80           # length of the sigmoid ramp-up (ONE / OKDDip / CL-ILR / PCL; 0: none)

    @property
    def members(self) -> int:
        return len(self.feature_dims)


class StepOutput(NamedTuple):
    loss: Tensor                     # scalar to backpropagate
    terms: dict[str, Tensor]         # named scalar parts (for logging; already weighted as in the total)
    state: dict[str, object]         # what `after_step` needs (e.g. embeddings for the memory bank)


class Objective(nn.Module):
    """Base class: a plain function of the members' outputs, plus the modules it owns (heads, banks, meta-net)."""

    #: the registered name (`--method`), set by `register`
    name: str = ""
    needs: MethodNeeds = MethodNeeds()
    #: whether the method can contrast against memory banks (its default on ImageNet-style data)
    supports_memory_bank: bool = False
    #: name of the classifier in `eval_logits` that is deployed (a member's final classifier)
    deployed: str = "net0"

    #: the training epoch (set by the trainer before each epoch; ramp-up weights read it)
    epoch: int = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    #: under DDP the trainer sets this to an all-gather with gradient (rank-ordered concatenation along dim 0);
    #: in-batch contrast gathers embeddings, labels and weights so negatives span the global batch
    gather = None

    @classmethod
    def needs_for(cls, memory_bank: bool = False) -> MethodNeeds:
        """What the method needs before its cohort exists (layout, views, EMA copy, sizes)."""
        return cls.needs

    @classmethod
    def default_weights(cls, memory_bank: bool) -> "ContrastWeights | None":
        """The method's contrast weights and temperatures when the user gives none; None without contrastive terms."""
        return None

    @classmethod
    def create(cls, ctx: MethodContext) -> "Objective":
        raise NotImplementedError

    def forward(self, outputs, labels: Tensor, contrast_idx: Tensor | None = None, *,
                ema_outputs=None) -> StepOutput:
        """`outputs`: one BackboneOutput per member; `ema_outputs`: the EMA cohort's outputs on the same input(s)
        (no gradient) when `needs.ema`, else None."""
        raise NotImplementedError

    @torch.no_grad()
    def after_step(self, out: StepOutput, index: Tensor | None) -> None:
        """Called after the optimizer step (memory-bank updates)."""

    def eval_logits(self, outputs, ema_outputs=None) -> dict[str, Tensor]:
        """Every classifier to evaluate, by name: members first as `net{i}`, then e.g. `net{i}.stage{s}`, `ens`,
        `ema{i}` (EMA members, when `needs.ema`)."""
        return {f"net{i}": o.logits[-1] for i, o in enumerate(outputs)}

    #: whether the objective has a meta phase (inner_loss / outer_loss / virtual_parameter_prefixes)
    supports_meta: bool = False

    def meta_parameters(self) -> list[nn.Parameter]:
        """Parameters trained by a separate (meta) optimizer, excluded from the main one."""
        return []

    def main_parameters(self) -> list[nn.Parameter]:
        meta = {id(p) for p in self.meta_parameters()}
        return [p for p in self.parameters() if id(p) not in meta]


def fp32(module: nn.Module, x: Tensor) -> Tensor:
    """Run a small head outside autocast in fp32 (fp64 stays fp64): L2-normalised embeddings scaled by 1/τ and the
    matching weights are too sensitive for bf16/fp16 (losses and softmax statistics stay fp32, docs/losses.md "Backends and numerics")."""
    with torch.autocast(x.device.type, enabled=False):
        return module(x.to(compute_dtype(x)))


def sum_ce(logit_list, labels: Tensor) -> Tensor:
    """Σ CE over a list of classifiers' logits."""
    return torch.stack([cross_entropy(z, labels) for z in logit_list]).sum()


_REGISTRY: dict[str, type[Objective]] = {}


def register(name: str):
    """Class decorator: make an `Objective` subclass available as `--method name`."""
    def add(cls: type[Objective]) -> type[Objective]:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return add


def registered() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get_method(name: str) -> type[Objective]:
    """The class registered as `name`; an unknown name is a ValueError that suggests the closest one."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(str(name), _REGISTRY, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"method must be one of {', '.join(_REGISTRY)}, got {name!r}{hint}")
    return _REGISTRY[name]
