"""Triton kernels (shipped as `fastmcl.kernels`). Kernels import nothing else of ours."""

from .bank_contrastive import bank_rows  # fused memory-bank rows (contract: bank_rows_reference)
from .inbatch_contrastive import inbatch_rows  # fused in-batch rows (contract: inbatch_rows_reference)

__all__ = ["bank_rows", "inbatch_rows"]
