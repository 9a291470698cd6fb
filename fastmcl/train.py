"""`python -m fastmcl.train`: the command-line entry point (see README). Bad input → one line on stderr, exit 2."""
from __future__ import annotations

import sys

from . import distributed
from .checkpoint import CheckpointError
from .config import config_from, parse_flags
from .build import build_trainer, resume_config
from .trainer import NonFiniteLoss


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        values = parse_flags(argv)      # argv parsed once; the explicit values also override a resumed run's
        resume = values.pop("resume", "")
        cfg, state = resume_config(resume, values) if resume else (config_from(values), None)
        result = build_trainer(cfg, resume_state=state).fit()
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
        best = max(result["eval"].items(), key=lambda kv: kv[1][0])
        print(f"fastmcl: done at step {result['step']}; deployed {result['deployed']} top-1 "
              f"{result['deployed_top1']:.2f}% (best classifier {best[0]} {best[1][0]:.2f}%); run {result['out']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
