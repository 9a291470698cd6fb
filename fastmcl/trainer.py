"""The cohort trainer: one loop for every method (it reads the method's `needs`, never its name).

step: batch (one view, or one view per member) → cohort forward (optional channels_last, bf16/fp16 autocast, EMA
copy) → objective → one SGD step for the whole cohort and the objective's heads (GradScaler under fp16) →
objective.after_step (memory banks) → EMA update. `--compile` compiles that forward (cohort + objective + the
meta-network's forward) as one function. Under torchrun: DDP over the cohort, the objective's own gradients
all-reduced, optional synchronised BN, in-batch contrast over the global batch, rank 0 alone logs and checkpoints.
Evaluation of every classifier the objective names, run directory (config.yaml, metrics.jsonl, TensorBoard,
curves.png, checkpoints/last.pt + best.pt), exact resume.
"""
from __future__ import annotations

import dataclasses
import math
import signal
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm import tqdm

from . import distributed as dist
from .checkpoint import capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from .config import TrainConfig
from .data import NegativeSampler
from .meta import FD_STEP, MetaPhase
from .methods import build_method, method_needs
from .methods.weights import ContrastWeights
from .models import build_cohort
from .models.ema import EmaCohort
from .pipeline import TrainData, detect_source
from .run_log import RunLogger


class NonFiniteLoss(RuntimeError):
    pass


def lr_at(cfg: TrainConfig, epoch: int, step_in_epoch: int = 0, steps_per_epoch: int = 1) -> float:
    """Per-epoch schedule as the official code (spec/lmcl.md §3): cosine 0.1·½(1+cos(π·ep/E)) or step decay;
    times an optional per-step linear warm-up over the first `warmup_epochs`."""
    if cfg.schedule == "cosine":
        lr = cfg.lr * 0.5 * (1 + math.cos(math.pi * epoch / cfg.epochs))
    else:
        lr = cfg.lr * cfg.lr_decay ** sum(epoch >= m for m in cfg.milestones)
    if cfg.warmup_epochs:
        progress = (epoch + (step_in_epoch + 1) / steps_per_epoch) / cfg.warmup_epochs
        lr *= min(1.0, progress)
    return lr


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


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
    opt = torch.optim.SGD(params, **common, **kind)
    return opt, f"torch.optim.SGD({next(iter(kind))}=True)"


def to_device(x, device: torch.device, channels_last: bool = False):
    """A batch tensor or a list of member views → device (and channels_last, a no-op for loaders that emit it)."""
    if isinstance(x, (list, tuple)):
        return [to_device(v, device, channels_last) for v in x]
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


def batch_size_of(x) -> int:
    return (x[0] if isinstance(x, (list, tuple)) else x).shape[0]


