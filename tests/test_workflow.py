"""A user's path through the CLI: run folders that never overwrite, resume from a folder or a file, typed YAML, one
line for each common mistake, the console without a progress bar, and the last evaluation of a shortened run."""
import json
import os
import re

import pytest
import torch

from fastmcl.checkpoint import load_checkpoint
from fastmcl.evaluate import main as evaluate_main
from fastmcl.export import main as export_main
from fastmcl.train import main
from fastmcl.trainer import Trainer
from support.runs import TINY, events, write_yaml

pytestmark = pytest.mark.usefixtures("one_thread")     # tests/conftest.py


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
    runs = sorted(p for p in (tmp_path / "runs").iterdir() if "-dml-" in p.name)
    assert len(runs) == 2 and all("-dml-resnet32" in p.name for p in runs)
    latest = tmp_path / "runs" / "latest"
    assert latest.is_symlink() and latest.resolve() == runs[-1].resolve()
    for run in runs:     # each run kept its own record
        assert [e["step"] for e in events(run, "train")] == [1]
    # `tensorboard --logdir runs` finds each run once (it follows links: not a second time through runs/latest)
    from tensorboard.backend.event_processing.io_wrapper import GetLogdirSubdirectories
    found = sorted(os.path.relpath(d, "runs") for d in GetLogdirSubdirectories("runs"))
    assert found == [f"tensorboard/{run.name}" for run in runs], found


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
    assert resolved["weight_decay"] == 5e-4 and resolved["lr"] == 0.1
    assert resolved["arch"] == ["resnet32", "resnet32"]     # one --arch for every member, written out


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


def test_a_failed_start_leaves_nothing_and_latest_where_it_was(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run_ok(TINY + ["--method", "dml", "--max-steps", "1"])
    runs = tmp_path / "runs"
    before = sorted(p.name for p in runs.iterdir())
    latest = (runs / "latest").resolve()
    one_line_error(capsys, TINY + ["--arch", "resnet33"], "resnet33")                       # bad network
    one_line_error(capsys, ["--method", "mcl", "--data", "synthetic", "--num-classes", "10", "--batch-size", "32",
                            "--no-progress"], "--batch-size")                                # batch / m-per-class
    original = Trainer.train_step

    def poisoned(self, x, y, index, lr=None):                                            # fails in the first step
        return original(self, x * float("nan"), y, index, lr)

    monkeypatch.setattr(Trainer, "train_step", poisoned)
    assert main(TINY + ["--method", "dml"]) == 1
    assert sorted(p.name for p in runs.iterdir()) == before and (runs / "latest").resolve() == latest
    assert [p.name for p in (runs / "tensorboard").iterdir()] == [latest.name]     # its events went too
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    assert evaluate_main([]) == 0                                   # runs/latest still names a usable run


def test_resume_does_not_inherit_max_steps(tmp_path):
    out = tmp_path / "run"
    run_ok(TINY + ["--method", "dml", "--epochs", "1", "--max-steps", "2", "--out", str(out)])
    run_ok(["--resume", str(out), "--epochs", "2", "--no-progress"])       # 3 steps per epoch: to the end of epoch 2
    assert [e["step"] for e in events(out, "train")] == [1, 2, 3, 4, 5, 6]
    run_ok(["--resume", str(out), "--epochs", "3", "--max-steps", "7", "--no-progress"])   # unless it says otherwise
    assert [e["step"] for e in events(out, "train")][-1] == 7


def test_final_line_names_the_last_step_and_the_checkpoint_evaluate_uses(tmp_path, capsys):
    out = tmp_path / "run"
    run_ok(TINY + ["--method", "dml", "--epochs", "3", "--lr", "0.5", "--out", str(out)])
    final = capsys.readouterr().out.strip().splitlines()[-1]
    deployed = [e for e in events(out, "eval") if e["deployed"]]
    best = load_checkpoint(out / "checkpoints" / "best.pt")
    best_top1 = max(e["top1"] for e in deployed)
    assert best["best_top1"] == best_top1
    assert f"{deployed[-1]['top1']:.2f}%" in final and "best.pt" in final
    assert f"step {best['step']}, top-1 {best_top1:.2f}%" in final
    assert evaluate_main([str(out), "--json", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["step"] == best["step"]


def test_progress_bar_counts_this_invocations_steps_and_the_first_step_is_announced(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("sys.stderr.isatty", lambda: True)
    run_ok(TINY + ["--method", "lmcl", "--epochs", "2", "--max-steps", "4", "--progress", "--out", str(tmp_path / "r")])
    captured = capsys.readouterr()
    totals = {int(t) for t in re.findall(r"\d+/(\d+) \[", captured.err)}
    assert totals == {4}, captured.err                     # 4 steps over two epochs of 3: one bar of 4
    before_first_step = captured.out.split("checkpoints/best.pt")[0]
    assert "meta phase" in before_first_step


def test_config_yaml_is_what_the_run_used(tmp_path):
    import yaml
    run_ok(TINY + ["--method", "one", "--out", str(tmp_path / "r"), "--max-steps", "1"])
    saved = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert saved["arch"] == ["resnet32"] * 3 and saved["cohort"] == 3 and saved["data"] == "synthetic"
    assert saved["epochs"] == 300 and saved["lr"] == 0.1 and saved["rampup_epochs"] == 80
    run_ok(["--config", str(tmp_path / "r" / "config.yaml"), "--out", str(tmp_path / "again")])   # runs as it is
    assert [e["step"] for e in events(tmp_path / "again", "train")] == [1]


def test_baseline_trains_every_member_alone(tmp_path):
    """net0 ends with the same weights whatever its peer is: no term between the members."""
    finals = []
    for peer in ("resnet32", "wrn_16_2"):
        out = tmp_path / peer
        run_ok(TINY + ["--method", "baseline", "--arch", "resnet32", "--arch", peer, "--epochs", "1",
                       "--out", str(out)])
        assert {k for e in events(out, "train") for k in e} >= {"ce0", "ce1"}
        finals.append(load_checkpoint(out / "checkpoints" / "last.pt")["cohort"])
    net0 = [k for k in finals[0] if k.startswith("nets.0.")]
    assert net0 and all(torch.equal(finals[0][k], finals[1][k]) for k in net0)
    dml = tmp_path / "dml"
    run_ok(TINY + ["--method", "dml", "--arch", "resnet32", "--arch", "wrn_16_2", "--epochs", "1", "--out", str(dml)])
    coupled = load_checkpoint(dml / "checkpoints" / "last.pt")["cohort"]
    assert not all(torch.equal(finals[1][k], coupled[k]) for k in net0)     # the check can fail
    assert evaluate_main([str(tmp_path / "resnet32")]) == 0
    assert export_main([str(tmp_path / "resnet32"), "--out", str(tmp_path / "net0.pt")]) == 0
