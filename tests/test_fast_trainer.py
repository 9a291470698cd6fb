"""The fast trainer's switches reproduce the eager fp32 step (issue 7): bf16 autocast, fp16 + GradScaler,
torch.compile (one graph, no graph breaks, no recompilation over 5 steps), and every method runs through the same
loop (views, shared trunk, EMA) with an exact resume."""
import json
import math

import pytest
import torch
from torch._dynamo.utils import counters

from fastmcl.checkpoint import load_checkpoint
from fastmcl.config import TrainConfig
from fastmcl.methods import METHODS
from fastmcl.build import build_trainer
from run_checks import assert_resume_is_exact

TINY = dict(data="synthetic", num_classes=4, synthetic_samples=64, image_size=16, batch_size=16, m_per_class=4,
            workers=0, progress=False, neg_k=20, meta_mode="off", deterministic=True)


def first_step_loss(tmp_path, **kw) -> float:
    torch.manual_seed(0)
    t = build_trainer(TrainConfig(out=str(tmp_path), **{**TINY, **kw}))
    x, y, idx = next(iter(t.data.train_batches(0)))
    return t.train_step(x, y, idx)["loss"]


@pytest.mark.parametrize("bank", [False, True], ids=["in-batch", "memory-bank"])
def test_bf16_autocast_reproduces_fp32_first_step(tmp_path, bank):
    ref = first_step_loss(tmp_path / "a", method="lmcl", memory_bank=bank)
    got = first_step_loss(tmp_path / "b", method="lmcl", memory_bank=bank, amp="bf16", channels_last=True)
    # bf16 convolutions (8-bit mantissa) against fp32; the losses and softmax statistics are fp32 in both
    assert abs(got - ref) <= 2e-2 * abs(ref), (got, ref)


def test_fp16_gradscaler_step(tmp_path):
    run = tmp_path / "run"
    ref = first_step_loss(tmp_path / "a", method="lmcl")
    t = build_trainer(TrainConfig(out=str(run), amp="fp16", method="lmcl", **{k: v for k, v in TINY.items()}))
    assert t.scaler.is_enabled()
    x, y, idx = next(iter(t.data.train_batches(0)))
    loss = t.train_step(x, y, idx)["loss"]
    assert math.isfinite(loss) and abs(loss - ref) <= 2e-2 * abs(ref), (loss, ref)
    # GradScaler starts at 2^16: an overflowing step is skipped and the scale halves, until steps go through
    for _ in range(30):
        before = [p.detach().clone() for p in t.cohort.parameters()]
        t.train_step(x, y, idx)
        if any(not torch.equal(a, p) for a, p in zip(before, t.cohort.parameters())):
            break
    else:
        pytest.fail("no fp16 step was applied in 30 steps")
    assert 0 < t.state_dict()["scaler"]["scale"] < 2.0 ** 16


@pytest.mark.parametrize("bank", [False, True], ids=["in-batch", "memory-bank"])
def test_compile_matches_eager_one_graph_no_recompiles(tmp_path, bank):
    torch._dynamo.reset()
    counters.clear()
    cfg = dict(TINY, method="lmcl", memory_bank=bank)
    eager = build_trainer(TrainConfig(out=str(tmp_path / "e"), **cfg))
    torch.manual_seed(0)
    compiled = build_trainer(TrainConfig(out=str(tmp_path / "c"), compile=True, compile_backend="aot_eager", **cfg))
    compiled.cohort.load_state_dict(eager.cohort.state_dict())
    compiled.objective.load_state_dict(eager.objective.state_dict())
    batches = list(eager.data.train_batches(0))
    for step in range(5):
        x, y, idx = batches[step % len(batches)]
        a = eager.train_step(x, y, idx)["loss"]
        b = compiled.train_step(x, y, idx)["loss"]
        assert abs(a - b) <= 1e-4 * abs(a), (step, a, b)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert dict(counters["graph_break"]) == {}
    assert counters["frames"]["total"] == 1         # compiled once, reused for the 4 later steps


@pytest.mark.parametrize("method", [m for m in METHODS if m not in ("lmcl",)])
def test_every_method_trains_and_resumes_exactly(tmp_path, method):
    """Each method through the one loop (shared trunk, views, EMA as it needs): 2N steps == N + resume + N."""
    args = ["--data", "synthetic", "--synthetic-samples", "48", "--num-classes", "4", "--batch-size", "16",
            "--image-size", "16", "--workers", "0", "--m-per-class", "4", "--no-progress", "--deterministic",
            "--log-every", "1", "--epochs", "3", "--method", method]
    full = assert_resume_is_exact(args, tmp_path)
    state = load_checkpoint(full / "checkpoints" / "last.pt")
    evals = [e for e in map(json.loads, (full / "metrics.jsonl").read_text().splitlines()) if e["event"] == "eval"]
    names = {e["member"] for e in evals}
    assert "net0" in names
    if method == "pcl":
        assert state["ema"] is not None and {"ema0", "ens"} <= names
        assert any(e.get("deployed") and e["member"] == "ema0" for e in evals)
