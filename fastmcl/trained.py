"""A trained run loaded back: its checkpoint (`best.pt`, else `last.pt`) in the networks it was trained with. What
`fastmcl.evaluate` and `fastmcl.export` start from (docs/export.md)."""
from __future__ import annotations

import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .build import build_networks, load_run, resolve_saved
from .checkpoint import CheckpointError
from .config import TrainConfig
from .methods import Objective
from .models import Classifier, Cohort, extract_member
from .models.ema import EmaCohort
from .pipeline import SMALL_IMAGE_MAX

#: the name of one single network of a run: a member `netN` or its temporal mean `emaN`
MEMBER = re.compile(r"(net|ema)(\d+)")


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
        kind, index = MEMBER.fullmatch(self.resolve(name)).groups()
        return extract_member(self.cohort if kind == "net" else self.ema.module, int(index))


def _bank_size(objective_state: dict) -> int:
    """The dataset size a memory-bank objective was built for (rows of its `memory` buffer `[nets, N, D]`), 0
    without a bank."""
    rows = [v.shape[-2] for k, v in objective_state.items() if k.split(".")[-1] == "memory" and v.dim() >= 2]
    return int(rows[0]) if rows else 0


def load_trained(path: str | Path) -> TrainedRun:
    """Load a run folder or checkpoint into its cohort, objective and EMA copy (CPU, eval mode).

    CheckpointError (one line) for a missing path or a file that is not a fastmcl checkpoint.
    """
    kind = archive_kind(Path(path))
    if kind is not None:
        raise CheckpointError(f"{path} is an exported network ({kind}), not a fastmcl checkpoint")
    checkpoint, cfg, state = load_run(path, best=True)
    if not {"cohort", "objective"} <= state.keys():
        raise CheckpointError(f"{checkpoint} is not a fastmcl checkpoint (it has no cohort and objective)")
    fc_rows = [v.shape[0] for k, v in state["cohort"].items() if k.endswith("fc.weight")]
    num_classes = int((state.get("data") or {}).get("num_classes") or (fc_rows[0] if fc_rows else 0))
    nets = build_networks(resolve_saved(cfg), num_classes, _bank_size(state["objective"]))
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


def archive_kind(path: Path) -> str | None:
    """`torchscript` or `exported` for those archives (by the files torch writes into them), else None."""
    if not path.is_file() or not zipfile.is_zipfile(path):
        return None
    with zipfile.ZipFile(path) as archive:
        leaves = {name.split("/", 1)[-1] for name in archive.namelist()}
    return "torchscript" if "constants.pkl" in leaves else "exported" if "archive_format" in leaves else None
