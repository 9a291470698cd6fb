"""The one typed training config: dataclass defaults → optional YAML (`--config`) → command-line flags.

Fields carry their argparse group and help text; `None` means "resolved from the data and method" by `resolve()`
(e.g. τ = 0.1 in-batch / 0.07 with a memory bank, docs/official_mcl.md §0). The resolved config is written to
RUN/config.yaml.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .losses.backend import BACKENDS

def _f(default, group: str, help: str, **kw):
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"group": group, "help": help, **kw})
    return field(default=default, metadata={"group": group, "help": help, **kw})


@dataclass
class TrainConfig:
    # data
    data: str = _f("", "data", "dataset: an ImageFolder root (train/, val/), a CIFAR-100 python folder, "
                               "'synthetic', or 'digits' (the bundled demo, also when empty)")
    num_classes: int = _f(10, "data", "classes of --data synthetic")
    synthetic_samples: int = _f(512, "data", "train samples of --data synthetic (val: a quarter)")
    image_size: int | None = _f(None, "data", "train/val crop size (default: 32 for CIFAR-style data, 224 otherwise)")
    val_resize: int | None = _f(None, "data", "val resize before the center crop (default: image_size / 0.875)")
    workers: int = _f(2, "data", "DataLoader worker processes")
    m_per_class: int | None = _f(None, "data", "samples per class in each batch for in-batch contrastive methods "
                                               "(MPerClassSampler; default 2, the digits demo 4: 10 classes)")
    cache_dir: str = _f("", "data", "where the digits demo tree is written (default: ~/.cache/fastmcl)")
    dali: bool = _f(False, "data", "decode and augment ImageFolder JPEGs with NVIDIA DALI (GPU 'mixed' decoder, or "
                                   "DALI's CPU backend); pip install nvidia-dali-cuda130")
    dali_device: str | None = _f(None, "data", "DALI backend: gpu | cpu (default: gpu when training on CUDA)")
    dali_threads: int = _f(4, "data", "DALI CPU worker threads per process")
    hw_decoder_load: float = _f(0.65, "data", "share of the JPEGs sent to the GPU's hardware decoder (A100/H100; "
                                              "DALI 'mixed' decoder)")
    dali_prefetch: int = _f(2, "data", "DALI prefetch queue depth (batches)")
    # model / cohort
    arch: list[str] = _f([], "model", "architecture per member, repeatable (--arch resnet32 --arch wrn_40_2); "
                                      "default resnet32 for every member", action="append")
    cohort: int | None = _f(None, "model", "number of members when --arch is given once or not at all (default: "
                                           "the method's, 2; ONE/CL-ILR/PCL 3, OKDDip 4)")
    shared_stem: bool = _f(False, "model", "MCL x n 'branched' variant: members share stem + layer1")
    # method
    method: str = _f("lmcl", "method", "the training method (the table in the README)")
    memory_bank: bool | None = _f(None, "method", "memory-bank contrast; default on for ImageNet-style data "
                                                  "at >= 64 px, off for CIFAR-style 32 px data")
    tau: float | None = _f(None, "method", "contrastive temperature (0.1 in-batch, 0.07 bank)")
    kd_T: float = _f(3.0, "method", "distillation temperature T")
    alpha: float | None = _f(None, "method", "VCL weight (0.1; L-MCL bank 0.01)")
    gamma: float | None = _f(None, "method", "soft VCL weight (1)")
    beta: float | None = _f(None, "method", "ICL weight (0.1; L-MCL bank 0.01)")
    lam: float | None = _f(None, "method", "soft ICL weight (1)")
    pos_k: int = _f(1, "method", "bank positives per anchor")
    neg_k: int = _f(8192, "method", "bank negatives per anchor")
    feat_dim: int = _f(128, "method", "embedding size of the projection heads")
    nce_m: float = _f(0.5, "method", "memory-bank momentum")
    bank_dtype: str = _f("fp32", "method", "memory-bank storage (bf16 halves the bank's memory and traffic; the "
                                          "momentum update is computed in fp32: docs/kernels/bank.md)",
                         choices=("fp32", "bf16"))
    logit_kd: bool = _f(False, "method", "MCL: add the mean-logit ensemble KD term")
    meta_mode: str = _f("second-order", "method", "L-MCL meta-optimisation of the matching weights (off keeps the "
                                                  "initial meta-network)",
                        choices=("second-order", "first-order", "off"))
    meta_freq: int | None = _f(None, "method", "run a meta phase every N batches of an epoch, batch 0 included "
                                               "(default 50 CIFAR-style, 500 ImageNet-style)")
    meta_inner: int = _f(2, "method", "virtual inner steps per meta phase")
    meta_derivatives: str = _f("differences", "method", "how the meta phase takes the networks' second derivatives: "
                               "differences (of fp32 forwards and gradients with the ReLU pieces held fixed) or "
                               "autograd "
                               "(double backward, the plain unrolled form, in the autocast dtype)",
                               choices=("differences", "autograd"))
    rampup_epochs: int | None = _f(None, "method", "ONE/OKDDip/PCL sigmoid ramp-up of the distillation weight, "
                                                   "w = exp(-5(1-t/L)^2) (default 80; the digits demo: its epochs)")
    ema_alpha: float = _f(0.999, "method", "PCL temporal mean: alpha_max of the EMA update")
    # optimisation
    epochs: int | None = _f(None, "optim", "epochs (default: 300 CIFAR-style, 100 ImageNet-style, 6 digits demo)")
    batch_size: int | None = _f(None, "optim", "global batch size (default 128; the digits demo 32)")
    lr: float | None = _f(None, "optim", "initial learning rate (default 0.1; the digits demo 0.05)")
    momentum: float = _f(0.9, "optim", "SGD momentum")
    nesterov: bool = _f(True, "optim", "Nesterov momentum")
    weight_decay: float | None = _f(None, "optim", "weight decay (5e-4 CIFAR-style, 1e-4 ImageNet-style)")
    schedule: str | None = _f(None, "optim", "learning-rate schedule (default: cosine CIFAR-style, multistep "
                                             "ImageNet-style)", choices=("cosine", "multistep"))
    milestones: list[int] = _f([], "optim", "multistep epochs (default 30 60 90)", nargs="+")
    lr_decay: float = _f(0.1, "optim", "multistep factor")
    warmup_epochs: float | None = _f(None, "optim", "linear warm-up from 0 over this many epochs, per step "
                                                    "(default 0 as the papers; 1 for the digits demo)")
    max_steps: int = _f(0, "optim", "stop after this many steps in total (0 = run all epochs)")
    # speed
    device: str = _f("auto", "speed", "auto | cpu | cuda | cuda:N")
    backend: str = _f("auto", "speed", "contrastive loss backend", choices=BACKENDS)
    k_chunk: int | None = _f(2048, "speed", "stream the bank's K in chunks of this size (reference backend)")
    channels_last: bool = _f(False, "speed", "channels_last memory format for the cohort")
    amp: str = _f("off", "speed", "autocast (fp16 with a GradScaler; losses, softmax statistics, heads and the "
                                  "meta-network stay fp32)", choices=("off", "bf16", "fp16"))
    compile: bool = _f(False, "speed", "torch.compile the training step (cohort forward + objective + meta-network "
                                       "forward); the meta phase's double backward stays eager")
    compile_mode: str = _f("default", "speed", "torch.compile mode (reduce-overhead: CUDA graphs, static shapes)",
                           choices=("default", "reduce-overhead", "max-autotune"))
    compile_backend: str = _f("inductor", "speed", "torch.compile backend (inductor; aot_eager for quick checks)")
    sync_bn: bool = _f(False, "speed", "under torchrun: synchronised BatchNorm over all processes")
    # run
    out: str = _f("", "run", "run directory (default: a new runs/<date-time>-<method>-<arch>/, with runs/latest "
                             "pointing at it); an existing folder must be empty unless --resume or --overwrite")
    overwrite: bool = _f(False, "run", "let --out replace the fastmcl files of an earlier run in that folder")
    seed: int = _f(0, "run", "random seed")
    deterministic: bool = _f(False, "run", "deterministic algorithms, no workers' nondeterminism")
    log_every: int = _f(10, "run", "write a train event every N steps")
    ckpt_every: int = _f(0, "run", "also checkpoint every N steps (0: only at epoch ends)")
    resume: str = _f("", "run", "continue a run: its folder (from checkpoints/last.pt) or a checkpoint file; 'auto': "
                                "the --out folder's run if it has a checkpoint, else a new run there")
    progress: bool = _f(True, "run", "tqdm progress bar")

    # -- resolution --------------------------------------------------------------------------------------------------
    def resolve(self, *, cifar_style: bool, demo: bool, method_defaults: dict) -> "TrainConfig":
        """Fill every None: first from `method_defaults` (what `fastmcl.build.resolve` took from the resolved method:
        memory bank, cohort size, τ and the contrastive weights), then from the data style (docs/official_mcl.md §0,
        §3), and validate the result."""
        c = dataclasses.replace(self)
        if len(c.arch) > 1 and c.cohort not in (None, len(c.arch)):
            raise ValueError(f"--cohort {c.cohort}: {len(c.arch)} architectures are given by --arch")
        c.cohort = len(c.arch) if len(c.arch) > 1 else c.cohort
        for name, value in method_defaults.items():
            if getattr(c, name) is None:
                setattr(c, name, value)
        c.arch, c.data = c.members(), c.data or ("digits" if demo else c.data)   # what the run uses, written out
        c.image_size = (32 if cifar_style else 224) if c.image_size is None else c.image_size
        c.val_resize = c.val_resize or round(c.image_size / 0.875)
        # The digits demo: 1,438 images of 10 classes, so smaller batches (8 classes x 4) and more, gentler steps.
        c.epochs = (6 if demo else 300 if cifar_style else 100) if c.epochs is None else c.epochs
        c.batch_size = (32 if demo else 128) if c.batch_size is None else c.batch_size
        c.lr = (0.05 if demo else 0.1) if c.lr is None else c.lr
        c.m_per_class = (4 if demo else 2) if c.m_per_class is None else c.m_per_class
        c.meta_freq = (50 if cifar_style else 500) if c.meta_freq is None else c.meta_freq
        c.rampup_epochs = c.rampup_epochs if c.rampup_epochs is not None else (c.epochs if demo else 80)
        c.warmup_epochs = c.warmup_epochs if c.warmup_epochs is not None else (1.0 if demo else 0.0)
        c.weight_decay = c.weight_decay if c.weight_decay is not None else (5e-4 if cifar_style else 1e-4)
        c.schedule = c.schedule or ("cosine" if cifar_style else "multistep")
        c.milestones = c.milestones or [30, 60, 90]
        c.validate()
        return c

    def validate(self) -> None:
        def need(ok: bool, name: str, msg: str):
            if not ok:
                raise ValueError(f"--{name.replace('_', '-')}: {msg}")
        need(self.batch_size is None or self.batch_size >= 1, "batch_size", "must be >= 1")
        need(self.cohort is None or self.cohort >= 1, "cohort", "must be >= 1")
        need(len(self.members()) >= 2, "cohort", f"method {self.method!r} is mutual and needs at least 2 members, got "
                                                  f"{len(self.members())}")
        need(self.lr is None or self.lr > 0, "lr", "must be > 0")
        need(self.max_steps >= 0, "max_steps", "must be >= 0")
        need(self.epochs is None or self.epochs >= 1, "epochs", "must be >= 1")
        need(self.image_size is None or self.image_size >= 1, "image_size", "must be >= 1")
        need(self.log_every >= 1, "log_every", "must be >= 1")
        need(self.ckpt_every >= 0, "ckpt_every", "must be >= 0")
        need(self.m_per_class is None or self.m_per_class >= 1, "m_per_class", "must be >= 1")
        need(self.workers >= 0, "workers", "must be >= 0")
        need(self.meta_freq is None or self.meta_freq >= 1, "meta_freq", "must be >= 1")
        need(self.meta_inner >= 1, "meta_inner", "must be >= 1")
        need(self.rampup_epochs is None or self.rampup_epochs >= 0, "rampup_epochs", "must be >= 0")
        need(0.0 <= self.ema_alpha < 1.0, "ema_alpha", f"must be in [0, 1), got {self.ema_alpha}")
        need(self.k_chunk is None or self.k_chunk >= 1, "k_chunk", "must be >= 1")
        for name in ("tau", "kd_T"):
            v = getattr(self, name)
            need(v is None or v > 0, name, f"must be > 0, got {v}")
        need(self.pos_k >= 1 and self.neg_k >= 1, "pos_k", "pos_k and neg_k must be >= 1")
        for f in dataclasses.fields(self):
            choices, value = f.metadata.get("choices"), getattr(self, f.name)
            need(choices is None or value is None or value in choices, f.name,
                 f"must be {_one_of(choices)}, got {value!r}" if choices else "")

    def members(self) -> list[str]:
        """Architecture of every member: --arch given n > 1 times wins; one --arch (or none) × --cohort."""
        if len(self.arch) > 1:
            return list(self.arch)
        return [self.arch[0] if self.arch else "resnet32"] * (self.cohort or 2)

    def to_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(dataclasses.asdict(self), sort_keys=False))


def _one_of(choices: tuple[str, ...]) -> str:
    return f"{', '.join(choices[:-1])} or {choices[-1]}" if len(choices) > 1 else choices[0]


# -- command line ----------------------------------------------------------------------------------------------------
GROUPS = {"data": "data", "model": "model / cohort", "method": "method", "optim": "optimisation", "speed": "speed",
          "run": "run"}


def _base_type(tp):
    """int | None → int; list[str] → str; bool stays bool."""
    tp = _strip_none(tp)
    return typing.get_args(tp)[0] if typing.get_origin(tp) is list else tp


def _strip_none(tp):
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastmcl.train",
                                description="Train a cohort with online knowledge distillation (L-MCL, MCL, PCL, DML, "
                                            "ONE, OKDDip, KDCL, CL-ILR).")
    p.add_argument("--config", default=None, help="YAML file of config fields; command-line flags override it")
    groups = {k: p.add_argument_group(v) for k, v in GROUPS.items()}
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        meta = f.metadata
        flag = "--" + f.name.replace("_", "-")
        base = _base_type(hints[f.name])
        g = groups[meta["group"]]
        if base is bool:
            g.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                           help=meta["help"])
        elif meta.get("action") == "append":
            g.add_argument(flag, dest=f.name, action="append", type=base, default=argparse.SUPPRESS, help=meta["help"])
        else:   # choices are checked by `validate` (one message for flags and YAML), shown here
            choices = meta.get("choices")
            g.add_argument(flag, dest=f.name, type=base, nargs=meta.get("nargs"), default=argparse.SUPPRESS,
                           metavar="{" + ",".join(choices) + "}" if choices else None, help=meta["help"])
    return p


def load_yaml(path: str | Path) -> dict:
    """A YAML file of config fields, each value converted to its field's type (`5e-4`, which YAML reads as a
    string, becomes a float); an unknown key or a value of the wrong type is a ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--config: no such file {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"--config: {path} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config: {path} must hold a mapping of config fields")
    hints = typing.get_type_hints(TrainConfig)
    out = {}
    for key, value in data.items():
        if key not in hints:
            close = difflib.get_close_matches(str(key), hints, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"--config: {path}: unknown key {key!r}{hint}")
        try:
            out[key] = _convert(value, hints[key])
        except (TypeError, ValueError):
            raise ValueError(f"--config: {path}: {key}: expected {_type_name(hints[key])}, got {value!r}") from None
    return out


