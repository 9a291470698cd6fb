"""`python -m fastmcl.train`: the command-line entry point (see README). Bad input → one line on stderr, exit 2."""
from __future__ import annotations

import sys

from . import distributed
from .checkpoint import CheckpointError
from .config import config_from, parse_flags
from .build import build_trainer, resume_config
from .console import final_line, quiet_on_closed_output
from .trainer import NonFiniteLoss


@quiet_on_closed_output
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        values = parse_flags(argv)      # argv parsed once; the explicit values also override a resumed run's
        resume = values.pop("resume", "")
        cfg, state = resume_config(resume, values) if resume else (config_from(values), None)
        trainer = build_trainer(cfg, resume_state=state)
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
    if "eval" in result and result["main"]:
        print(final_line(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
