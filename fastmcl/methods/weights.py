"""The contrastive loss weights and temperatures of MCL/L-MCL, with the official code's per-setting defaults (docs/official_mcl.md §0)."""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..losses import ContrastiveTerms


@dataclass(frozen=True)
class ContrastWeights:
    alpha: float      # VCL
    gamma: float      # soft VCL
    beta: float       # ICL
    lam: float        # soft ICL
    tau: float
    kd_T: float = 3.0

    @classmethod
    def defaults(cls, method: str, memory_bank: bool) -> "ContrastWeights":
        """In-batch: α=β=0.1, γ=λ=1, τ=0.1. Bank: τ=0.07; L-MCL α=β=0.01, MCL α=β=0.1 (docs/official_mcl.md §0 table)."""
        if not memory_bank:
            return cls(0.1, 1.0, 0.1, 1.0, tau=0.1)
        ab = 0.01 if method == "lmcl" else 0.1
        return cls(ab, 1.0, ab, 1.0, tau=0.07)

    def weighted(self, c: ContrastiveTerms) -> dict[str, Tensor]:
        return {"vcl": self.alpha * c.vcl, "soft_vcl": self.gamma * c.soft_vcl,
                "icl": self.beta * c.icl, "soft_icl": self.lam * c.soft_icl}
