"""The cohort: the set of networks trained together, for every method (docs/official_baselines.md §3).

Two layouts:
- independent members (DML, KDCL, MCL×2, L-MCL): each member owns a whole backbone (heterogeneous archs allowed);
- shared trunk (MCL×4 "ResNet_b"/"WideResNet_b", docs/fidelity.md Q3; ONE/OKDDip/PCL, docs/official_baselines.md §1.1):
  ONE stem + the first `trunk_stages` residual stages, then one branch per member with its own copies of the
  remaining stages, pool and fc.
Input is one batch for all members, or one view per member (KDCL, PCL). Through a shared trunk, per-member views run
the trunk once per view (as PCL's reference does; batching views would change the BN statistics).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from .base import BackboneOutput, Branch, StagedBackbone, global_pool
from .registry import build_backbone


class _ScaleGrad(torch.autograd.Function):
    """Identity forward, gradient × scale backward (CL-ILR's backprop rescaling, docs/official_baselines.md §2.5)."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.scale, None


class Cohort(nn.Module):
    """`forward(x) -> list[BackboneOutput]`, one per member, in member order.

    Attributes: `members` (count), `feature_dims` / `num_stages` (per member), `archs`, `shared_trunk` (bool).
    Modules: `nets` (backbones, or branches when shared), `trunk` (shared stem+stages, or None).
    """

    def __init__(self, nets: Sequence[nn.Module], *, trunk: nn.Module | None = None,
                 archs: Sequence[str] | None = None):
        super().__init__()
        if len(nets) == 0:
            raise ValueError("nets: a cohort needs at least one member")
        self.nets = nn.ModuleList(nets)
        self.trunk = trunk
        self.members: int = len(nets)
        self.feature_dims: list[int] = [int(net.feature_dim) for net in nets]
        # a shared-trunk branch has a single output (aux branches are not supported there)
        self.num_stages: list[int] = [1 if trunk is not None else int(net.num_stages) for net in nets]
        self.archs: list[str] = list(archs) if archs is not None else [type(n).__name__ for n in nets]
        #: scale of the gradient flowing back into the shared trunk (CL-ILR: 1/m); 1 leaves it alone
        self.trunk_grad_scale: float = 1.0
        #: channels of the shared trunk's output (the width of `BackboneOutput.trunk`), None without a trunk
        self.trunk_dim: int | None = None
        if trunk is not None:
            first_conv = next(m for m in nets[0].modules() if isinstance(m, nn.Conv2d))
            self.trunk_dim = int(first_conv.in_channels)

    @property
    def shared_trunk(self) -> bool:
        return self.trunk is not None

    def _views(self, x: Tensor | Sequence[Tensor]) -> list[Tensor] | None:
        if isinstance(x, Tensor):
            return None
        if not isinstance(x, (list, tuple)) or not all(isinstance(v, Tensor) for v in x):
            raise ValueError(f"x: expected a Tensor or a list of {self.members} Tensors (one view per member), "
                             f"got {type(x).__name__}")
        if len(x) != self.members:
            raise ValueError(f"x: got {len(x)} views for a cohort of {self.members} members")
        return list(x)

    def forward(self, x: Tensor | Sequence[Tensor]) -> list[BackboneOutput]:
        views = self._views(x)
        if self.trunk is None:
            return [net(x if views is None else views[i]) for i, net in enumerate(self.nets)]
        # shared trunk: once for a common batch, once per view otherwise
        hs = [self.trunk(x)] * self.members if views is None else [self.trunk(v) for v in views]
        if self.trunk_grad_scale != 1.0:
            hs = [_ScaleGrad.apply(h, self.trunk_grad_scale) for h in hs]
        outs = []
        for net, h in zip(self.nets, hs):
            f, z = net(h)
            outs.append(BackboneOutput([f], [z], global_pool(h)))
        return outs

    def member_modules(self, i: int) -> list[nn.Module]:
        """Modules that make up member i: `[backbone]`, or `[trunk, branch_i]` with a shared trunk.

        Counting parameters over these gives the deployable size of member i; the trunk is shared, so summing
        over all members counts it more than once (use `cohort.parameters()` for the unique total).
        """
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.members:
            raise ValueError(f"i: member index must be in [0, {self.members}), got {i!r}")
        return [self.nets[i]] if self.trunk is None else [self.trunk, self.nets[i]]


def _split(backbone: StagedBackbone, trunk_stages: int) -> tuple[nn.Sequential, Branch]:
    """Cut a backbone after `trunk_stages` residual stages: (stem + first stages, rest + post + fc)."""
    stages = backbone.stage_modules()
    trunk = nn.Sequential(backbone.stem, *stages[:trunk_stages])
    branch = Branch(nn.Sequential(*stages[trunk_stages:]), backbone.post, backbone.fc)
    return trunk, branch


def build_cohort(archs: list[str], num_classes: int, *, aux: bool = False, shared_stem: bool = False,
                 trunk_stages: int | None = 1) -> Cohort:
    """Build a cohort of `len(archs)` members.

    `shared_stem=True` builds the multi-branch layout: one trunk (stem + the first `trunk_stages` residual stages;
    1 = MCL×4 "ResNet_b" of docs/fidelity.md Q3; None = all but the last, the ONE/OKDDip/CL-ILR/PCL split of
    docs/official_baselines.md §1.1) and one branch per member. It needs identical archs and no aux branches.
    """
    if isinstance(archs, str) or not isinstance(archs, (list, tuple)) or len(archs) == 0:
        raise ValueError(f"archs: expected a non-empty list of architecture names, got {archs!r}")
    if not shared_stem:
        if trunk_stages not in (1, None):
            raise ValueError(f"trunk_stages: only meaningful with shared_stem=True, got {trunk_stages}")
        nets = [build_backbone(a, num_classes, aux=aux) for a in archs]
        return Cohort(nets, archs=archs)

    if aux:
        raise ValueError("aux: auxiliary branches are not supported with shared_stem=True")
    if len(set(archs)) != 1:
        raise ValueError(f"archs: shared_stem=True needs identical archs, got {list(archs)}")
    # one fresh backbone per member (own init); member 0 donates the trunk, the others' stems are dropped
    backbones = [build_backbone(a, num_classes) for a in archs]
    n_res = backbones[0].num_res_stages
    trunk_stages = n_res - 1 if trunk_stages is None else trunk_stages
    if isinstance(trunk_stages, bool) or not isinstance(trunk_stages, int) or not 1 <= trunk_stages < n_res:
        raise ValueError(f"trunk_stages: must be in [1, {n_res - 1}] for {archs[0]}, got {trunk_stages!r}")
    trunk, _ = _split(backbones[0], trunk_stages)
    branches = [_split(bb, trunk_stages)[1] for bb in backbones]
    return Cohort(branches, trunk=trunk, archs=archs)
