"""Runs that survive what clusters do to them, through the public commands: `--resume auto`, a torchrun worker killed
under `--max-restarts`, a requeued job (SIGTERM, then the identical command again), Ctrl-C, and a `last.pt` that cannot
be read (the previous checkpoint takes over)."""
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastmcl.checkpoint import load_checkpoint
from fastmcl.config import parse_config
from fastmcl.train import main
from fastmcl.trainer import Trainer
from support.gloo import torchrun_command, torchrun_workers

# 64 samples / batch 16: 4 steps an epoch; lr 0.01 keeps the tiny synthetic run finite
TINY = ["--data", "synthetic", "--synthetic-samples", "64", "--num-classes", "4", "--batch-size", "16",
        "--image-size", "16", "--workers", "0", "--m-per-class", "4", "--no-progress", "--deterministic",
        "--log-every", "1", "--lr", "0.01", "--method", "dml"]
#: torchrun's variables are the launcher's to set: a test run inside one must not inherit them
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def train_events(run: Path, skip: int = 0) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()[skip:]
    return [e for e in map(json.loads, lines) if e["event"] == "train"]


def losses(run: Path) -> dict[int, float]:
    """The loss of every step; a step trained again after a restart counts with its later value."""
    return {e["step"]: e["loss"] for e in train_events(run)}


def saved_step(run: Path) -> int:
    return int(load_checkpoint(run / "checkpoints" / "last.pt")["step"])


def start(cmd: list[str], cwd: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
    return out


def wait_for_step(run: Path, step: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").exists() and any(e["step"] >= step for e in train_events(run)):
            return
        time.sleep(0.05)
    pytest.fail(f"the run never reached step {step}:\n{finish(proc, 10)[-3000:]}")


# -- in one process -----------------------------------------------------------------------------------------------
def test_resume_auto_starts_a_run_then_continues_it(tmp_path, capsys):
    run = tmp_path / "run"
    auto = TINY + ["--out", str(run), "--resume", "auto"]
    assert main(auto + ["--max-steps", "2"]) == 0                       # new folder: a new run
    assert main(auto + ["--max-steps", "3"]) == 0                       # the same command again: continues
    assert "resuming" in capsys.readouterr().out
    assert [e["step"] for e in train_events(run)] == [1, 2, 3] and saved_step(run) == 3
    # the checks of --resume DIR, and --out required, each in one line
    for argv, match in ((TINY + ["--resume", "auto"], "--out"),
                        (TINY + ["--method", "mcl", "--out", str(run), "--resume", "auto"], "--method"),
                        (TINY + ["--num-classes", "8", "--out", str(run), "--resume", "auto"], "classes")):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and match in err, err
    # a folder left by a run stopped before its first checkpoint starts anew; one with other files is refused
    (run / "checkpoints" / "last.pt").unlink()
    (run / "checkpoints" / "previous.pt").unlink()
    assert main(auto + ["--max-steps", "1"]) == 0
    assert [e["step"] for e in train_events(run)] == [1]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("not a run")
    assert main(TINY + ["--out", str(tmp_path / "mine"), "--resume", "auto"]) == 2
    assert "not empty" in capsys.readouterr().err


def test_ctrl_c_saves_at_the_end_of_the_step_and_a_second_one_exits_at_once(tmp_path, monkeypatch, capsys):
    original = Trainer.train_step
    presses = {}

    def pressed(self, *args, **kwargs):
        for _ in range(presses.get(self.step + 1, 0)):   # Ctrl-C while this step runs
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train_step", pressed)
    run = tmp_path / "run"
    presses[3] = 1
    assert main(TINY + ["--out", str(run), "--epochs", "5"]) == 130
    said = [line for line in capsys.readouterr().out.splitlines() if "SIGINT" in line]
    assert len(said) == 1 and "step 3" in said[0] and f"--resume {run}" in said[0], said
    assert saved_step(run) == 3
    presses.clear()
    presses[5] = 2                                                       # the step is not finished, nothing saved
    assert main(["--resume", str(run), "--no-progress"]) == 130
    assert "interrupted" in capsys.readouterr().err and saved_step(run) == 4
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_unreadable_last_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(TINY + ["--out", str(run), "--max-steps", "3", "--ckpt-every", "1"]) == 0
    last = run / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])                          # a partial copy
    capsys.readouterr()
    assert main(["--resume", str(run), "--max-steps", "4", "--no-progress"]) == 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(last) in err and "previous" in err and "step 2" in err, err
    assert [e["step"] for e in train_events(run)][-2:] == [3, 4] and saved_step(run) == 4


