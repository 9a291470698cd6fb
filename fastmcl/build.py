"""The composition root: every component of a run built from one config. `train`, `evaluate` and `export` use it;
the trainer receives what is built here and only runs the loop."""
from __future__ import annotations

import dataclasses
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import distributed as dist
from .checkpoint import (CheckpointError, check_same_classes, find_checkpoint, load_checkpoint, load_resume_checkpoint,
                         run_dir_of)
from .config import TrainConfig
from .console import status
from .data import NegativeSampler
from .meta import FD_STEP, MetaPhase
from .methods import Objective, ResolvedMethod, build_method, resolve_method
from .models import Cohort, build_cohort
from .models.ema import EmaCohort
from .pipeline import SMALL_IMAGE_MAX, TrainData, detect_source
from .run_log import RUNS, tensorboard_dir
from .trainer import Trainer, TrainingParts


#: the config fields that set the contrast weights (`ContrastWeights`)
WEIGHT_FIELDS = ("tau", "alpha", "gamma", "beta", "lam", "kd_T")


@dataclass(frozen=True)
class Resolved:
    """A run's config with every None filled, and its method resolved from it: what everything downstream uses."""
    cfg: TrainConfig
    method: ResolvedMethod


def resolve(cfg: TrainConfig, *, cifar_style: bool, demo: bool) -> Resolved:
    """The one resolution step: the method (memory bank, needs, contrast weights) from the flags and the data style,
    then every None of the config from the method (memory bank, cohort size, τ and weights) and the data style, and
    the config's one validation. Resolving a resolved config changes nothing."""
    method = resolve_method(cfg.method, memory_bank=cfg.memory_bank, cifar_style=cifar_style,
                            **{k: getattr(cfg, k) for k in WEIGHT_FIELDS})
    filled = {"memory_bank": method.memory_bank, "cohort": method.needs.default_members}
    if method.weights is not None:
        filled.update({k: getattr(method.weights, k) for k in WEIGHT_FIELDS})
    return Resolved(cfg.resolve(cifar_style=cifar_style, demo=demo, method_defaults=filled), method)


def resolve_saved(cfg: TrainConfig) -> Resolved:
    """A config a run wrote (every field already filled) resolved again: its method's needs and weights."""
    return resolve(cfg, cifar_style=(cfg.image_size or 0) <= SMALL_IMAGE_MAX, demo=False)


@dataclass
class Networks:
    """The trained modules: the cohort, the objective (heads, banks, meta-network) and the EMA copy (PCL)."""
    cohort: Cohort
    objective: Objective
    ema: EmaCohort | None


def build_networks(run: Resolved, num_classes: int, num_samples: int, *, ema: bool = True) -> Networks:
    """Cohort, objective and (where the method keeps one and `ema`) EMA copy for a resolved run, on the CPU, freshly
    initialised. Training takes its EMA copy after the cohort's SyncBN conversion and DDP start instead."""
    cfg, needs = run.cfg, run.method.needs
    archs = cfg.members()
    cohort = build_cohort(archs, num_classes, aux=needs.aux, shared_stem=cfg.shared_stem or needs.shared_trunk,
                          trunk_stages=None if needs.shared_trunk else 1)
    if needs.trunk_grad_scale:
        cohort.trunk_grad_scale = 1.0 / len(archs)
    objective = build_method(run.method, feature_dims=cohort.feature_dims, num_stages=cohort.num_stages,
                             num_classes=num_classes, num_samples=num_samples, feat_dim=cfg.feat_dim,
                             pos_k=cfg.pos_k, nce_m=cfg.nce_m, bank_dtype=cfg.bank_dtype, kd_T=cfg.kd_T,
                             logit_kd=cfg.logit_kd,
                             backend=cfg.backend, k_chunk=cfg.k_chunk, trunk_dim=cohort.trunk_dim,
                             rampup_epochs=cfg.rampup_epochs)
    return Networks(cohort, objective, EmaCohort(cohort, cfg.ema_alpha) if ema and needs.ema else None)


