"""The pieces of piecewise-linear ops recorded in one forward and replayed in another, so that differences of gradients
converge to autograd's second derivatives even across a ReLU kink."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastmcl.meta.pieces import Pieces


def _grad(net, x, params):
    return torch.autograd.grad(net(x).square().sum(), params)


def _hvp(net, x, params, v):
    g = torch.autograd.grad(net(x).square().sum(), params, create_graph=True)
    return torch.autograd.grad(g, params, v)


def _difference(net, x, params, v, h, pieces=None):
    """(∇L(θ + h v) − ∇L(θ)) / h, replaying `pieces` at the shifted point when given."""
    base = _grad(net, x, params)
    with torch.no_grad():
        for p, vv in zip(params, v):
            p.add_(h * vv)
    try:
        if pieces is None:
            shifted = _grad(net, x, params)
        else:
            with pieces.replay():
                shifted = _grad(net, x, params)
    finally:
        with torch.no_grad():
            for p, vv in zip(params, v):
                p.sub_(h * vv)
    return [(s - b) / h for s, b in zip(shifted, base)]


def _rel(a, b):
    a, b = torch.cat([t.flatten() for t in a]), torch.cat([t.flatten() for t in b])
    return ((a - b).norm() / b.norm()).item()


def _kinked_mlp():
    """A ReLU MLP with one unit's pre-activation put 1e-4 from its kink, so a step h = 1e-3 crosses it."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(inplace=True), nn.Linear(8, 2)).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    with torch.no_grad():
        pre = net[0](x)
        net[0].bias[0] -= pre[0, 0] - 1e-4            # sample 0, unit 0: pre-activation +1e-4
    params = list(net.parameters())
    v = [torch.zeros_like(p) for p in params]
    v[1][0] = -1.0                                     # moving that unit's bias by −h turns it off
    return net, x, params, v


def test_replayed_masks_give_autograds_hessian_vector_product_across_a_kink():
    net, x, params, v = _kinked_mlp()
    exact = _hvp(net, x, params, v)
    pieces = Pieces()
    with pieces:
        net(x)
    frozen = [_rel(_difference(net, x, params, v, h, pieces), exact) for h in (1e-3, 1e-4)]
    assert frozen[0] < 1e-3 and frozen[1] < frozen[0] / 5      # O(h) from the smooth part alone
    free = _rel(_difference(net, x, params, v, 1e-3), exact)
    assert free > 10                           # without the replay the flipped unit shows up as a jump


def test_replay_at_the_same_point_is_bit_identical_and_reusable():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1),
                        nn.Flatten(), nn.Dropout(0.5), nn.Linear(4 * 3 * 3, 2), nn.ReLU())
    x = torch.randn(5, 3, 8, 8)
    pieces = Pieces()
    with pieces:
        ref = net(x)
    for _ in range(2):
        with pieces.replay():
            assert torch.equal(net(x), ref)
    assert not torch.equal(net(x), ref)        # a fresh forward draws a new dropout mask
    with pytest.raises(RuntimeError, match="used 3 of 4"):   # relu, max-pool winners, dropout; the last relu unused
        with pieces.replay():
            net[:-1](x)


def test_replayed_max_pool_routes_through_the_recorded_winner():
    x = torch.tensor([[[[1.0, 0.9999], [0.0, 0.0]]]], requires_grad=True)
    pieces = Pieces()
    with pieces:
        F.max_pool2d(x, 2)
    shifted = x.detach().clone()
    shifted[0, 0, 0, 1] += 1e-3                 # the runner-up now wins a plain max-pool
    shifted.requires_grad_(True)
    with pieces.replay():
        out = F.max_pool2d(shifted, 2)
    assert out.item() == pytest.approx(1.0)
    out.backward()
    assert shifted.grad[0, 0, 0, 0] == 1 and shifted.grad.sum() == 1


def test_a_forward_that_takes_another_path_fails_loudly():
    relu = nn.ReLU()
    x = torch.randn(3, 4)
    pieces = Pieces()
    with pieces:
        relu(x)
    with pytest.raises(RuntimeError, match="shape"):
        with pieces.replay():
            relu(torch.randn(2, 4))
    with pytest.raises(RuntimeError, match="more piecewise-linear ops"):
        with pieces.replay():
            relu(relu(x))
    with pytest.raises(RuntimeError, match="used 0 of 1"):
        with pieces.replay():
            x + 1


def test_unrecorded_piecewise_ops_are_refused():
    with pytest.raises(NotImplementedError, match="leaky_relu"):
        with Pieces():
            F.leaky_relu(torch.randn(3))


def test_a_piece_of_another_kind_is_refused():
    x = torch.randn(1, 1, 4, 4)
    pieces = Pieces()
    with pieces:
        F.relu(x)
    with pytest.raises(RuntimeError, match="relu .* does not fit the replayed max_pool"):
        with pieces.replay():
            F.max_pool2d(x, 2)


def test_replayed_relu_keeps_the_in_place_contract_and_its_gradient_is_the_mask():
    torch.manual_seed(2)
    x = torch.randn(6, 5)
    pieces = Pieces()
    with pieces:
        F.relu(x.clone(), inplace=True)
        F.relu(x)
    on = x > 0
    shifted = (x + 0.3).requires_grad_(True)
    work = shifted * 1.0                       # a non-leaf, as inside a network
    with pieces.replay():
        out = F.relu(work, inplace=True)
        copy = F.relu(work)
    assert out is work                          # written into its input, like the op it replays
    assert torch.equal(out, torch.where(on, shifted.detach(), 0.0))
    assert torch.equal(copy, out)
    (out * 2 + copy).sum().backward()
    assert torch.equal(shifted.grad, on.float() * 3)


def test_replayed_in_place_relu_on_a_leaf_under_no_grad_stays_in_place():
    leaf = torch.randn(4, requires_grad=True)
    pieces = Pieces()
    with pieces, torch.no_grad():
        F.relu(leaf.detach().clone(), inplace=True)
    expected = leaf.detach().clamp(min=0)
    with pieces.replay(), torch.no_grad():
        out = F.relu(leaf, inplace=True)           # torch.relu_ writes into a leaf under no_grad
    assert torch.equal(leaf.detach(), expected) and torch.equal(out, expected)
