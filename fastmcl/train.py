"""`python -m fastmcl.train`: the command-line entry point (see README). Bad input → one line on stderr, exit 2."""
from __future__ import annotations

import signal
import sys
from pathlib import Path

from . import distributed
from .checkpoint import CheckpointError, has_checkpoint
from .config import config_from, parse_flags
from .build import RUN_FILES, build_trainer, resume_config
from .console import final_line, quiet_on_closed_output
from .trainer import NonFiniteLoss


@quiet_on_closed_output
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        values = parse_flags(argv)      # argv parsed once; the explicit values also override a resumed run's
        resume = values.pop("resume", "")
        if resume == "auto":
            resume, anew = resume_auto(values.get("out", ""))
            if anew:
                values["overwrite"] = True
        cfg, state = resume_config(resume, values) if resume else (config_from(values), None)
        trainer = build_trainer(cfg, resume_state=state)
        if state is not None and distributed.launch_rank() == 0:
            print(f"fastmcl: resuming {cfg.resume} at step {state['step']} (epoch {state['epoch']})", flush=True)
        try:
            result = trainer.fit()
        except BaseException:
            trainer.run_folder.release()     # a start that failed before its first checkpoint leaves nothing
            raise
    except NonFiniteLoss as e:
        print(f"fastmcl: error: {e}; stopped, the last good checkpoint is kept in checkpoints/last.pt",
              file=sys.stderr)
        return 1
    except (ValueError, CheckpointError) as e:  # DataError and CheckpointError are ValueErrors
        print(f"fastmcl: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastmcl: interrupted", file=sys.stderr)
        return 130
    finally:
        distributed.shutdown()      # under torchrun: leave the process group cleanly
    if result.get("signal") == signal.SIGINT:
        return 130
    if "eval" in result and result["main"]:
        print(final_line(result))
    return 0


def resume_auto(out: str) -> tuple[str, bool]:
    """`--resume auto`: `(out, False)`, to continue the run in `--out` when it holds a checkpoint; else `("", anew)`,
    to start one there, `anew` when the folder holds only the files of a run stopped before its first checkpoint.
    Every process under torchrun decides before the process group forms, before process 0 writes (docs/runtime.md)."""
    if not out:
        raise ValueError("--resume auto needs --out DIR: the folder the run continues from, or starts in")
    if has_checkpoint(out):
        return out, False
    folder = Path(out)
    return "", folder.is_dir() and all(any(p.match(pattern) for pattern in RUN_FILES) for p in folder.iterdir())

if __name__ == "__main__":
    sys.exit(main())