def make_optimizer(params, cfg: TrainConfig, device: torch.device) -> tuple[torch.optim.Optimizer, str]:
    """One SGD for the whole cohort: apex's FusedSGD when `import apex` works on CUDA, else torch's fused=True on
    CUDA / foreach=True on CPU. Returns the optimizer and its name for the run log."""
    params = list(params)
    common = dict(lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
    if device.type == "cuda":
        try:
            from apex.optimizers import FusedSGD  # optional: not installable from the registries here
            return FusedSGD(params, **common), "apex.optimizers.FusedSGD"
        except ImportError:
            pass
    kind = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.SGD(params, **common, **kind), f"torch.optim.SGD({next(iter(kind))}=True)"


#: the files a run writes into its folder (what --overwrite replaces)
RUN_FILES = ("config.yaml", "metrics.jsonl", "curves.png", "checkpoints", "events.out.tfevents.*")


def run_dir(cfg: TrainConfig) -> Path:
    """The run's folder, checked but not touched: `--out` (empty or new, or resumed, or `--overwrite`n), else a new
    `runs/<date-time>-<method>-<arch>/`. `RunFolder.claim` makes it once the run is known to start."""
    if cfg.out:
        out = Path(cfg.out)
        if cfg.resume or not out.exists():
            return out
        if not out.is_dir():
            raise ValueError(f"--out {out}: is a file, not a folder")
        if any(out.iterdir()) and not cfg.overwrite:
            raise ValueError(f"--out {out}: the folder is not empty; pass --resume {out} to continue that run, "
                             f"--overwrite to replace it, or another --out")
        return out
    runs = RUNS
    stamp = time.strftime("%Y%m%d-%H%M%S")
    archs = "-".join(dict.fromkeys(cfg.members()))
    out = runs / f"{stamp}-{cfg.method}-{archs}"
    n = 1
    while out.exists():
        n += 1
        out = runs / f"{stamp}-{cfg.method}-{archs}-{n}"
    return out


def remove_run_files(run: Path) -> None:
    """Delete what a run writes into `run` (and its TensorBoard events, wherever they are); other files stay."""
    for pattern in RUN_FILES:
        for old in run.glob(pattern):
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    events = tensorboard_dir(run)
    if events != run.resolve():
        shutil.rmtree(events, ignore_errors=True)


@dataclass
class RunFolder:
    """A new run's folder, made only when config, data and networks are valid; `runs/latest` points at a default one.
    `release` takes back a start that failed before any checkpoint: nothing is left and `runs/latest` is restored."""
    path: Path
    fresh: bool                          # written by this invocation from the start (not resumed)
    made: bool = False                   # the folder itself made by this invocation
    latest: Path | None = None           # runs/latest when this run set it
    previous: str | None = None          # where runs/latest pointed before

    @classmethod
    def claim(cls, cfg: TrainConfig, out: Path) -> "RunFolder":
        if cfg.resume:
            return cls(out, fresh=False)
        if cfg.overwrite:
            remove_run_files(out)
        made = not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        if cfg.out:
            return cls(out, fresh=True, made=made)
        latest = out.parent / "latest"
        previous = os.readlink(latest) if latest.is_symlink() else None
        if latest.is_symlink() or not latest.exists():
            latest.unlink(missing_ok=True)
            latest.symlink_to(out.name, target_is_directory=True)
        return cls(out, fresh=True, made=made, latest=latest, previous=previous)

    def release(self) -> None:
        if not self.fresh or any((self.path / "checkpoints").glob("*.pt")):
            return
        remove_run_files(self.path)
        if self.made and not any(self.path.iterdir()):
            self.path.rmdir()
        if self.latest is not None and os.path.realpath(self.latest) == str(self.path.resolve()):
            self.latest.unlink()
            if self.previous is not None:
                self.latest.symlink_to(self.previous, target_is_directory=True)


def build_trainer(cfg: TrainConfig, *, resume_state: dict | None = None) -> Trainer:
    """Data, networks, distributed wrapping, optimizers, meta phase and precision for `cfg`, handed to a `Trainer`."""
    source = detect_source(cfg)
    run = resolve(cfg, cifar_style=source.cifar_style, demo=source.demo)
    needs = run.method.needs
    info, device = dist.init_distributed(run.cfg.device)
    cfg = run.cfg
    out = run_dir(cfg)
    torch.manual_seed(cfg.seed)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    status(f"reading the {source.kind} data...", info.is_main)
    data = TrainData(cfg, source, device, m_per_class=cfg.m_per_class if needs.m_per_class else 0,
                     rank=info.rank, world_size=info.world_size, views=len(cfg.members()) if needs.views else 1)
    if resume_state is not None:
        check_same_classes(resume_state.get("data"), data.card(), cfg.resume)
    nets = build_networks(run, data.num_classes, len(data.labels), ema=False)
    cohort, objective = nets.cohort.to(device), nets.objective.to(device)
    if cfg.channels_last:
        cohort.to(memory_format=torch.channels_last)
    if cfg.sync_bn and info.enabled:
        cohort = dist.convert_sync_batchnorm(cohort, device)
    if info.enabled:   # identical start on every rank: DDP broadcasts the cohort, the objective is not under DDP
        dist.broadcast_module_(objective)
        objective.gather = dist.all_gather_with_grad
    negatives = (NegativeSampler(data.labels, cfg.pos_k, cfg.neg_k, seed=cfg.seed).to(device)
                 if needs.memory_bank else None)
    optimizer, optimizer_name = make_optimizer(list(cohort.parameters()) + objective.main_parameters(), cfg, device)
    model: nn.Module = cohort   # DDP averages the cohort's gradients in backward; the trainer all-reduces the heads'
    if info.enabled:
        from torch.nn.parallel import DistributedDataParallel
        model = DistributedDataParallel(cohort, device_ids=[device.index] if device.type == "cuda" else None)
    ema = EmaCohort(cohort, cfg.ema_alpha).to(device) if needs.ema else None
    meta_optimizer, meta = None, None
    if objective.supports_meta and cfg.meta_mode != "off":
        # docs/official_mcl.md §2.4: the meta-network's own SGD (Nesterov, momentum 0.9, wd), lr on the main schedule
        meta_optimizer = torch.optim.SGD(objective.meta_parameters(), lr=cfg.lr, momentum=0.9, nesterov=True,
                                         weight_decay=cfg.weight_decay)
        meta = MetaPhase(cohort, objective, meta_optimizer, inner_steps=cfg.meta_inner, mode=cfg.meta_mode,
                         momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                         fd_step=FD_STEP if cfg.meta_derivatives == "differences" else None,
                         reduce_grads=dist.all_reduce_mean_grads if info.enabled else None)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    folder = RunFolder.claim(cfg, out) if info.is_main else RunFolder(out, fresh=False)
    cfg = dataclasses.replace(cfg, out=str(out))
    parts = TrainingParts(
        cfg=cfg, needs=needs, dist=info, device=device, data=data, cohort=cohort, objective=objective, ema=ema,
        model=model, negatives=negatives, optimizer=optimizer, optimizer_name=optimizer_name, meta=meta,
        meta_optimizer=meta_optimizer, autocast=autocast,
        # fp16 needs loss scaling; the meta phase runs in fp32 then (no scaler inside it)
        meta_autocast=nullcontext() if cfg.amp == "fp16" else autocast,
        scaler=torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16"))
    trainer = Trainer(parts, resume_state=resume_state)
    trainer.run_folder = folder
    return trainer


def load_run(path: str | Path, *, best: bool) -> tuple[Path, TrainConfig, dict]:
    """The one loader of a run's checkpoint: `find_checkpoint(path, best=best)` read, with its config. A file that is
    not a fastmcl checkpoint (no usable config) is a CheckpointError."""
    if best:
        checkpoint = find_checkpoint(path, best=True)
        state = load_checkpoint(checkpoint)
    else:       # what --resume continues: last.pt, or previous.pt when last.pt cannot be read
        checkpoint, state = load_resume_checkpoint(path)
    try:
        return checkpoint, TrainConfig(**state["config"]), state
    except (KeyError, TypeError) as e:      # no config, or a config of fields this fastmcl does not have
        raise CheckpointError(f"{checkpoint} is not a fastmcl checkpoint (no usable config: {e})") from e


#: settings of one invocation, not of the run: `--resume` does not inherit them (a resumed run goes to its last epoch)
INVOCATION_ONLY = ("max_steps", "overwrite", "progress")


def resume_config(path: str | Path, overrides: dict) -> tuple[TrainConfig, dict]:
    """The config of the run to continue (a run folder or a checkpoint file) with the explicitly given flags on top,
    and its last checkpoint's state (the previous one when that cannot be read)."""
    checkpoint, before, state = load_run(path, best=False)
    run = run_dir_of(checkpoint)
    values = {**dataclasses.asdict(before), **{name: getattr(TrainConfig(), name) for name in INVOCATION_ONLY}}
    before = TrainConfig(**values)
    after = TrainConfig(**{**values, **overrides})
    for what, was, now in (("--method", before.method, after.method), ("members", before.members(), after.members()),
                           ("--cohort", before.cohort, after.cohort),
                           ("--shared-stem", before.shared_stem, after.shared_stem),
                           ("--memory-bank", before.memory_bank, after.memory_bank)):   # the checkpoint's shapes
        if was != now:
            raise ValueError(f"--resume {path}: the run was trained with {what} {was}, not {now}; drop the flag to "
                             f"continue it, or start a new run")
    values.update(overrides)
    values["resume"] = str(run)
    values.setdefault("out", str(run))
    return TrainConfig(**values), state
