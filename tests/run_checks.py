"""Shared end-to-end check: a run of 2N steps equals N steps + resume + N steps (losses to 1e-6)."""
import json
from pathlib import Path

from fastmcl.train import main


def train_losses(run: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if e["event"] == "train"}


def assert_resume_is_exact(args: list[str], tmp_path: Path, steps: int = 4) -> Path:
    """Runs `args` for `steps` steps, and for steps/2 + resume + steps/2; returns the uninterrupted run's folder."""
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(args + ["--out", str(full), "--max-steps", str(steps)]) == 0
    assert main(args + ["--out", str(part), "--max-steps", str(steps // 2)]) == 0
    assert main(["--resume", str(part), "--max-steps", str(steps), "--no-progress"]) == 0
    want, got = train_losses(full), train_losses(part)
    assert sorted(want) == sorted(got) == list(range(1, steps + 1))
    for step in want:
        assert abs(got[step] - want[step]) <= 1e-6 * max(1.0, abs(want[step])), (step, got[step], want[step])
    return full
