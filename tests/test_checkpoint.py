"""fastmcl.checkpoint: round trips under weights_only, RNG restore, load errors, and atomicity under SIGKILL."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fastmcl.checkpoint import (
    CheckpointError,
    capture_rng_state,
    find_checkpoint,
    load_checkpoint,
    load_resume_checkpoint,
    restore_rng_state,
    run_dir_of,
    save_checkpoint,
)

REPO = Path(__file__).resolve().parents[1]


def _assert_same(a, b, where="state"):
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


# ------------------------------------------------------------------------------------------------ round trips


def test_round_trip_nested_state_weights_only(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    # shaped like an optimizer's state_dict (int keys!); building a real torch.optim costs ~1 s of lazy imports
    optimizer = {
        "state": {0: {"momentum_buffer": torch.randn(4, 3)}, 1: {"momentum_buffer": torch.randn(4)}},
        "param_groups": [{"lr": 0.1, "momentum": 0.9, "nesterov": False, "params": [0, 1]}],
    }
    state = {
        "members": {"net0": model.state_dict(), "net1": {"w": torch.randn(2, 3, dtype=torch.bfloat16)}},
        "optimizer": optimizer,
        "bank": torch.arange(12, dtype=torch.int64).reshape(3, 4),
        "mask": torch.tensor([True, False]),
        "epoch": 7,
        "step": 12345,
        "best_top1": 71.25,
        "method": "lmcl",
        "scaler": None,
        "history": [1.5, 2.5, ("a", 3)],
        "config": {"lr": 0.05, "milestones": [150, 225], "dataset": {"name": "cifar100", "root": "/data"}},
        "rng": capture_rng_state(),
    }
    path = tmp_path / "checkpoints" / "last.pt"  # parents are created
    save_checkpoint(path, state)
    loaded = load_checkpoint(path)
    _assert_same(state, loaded)
    # what torch itself reads with weights_only=True, i.e. nothing in there needs unsafe unpickling
    _assert_same(state, torch.load(path, weights_only=True))
    assert not [p for p in path.parent.iterdir() if p.name != "last.pt"], "temp files left behind"


def test_save_replaces_previous_version(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"v": 1})
    save_checkpoint(path, {"v": 2})
    assert load_checkpoint(path) == {"v": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_failed_save_keeps_old_file_and_no_temp(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"v": 1})
    with pytest.raises(Exception):
        save_checkpoint(path, {"v": 2, "bad": lambda: None})  # unpicklable: torch.save fails midway
    assert load_checkpoint(path) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_rng_restore_reproduces_next_draws(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    # leave a cached second Gaussian in both random and numpy's legacy generator: part of the state to restore
    random.gauss(0.0, 1.0)
    np.random.randn()

    def draws():
        return (
            [random.random(), random.gauss(0.0, 1.0), random.randint(0, 10**9)],
            np.random.randn(3).tolist() + np.random.rand(2).tolist(),
            torch.rand(4).tolist() + torch.randint(0, 10**6, (3,)).tolist(),
        )

    save_checkpoint(tmp_path / "rng.pt", {"rng": capture_rng_state()})
    expected = draws()
    draws()  # advance everything further
    restore_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    assert draws() == expected


# ------------------------------------------------------------------------------------------------ load errors


def _torn(path: Path) -> None:
    save_checkpoint(path, {"w": torch.randn(1000)})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


class _NotAllowed:
    pass


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda p: None, id="missing"),
        pytest.param(lambda p: p.write_bytes(b""), id="empty"),
        pytest.param(_torn, id="truncated"),
        pytest.param(lambda p: p.write_bytes(b"not a checkpoint\n" * 50), id="garbage"),
        pytest.param(lambda p: torch.save({"obj": _NotAllowed()}, p), id="unsafe-global"),
        pytest.param(lambda p: torch.save(torch.zeros(2), p), id="not-a-dict"),
    ],
)
def test_bad_file_raises_checkpoint_error_naming_path(tmp_path, make):
    path = tmp_path / "run" / "last.pt"
    path.parent.mkdir()
    make(path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    msg = str(info.value)
    assert str(path) in msg and "\n" not in msg and len(msg) < 400, msg
    assert isinstance(info.value, ValueError)


def test_find_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        find_checkpoint(tmp_path)  # empty run dir
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        find_checkpoint(tmp_path / "nope")
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(CheckpointError, match=str(tmp_path)):
        find_checkpoint(tmp_path)  # checkpoints/ without last.pt
    last = tmp_path / "checkpoints" / "last.pt"
    save_checkpoint(last, {"epoch": 1})
    assert find_checkpoint(str(tmp_path)) == last
    # `--resume RUN/checkpoints/last.pt` (or best.pt) names the file itself; the run folder is found from it
    save_checkpoint(tmp_path / "checkpoints" / "best.pt", {"epoch": 0})
    assert find_checkpoint(str(last)) == last
    assert find_checkpoint(tmp_path / "checkpoints" / "best.pt") == tmp_path / "checkpoints" / "best.pt"
    assert run_dir_of(find_checkpoint(last)) == run_dir_of(find_checkpoint(tmp_path)) == tmp_path
    save_checkpoint(tmp_path / "elsewhere.pt", {"epoch": 2})
    assert run_dir_of(find_checkpoint(tmp_path / "elsewhere.pt")) == tmp_path


def test_keep_previous_and_the_fallback_to_it(tmp_path, capsys):
    """`last.pt` replaced with `keep_previous` leaves the old one as `previous.pt` (renamed, no temp left); a resume of
    the run folder falls back to it when `last.pt` is torn or missing, in one line; a file named explicitly does not."""
    ckpts = tmp_path / "checkpoints"
    last, previous = ckpts / "last.pt", ckpts / "previous.pt"
    for step in (1, 2, 3):
        save_checkpoint(last, {"step": step}, keep_previous=previous)
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.pt", "previous.pt"]
    assert load_checkpoint(previous) == {"step": 2}
    assert load_resume_checkpoint(tmp_path) == (last, {"step": 3}) and not capsys.readouterr().err
    last.write_bytes(last.read_bytes()[:20])
    assert load_resume_checkpoint(tmp_path) == (previous, {"step": 2})
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(last) in err and str(previous) in err, err
    with pytest.raises(CheckpointError, match="last.pt"):
        load_resume_checkpoint(last)                              # named explicitly: that file or an error
    last.unlink()                                                 # a kill between the two renames
    assert load_resume_checkpoint(tmp_path) == (previous, {"step": 2})
    previous.write_bytes(b"")
    save_checkpoint(last, {"step": 4})
    last.write_bytes(b"garbage")
    with pytest.raises(CheckpointError) as info:                  # neither readable: one line naming both
        load_resume_checkpoint(tmp_path)
    assert str(last) in str(info.value) and str(previous) in str(info.value) and "\n" not in str(info.value)


def test_leftover_temp_is_replaced_by_the_next_save(tmp_path):
    """A writer killed mid-save leaves its temp file; the next save of that target takes it over, others stay."""
    save_checkpoint(tmp_path / "last.pt", {"v": 0})
    save_checkpoint(tmp_path / "best.pt", {"v": 0})
    (tmp_path / ".last.pt.tmp").write_bytes(b"partial")
    (tmp_path / ".best.pt.tmp").write_bytes(b"partial")  # another target's writer: not ours to touch
    save_checkpoint(tmp_path / "last.pt", {"v": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == [".best.pt.tmp", "best.pt", "last.pt"]
    assert load_checkpoint(tmp_path / "last.pt") == {"v": 1}


# ------------------------------------------------------------------------------------------------ SIGKILL

# Writes ~200 MB checkpoints to argv[1] in a loop, alternating between two contents. Each file holds its marker (the
# iteration number) and the CRC of its tensors; the parent also learns both CRCs from stdout.
_WRITER = r"""
import sys, time, zlib, torch
from fastmcl.checkpoint import save_checkpoint

