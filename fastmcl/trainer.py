"""The training loop for every method: step, evaluate, fit. It reads the method's `needs`, never its name; what it runs
on is built by `fastmcl.build`. The run folder's layout and the resume rules are in docs/runtime.md."""
from __future__ import annotations

import dataclasses
import math
import sys
import time
import warnings
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from . import distributed as dist
from .accuracy import evaluate_classifiers
from .checkpoint import BEST, LAST, PREVIOUS, capture_rng_state, restore_rng_state, save_checkpoint
from .config import TrainConfig
from .console import Progress, status
from .distributed import DistEnv
from .methods import MethodNeeds, Objective
from .run_log import RunLogger
from .stopping import StopRequest

if TYPE_CHECKING:   # built by fastmcl.build; the loop only calls them
    from .data import NegativeSampler
    from .meta import MetaPhase
    from .models.ema import EmaCohort
    from .pipeline import TrainData


class NonFiniteLoss(RuntimeError):
    pass


def lr_at(cfg: TrainConfig, epoch: int, step_in_epoch: int = 0, steps_per_epoch: int = 1) -> float:
    """Per-epoch schedule as the official code (docs/official_mcl.md §3): cosine 0.1·½(1+cos(π·ep/E)) or step decay;
    times an optional per-step linear warm-up over the first `warmup_epochs`."""
    if cfg.schedule == "cosine":
        lr = cfg.lr * 0.5 * (1 + math.cos(math.pi * epoch / cfg.epochs))
    else:
        lr = cfg.lr * cfg.lr_decay ** sum(epoch >= m for m in cfg.milestones)
    if cfg.warmup_epochs:
        lr *= min(1.0, (epoch + (step_in_epoch + 1) / steps_per_epoch) / cfg.warmup_epochs)
    return lr


def to_device(x, device: torch.device, channels_last: bool = False):
    """A batch tensor or a list of member views → device (and channels_last, a no-op for loaders that emit it)."""
    if isinstance(x, (list, tuple)):
        return [to_device(v, device, channels_last) for v in x]
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


def batch_size_of(x) -> int:
    return (x[0] if isinstance(x, (list, tuple)) else x).shape[0]


@dataclass
class TrainingParts:
    """Everything the loop runs on, built by `fastmcl.build.build_trainer` from one resolved config."""
    cfg: TrainConfig
    needs: MethodNeeds                 # the resolved method's (`fastmcl.methods.resolve_method`)
    dist: DistEnv
    device: torch.device
    data: TrainData
    cohort: nn.Module
    objective: Objective
    ema: EmaCohort | None
    model: nn.Module                   # the cohort, or its DDP wrapper
    negatives: NegativeSampler | None  # the memory-bank contrast indices
    optimizer: torch.optim.Optimizer
    optimizer_name: str
    meta: MetaPhase | None
    meta_optimizer: torch.optim.Optimizer | None
    autocast: AbstractContextManager
    meta_autocast: AbstractContextManager
    scaler: torch.amp.GradScaler


