"""`python -m fastmcl.export RUN_OR_CHECKPOINT`: one trained network as a standalone classifier (see docs/export.md).

The network is one cohort member (`netN`), one member of PCL's temporal-mean copy (`emaN`), or the method's deployed
one (default). Whatever the cohort's layout, it is saved as a `fastmcl.models.Classifier` — one plain backbone whose
`forward` returns logits — with the metadata a user needs beside it: architecture, number of classes, class names,
input size, normalisation statistics. Three formats:
- `state_dict`: `{"state_dict": ..., "meta": {...}}`, readable with `torch.load(weights_only=True)`; rebuilding needs
  torch and `fastmcl.models.Classifier`;
- `torchscript`: the traced eval-mode network, metadata in the archive's extra file `fastmcl.json`; loading needs
  only torch (`torch.jit.load`);
- `exported`: the same as a `torch.export` program (`.pt2`, `torch.export.load`), for torch releases that retire
  TorchScript.
Bad input → one line on stderr, exit 2.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
from pathlib import Path

import torch
from torch import nn

from .checkpoint import run_dir_of
from .console import quiet_on_closed_output
from .models import Classifier
from .trained import MEMBER, TrainedRun, archive_kind, load_trained

FORMATS = ("state_dict", "torchscript", "exported")
#: name of the metadata file inside a TorchScript or `torch.export` archive (their loaders' `extra_files`)
META_FILE = "fastmcl.json"
_SUFFIX = {"state_dict": ".pt", "torchscript": ".torchscript.pt", "exported": ".pt2"}


def export_metadata(run: TrainedRun, name: str) -> dict:
    """What a user needs beside the weights: architecture, classes, input size, normalisation, provenance."""
    resolved = run.resolve(name)
    arch = run.cohort.archs[int(MEMBER.fullmatch(resolved)[2])]
    return {"arch": arch, **run.data, "member": resolved, "deployed": resolved == run.objective.deployed,
            "method": run.cfg.method, "step": int(run.state.get("step", 0)), "checkpoint": str(run.checkpoint)}


def check_member(run: TrainedRun, name: str, network: nn.Module, *, atol: float = 1e-5) -> None:
    """The standalone network's logits equal the classifier `name` of the method's own evaluation, on a random
    batch (guards the weight mapping against a cohort layout it does not know)."""
    resolved = run.resolve(name)
    size = run.data["image_size"]
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        extra = {"ema_outputs": run.ema(x)} if run.ema is not None else {}
        expected = run.objective.eval_logits(run.cohort(x), **extra)[resolved]
        got = network(x)
    if not torch.allclose(got, expected, rtol=1e-4, atol=atol):
        raise RuntimeError(f"exported {resolved} differs from the cohort's by {(got - expected).abs().max():.3g}")


def save_exported(network: Classifier, meta: dict, out: str | Path, fmt: str) -> Path:
    """Write `network` with `meta` in `fmt` (one of `FORMATS`) to `out`, atomically."""
    network = network.eval()
    size = meta["image_size"]
    example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    buffer = io.BytesIO()
    if fmt == "state_dict":
        torch.save({"state_dict": network.state_dict(), "meta": meta}, buffer)
    elif fmt == "torchscript":
        with torch.no_grad():     # checked against the eager network once here, not by the trace's own check
            traced = torch.jit.trace(network, example, check_trace=False)
            _check_same(traced(example), network(example), fmt)
        torch.jit.save(traced, buffer, _extra_files={META_FILE: json.dumps(meta)})
    elif fmt == "exported":
        program = torch.export.export(network, (example,), dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
        with torch.no_grad():
            _check_same(program.module()(example), network(example), fmt)
        torch.export.save(program, buffer, extra_files={META_FILE: json.dumps(meta)})
    else:
        raise ValueError(f"--format: must be one of {', '.join(FORMATS)}, got {fmt!r}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_bytes(buffer.getvalue())
    os.replace(tmp, out)
    return out


def _check_same(got: torch.Tensor, expected: torch.Tensor, fmt: str) -> None:
    if not torch.allclose(got, expected, rtol=1e-5, atol=1e-5):
        raise RuntimeError(f"the {fmt} network's logits differ from the eager network's by "
                           f"{(got - expected).abs().max():.3g}")


def load_exported(path: str | Path) -> tuple[nn.Module, dict]:
    """Any format back as `(network, metadata)`, the network in eval mode (the README shows the same in plain
    torch)."""
    path = Path(path)
    kind = archive_kind(path)
    extra = {META_FILE: ""}
    if kind == "exported":        # the program holds the eval-mode graph; its module has no train mode to leave
        network = torch.export.load(path, extra_files=extra).module()
        return network, json.loads(extra[META_FILE])
    if kind == "torchscript":
        network = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        return network.eval(), json.loads(extra[META_FILE])
    saved = torch.load(path, map_location="cpu", weights_only=True)
    meta = saved["meta"]
    network = Classifier(meta["arch"], meta["num_classes"])
    network.load_state_dict(saved["state_dict"])
    return network.eval(), meta


def default_out(checkpoint: Path, member: str, fmt: str) -> Path:
    """`RUN/export/<member>.pt` (state_dict), `.torchscript.pt` or `.pt2` (exported), beside the run's checkpoints."""
    return run_dir_of(checkpoint) / "export" / f"{member}{_SUFFIX[fmt]}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastmcl.export",
                                description="Save one trained network of a run as a standalone classifier that "
                                            "returns logits, with its architecture, classes, input size and "
                                            "normalisation.")
    p.add_argument("run", metavar="RUN_OR_CHECKPOINT", nargs="?", default="runs/latest",
                   help="a run folder (its checkpoints/best.pt, else last.pt) or a checkpoint file (default: "
                        "runs/latest, the newest run)")
    p.add_argument("--member", default="deployed", help="deployed (the method's deployed network) | netN (cohort "
                                                        "member N) | emaN (PCL: member N's temporal mean)")
    p.add_argument("--format", default="state_dict", choices=FORMATS,
                   help="state_dict: weights + metadata for torch.load(weights_only=True) and "
                        "fastmcl.models.Classifier; torchscript: loads with torch alone (torch.jit.load); exported: "
                        "a torch.export program, loads with torch alone (torch.export.load)")
    p.add_argument("--out", default=None, help="output file (default: RUN/export/<member>.pt, .torchscript.pt or "
                                               ".pt2)")
    return p


@quiet_on_closed_output
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run = load_trained(args.run)
        network = run.member(args.member)
        check_member(run, args.member, network)
        meta = export_metadata(run, args.member)
        out = Path(args.out) if args.out else default_out(run.checkpoint, meta["member"], args.format)
        save_exported(network, meta, out, args.format)
    except ValueError as e:       # CheckpointError is a ValueError
        print(f"fastmcl: error: {e}", file=sys.stderr)
        return 2
    if not run.state.get("data"):
        print("fastmcl: note: the checkpoint does not record its data's class names and normalisation; saved as null",
              file=sys.stderr)
    print(f"fastmcl: exported {meta['member']}{' (deployed)' if meta['deployed'] else ''} of {run.checkpoint}: "
          f"{meta['arch']}, {meta['num_classes']} classes, {meta['image_size']} px -> {out} ({args.format})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
