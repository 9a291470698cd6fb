"""Reference losses (plain PyTorch): the oracle every fast path is checked against.

Single pair calls (spec/lmcl.md §1.2, §1.3): `contrastive_terms`, `bank_contrastive_terms`.
Whole cohort, each distinct block once: `cohort_contrastive_terms`, `cohort_bank_contrastive_terms` with a
`ContrastPlan` from `lmcl_plan` / `mcl_plan`. Logit terms: `kd_kl`, `cross_entropy`. Memory: `MemoryBank`.
"""
from .bank import bank_contrastive_terms
from .backend import BACKENDS, resolve_backend
from .cohort_terms import cohort_bank_contrastive_terms, cohort_contrastive_terms
from .contrastive import ContrastiveTerms, compute_dtype, contrastive_terms
from .distill import cross_entropy, kd_kl
from .memory import MemoryBank
from .plan import TERMS, ContrastPlan, layer_pairs, lmcl_plan, mcl_plan

__all__ = [
    "BACKENDS", "ContrastPlan", "ContrastiveTerms", "MemoryBank", "TERMS", "bank_contrastive_terms",
    "cohort_bank_contrastive_terms", "cohort_contrastive_terms", "compute_dtype", "contrastive_terms", "cross_entropy", "kd_kl",
    "layer_pairs", "lmcl_plan", "mcl_plan", "resolve_backend",
]
