"""The trainer end to end on tiny synthetic data: exact resume, signals, NaN handling, run directory, bad input."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from fastmcl.build import resolve
from fastmcl.checkpoint import load_checkpoint
from fastmcl.config import TrainConfig, parse_config
from fastmcl.train import main
from fastmcl.trainer import Trainer
from run_checks import assert_resume_is_exact
from support.runs import TINY, events, write_yaml


@pytest.mark.parametrize("bank", [False, True], ids=["in-batch", "memory-bank"])
def test_resume_is_exact(tmp_path, bank):
    """2N steps == N steps + resume + N steps (losses and weights to 1e-6), crossing an epoch boundary."""
    extra = ["--method", "lmcl", "--epochs", "3", "--neg-k", "20"] + (["--memory-bank"] if bank else ["--no-memory-bank"])
    full = assert_resume_is_exact(TINY + extra, tmp_path)
    part = tmp_path / "part"
    a = load_checkpoint(full / "checkpoints" / "last.pt")
    b = load_checkpoint(part / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 4
    for group in ("cohort", "objective"):
        for k, v in a[group].items():
            assert torch.allclose(v.float(), b[group][k].float(), rtol=1e-6, atol=1e-6), (group, k)


def test_run_directory_contents_and_events(tmp_path):
    run = tmp_path / "run"
    assert main(TINY + ["--method", "mcl", "--epochs", "1", "--out", str(run)]) == 0
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["method"] == "mcl" and cfg["tau"] == 0.1 and cfg["epochs"] == 1  # resolved, no None left for tau
    train = events(run, "train")
    assert train and set(train[0]) >= {"event", "epoch", "step", "loss", "lr", "images_per_sec"}
    ev = events(run, "eval")
    assert {e["member"] for e in ev} == {"net0", "net1"} and all(0 <= e["top1"] <= e["top5"] <= 100 for e in ev)
    assert sum(e["deployed"] for e in ev) == 1
    assert (run / "curves.png").stat().st_size > 1000
    assert (run / "checkpoints" / "last.pt").exists() and (run / "checkpoints" / "best.pt").exists()
    assert list(run.glob("events.out.tfevents.*"))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    original = Trainer.train_step

    def poisoned(self, x, y, index, lr=None):
        if self.step == 2:
            x = x * float("nan")
        return original(self, x, y, index, lr)

    monkeypatch.setattr(Trainer, "train_step", poisoned)
    rc = main(TINY + ["--method", "dml", "--epochs", "2", "--ckpt-every", "1", "--out", str(run)])
    assert rc == 1
    err = capsys.readouterr().err
    assert "non-finite loss" in err and "step 2" in err
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["cohort"].values() if v.is_floating_point())


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(tmp_path):
    run = tmp_path / "run"
    args = TINY + ["--method", "dml", "--epochs", "1000", "--out", str(run)]
    proc = subprocess.Popen([sys.executable, "-m", "fastmcl.train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            if (run / "metrics.jsonl").exists() and events(run, "train"):
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    assert "saved" in out
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["step"] >= 1


def _imagefolder(root: Path, *, empty_class=False, corrupt=False):
    from PIL import Image
    for split in ("train", "val"):
        for c in ("a", "b"):
            d = root / split / c
            d.mkdir(parents=True)
            if empty_class and split == "train" and c == "b":
                continue
            for i in range(3):
                Image.new("RGB", (20, 20), (i * 40, 10, 10)).save(d / f"{i}.jpg")
    if corrupt:
        (root / "train" / "a" / "bad.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    return root


@pytest.mark.parametrize("case,argv_fn,match", [
    ("missing data", lambda t: ["--data", str(t / "nope")], "no such folder"),
    ("empty data dir", lambda t: ["--data", str(t)], "ImageFolder"),
    ("empty class", lambda t: ["--data", str(_imagefolder(t / "d", empty_class=True))], "no images"),
    ("corrupt image", lambda t: ["--data", str(_imagefolder(t / "d", corrupt=True)), "--batch-size", "2"], "bad.jpg"),
    ("unknown arch", lambda t: TINY + ["--arch", "resnet9000"], "resnet9000"),
    ("unknown method", lambda t: TINY + ["--method", "magic"], "method"),
    ("cohort of one", lambda t: TINY + ["--cohort", "1"], "at least 2"),
    ("unknown yaml key", lambda t: ["--config", str(write_yaml(t, {"batch_sise": 3}))], "batch_sise"),
    ("resume without checkpoint", lambda t: ["--resume", str(t)], "no checkpoint"),
])
def test_bad_input_one_line_nonzero_exit(tmp_path, capsys, case, argv_fn, match):
    rc = main(argv_fn(tmp_path) + ["--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc != 0
    assert len(err.splitlines()) == 1 and match in err, err
    assert "Traceback" not in err


def test_yaml_sets_defaults_and_flags_override(tmp_path):
    p = write_yaml(tmp_path, {"batch_size": 32, "lr": 0.05, "arch": ["resnet32", "wrn_16_2"]})
    cfg = parse_config(["--config", str(p), "--lr", "0.2"])
    assert cfg.batch_size == 32 and cfg.lr == 0.2 and cfg.members() == ["resnet32", "wrn_16_2"]
    assert resolve(TrainConfig(), cifar_style=False, demo=False).cfg.memory_bank is True
    assert resolve(TrainConfig(method="dml"), cifar_style=False, demo=False).cfg.memory_bank is False


def test_cli_subprocess_error_has_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "fastmcl.train", "--data", str(tmp_path / "missing")],
                       capture_output=True, text=True, env={**os.environ, "FASTMCL_CACHE": str(tmp_path)})
    assert r.returncode == 2 and "Traceback" not in r.stderr and "no such folder" in r.stderr


@pytest.mark.slow
def test_shortened_digits_demo(tmp_path, capsys):
    """The main job's path end to end (digits JPEG tree → decode → L-MCL with a meta phase → eval table), one epoch
    without warm-up; the full demo (`make train`) is measured in the README."""
    run = tmp_path / "run"
    rc = main(["--cache-dir", str(tmp_path / "cache"), "--epochs", "1", "--warmup-epochs", "0", "--no-progress",
               "--out", str(run), "--log-every", "5"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "net0.agg" in out and "deployed: net0" in out
    assert (tmp_path / "cache" / "digits32" / "train").is_dir()
    train = events(run, "train")
    assert train[-1]["loss"] < train[0]["loss"]
    top1 = {e["member"]: e["top1"] for e in events(run, "eval")}
    assert set(top1) >= {"net0", "net1", "net0.stage0", "net0.agg"}
