"""Reference losses (plain PyTorch): the oracle every fast path is checked against.

One official pair call (docs/official_mcl.md §1.2, §1.3): `contrastive_terms`, `bank_contrastive_terms` (`pair_terms`).
A whole cohort, each distinct block once: `cohort_contrastive_terms`, `cohort_bank_contrastive_terms` with a
`ContrastPlan` from `lmcl_plan` / `mcl_plan` (`cohort_terms`). Logit terms: `kd_kl`, `cross_entropy`. `MemoryBank`.
"""
from .backend import BACKENDS, resolve_backend
from .cohort_terms import cohort_bank_contrastive_terms, cohort_contrastive_terms, plan_indices
from .distill import cross_entropy, kd_kl
from .memory import MemoryBank
from .pair_terms import bank_contrastive_terms, contrastive_terms
from .plan import TERMS, ContrastPlan, layer_pairs, lmcl_plan, mcl_plan
from .rows import ContrastiveTerms, compute_dtype

__all__ = [
    "BACKENDS", "ContrastPlan", "ContrastiveTerms", "MemoryBank", "TERMS", "bank_contrastive_terms",
    "cohort_bank_contrastive_terms", "cohort_contrastive_terms", "compute_dtype", "contrastive_terms",
    "cross_entropy", "kd_kl", "layer_pairs", "lmcl_plan", "mcl_plan", "plan_indices", "resolve_backend",
]
