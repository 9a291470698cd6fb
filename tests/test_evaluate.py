"""`python -m fastmcl.evaluate`: every classifier the run evaluated, with the numbers the training run logged for the
same checkpoint, the deployed one marked; bad input ends in one line and exit 2."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from fastmcl import evaluate, train

pytestmark = pytest.mark.usefixtures("one_thread")


def logged_eval(run) -> dict[str, dict]:
    """The last evaluation the training run logged: member → its event."""
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in events if e["event"] == "eval"]
    last = max(e["step"] for e in evals)
    return {e["member"]: e for e in evals if e["step"] == last}


@pytest.mark.parametrize("method,deployed", [("pcl", "ema0"), ("lmcl", "net0")])
def test_numbers_equal_the_training_runs(runs, tmp_path, capsys, method, deployed):
    report_path = tmp_path / "eval.json"
    assert evaluate.main([str(runs[method]), "--json", str(report_path)]) == 0
    table = capsys.readouterr().out
    report = json.loads(report_path.read_text())
    logged = logged_eval(runs[method])
    assert set(report["classifiers"]) == set(logged)
    assert len(logged) >= 7                              # members and the method's other heads
    for name, row in report["classifiers"].items():
        assert (row["top1"], row["top5"]) == (logged[name]["top1"], logged[name]["top5"]), name
        assert row["deployed"] == logged[name]["deployed"] == (name == deployed)
    assert report["deployed"] == deployed and report["images"] == 16 and report["method"] == method
    marked = [line for line in table.splitlines() if "deployed" in line]
    assert len(marked) == 1 and marked[0].split()[0] == deployed


def test_json_on_stdout(runs, capsys):
    assert evaluate.main([str(runs["pcl"] / "checkpoints" / "last.pt"), "--json", "-", "--batch-size", "5"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)                    # stdout holds the JSON alone, the table goes to stderr
    assert report["checkpoint"].endswith("last.pt") and report["images"] == 16
    assert {"net0", "net1", "net2", "ens", "ema0", "ema1", "ema2"} == set(report["classifiers"])
    assert "<- deployed" in captured.err


def write_tree(root, names):
    """A small ImageFolder tree (train/, val/) of 32-px images, two per class."""
    for split in ("train", "val"):
        for c, name in enumerate(names):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(2):
                pixels = np.full((32, 32, 3), 20 * c + 10 * i, dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")


def one_line_error(capsys, argv) -> str:
    assert evaluate.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fastmcl: error: ") and "\n" not in err
    return err


def test_errors(runs, tmp_path, capsys):
    assert "no such run folder" in one_line_error(capsys, [str(tmp_path / "missing")])
    torch.save([1, 2], tmp_path / "list.pt")
    one_line_error(capsys, [str(tmp_path / "list.pt")])
    write_tree(tmp_path / "three", ["a", "b", "c"])
    err = one_line_error(capsys, [str(runs["pcl"]), "--data", str(tmp_path / "three")])
    assert "3 classes" in err and "10" in err
    write_tree(tmp_path / "ten", [str(c) for c in range(9)] + ["other"])    # synthetic classes are named 0..9
    err = one_line_error(capsys, [str(runs["pcl"]), "--data", str(tmp_path / "ten")])
    assert "'other'" in err and "'9'" in err


@pytest.mark.parametrize("module", ["fastmcl.evaluate", "fastmcl.export"])
def test_output_closed_early_is_a_quiet_exit(runs, tmp_path, module):
    """`python -m fastmcl.evaluate RUN | head -1`: here the reader is gone before the command writes."""
    import subprocess
    import sys
    argv = [sys.executable, "-m", module, str(runs["pcl"])] + (["--out", str(tmp_path / "n.pt")]
                                                               if module == "fastmcl.export" else [])
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 141 and "Traceback" not in err and "BrokenPipe" not in err, err


@pytest.mark.parametrize("size", [32, 72], ids=["small-tree", "imagenet-style"])
def test_evaluate_reads_the_validation_set_alone(tmp_path, capsys, size):
    """The same numbers with the training images gone: only val/ is read (and the training normalisation kept)."""
    data = tmp_path / "data"
    for split, count in (("train", 4), ("val", 2)):
        for c in range(4):
            folder = data / split / f"c{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                rng = np.random.default_rng(100 * c + 10 * i + (split == "val"))
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    run = tmp_path / "run"
    assert train.main(["--method", "dml", "--data", str(data), "--batch-size", "8", "--epochs", "1", "--workers", "0",
                       "--no-progress", "--out", str(run)]) == 0
    reports = []
    for moved in (False, True):
        if moved:
            (data / "train").rename(tmp_path / "train-moved")
        assert evaluate.main([str(run), "--json", str(tmp_path / "e.json")]) == 0
        reports.append(json.loads((tmp_path / "e.json").read_text())["classifiers"])
    assert reports[0] == reports[1] and reports[0]["net0"]["top1"] >= 0