def crc(tensors):
    c = 0
    for t in tensors:
        c = zlib.crc32(t.numpy().tobytes(), c)
    return c

path, marker = sys.argv[1], int(sys.argv[2])
saves_done = 0
if sys.argv[3] == "pause":
    # After one complete save, stall inside the next save's file fsync: the temp file is written, not yet renamed.
    import os, stat
    real_fsync = os.fsync
    def fsync(fd):
        if saves_done >= 1 and stat.S_ISREG(os.fstat(fd).st_mode):
            print("in_fsync", flush=True)
            time.sleep(60)
        real_fsync(fd)
    os.fsync = fsync
n = 12_500_000  # 4 tensors x 50 MB of float32 (arange stays exact below 2**24)
versions = []
for parity in (0, 1):
    tensors = [torch.arange(n, dtype=torch.float32).add_(2 * k + parity) for k in range(4)]
    versions.append((tensors, crc(tensors)))
    print("crc", parity, versions[-1][1], flush=True)
while True:
    tensors, c = versions[marker % 2]
    print("saving", marker, flush=True)
    t0 = time.perf_counter()
    save_checkpoint(path, {"marker": marker, "crc": c, "tensors": tensors})
    print("saved", marker, time.perf_counter() - t0, flush=True)
    saves_done += 1
    marker += 1