def _convert(value, tp):
    """`value` as type `tp` (`int | None`, `list[str]`, `float`, `bool`, `str`); TypeError/ValueError if it is not."""
    if value is None:
        if type(None) in typing.get_args(tp):
            return None
        raise TypeError
    base = _base_type(tp)
    if typing.get_origin(_strip_none(tp)) is list:     # one value stands for a list of one
        return [_scalar(v, base) for v in (value if isinstance(value, list) else [value])]
    return _scalar(value, base)


def _scalar(value, base: type):
    if base is bool:
        if isinstance(value, bool):
            return value
        raise TypeError
    if isinstance(value, (bool, list, dict)):
        raise TypeError
    if base is int:
        number = float(value)
        if not number.is_integer():
            raise ValueError
        return int(number)
    if base is float:
        return float(value)
    if base is str:
        if not isinstance(value, str):
            raise TypeError
    return value


def _type_name(tp) -> str:
    inner = _strip_none(tp)
    name = f"a list of {_base_type(tp).__name__}" if typing.get_origin(inner) is list else f"{inner.__name__}"
    return name + (" or null" if inner is not tp else "")


def parse_flags(argv: list[str] | None = None) -> dict:
    """The values given explicitly: the YAML file's (`--config`), then the command-line flags on top. Errors are
    ValueError (unknown YAML keys) or argparse's exit 2 (bad flags)."""
    args = vars(build_parser().parse_args(argv))
    yaml_path = args.pop("config", None)
    values = load_yaml(yaml_path) if yaml_path else {}
    values.update(args)
    return values


def config_from(values: dict) -> TrainConfig:
    """Defaults with `values` on top."""
    try:
        return TrainConfig(**values)
    except TypeError as e:
        raise ValueError(f"config: {e}") from None


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """Defaults → YAML → flags."""
    return config_from(parse_flags(argv))