class Trainer:
    """The loop: `train_step`, `evaluate`, `fit`; it reads the method's `needs`, never its name."""

    def __init__(self, parts: TrainingParts, *, resume_state: dict | None = None):
        p = parts
        self.cfg, self.needs, self.dist, self.device, self.data = p.cfg, p.needs, p.dist, p.device, p.data
        self.cohort, self.objective, self.ema, self.model = p.cohort, p.objective, p.ema, p.model
        self.negatives, self.optimizer, self.optimizer_name = p.negatives, p.optimizer, p.optimizer_name
        self.meta, self.meta_optimizer, self.scaler = p.meta, p.meta_optimizer, p.scaler
        self.autocast, self.meta_autocast = p.autocast, p.meta_autocast
        cfg = self.cfg
        self._forward = self._forward_eager
        if cfg.compile:
            # the plans' index tables are lru_cached pure functions of frozen plans: tracing through is safe
            warnings.filterwarnings("ignore", message="Dynamo detected a call to a `functools.lru_cache`")
            self._forward = torch.compile(self._forward_eager, mode=None if cfg.compile_mode == "default"
                                          else cfg.compile_mode, backend=cfg.compile_backend)
        self.out = Path(cfg.out)
        self.ckpt_dir = self.out / "checkpoints"
        self.epoch, self.step, self.step_in_epoch, self.best_top1 = 0, 0, 0, -1.0
        if resume_state is not None:
            self._load_state(resume_state)
        self.stop, self._last_saved_step = StopRequest(), -1

    # -- state --------------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"cohort": self.cohort.state_dict(), "objective": self.objective.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "meta_optimizer": self.meta_optimizer.state_dict() if self.meta_optimizer else None,
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "scaler": self.scaler.state_dict(),
                "epoch": self.epoch, "step": self.step,
                "step_in_epoch": self.step_in_epoch, "best_top1": self.best_top1, "rng": capture_rng_state(),
                "config": dataclasses.asdict(self.cfg), "data": self.data.card()}

    def _load_state(self, state: dict) -> None:
        self.cohort.load_state_dict(state["cohort"])
        self.objective.load_state_dict(state["objective"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.meta_optimizer is not None and state.get("meta_optimizer"):
            self.meta_optimizer.load_state_dict(state["meta_optimizer"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.step_in_epoch, self.best_top1 = int(state["step_in_epoch"]), float(state["best_top1"])
        restore_rng_state(state["rng"])

    def save(self, name: str = LAST) -> Path:
        """Rank 0 writes (the others hold the same state); a new step keeps the last.pt it replaces as previous.pt"""
        path = self.ckpt_dir / name
        if self.dist.is_main:
            keep = name == LAST and self.step != self._last_saved_step
            save_checkpoint(path, self.state_dict(), keep_previous=path.with_name(PREVIOUS) if keep else None)
            if name == LAST:
                self._last_saved_step = self.step
        return path

    # -- one step -----------------------------------------------------------------------------------------------------
    def _forward_eager(self, x, y: torch.Tensor, contrast_idx: torch.Tensor | None):
        """Cohort (+ EMA copy) forward and the objective: the unit `--compile` compiles."""
        with self.autocast:
            outputs = self.model(x)
            extra = {}
            if self.ema is not None:
                with torch.no_grad():
                    extra["ema_outputs"] = self.ema(x)
            return self.objective(outputs, y, contrast_idx, **extra)

    def train_step(self, x, y: torch.Tensor, index: torch.Tensor, lr: float | None = None) -> dict:
        self.cohort.train()
        self.objective.train()
        if self.ema is not None:
            self.ema.train()
        contrast_idx = self.negatives(index, self.step) if self.negatives is not None else None
        out = self._forward(x, y, contrast_idx)
        names = ["loss", *out.terms]
        packed = torch.stack([out.loss.detach()] + [out.terms[n].to(out.loss.dtype) for n in names[1:]])
        if self.dist.enabled:     # log global means; the same all-reduce carries a stop request to every rank
            packed = torch.cat([packed, packed.new_tensor([float(self.stop.signum is not None)])])
            dist.all_reduce_sum(packed)
            packed[:-1] /= self.dist.world_size
        values = packed.tolist()     # the step's one host sync: the NaN check before the update, and the log
        if self.dist.enabled and values.pop() > 0:
            self.stop.request()
        terms = dict(zip(names, values))
        loss = terms["loss"]
        if not math.isfinite(loss):
            raise NonFiniteLoss(f"non-finite loss ({loss}) at step {self.step} (epoch {self.epoch})")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(out.loss).backward()
        if self.dist.enabled:
            dist.all_reduce_mean_grads(self.objective.main_parameters())
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.objective.after_step(out, index)
        if self.ema is not None:
            self.ema.update(self.cohort, self.step)
        # docs/official_mcl.md §2.4: after the regular update, on the same batch, when batch_idx % meta_freq == 0
        if self.meta is not None and self.step_in_epoch % self.cfg.meta_freq == 0:
            with self.meta_autocast, dist.local_batchnorm(self.cohort):
                result = self.meta.step(x, y, contrast_idx, lr if lr is not None else self.optimizer.param_groups[0]["lr"])
            terms["meta_outer"] = float(result.outer_loss)
        return terms

    # -- evaluation ---------------------------------------------------------------------------------------------------
    def evaluate(self) -> dict[str, tuple[float, float]]:
        reduce = dist.all_reduce_sum if self.dist.enabled and self.data.val_sharded else None
        return evaluate_classifiers(self.cohort, self.objective, self.ema, self.data.val_batches(), self.device,
                                    autocast=self.autocast, channels_last=self.cfg.channels_last, reduce_counts=reduce)

    # -- the loop -----------------------------------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg = self.cfg
        main = self.dist.is_main
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            cfg.to_yaml(self.out / "config.yaml")
        log = RunLogger(self.out, enabled=main)
        self.stop.install()
        if main:
            self._print_header()
        steps_per_epoch = self.data.steps_per_epoch()
        end = min(cfg.epochs * steps_per_epoch, cfg.max_steps or cfg.epochs * steps_per_epoch)
        progress = Progress(max(end - self.step, 0), enabled=main, bar=cfg.progress)
        last_eval: dict[str, tuple[float, float]] = {}
        try:
            while self.epoch < cfg.epochs and not self._done():
                losses = []
                self.objective.set_epoch(self.epoch)
                window_start, window_images = time.perf_counter(), 0
                for x, y, index in self.data.train_batches(self.epoch, self.step_in_epoch):
                    lr = lr_at(cfg, self.epoch, self.step_in_epoch, steps_per_epoch)
                    for group in self.optimizer.param_groups:
                        group["lr"] = lr
                    x = to_device(x, self.device, self.cfg.channels_last)
                    y, index = y.to(self.device, non_blocking=True), index.to(self.device, non_blocking=True)
                    terms = self.train_step(x, y, index, lr)
                    self.step += 1
                    self.step_in_epoch += 1
                    loss = terms.pop("loss")
                    losses.append(loss)
                    window_images += batch_size_of(x) * self.dist.world_size
                    ips = None
                    if self.step % cfg.log_every == 0:
                        ips = window_images / (time.perf_counter() - window_start)
                        log.log_train(self.epoch, self.step, loss, lr, ips, **terms)
                        window_start, window_images = time.perf_counter(), 0
                    progress.step(self.epoch, self.step, loss, lr, ips)
                    if cfg.ckpt_every and self.step % cfg.ckpt_every == 0:
                        self.save()
                    if self.stop.signum is not None or self._done():
                        break
                if self.stop.signum is not None:
                    progress.close()
                    path = self.save()
                    if main:
                        self.stop.report(path, self.step, self.epoch)
                    return {"stopped": True, "step": self.step, "signal": self.stop.signum}
                last_eval = self._evaluate_and_save(log, losses, progress,
                                                    epoch_done=self.step_in_epoch >= steps_per_epoch)
            if not last_eval:
                last_eval = self.evaluate()
            deployed = self.objective.deployed
            return {"step": self.step, "epoch": self.epoch, "eval": last_eval, "best_top1": self.best_top1,
                    "deployed": deployed, "deployed_top1": last_eval[deployed][0], "main": self.dist.is_main,
                    "out": str(self.out), "best": log.best}
        finally:
            progress.close()
            self.stop.restore()
            log.close()

    def _print_header(self) -> None:
        cfg, needs = self.cfg, self.needs
        contrast = "memory bank" if needs.memory_bank else "in-batch" if needs.m_per_class else "none"
        print(f"fastmcl: {cfg.method} | members {', '.join(cfg.members())} | data {self.data.source.kind} "
              f"({len(self.data.labels)} train, {self.data.num_classes} classes) via {self.data.loader_name} | "
              f"contrast: {contrast} | device {self.device} x {self.dist.world_size} process(es) | "
              f"amp {cfg.amp} | compile {'on' if cfg.compile else 'off'} | optimizer {self.optimizer_name} | "
              f"deployed: {self.objective.deployed} | run {self.out}", flush=True)
        if cfg.amp == "fp16" and self.device.type == "cpu":
            print("fastmcl: warning: --amp fp16 on a CPU is several times slower than bf16; use --amp bf16 there",
                  file=sys.stderr, flush=True)
        first = ["compiling the training step with torch.compile (minutes)"] if cfg.compile else []
        if self.meta is not None:
            first.append(f"a meta phase (the cost of several steps; then every {cfg.meta_freq} batches)")
        status(f"first step{' with ' + ' and '.join(first) if first else ''}...")

    def _done(self) -> bool:
        return bool(self.cfg.max_steps) and self.step >= self.cfg.max_steps

    def _evaluate_and_save(self, log: RunLogger, losses: list[float], progress: Progress, *, epoch_done: bool) -> dict:
        """Evaluate every classifier, log and print the table, checkpoint (`best.pt` by the deployed network). A run
        stopped mid-epoch by `--max-steps` is evaluated too, without moving the random state a resume continues."""
        rng = None if epoch_done else capture_rng_state()
        results = self.evaluate()
        if rng is not None:
            restore_rng_state(rng)
        deployed = self.objective.deployed
        for name, (top1, top5) in results.items():
            log.log_eval(self.epoch, self.step, name, top1, top5, deployed=name == deployed)
        progress.write(log.end_epoch(self.epoch, sum(losses) / max(len(losses), 1)))
        if epoch_done:
            self.epoch += 1
            self.step_in_epoch = 0
        top1 = results[deployed][0]
        if top1 > self.best_top1:
            self.best_top1 = top1
            self.save(BEST)
        self.save()
        return results
