"""fastmcl.run_log.RunLogger: metrics.jsonl, TensorBoard mirror, curves.png, resume and torn-line repair."""
from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from fastmcl.run_log import RunLogger

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MEMBERS = ("resnet32_a", "resnet32_b", "ensemble")


def _strict_lines(path):
    """Parse metrics.jsonl, refusing the bare NaN/Infinity that Python's json would otherwise accept."""

    def refuse(token):
        raise AssertionError(f"bare {token} in {path}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def _log_epoch(logger, epoch, steps_per_epoch=2, loss=None):
    base = epoch * steps_per_epoch
    for s in range(steps_per_epoch):
        logger.log_train(epoch, base + s, loss=2.0 - 0.1 * epoch if loss is None else loss, lr=0.1,
                         images_per_sec=1000.0 + s)
    for k, member in enumerate(MEMBERS):
        logger.log_eval(epoch, base + steps_per_epoch - 1, member, top1=40.0 + 5 * epoch + k, top5=70.0 + epoch)
    return logger.end_epoch(epoch, train_loss=2.0 - 0.1 * epoch if loss is None else loss)


@pytest.fixture
def figures(monkeypatch):
    """Record what each Figure.savefig drew: per panel, its title and its lines as (label, {step: value})."""
    drawn = []
    original = Figure.savefig

    def spy(self, *args, **kwargs):
        drawn.append([(ax.get_title(), [(line.get_label(), dict(zip(line.get_xdata(), line.get_ydata())))
                                        for line in ax.get_lines()]) for ax in self.axes])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    return drawn


def _panels(figure):
    """[(title, number of lines)] of one recorded figure."""
    return [(title, len(lines)) for title, lines in figure]


def _curves(figure):
    """The train loss {step: value} and the top-1 {member: {step: value}} one recorded figure shows."""
    (_, [(_, loss)]), (_, top1) = figure
    return loss, dict(top1)


def test_metrics_jsonl_tensorboard_curves_and_table(tmp_path, figures):
    out = tmp_path / "run"
    with RunLogger(out) as logger:
        for epoch in range(2):
            table = _log_epoch(logger, epoch)
        # extras, tensors and numpy scalars are turned into plain JSON numbers
        logger.log_train(2, 4, loss=torch.tensor(1.25), lr=np.float32(0.05), images_per_sec=np.float64(900.0),
                         grad_norm=torch.tensor([1.0, 2.0]))

    events = _strict_lines(out / "metrics.jsonl")
    required = {
        "train": {"epoch", "step", "loss", "lr", "images_per_sec", "time"},
        "eval": {"epoch", "step", "member", "top1", "top5", "time"},
        "epoch": {"epoch", "step", "train_loss", "best_member", "best_top1", "time"},
    }
    assert [e["event"] for e in events].count("eval") == 2 * len(MEMBERS)
    for event in events:
        assert required[event["event"]] <= set(event), event
    assert events[-1] == {**events[-1], "loss": 1.25, "lr": pytest.approx(0.05), "images_per_sec": 900.0,
                          "grad_norm": [1.0, 2.0]}
    assert isinstance(events[-1]["loss"], float)
    epoch1 = [e for e in events if e["event"] == "epoch"][-1]
    assert (epoch1["best_member"], epoch1["best_top1"], epoch1["step"]) == ("ensemble", 47.0, 3)

    # table: every member with its top1, the epoch's highest one marked
    for k, member in enumerate(MEMBERS):
        assert f"{40.0 + 5 + k:.2f}" in table and member in table
    best_line = next(line for line in table.splitlines() if "highest" in line)
    assert "ensemble" in best_line and "47.00" in best_line

    # curves.png: a real PNG of two panels, one top-1 line per member
    png = (out / "curves.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 20_000
    assert _panels(figures[-1]) == [("train loss", 1), ("top-1 accuracy (evaluations)", len(MEMBERS))]
    loss, top1 = _curves(figures[-1])
    assert loss == pytest.approx({0: 2.0, 1: 2.0, 2: 1.9, 3: 1.9})     # every logged step, not an epoch mean
    assert top1["resnet32_b"] == {1: 41.0, 3: 46.0}                     # every evaluation, at its step
    assert not list(out.glob(".curves*"))  # temp file replaced, not left behind

    # TensorBoard events with the documented tags and steps
    assert list(out.glob("events.out.tfevents.*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/images_per_sec", "epoch/train_loss",
            "eval/resnet32_a/top1", "eval/ensemble/top5"} <= tags
    assert not {"train/epoch", "train/step", "train/time"} & tags
    assert [(e.step, e.value) for e in acc.Scalars("eval/resnet32_b/top1")] == [(1, 41.0), (3, 46.0)]


def test_disabled_logger_writes_nothing(tmp_path):
    out = tmp_path / "rank1"
    logger = RunLogger(out, enabled=False)
    logger.log({"event": "custom", "x": 1})
    logger.log_train(0, 0, 1.0, 0.1, 10.0)
    logger.log_eval(0, 0, "a", 50.0, 80.0)
    assert logger.end_epoch(0, 1.0) == ""
    logger.close()
    assert not out.exists()


def test_non_finite_values_are_json_strings(tmp_path):
    with RunLogger(tmp_path, tensorboard=False) as logger:
        logger.log_train(0, 0, loss=float("nan"), lr=torch.tensor(float("inf")), images_per_sec=-math.inf,
                         nested={"a": np.float32("nan")})
        logger.log_eval(0, 0, "a", top1=float("nan"), top5=10.0)
        table = logger.end_epoch(0, train_loss=torch.tensor(float("nan")))
    train, _, epoch = _strict_lines(tmp_path / "metrics.jsonl")
    assert (train["loss"], train["lr"], train["images_per_sec"], train["nested"]) == ("nan", "inf", "-inf",
                                                                                     {"a": "nan"})
    assert epoch["train_loss"] == "nan" and "best_member" not in epoch  # no finite top1: no best
    assert "nan" in table and (tmp_path / "curves.png").read_bytes().startswith(PNG_SIGNATURE)


def test_resume_appends_and_rebuilds_history(tmp_path, figures):
    with RunLogger(tmp_path, tensorboard=False) as logger:
        _log_epoch(logger, 0)
        _log_epoch(logger, 1)
        _log_epoch(logger, 2, loss=9.0)  # logged after the last checkpoint, then the run crashed
    n_before = len(_strict_lines(tmp_path / "metrics.jsonl"))

    with RunLogger(tmp_path, tensorboard=False) as logger:  # resumed from the checkpoint of epoch 1
        _log_epoch(logger, 2)
        assert sorted(_curves(figures[-1])[0]) == [0, 1, 2, 3, 4, 5]  # steps of epochs 0 and 1 replayed
        _log_epoch(logger, 3)

    lines = _strict_lines(tmp_path / "metrics.jsonl")
    assert len(lines) > n_before and lines[0]["epoch"] == 0  # appended, nothing lost
    loss, top1 = _curves(figures[-1])
    assert loss == pytest.approx({0: 2.0, 1: 2.0, 2: 1.9, 3: 1.9, 4: 1.8, 5: 1.8, 6: 1.7, 7: 1.7})  # 4, 5: later win
    assert list(top1) == list(MEMBERS)
    assert top1["resnet32_a"] == {1: 40.0, 3: 45.0, 5: 50.0, 7: 55.0}
    assert _panels(figures[-1]) == [("train loss", 1), ("top-1 accuracy (evaluations)", len(MEMBERS))]


def test_torn_last_line_is_dropped_before_appending(tmp_path, figures):
    with RunLogger(tmp_path, tensorboard=False) as logger:
        _log_epoch(logger, 0)
    metrics = tmp_path / "metrics.jsonl"
    good = metrics.read_bytes()
    metrics.write_bytes(good + b'{"event": "train", "epoch": 1, "step": 2, "lo')  # killed mid-line

    with pytest.warns(UserWarning, match="torn last line"):
        logger = RunLogger(tmp_path, tensorboard=False)
    assert metrics.read_bytes() == good  # rewritten without the partial line
    with logger:
        _log_epoch(logger, 1)
    assert _curves(figures[-1])[0] == pytest.approx({0: 2.0, 1: 2.0, 2: 1.9, 3: 1.9})  # epoch 0 replayed
    lines = _strict_lines(metrics)
    assert all("lo" != k for e in lines for k in e) and lines[-1]["event"] == "epoch"


def test_complete_last_line_without_newline_is_kept(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"event": "epoch", "epoch": 0, "step": 5, "train_loss": 1.5}')  # newline never written
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about: the object is complete
        with RunLogger(tmp_path, tensorboard=False) as logger:
            logger.log_train(1, 6, 1.0, 0.1, 100.0)
    lines = _strict_lines(metrics)
    assert [e["event"] for e in lines] == ["epoch", "train"]


def test_log_requires_event_name_and_open_logger(tmp_path):
    logger = RunLogger(tmp_path, tensorboard=False)
    with pytest.raises(ValueError, match="'event'"):
        logger.log({"loss": 1.0})
    logger.close()
    logger.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        logger.log({"event": "train"})
