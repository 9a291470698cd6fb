"""Triton kernels (shipped as `fastmcl.kernels`). Kernels import nothing else of ours."""

from .bank_contrastive import bank_rows  # noqa: E402,F401  fused memory-bank rows (contract: bank_rows_reference)
from .inbatch_contrastive import inbatch_rows  # noqa: E402,F401  fused in-batch rows (contract: inbatch_rows_reference)

# True only once every fused kernel the dispatcher needs (bank_rows and inbatch_rows) is exported above.
AVAILABLE = all(callable(globals().get(name)) for name in ("bank_rows", "inbatch_rows"))
