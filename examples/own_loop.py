"""fastmcl's cohort and objectives in your own PyTorch loop: a 2-network L-MCL cohort trained on random data.

Part 1 builds the cohort and the L-MCL objective exactly as `python -m fastmcl.train` does and runs plain SGD steps
(no meta phase: the matching weights come from the meta-network's initial state). Part 2 calls the loss functions
alone on embeddings and logits of your own networks. Run: `python examples/own_loop.py --steps 2`.
"""
import argparse

import torch
import torch.nn.functional as F

from fastmcl.losses import contrastive_terms, cross_entropy, kd_kl
from fastmcl.methods import build_method, method_needs
from fastmcl.models import build_cohort


def train_cohort(steps: int, num_classes: int = 10, batch_size: int = 16) -> None:
    needs = method_needs("lmcl")                  # L-MCL: auxiliary branches, 2 samples per class in a batch
    cohort = build_cohort(["resnet32", "resnet32"], num_classes, aux=needs.aux)
    objective = build_method("lmcl", feature_dims=cohort.feature_dims, num_stages=cohort.num_stages,
                             num_classes=num_classes)   # heads, aggregators, meta-network; in-batch contrast
    params = list(cohort.parameters()) + objective.main_parameters()
    optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    labels = torch.arange(batch_size // needs.m_per_class).repeat_interleave(needs.m_per_class)
    for step in range(steps):
        cohort.train()
        objective.train()
        objective.set_epoch(0)                    # ramp-up methods (ONE, OKDDip, CL-ILR, PCL) read the epoch
        x = torch.randn(batch_size, 3, 32, 32)    # your normalised images
        out = objective(cohort(x), labels)        # StepOutput(loss, terms, state)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        objective.after_step(out, None)           # memory-bank methods update their banks here (dataset indices)
        terms = ", ".join(f"{name} {value.item():.3f}" for name, value in out.terms.items())
        print(f"step {step}: loss {out.loss.item():.3f} ({terms})")
    cohort.eval()
    objective.eval()
    with torch.no_grad():
        logits = objective.eval_logits(cohort(torch.randn(4, 3, 32, 32)))   # every classifier by name
    print(f"classifiers: {', '.join(logits)}; deployed: {objective.deployed} {tuple(logits[objective.deployed].shape)}")


def losses_alone(num_classes: int = 10, batch_size: int = 16) -> None:
    labels = torch.arange(batch_size // 2).repeat_interleave(2)
    logits_a = torch.randn(batch_size, num_classes, requires_grad=True)      # two networks' logits ...
    logits_b = torch.randn(batch_size, num_classes, requires_grad=True)
    feats_a = torch.randn(batch_size, 128, requires_grad=True)               # ... and their projected embeddings
    feats_b = torch.randn(batch_size, 128, requires_grad=True)
    e_a, e_b = F.normalize(feats_a, dim=1), F.normalize(feats_b, dim=1)
    c = contrastive_terms(e_a, e_b, labels, tau=0.1, kd_T=3.0)              # both directions of the pair
    loss = (cross_entropy(logits_a, labels) + cross_entropy(logits_b, labels)
            + kd_kl(logits_a, logits_b, 3.0) + kd_kl(logits_b, logits_a, 3.0)          # DML: detached peers, T^2
            + 0.1 * c.vcl + 1.0 * c.soft_vcl + 0.1 * c.icl + 1.0 * c.soft_icl)        # MCL's in-batch weights
    loss.backward()
    print(f"losses alone: {loss.item():.3f} (vcl {c.vcl.item():.3f}, icl {c.icl.item():.3f}); "
          f"grad norm {feats_a.grad.norm().item():.3g}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    train_cohort(args.steps)
    losses_alone()
