"""Which logit blocks feed which contrastive term: the deduplicated form of a whole cohort's contrastive loss.

Embeddings are numbered flat, u = 0..NE−1, with `net_of[u]` their network. A block (u, v) is the logit matrix with
anchors e_u and contrasts "of v": in-batch e_v (S = e_u e_vᵀ/τ); with a memory bank, the bank of network net_of[v]
(so the block depends on v only through its network — docs/losses.md; the 128 → 16 deduplication). A block is a *view*
block when u and v belong to the same network (VCL; in the bank setting the own column is dropped) and a *cross*
block otherwise (ICL).

A term entry adds (1/B) Σ_b w[row, b] · stat_b to one of the four terms, where stat is a supervised-contrastive row
(`ce` entries) or a KL row between a student and a (detached) teacher block (`kl` entries).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from torch import Tensor

TERMS = ("vcl", "soft_vcl", "icl", "soft_icl")
VCL, SOFT_VCL, ICL, SOFT_ICL = range(4)

Block = tuple[int, int]


@dataclass(frozen=True)
class ContrastPlan:
    net_of: tuple[int, ...]                                   # network of each flat embedding
    ce: tuple[tuple[int, Block, int], ...]                    # (term, block, weight row)
    kl: tuple[tuple[int, Block, Block, int], ...]             # (term, student block, teacher block, weight row)
    num_weight_rows: int
    ce_blocks: tuple[Block, ...] = field(init=False)          # distinct blocks, in first-use order
    kl_blocks: tuple[tuple[Block, Block], ...] = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "ce_blocks", tuple(dict.fromkeys(b for _, b, _ in self.ce)))
        object.__setattr__(self, "kl_blocks", tuple(dict.fromkeys((s, t) for _, s, t, _ in self.kl)))
        for _, s, t, _ in self.kl:
            if self.is_view_block(s) != self.is_view_block(t):
                raise ValueError(f"plan pairs view block {s if self.is_view_block(s) else t} with cross block "
                                 f"{t if self.is_view_block(s) else s} in one KL entry")

    @property
    def num_embeddings(self) -> int:
        return len(self.net_of)

    def is_view_block(self, block: Block) -> bool:
        return self.net_of[block[0]] == self.net_of[block[1]]

    def index_tables(self, device: torch.device | str = "cpu") -> dict[str, Tensor]:
        """This plan's index tensors on `device` (`index_tables`)."""
        return index_tables(self, torch.device(device))


@functools.lru_cache(maxsize=64)
def index_tables(plan: ContrastPlan, device: torch.device) -> dict[str, Tensor]:
    """The plan's index tensors on `device` (built once per plan and device; plans are frozen): block lists
    (ce_u, ce_v, kl_su, kl_sv, kl_tu, kl_tv), term entries (ce/kl_term, _block, _row), net_of, the bank of each block
    (ce_m, kl_sm, kl_tm) and the view flags (ce_is_view, kl_is_view). Also `ContrastPlan.index_tables`."""
    ce_pos = {b: n for n, b in enumerate(plan.ce_blocks)}
    kl_pos = {b: n for n, b in enumerate(plan.kl_blocks)}

    def t(values):
        return torch.tensor(values, dtype=torch.long, device=device)

    return {
        "ce_u": t([b[0] for b in plan.ce_blocks]), "ce_v": t([b[1] for b in plan.ce_blocks]),
        "kl_su": t([s[0] for s, _ in plan.kl_blocks]), "kl_sv": t([s[1] for s, _ in plan.kl_blocks]),
        "kl_tu": t([t_[0] for _, t_ in plan.kl_blocks]), "kl_tv": t([t_[1] for _, t_ in plan.kl_blocks]),
        "ce_term": t([e[0] for e in plan.ce]), "ce_block": t([ce_pos[e[1]] for e in plan.ce]),
        "ce_row": t([e[2] for e in plan.ce]),
        "kl_term": t([e[0] for e in plan.kl]), "kl_block": t([kl_pos[(e[1], e[2])] for e in plan.kl]),
        "kl_row": t([e[3] for e in plan.kl]),
        "net_of": t(list(plan.net_of)),
        # bank setting: the bank (network) each block scores against
        "ce_m": t([plan.net_of[b[1]] for b in plan.ce_blocks]),
        "kl_sm": t([plan.net_of[s[1]] for s, _ in plan.kl_blocks]),
        "kl_tm": t([plan.net_of[t_[1]] for _, t_ in plan.kl_blocks]),
        # bank setting: which distinct blocks are view (same network) or cross blocks
        "ce_is_view": torch.tensor([plan.is_view_block(b) for b in plan.ce_blocks], dtype=torch.bool, device=device),
        "kl_is_view": torch.tensor([plan.is_view_block(s) for s, _ in plan.kl_blocks], dtype=torch.bool, device=device),
    }


