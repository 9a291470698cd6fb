"""One cohort member as a standalone classifier: the network a user deploys after training.

Every member is one backbone of its architecture, whatever the cohort's layout: an independent member is its backbone
without the L-MCL auxiliary branches (docs/official_mcl.md §2.1), a shared-trunk member is the trunk (stem + first stages)
followed by its own branch (remaining stages, post, fc), which together are exactly a backbone's modules, as
`build_cohort` cut them. So the exported network is always `Classifier(arch, num_classes)`, and its logits equal the
member's final logits inside the cohort.
"""
from __future__ import annotations

from torch import Tensor, nn

from .cohort import Cohort
from .registry import build_backbone


class Classifier(nn.Module):
    """`forward(x) -> logits [B, num_classes]`: one plain backbone of `arch` (no auxiliary branches)."""

    def __init__(self, arch: str, num_classes: int):
        super().__init__()
        self.arch = arch
        self.num_classes = num_classes
        self.backbone = build_backbone(arch, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x).logits[-1]


def member_state_dict(cohort: Cohort, i: int) -> dict[str, Tensor]:
    """Member `i`'s weights under a plain backbone's keys (`stem.*`, `layer{s}.*`, `post.*`, `fc.*`).

    Independent members drop their `aux.*` branches; a shared-trunk member maps the trunk's `0.*` (stem) and
    `{s}.*` (stage s) and its branch's `stages.{j}.*` (stage trunk_stages + 1 + j) onto the backbone's names.
    """
    cohort.member_modules(i)                            # validates i
    net = cohort.nets[i]
    if cohort.trunk is None:
        return {k: v for k, v in net.state_dict().items() if not k.startswith("aux.")}
    trunk_stages = len(cohort.trunk) - 1
    out: dict[str, Tensor] = {}
    for key, value in cohort.trunk.state_dict().items():
        index, rest = key.split(".", 1)
        out[f"stem.{rest}" if index == "0" else f"layer{index}.{rest}"] = value
    for key, value in net.state_dict().items():
        if key.startswith("stages."):
            _, j, rest = key.split(".", 2)
            key = f"layer{trunk_stages + 1 + int(j)}.{rest}"
        out[key] = value
    return out


def extract_member(cohort: Cohort, i: int) -> Classifier:
    """A `Classifier` holding a copy of member `i`'s weights (eval mode, on the CPU, fp32 as trained)."""
    num_classes = int(cohort.nets[i].fc.out_features)
    classifier = Classifier(cohort.archs[i], num_classes)
    state = {f"backbone.{k}": v.detach().cpu().clone() for k, v in member_state_dict(cohort, i).items()}
    classifier.load_state_dict(state)
    return classifier.eval()
