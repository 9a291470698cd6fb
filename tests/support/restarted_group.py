"""A torchrun worker for tests: joins the group with `fastmcl.distributed.init_distributed`, all-reduces, and on the
first attempt rank 1 dies by SIGKILL after the group formed. On the restart rank 1 starts late, so rank 0 would read
a stale address if the store's keys were shared between attempts. Prints `attempt A rank R sum S`."""
import os
import signal
import time

import torch

from fastmcl.distributed import all_reduce_sum, init_distributed, shutdown

rank, attempt = int(os.environ["RANK"]), int(os.environ["TORCHELASTIC_RESTART_COUNT"])
if attempt > 0 and rank == 1:
    time.sleep(3)
init_distributed("cpu")
total = all_reduce_sum(torch.ones(1)).item()
print(f"attempt {attempt} rank {rank} sum {total:g}", flush=True)
if attempt == 0:
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)                       # rank 0 waits to be stopped by the agent
shutdown()