def layer_pairs(num_stages: list[int]) -> list[tuple[int, int, int, int]]:
    """Every ordered cross-network stage pair (i, k, j, z) in the official code's loop order (docs/fidelity.md):
    for i, for j ≠ i, for stage k of i, for stage z of j. Its position is the pair's weight row."""
    n = len(num_stages)
    return [(i, k, j, z) for i in range(n) for j in range(n) if i != j
            for k in range(num_stages[i]) for z in range(num_stages[j])]


def flat_index(num_stages: list[int]) -> tuple[dict[tuple[int, int], int], tuple[int, ...]]:
    """(network, stage) → flat embedding number, and the network of each flat embedding."""
    flat, net_of = {}, []
    for i, s_count in enumerate(num_stages):
        for s in range(s_count):
            flat[(i, s)] = len(net_of)
            net_of.append(i)
    return flat, tuple(net_of)


def pair_call_entries(a: int, b: int, row: int):
    """The four terms of one official pair call on (e_a, e_b) (docs/losses.md): both directions of each."""
    ce = [(ICL, (a, b), row), (ICL, (b, a), row), (VCL, (a, a), row), (VCL, (b, b), row)]
    kl = [(SOFT_ICL, (a, b), (b, a), row), (SOFT_ICL, (b, a), (a, b), row),
          (SOFT_VCL, (a, a), (b, b), row), (SOFT_VCL, (b, b), (a, a), row)]
    return ce, kl


def lmcl_plan(num_stages: list[int]) -> ContrastPlan:
    """L-MCL: one weighted pair call per ordered cross-network stage pair, summed (docs/losses.md)."""
    flat, net_of = flat_index(num_stages)
    ce, kl = [], []
    for row, (i, k, j, z) in enumerate(layer_pairs(num_stages)):
        c, k_ = pair_call_entries(flat[(i, k)], flat[(j, z)], row)
        ce += c
        kl += k_
    return ContrastPlan(net_of, tuple(ce), tuple(kl), num_weight_rows=len(layer_pairs(num_stages)))


def mcl_plan(num_nets: int) -> ContrastPlan:
    """MCL with n networks, final layer (docs/losses.md): ICL and soft ICL over unordered pairs i < j
    (both directions), VCL over each network once, soft VCL over all ordered pairs i ≠ j. No weights (row 0 = 1)."""
    ce, kl = [], []
    for i in range(num_nets):
        ce.append((VCL, (i, i), 0))
        for j in range(num_nets):
            if j != i:
                kl.append((SOFT_VCL, (i, i), (j, j), 0))
            if j > i:
                ce += [(ICL, (i, j), 0), (ICL, (j, i), 0)]
                kl += [(SOFT_ICL, (i, j), (j, i), 0), (SOFT_ICL, (j, i), (i, j), 0)]
    return ContrastPlan(tuple(range(num_nets)), tuple(ce), tuple(kl), num_weight_rows=1)


def pair_plan() -> ContrastPlan:
    """One official pair call on two embeddings of two networks: the single-pair API through the cohort engine."""
    ce, kl = pair_call_entries(0, 1, 0)
    return ContrastPlan((0, 1), tuple(ce), tuple(kl), num_weight_rows=1)