def test_the_readme_scheduler_script_is_valid_bash_and_its_command_parses():
    """The README's SLURM script (a `sh` block: it cannot run without SLURM) parses, and its launch line is a valid
    torchrun command with restarts around a `--resume auto` run."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    [script] = re.findall(r"^```sh\n(.*?)^```", readme, flags=re.S | re.M)
    assert "--requeue" in script and "--signal=" in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    [launch] = [line for line in script.splitlines() if line.startswith("torchrun ")]
    from torch.distributed.run import get_args_parser
    ns = get_args_parser().parse_args(shlex.split(launch.rstrip("& "))[1:])
    assert ns.max_restarts > 0 and ns.module and ns.training_script == "fastmcl.train"
    cfg = parse_config(ns.training_script_args)
    assert cfg.resume == "auto" and cfg.out


# -- separate processes, as a scheduler and torchrun run them --------------------------------------------------------
def test_requeue_sigterm_then_the_identical_command_continues_at_the_saved_step(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "fastmcl.train", *TINY, "--epochs", "3", "--out", str(run), "--resume", "auto"]
    proc = start(cmd, tmp_path)
    wait_for_step(run, 2, proc)
    proc.send_signal(signal.SIGTERM)
    out = finish(proc)
    assert proc.returncode == 0 and "SIGTERM" in out, out[-3000:]
    step, before = saved_step(run), len((run / "metrics.jsonl").read_text().splitlines())
    proc = start(cmd, tmp_path)                                          # the requeued job: the same command line
    out = finish(proc)
    assert proc.returncode == 0 and f"at step {step}" in out, out[-3000:]
    assert [e["step"] for e in train_events(run, skip=before)] == list(range(step + 1, 13))


def test_with_data_workers_a_run_exits_and_ctrl_c_to_its_process_group_saves(tmp_path):
    """Persistent DataLoader workers: the process ends when the run does (Python's exit handler stops the workers
    with SIGTERM), and a terminal's Ctrl-C, sent to the whole process group, stops the run cleanly after a step."""
    cmd = [sys.executable, "-m", "fastmcl.train", *TINY, "--workers", "2", "--epochs", "2"]
    proc = start([*cmd, "--out", str(tmp_path / "whole")], tmp_path)
    out = finish(proc, timeout=120)
    assert proc.returncode == 0 and "done at step 8" in out, out[-3000:]
    run = tmp_path / "stopped"
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    proc = subprocess.Popen([*cmd, "--epochs", "50", "--out", str(run)], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    wait_for_step(run, 2, proc)
    os.killpg(proc.pid, signal.SIGINT)                                  # what Ctrl-C in its terminal does
    out = finish(proc, timeout=120)
    said = [line for line in out.splitlines() if "SIGINT at step" in line]
    assert proc.returncode == 130 and len(said) == 1 and "Traceback" not in out, out[-3000:]
    assert f"step {saved_step(run)} " in said[0]


def test_ctrl_c_under_torchrun_stops_every_process_at_the_same_step(tmp_path):
    run = tmp_path / "run"
    agent = start([*torchrun_command(2), "-m", "fastmcl.train", *TINY, "--epochs", "50", "--out", str(run)], tmp_path)
    wait_for_step(run, 2, agent)
    agent.send_signal(signal.SIGINT)                                     # what Ctrl-C in its terminal does
    out = finish(agent)
    said = [line for line in out.splitlines() if "SIGINT at step" in line]
    # process 0 saved after a step that the other process finished too: the step's all-reduce carried the request
    assert len(said) == 1 and f"step {saved_step(run)} " in said[0], out[-3000:]
    # torchrun prints its own traceback of the SIGINT; none of the processes it ran may have failed
    assert not [line for line in out.splitlines() if 'File "' in line and "fastmcl" in line], out[-3000:]


def test_a_restarted_group_forms_even_when_a_new_process_starts_late(tmp_path):
    """torchrun keeps one store across restarts: a restarted rank 0 must not join the address of the rank that died
    (it would be refused) while the new rank 1 is still starting."""
    worker = Path(__file__).parent / "support" / "restarted_group.py"
    agent = start([*torchrun_command(2), "--max-restarts", "1", str(worker)], tmp_path)
    out = finish(agent, timeout=120)
    assert agent.returncode == 0, out[-3000:]
    # the processes share one pipe: their lines may interleave
    assert sorted(re.findall(r"attempt 1 rank \d sum \d+", out)) == \
        ["attempt 1 rank 0 sum 2", "attempt 1 rank 1 sum 2"], out[-3000:]


def test_a_killed_worker_is_restarted_and_the_run_continues_exactly(tmp_path):
    """torchrun --max-restarts with --resume auto: rank 1 SIGKILLed mid-run; the agent restarts both processes,
    they resume from the newest checkpoint and the losses from there on equal an uninterrupted run's."""
    args = [*TINY, "--method", "lmcl", "--no-memory-bank", "--meta-mode", "off", "--sync-bn", "--epochs", "4"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    agent = start([*torchrun_command(2), "-m", "fastmcl.train", *args, "--out", str(whole)], tmp_path)
    assert agent.wait(300) == 0, finish(agent)[-3000:]
    finish(agent)
    launch = [*torchrun_command(2), "--max-restarts", "2", "-m", "fastmcl.train", *args, "--out", str(killed),
              "--resume", "auto"]
    agent = start(launch, tmp_path)
    wait_for_step(killed, 6, agent)
    workers = torchrun_workers(agent.pid)
    os.kill(workers[1], signal.SIGKILL)
    killed_at = time.time()
    out = finish(agent)
    assert agent.returncode == 0, out[-3000:]
    resumed = [line for line in out.splitlines() if "resuming" in line]
    assert resumed, out[-3000:]
    step = int(resumed[0].split(" at step ")[1].split()[0])
    a, b = losses(whole), losses(killed)
    assert sorted(a) == sorted(b) == list(range(1, 17)) and 4 <= step < 16
    for s in range(step + 1, 17):
        assert abs(a[s] - b[s]) <= 1e-6 * abs(a[s]), (s, a[s], b[s])
    first = min(e["time"] for e in train_events(killed) if e["step"] == step + 1 and e["time"] > killed_at)
    print(f"\nrestart: resumed from step {step}; final loss {b[16]!r} vs uninterrupted {a[16]!r} (relative "
          f"difference {abs(a[16] - b[16]) / abs(a[16]):.1e}); kill to the first step after the restart "
          f"{first - killed_at:.1f} s")
