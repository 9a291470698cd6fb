"""The meta phase's outer loss as a plain function of the meta-network, for finite-difference checks of
`MetaPhase.hypergradient`."""
import torch
from torch import Tensor

from fastmcl.meta import MetaPhase


@torch.no_grad()
def outer_loss(meta: MetaPhase, x: Tensor, y: Tensor, contrast_idx: Tensor | None, lr: float) -> Tensor:
    """L_outer after the phase's virtual steps (each an ordinary gradient step), with no graph."""
    u = meta.unroll(x, y, contrast_idx, lr)
    theta, bufs = u.theta0, {}
    for kind in ["inner"] * meta.inner_steps + ["outer"]:
        with torch.enable_grad():
            theta = {n: p.detach().requires_grad_(True) for n, p in theta.items()}
            loss = u.loss(theta, kind)
            grads = torch.autograd.grad(loss, list(theta.values()), allow_unused=True)
        theta, bufs = u.sgd({n: p.detach() for n, p in theta.items()}, bufs, grads)
    return u.loss(theta, "outer")
