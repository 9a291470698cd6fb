"""Run code on W CPU processes joined by a gloo process group, the way torchrun would launch them.

`run_ranks` spawns the ranks once and runs named scenarios in order on each; every rank saves its results (or the
traceback of the scenario that failed) to a file, so a failing rank fails a test instead of hanging, and the parent
kills stragglers after a deadline. `torchrun_command` builds a `torch.distributed.run` command line for end-to-end
runs, `torchrun_workers` finds the processes it started.
"""
from __future__ import annotations

import os
import socket
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastmcl import distributed

# (rank, the process's DistEnv, its device) -> a result saved with torch.save
Scenario = Callable[[int, distributed.DistEnv, torch.device], object]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(nproc: int = 2) -> list[str]:
    """`python -m torch.distributed.run` on this host with `nproc` processes; append the script and its arguments."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
            "--master-addr", "127.0.0.1", "--master-port", str(free_port())]


def torchrun_workers(agent_pid: int) -> dict[int, int]:
    """The worker processes a torchrun agent has started now: `{RANK: pid}` (from /proc, Linux)."""
    workers = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid != agent_pid:
                continue
            env = dict(v.split("=", 1) for v in (entry / "environ").read_text().split("\0") if "=" in v)
        except (OSError, IndexError, ValueError):
            continue      # gone meanwhile
        if "RANK" in env:
            workers[int(env["RANK"])] = int(entry.name)
    return workers


def _rank_main(rank: int, world: int, port: int, scenarios: dict[str, Scenario], outdir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    results: dict = {}
    try:
        env, device = distributed.init_distributed("cpu", timeout=timedelta(seconds=30))
    except BaseException:
        torch.save({"__init__": traceback.format_exc()}, os.path.join(outdir, f"rank{rank}.pt"))
        return
    try:
        for name, scenario in scenarios.items():
            try:
                results[name] = scenario(rank, env, device)
            except BaseException:
                results[name] = {"__error__": traceback.format_exc()}
                break  # the collectives may be out of step now: stop cleanly
        dist.barrier()
    except BaseException:
        results.setdefault("__teardown__", traceback.format_exc())
    finally:
        torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
        distributed.shutdown()


def run_ranks(scenarios: dict[str, Scenario], outdir: Path, world: int = 2, deadline_s: float = 90.0) -> list[dict]:
    """Each rank's `{scenario name: result}`; fails the calling test if a rank could not start or did not finish.

    A scenario that raised leaves `{"__error__": traceback}` (and the later ones do not run): see `result_of`.
    """
    ctx = mp.spawn(_rank_main, args=(world, free_port(), scenarios, str(outdir)), nprocs=world, join=False)
    deadline = time.monotonic() + deadline_s
    spawn_error = None
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                spawn_error = f"ranks did not finish within {deadline_s}s"
                break
    except Exception as e:  # a rank died with an exception or a signal
        spawn_error = f"{type(e).__name__}: {e}"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join(5)
    results = []
    for rank in range(world):
        path = outdir / f"rank{rank}.pt"
        if not path.exists():
            pytest.fail(f"rank {rank} wrote no results ({spawn_error})")
        res = torch.load(path, weights_only=False)
        if "__init__" in res:
            pytest.fail(f"rank {rank}: init_distributed failed:\n{res['__init__']}")
        if "__teardown__" in res:
            pytest.fail(f"rank {rank}: teardown failed:\n{res['__teardown__']}")
        results.append(res)
    if spawn_error is not None:
        pytest.fail(f"spawned ranks failed: {spawn_error}")
    return results


def result_of(results: list[dict], name: str) -> list:
    """Scenario `name`'s result on every rank; fails the test with the rank's traceback if it raised or never ran."""
    out = []
    for rank, res in enumerate(results):
        if name not in res:
            errors = "; ".join(str(v["__error__"]) for v in res.values() if isinstance(v, dict) and "__error__" in v)
            pytest.fail(f"rank {rank}: scenario {name!r} did not run; errors: {errors}")
        if isinstance(res[name], dict) and "__error__" in res[name]:
            pytest.fail(f"rank {rank}: scenario {name!r} raised:\n{res[name]['__error__']}")
        out.append(res[name])
    return out
