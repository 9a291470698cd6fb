"""The L-MCL meta phase: `phase` (the phase), `differences` (its default reverse sweep by differences), `unrolled`
(its exact autograd form), `pieces` (the piecewise-linear pieces held fixed between forwards)."""
from .phase import FD_STEP, MetaPhase, MetaResult, ieee_fp32

__all__ = ["FD_STEP", "MetaPhase", "MetaResult", "ieee_fp32"]