class Trainer:
    def __init__(self, cfg: TrainConfig, *, resume_state: dict | None = None):
        source = detect_source(cfg)
        self.cfg = cfg = cfg.resolve(cifar_style=source.cifar_style, demo=source.demo,
                                     default_members=method_needs(cfg.method).default_members)
        needs = method_needs(cfg.method, memory_bank=bool(cfg.memory_bank))
        self.dist, self.device = dist.init_distributed(cfg.device)
        torch.manual_seed(cfg.seed)
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True)
        archs = cfg.members()
        views = len(archs) if needs.views else 1
        self.data = TrainData(cfg, source, self.device, m_per_class=cfg.m_per_class if needs.m_per_class else 0,
                              rank=self.dist.rank, world_size=self.dist.world_size, views=views)
        self.cohort = build_cohort(archs, self.data.num_classes, aux=needs.aux,
                                   shared_stem=cfg.shared_stem or needs.shared_trunk,
                                   trunk_stages=None if needs.shared_trunk else 1)
        if needs.trunk_grad_scale:
            self.cohort.trunk_grad_scale = 1.0 / len(archs)
        weights = ContrastWeights(cfg.alpha, cfg.gamma, cfg.beta, cfg.lam, tau=cfg.tau, kd_T=cfg.kd_T)
        self.objective = build_method(cfg.method, feature_dims=self.cohort.feature_dims,
                                      num_stages=self.cohort.num_stages, num_classes=self.data.num_classes,
                                      memory_bank=bool(cfg.memory_bank), num_samples=len(self.data.labels),
                                      weights=weights, feat_dim=cfg.feat_dim, pos_k=cfg.pos_k, nce_m=cfg.nce_m,
                                      kd_T=cfg.kd_T, logit_kd=cfg.logit_kd, backend=cfg.backend,
                                      k_chunk=cfg.k_chunk, trunk_dim=self.cohort.trunk_dim,
                                      rampup_epochs=cfg.rampup_epochs)
        self.cohort.to(self.device)
        self.objective.to(self.device)
        if cfg.channels_last:
            self.cohort.to(memory_format=torch.channels_last)
        if cfg.sync_bn and self.dist.enabled:
            self.cohort = dist.convert_sync_batchnorm(self.cohort, self.device)
        if self.dist.enabled:   # identical start on every rank (same seed already; this makes it certain)
            dist.broadcast_module_(self.cohort)
            dist.broadcast_module_(self.objective)
            self.objective.gather = dist.all_gather_with_grad
        self.ema = EmaCohort(self.cohort, cfg.ema_alpha).to(self.device) if needs.ema else None
        self.negatives = (NegativeSampler(self.data.labels, cfg.pos_k, cfg.neg_k, seed=cfg.seed).to(self.device)
                          if self.objective.needs.memory_bank else None)
        params = list(self.cohort.parameters()) + self.objective.main_parameters()
        self.optimizer, self.optimizer_name = make_optimizer(params, cfg, self.device)
        # DDP averages the cohort's gradients during backward; the objective's (heads) are all-reduced after it
        self.model = self.cohort
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel
            self.model = DistributedDataParallel(self.cohort, device_ids=[self.device.index]
                                                 if self.device.type == "cuda" else None)
        self.meta_optimizer, self.meta = None, None
        if self.objective.supports_meta and cfg.meta_mode != "off":
            # spec §2.4: the meta-network's own SGD (Nesterov, momentum 0.9, wd), lr on the main schedule
            self.meta_optimizer = torch.optim.SGD(self.objective.meta_parameters(), lr=cfg.lr, momentum=0.9,
                                                  nesterov=True, weight_decay=cfg.weight_decay)
            self.meta = MetaPhase(self.cohort, self.objective, self.meta_optimizer, inner_steps=cfg.meta_inner,
                                  mode=cfg.meta_mode, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                                  fd_step=FD_STEP if cfg.meta_derivatives == "differences" else None,
                                  reduce_grads=dist.all_reduce_mean_grads if self.dist.enabled else None)
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
        self.autocast = (torch.autocast(self.device.type, dtype=amp_dtype) if amp_dtype is not None
                         else nullcontext())
        # fp16 needs loss scaling; the meta phase runs in fp32 then (no scaler inside it)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.amp == "fp16")
        self.meta_autocast = nullcontext() if cfg.amp == "fp16" else self.autocast
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
        self._stop_signal: int | None = None

    # -- state --------------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"cohort": self.cohort.state_dict(), "objective": self.objective.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "meta_optimizer": self.meta_optimizer.state_dict() if self.meta_optimizer else None,
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "scaler": self.scaler.state_dict(),
                "epoch": self.epoch, "step": self.step,
                "step_in_epoch": self.step_in_epoch, "best_top1": self.best_top1, "rng": capture_rng_state(),
                "config": dataclasses.asdict(self.cfg)}

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

    def save(self, name: str = "last.pt") -> Path:
        """Rank 0 writes; the other ranks hold the same state."""
        path = self.ckpt_dir / name
        if self.dist.is_main:
            save_checkpoint(path, self.state_dict())
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
        loss_t = out.loss.detach()
        if self.dist.enabled:     # log the global loss; one all-reduce also carries a stop request to every rank
            packed = torch.stack([loss_t, loss_t.new_tensor(float(self._stop_signal is not None))])
            dist.all_reduce_sum(packed)
            loss_t, stop = packed[0] / self.dist.world_size, packed[1]
            if stop.item() > 0 and self._stop_signal is None:
                self._stop_signal = signal.SIGTERM
        loss = loss_t.item()  # the step's one host sync: the NaN check before the update, and the logged loss
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
        terms = {"loss": loss, **out.terms}
        # spec §2.4: after the regular update, on the same batch, when batch_idx % meta_freq == 0
        if self.meta is not None and self.step_in_epoch % self.cfg.meta_freq == 0:
            with self.meta_autocast, dist.local_batchnorm(self.cohort):
                result = self.meta.step(x, y, contrast_idx, lr if lr is not None else self.optimizer.param_groups[0]["lr"])
            terms["meta_outer"] = torch.tensor(result.outer_loss)
        return terms

    # -- evaluation ---------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, tuple[float, float]]:
        self.cohort.eval()
        self.objective.eval()
        correct1: dict[str, torch.Tensor] = {}
        correct5: dict[str, torch.Tensor] = {}
        total = 0
        for x, y, _ in self.data.val_batches():
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            if self.cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with self.autocast:
                extra = {}
                if self.ema is not None:
                    self.ema.eval()
                    extra["ema_outputs"] = self.ema(x)
                named = self.objective.eval_logits(self.cohort(x), **extra)
            for name, logits in named.items():
                top = logits.float().topk(min(5, logits.shape[1]), dim=1).indices
                hit = top == y[:, None]
                correct1[name] = correct1.get(name, 0) + hit[:, 0].sum()
                correct5[name] = correct5.get(name, 0) + hit.any(1).sum()
            total += y.shape[0]
        names = sorted(correct1)
        counts = torch.tensor([[float(correct1[n]) for n in names], [float(correct5[n]) for n in names]] +
                              [[float(total)] * len(names)], dtype=torch.float64)
        if self.dist.enabled and self.data.val_sharded:   # DALI's val reader gives each rank a shard
            counts = dist.all_reduce_sum(counts.to(self.device)).cpu()
        return {n: (100.0 * float(counts[0, i]) / float(counts[2, i]), 100.0 * float(counts[1, i]) / float(counts[2, i]))
                for i, n in enumerate(names)}

    # -- the loop -----------------------------------------------------------------------------------------------------
    def _on_signal(self, signum, frame):
        self._stop_signal = signum

    def fit(self) -> dict:
        cfg = self.cfg
        main = self.dist.is_main
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            cfg.to_yaml(self.out / "config.yaml")
        log = RunLogger(self.out, enabled=main)
        previous = signal.signal(signal.SIGTERM, self._on_signal)
        deployed = self.objective.deployed
        if main:
            print(f"fastmcl: {cfg.method} | members {', '.join(cfg.members())} | data {self.data.source.kind} "
                  f"({len(self.data.labels)} train, {self.data.num_classes} classes) via {self.data.loader_name} | "
                  f"contrast: {self._contrast_kind()} | device {self.device} x {self.dist.world_size} process(es) | "
                  f"amp {cfg.amp} | compile {'on' if cfg.compile else 'off'} | optimizer {self.optimizer_name} | "
                  f"deployed: {deployed}", flush=True)
        steps_per_epoch = self.data.steps_per_epoch()
        last_eval: dict[str, tuple[float, float]] = {}
        try:
            while self.epoch < cfg.epochs and not self._done():
                losses = []
                batches = self.data.train_batches(self.epoch, self.step_in_epoch)
                self.objective.set_epoch(self.epoch)
                bar = tqdm(batches, total=steps_per_epoch - self.step_in_epoch, disable=not (cfg.progress and main),
                           desc=f"epoch {self.epoch}", leave=False, dynamic_ncols=True)
                for x, y, index in bar:
                    t0 = time.perf_counter()
                    lr = lr_at(cfg, self.epoch, self.step_in_epoch, steps_per_epoch)
                    for group in self.optimizer.param_groups:
                        group["lr"] = lr
                    x = to_device(x, self.device, self.cfg.channels_last)
                    y, index = y.to(self.device, non_blocking=True), index.to(self.device, non_blocking=True)
                    terms = self.train_step(x, y, index, lr)
                    self.step += 1
                    self.step_in_epoch += 1
                    loss = terms["loss"]
                    losses.append(loss)
                    if self.device.type == "cuda":
                        torch.cuda.synchronize()
                    ips = batch_size_of(x) * self.dist.world_size / (time.perf_counter() - t0)
                    bar.set_postfix(loss=f"{loss:.3f}", ips=f"{ips:.0f}")
                    if self.step % cfg.log_every == 0:
                        log.log_train(self.epoch, self.step, loss, lr, ips,
                                      **{k: float(v) for k, v in terms.items() if k != "loss"})
                    if cfg.ckpt_every and self.step % cfg.ckpt_every == 0:
                        self.save()
                    if self._stop_signal is not None or self._done():
                        break
                bar.close()
                if self._stop_signal is not None:
                    path = self.save()
                    if main:
                        print(f"fastmcl: received signal {self._stop_signal} at step {self.step}: saved {path}, "
                              f"exiting", flush=True)
                    return {"stopped": True, "step": self.step}
                if self.step_in_epoch < steps_per_epoch:      # --max-steps ended mid-epoch
                    self.save()
                    break
                last_eval = self._end_epoch(log, losses, deployed)
            if not last_eval:
                last_eval = self.evaluate()
            return {"step": self.step, "epoch": self.epoch, "eval": last_eval, "best_top1": self.best_top1}
        finally:
            signal.signal(signal.SIGTERM, previous)
            log.close()

    def _contrast_kind(self) -> str:
        needs = self.objective.needs
        return "memory bank" if needs.memory_bank else "in-batch" if needs.m_per_class else "none"

    def _done(self) -> bool:
        return bool(self.cfg.max_steps) and self.step >= self.cfg.max_steps

    def _end_epoch(self, log: RunLogger, losses: list[float], deployed: str) -> dict:
        results = self.evaluate()
        for name, (top1, top5) in results.items():
            log.log_eval(self.epoch, self.step, name, top1, top5, deployed=name == deployed)
        table = log.end_epoch(self.epoch, sum(losses) / max(len(losses), 1))
        if self.dist.is_main:
            print(table, flush=True)
        self.epoch += 1
        self.step_in_epoch = 0
        top1 = results[deployed][0]
        self.save()
        if top1 > self.best_top1:
            self.best_top1 = top1
            self.save("best.pt")
            self.save()  # keep best_top1 in last.pt too
        return results


def resume_config(run_dir: str | Path, overrides: dict) -> tuple[TrainConfig, dict]:
    """The checkpoint's config with the explicitly given flags on top, and the checkpoint state."""
    from .checkpoint import find_checkpoint
    state = load_checkpoint(find_checkpoint(run_dir))
    values = dict(state["config"])
    values.update(overrides)
    values["resume"] = str(run_dir)
    values.setdefault("out", str(run_dir))
    return TrainConfig(**values), state
