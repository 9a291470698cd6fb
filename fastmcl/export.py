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
import re
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .build import build_networks, load_run
from .checkpoint import CheckpointError
from .config import TrainConfig
from .console import quiet_on_closed_output
from .methods import Objective
from .models import Classifier, Cohort, extract_member
from .models.ema import EmaCohort
from .pipeline import SMALL_IMAGE_MAX

FORMATS = ("state_dict", "torchscript", "exported")
#: name of the metadata file inside a TorchScript or `torch.export` archive (their loaders' `extra_files`)
META_FILE = "fastmcl.json"
_SUFFIX = {"state_dict": ".pt", "torchscript": ".torchscript.pt", "exported": ".pt2"}
_MEMBER = re.compile(r"(net|ema)(\d+)")


@dataclass
class TrainedRun:
    """A checkpoint loaded into the networks it was trained with (on the CPU, eval mode)."""

    checkpoint: Path
    cfg: TrainConfig
    state: dict
    cohort: Cohort
    objective: Objective
    ema: EmaCohort | None

    @property
    def data(self) -> dict:
        """`num_classes`, `class_names`, `image_size`, `val_resize`, `mean`, `std` of the training data (None where
        the checkpoint does not record them). `val_resize`: the shorter side before the centre crop of ImageNet-style
        validation images; None for small images, which are resized to `image_size` whole."""
        recorded = self.state.get("data") or {}
        image_size = int(recorded.get("image_size") or self.cfg.image_size)
        resize = recorded.get("val_resize", self.cfg.val_resize if image_size > SMALL_IMAGE_MAX else None)
        return {"num_classes": int(self.cohort.nets[0].fc.out_features), "class_names": recorded.get("class_names"),
                "image_size": image_size, "val_resize": resize, "mean": recorded.get("mean"),
                "std": recorded.get("std")}

    def exportable(self) -> list[str]:
        """Names of the single networks of this run, members first, then the temporal-mean copy's."""
        names = [f"net{i}" for i in range(self.cohort.members)]
        return names + ([f"ema{i}" for i in range(self.cohort.members)] if self.ema is not None else [])

    def resolve(self, name: str) -> str:
        """`deployed` → the method's deployed network's name; ValueError naming the exportable ones for a name that
        is not one of them."""
        resolved = self.objective.deployed if name == "deployed" else name
        if resolved not in self.exportable():
            raise ValueError(f"--member {name}: not a single network of this {self.cfg.method} run; choose one of "
                             f"deployed ({self.objective.deployed}), {', '.join(self.exportable())}")
        return resolved

    def member(self, name: str) -> Classifier:
        """`deployed`, `netN` or `emaN` as a standalone `Classifier`."""
        kind, index = _MEMBER.fullmatch(self.resolve(name)).groups()
        return extract_member(self.cohort if kind == "net" else self.ema.module, int(index))


def find_run_checkpoint(path: str | Path) -> Path:
    """A checkpoint file as given, or a run folder's `checkpoints/best.pt` (else `last.pt`)."""
    path = Path(path)
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            if (path / "checkpoints" / name).is_file():
                return path / "checkpoints" / name
        raise CheckpointError(f"{path}: no checkpoints/best.pt or checkpoints/last.pt in this folder")
    if not path.exists():
        raise CheckpointError(f"{path}: no such run folder or checkpoint file")
    return path


def _bank_size(objective_state: dict) -> int:
    """The dataset size a memory-bank objective was built for (rows of its `memory` buffer `[nets, N, D]`), 0
    without a bank."""
    rows = [v.shape[-2] for k, v in objective_state.items() if k.split(".")[-1] == "memory" and v.dim() >= 2]
    return int(rows[0]) if rows else 0


def load_trained(path: str | Path) -> TrainedRun:
    """Load a run folder or checkpoint into its cohort, objective and EMA copy (CPU, eval mode).

    CheckpointError (one line) for a missing path or a file that is not a fastmcl checkpoint.
    """
    checkpoint = find_run_checkpoint(path)
    if archive_kind(checkpoint) is not None:
        raise CheckpointError(f"{checkpoint} is an exported network ({archive_kind(checkpoint)}), not a fastmcl "
                              f"checkpoint")
    try:
        cfg, state = load_run(checkpoint)
    except (KeyError, TypeError) as e:      # no config, or a config of fields this fastmcl does not have
        raise CheckpointError(f"{checkpoint} is not a fastmcl checkpoint (no usable config: {e})") from e
    if not {"cohort", "objective"} <= state.keys():
        raise CheckpointError(f"{checkpoint} is not a fastmcl checkpoint (it has no cohort and objective)")
    fc_rows = [v.shape[0] for k, v in state["cohort"].items() if k.endswith("fc.weight")]
    num_classes = int((state.get("data") or {}).get("num_classes") or (fc_rows[0] if fc_rows else 0))
    nets = build_networks(cfg, num_classes, _bank_size(state["objective"]))
    cohort, objective, ema = nets.cohort, nets.objective, nets.ema
    try:
        cohort.load_state_dict(state["cohort"])
        objective.load_state_dict(state["objective"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
    except (RuntimeError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{checkpoint}: the weights do not fit the networks its config describes ({first})")
    for module in (cohort, objective, ema):
        if module is not None:
            module.eval()
    return TrainedRun(checkpoint, cfg, state, cohort, objective, ema)


def export_metadata(run: TrainedRun, name: str) -> dict:
    """What a user needs beside the weights: architecture, classes, input size, normalisation, provenance."""
    resolved = run.resolve(name)
    arch = run.cohort.archs[int(_MEMBER.fullmatch(resolved)[2])]
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


def archive_kind(path: Path) -> str | None:
    """`torchscript` or `exported` for those archives (by the files torch writes into them), else None."""
    if not path.is_file() or not zipfile.is_zipfile(path):
        return None
    with zipfile.ZipFile(path) as archive:
        leaves = {name.split("/", 1)[-1] for name in archive.namelist()}
    return "torchscript" if "constants.pkl" in leaves else "exported" if "archive_format" in leaves else None


def default_out(checkpoint: Path, member: str, fmt: str) -> Path:
    """`RUN/export/<member>.pt` (state_dict), `.torchscript.pt` or `.pt2` (exported), beside the run's checkpoints."""
    run_dir = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
    return run_dir / "export" / f"{member}{_SUFFIX[fmt]}"


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
