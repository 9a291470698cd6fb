"""A user's path through the CLI: run folders that never overwrite, resume from a folder or a file, typed YAML, one
line for each common mistake, the console without a progress bar, and the last evaluation of a shortened run."""
import json
import os
from pathlib import Path

import pytest

from fastmcl.train import main
from support.runs import TINY, events, write_yaml


def run_ok(argv: list[str]) -> None:
    assert main(argv) == 0


def one_line_error(capsys, argv: list[str], match: str) -> None:
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc != 0 and len(err.splitlines()) == 1 and match in err and "Traceback" not in err, err


def test_default_run_folder_is_new_and_latest_points_at_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_ok(TINY + ["--method", "dml", "--max-steps", "1"])
    run_ok(TINY + ["--method", "dml", "--max-steps", "1"])
    runs = sorted(p for p in (tmp_path / "runs").iterdir() if not p.is_symlink())
    assert len(runs) == 2 and all("-dml-resnet32" in p.name for p in runs)
    latest = tmp_path / "runs" / "latest"
    assert latest.is_symlink() and latest.resolve() == runs[-1].resolve()
    for run in runs:     # each run kept its own record
        assert [e["step"] for e in events(run, "train")] == [1]


def test_out_must_be_empty_unless_resume_or_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    run_ok(TINY + ["--method", "dml", "--max-steps", "1", "--out", str(out)])
    one_line_error(capsys, TINY + ["--method", "dml", "--max-steps", "1", "--out", str(out)], "not empty")
    run_ok(TINY + ["--method", "dml", "--max-steps", "2", "--out", str(out), "--overwrite"])
    assert [e["step"] for e in events(out, "train")] == [1, 2]       # replaced, not appended


def test_resume_takes_a_folder_or_a_checkpoint_file_and_refuses_a_changed_cohort(tmp_path, capsys):
    out = tmp_path / "run"
    run_ok(TINY + ["--method", "dml", "--max-steps", "1", "--out", str(out)])
    run_ok(["--resume", str(out / "checkpoints" / "last.pt"), "--max-steps", "2", "--no-progress"])
    assert [e["step"] for e in events(out, "train")] == [1, 2]
    one_line_error(capsys, ["--resume", str(out), "--method", "lmcl"], "--method")
    one_line_error(capsys, ["--resume", str(out), "--arch", "wrn_16_2"], "members")


@pytest.mark.parametrize("yaml_values,match", [
    ({"epochs": 1.5}, "epochs"),
    ({"lr": "fast"}, "lr"),
    ({"batch_sise": 16}, "did you mean 'batch_size'"),
    ({"method": "lmcll"}, "did you mean 'lmcl'"),
])
def test_yaml_mistakes_end_in_one_line(tmp_path, capsys, yaml_values, match):
    one_line_error(capsys, TINY + ["--config", str(write_yaml(tmp_path, yaml_values)), "--out", str(tmp_path / "o")], match)


def test_yaml_numbers_in_exponent_form_and_a_single_arch(tmp_path):
    cfg = write_yaml(tmp_path, {"weight_decay": "5e-4", "lr": "1e-1", "arch": "resnet32", "method": "dml", "max_steps": 1})
    run_ok(TINY + ["--config", str(cfg), "--out", str(tmp_path / "o")])
    import yaml
    resolved = yaml.safe_load((tmp_path / "o" / "config.yaml").read_text())
    assert resolved["weight_decay"] == 5e-4 and resolved["lr"] == 0.1 and resolved["arch"] == ["resnet32"]


def test_console_lines_without_a_bar_and_a_final_evaluation_mid_epoch(tmp_path, capsys):
    out = tmp_path / "run"
    run_ok(TINY + ["--method", "pcl", "--max-steps", "2", "--out", str(out), "--log-every", "1"])
    printed = capsys.readouterr().out
    assert "step 1 loss" in printed and "step 2 loss" in printed and "img/s" in printed
    evals = events(out, "eval")
    assert evals and [e["member"] for e in evals if e.get("deployed")] == ["ema0"]
    deployed_top1 = next(e["top1"] for e in evals if e.get("deployed"))
    assert f"deployed ema0 top-1 {deployed_top1:.2f}%" in printed
    assert (out / "checkpoints" / "best.pt").is_file()


def test_fp16_on_a_cpu_warns(tmp_path, capsys):
    run_ok(TINY + ["--method", "dml", "--max-steps", "1", "--amp", "fp16", "--out", str(tmp_path / "o")])
    assert "fp16" in capsys.readouterr().err


def test_too_few_classes_for_the_batch_says_what_would_work(tmp_path, capsys):
    one_line_error(capsys, ["--data", "synthetic", "--num-classes", "10", "--image-size", "16", "--max-steps", "1",
                            "--no-progress", "--out", str(tmp_path / "o")], "--batch-size 20")
    run_ok(["--data", "synthetic", "--num-classes", "10", "--image-size", "16", "--max-steps", "1", "--no-progress",
            "--batch-size", "20", "--workers", "0", "--out", str(tmp_path / "o2")])


@pytest.mark.parametrize("flag", ["--batch-size", "--epochs", "--lr", "--image-size"])
def test_zero_is_refused_not_replaced_by_the_default(tmp_path, capsys, flag):
    one_line_error(capsys, TINY + [flag, "0", "--out", str(tmp_path / "o")], flag)