"""


def _crc(tensors) -> int:
    import zlib

    c = 0
    for t in tensors:
        c = zlib.crc32(t.numpy().tobytes(), c)
    return c


class _Writer:
    """The writer subprocess plus a thread collecting its stdout lines."""

    def __init__(self, path: Path, first_marker: int, mode: str):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(path), str(first_marker), mode],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.lines: list[list[str]] = []
        self.cond = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:
            with self.cond:
                self.lines.append(line.split())
                self.cond.notify_all()

    def wait_for(self, word: str, after: int = 0, timeout: float = 60.0) -> tuple[int, list[str]]:
        """Wait for the first line starting with ``word`` at index >= ``after``; return its index and words."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for i in range(after, len(self.lines)):
                    if self.lines[i] and self.lines[i][0] == word:
                        return i, self.lines[i]
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None and not self.reader.is_alive():
                    raise AssertionError(f"writer never printed {word!r}; stderr: {self.proc.stderr.read()[-2000:]}")
                self.cond.wait(min(left, 0.5))

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.reader.join(timeout=10)
        self.proc.stderr.close()


@pytest.mark.slow
def test_sigkill_never_leaves_a_torn_checkpoint(tmp_path):
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    path = tmp_path / "checkpoints" / "last.pt"
    for round_ in range(3):
        # Round 0 kills deterministically between writing the temp file and renaming it; the others at a random
        # moment of the save/replace/fsync cycle (mostly inside torch.save, which dominates it).
        writer = _Writer(path, first_marker=100 * round_, mode="pause" if round_ == 0 else "run")
        try:
            _, line = writer.wait_for("saved")  # one complete save first (the first round has no file before)
            if round_ == 0:
                writer.wait_for("in_fsync")
            else:
                time.sleep(rng.uniform(0.0, 2.0 * float(line[2])))
        finally:
            writer.kill()

        crcs = {int(w[1]): int(w[2]) for w in writer.lines if w[0] == "crc"}
        saved = [int(w[1]) for w in writer.lines if w[0] == "saved"]
        saving = [int(w[1]) for w in writer.lines if w[0] == "saving"]
        # Sequential writer: the file is the last completed save, or the one in progress if its rename had happened.
        allowed = {saved[-1], saving[-1]}
        temps = [p.name for p in path.parent.iterdir() if p.name != "last.pt"]

        state = load_checkpoint(path)  # never a CheckpointError: no torn file
        marker = state["marker"]
        assert marker in allowed, f"seed {seed}: marker {marker} not in {allowed}"
        if round_ == 0:
            assert marker == saved[-1], "the stalled save must not be visible yet"
        assert state["crc"] == crcs[marker % 2], f"seed {seed}: marker and contents disagree"
        assert _crc(state["tensors"]) == state["crc"], f"seed {seed}: contents torn"
        del state
        if round_ == 0:
            # the mid-save kill left a complete temp file that was never renamed onto last.pt; the next writer's
            # save takes it over and leaves nothing behind
            assert temps, "round 0 kill did not land mid-save"
            save_checkpoint(path, {"marker": -1})
            assert [p.name for p in path.parent.iterdir()] == ["last.pt"]

    save_checkpoint(path, {"marker": -1})
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]
