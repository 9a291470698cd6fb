"""L-MCL meta-network for layer matching weights (docs/official_mcl.md §2.3, [L] models/meta_network.py:5-43)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MetaWeightNet(nn.Module):
    """One `Linear(d_{i,s} → proj_dim)` (bias, no activation) per (network i, stage s) on the raw pooled features.

    For a pair (i, k, j, z): `w[b] = sigmoid(<normalize(P_{i,k} f_{i,k}[b]), normalize(P_{j,z} f_{j,z}[b])>)`, so
    every weight lies in (sigmoid(-1), sigmoid(1)) ≈ (0.27, 0.73). The pair order is the caller's (docs/official_mcl.md §2.2).
    """

    def __init__(self, feature_dims: list[list[int]], proj_dim: int = 128):
        super().__init__()
        if not feature_dims or any(len(dims) == 0 for dims in feature_dims):
            raise ValueError(f"feature_dims: need >= 1 network with >= 1 stage each, got {feature_dims}")
        self.feature_dims = [list(d) for d in feature_dims]
        self.proj_dim = proj_dim
        self.proj = nn.ModuleList(nn.ModuleList(nn.Linear(d, proj_dim) for d in dims) for dims in feature_dims)
        # row of (i, s) in the stacked projection tensor
        self._offsets = [0]
        for dims in feature_dims:
            self._offsets.append(self._offsets[-1] + len(dims))

    def project(self, features: list[list[Tensor]]) -> Tensor:
        """Project and L2-normalise every (net, stage) feature once → `[N_total, B, proj_dim]`."""
        if len(features) != len(self.proj) or any(len(f) != len(p) for f, p in zip(features, self.proj)):
            raise ValueError(f"features: expected stage counts {[len(d) for d in self.feature_dims]}, "
                             f"got {[len(f) for f in features]}")
        z = [F.normalize(proj(f), dim=1) for net_proj, net_feats in zip(self.proj, features)
             for proj, f in zip(net_proj, net_feats)]
        return torch.stack(z)

    def _flat_index(self, pairs: Sequence[tuple[int, int, int, int]], device: torch.device) -> tuple[Tensor, Tensor]:
        a, b = [], []
        n_nets = len(self.proj)
        for pair in pairs:
            if len(pair) != 4:
                raise ValueError(f"pairs: each pair must be (i, k, j, z), got {pair!r}")
            i, k, j, z = (int(v) for v in pair)
            for net, stage in ((i, k), (j, z)):
                if not (0 <= net < n_nets and 0 <= stage < len(self.proj[net])):
                    raise ValueError(f"pairs: (network {net}, stage {stage}) in {pair!r} is out of range for "
                                     f"stage counts {[len(d) for d in self.feature_dims]}")
            a.append(self._offsets[i] + k)
            b.append(self._offsets[j] + z)
        return (torch.tensor(a, dtype=torch.long, device=device), torch.tensor(b, dtype=torch.long, device=device))

    def forward(self, features: list[list[Tensor]], pairs: Sequence[tuple[int, int, int, int]]) -> Tensor:
        """Matching weights `[len(pairs), B]`: row c belongs to `pairs[c]`."""
        z = self.project(features)                          # [N, B, D]
        a, b = self._flat_index(pairs, z.device)
        return torch.sigmoid((z[a] * z[b]).sum(-1))         # [P, B]
