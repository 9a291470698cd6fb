"""NVIDIA DALI input pipelines: JPEG decode on the GPU (``mixed``) or the CPU, crop/flip/normalise inside DALI.

Every loader yields ``(x, labels, dataset_index)`` like the PIL path: ``x`` float32 ``[B, 3, S, S]`` (NCHW-shaped; with
``channels_last=True`` DALI emits per-sample "HWC", which batches to NHWC, and ``x`` is the channels_last NCHW view of
it), ``labels``/``dataset_index`` int64 ``[B]``. On the GPU backend everything lives on ``cuda:device_id``.

* :class:`DaliIndexLoader` (training; the one ``TrainData`` uses): an ``fn.external_source`` fed from Python with the
  dataset indices of the epoch in the exact order the sampler gives them (``TrainData._epoch_indices``: this rank's
  slice of every global batch; ``MPerClassSampler`` and ``ShuffleSampler`` alike), so DALI sees the same global
  batches as the PIL DataLoader and resuming mid-epoch is exact. Per sample it feeds the encoded file, the dataset
  index and *keyed* augmentation parameters computed in Python from (seed, epoch, dataset index):

  - ``style="imagenet"``: the RandomResizedCrop box (torchvision's algorithm, drawn with the same torch.Generator
    calls as the PIL path; the image size comes from the file header) and the flip. DALI decodes only the box
    (``fn.decoders.image_slice``, ROI decoding as in NVIDIA's ResNet-50 DALI recipe; ``roi_decode=False`` decodes the
    whole image and crops inside ``fn.resize``), resizes it to S×S, flips and normalises. The crops and flips equal
    the PIL path's ``ImageFolderDataset(..., imagenet_train_transform(S), aug_seed=seed)`` exactly; pixel values
    differ only by the resize filters.
  - ``style="cifar"`` (small images, <= 64 px): resize to S×S, zero-pad-``padding`` random crop + flip with the
    offsets of :func:`~fastmcl.data.transforms.crop_flip_params` — the same as the on-device ``DeviceBatchLoader``.

  Augmentation therefore does not depend on the number of processes or DALI threads.

  ``views=V > 1`` (KDCL / PCL: every cohort member sees its own augmented view): ``x`` is a list of V tensors, view
  ``v`` keyed exactly like a one-view loader whose seed is ``_keyhash.view_seed(seed, v)`` (view 0 keeps ``seed``).
  The feed sends V sets of (crop, flip) with one copy of each file; the graph decodes every image ONCE and branches
  into V crop/resize/flip/normalise chains (imagenet: full decode, then ``fn.slice`` of each box — bit-identical to
  ``image_slice``'s ROI decode on the CPU backend — and resize; ``roi_decode=False``: ``fn.resize`` with each ROI;
  cifar: one resize to S×S, then V pad-crops). ``views=1`` is unchanged.
* :class:`DaliReaderLoader`: ``fn.readers.file`` over the file list (``files=`` paths, ``labels=`` the sample *index*;
  the class comes from a tensor lookup), sharded with ``shard_id``/``num_shards``/``pad_last_batch=True``.
  ``train=False`` (validation): files in order, ``stick_to_shard`` (a rank reads the same contiguous part every
  epoch), ``LastBatchPolicy.PARTIAL`` with ``reader_name`` — every rank runs the same number of steps and the
  padding is trimmed, so each image is counted exactly once over the ranks.
  ``train=True``: ``random_shuffle`` (DALI shuffles the list once with a fixed seed, identical on every rank, shards
  it, and shuffles within a buffer; the shards move on each epoch and partition it), DALI's own RNG for
  ``fn.random_resized_crop`` and the flip, ``LastBatchPolicy.DROP``. Use it when the exact sampler does not matter;
  it cannot give m-samples-per-class batches.

Decoding: ``device="gpu"`` uses the ``mixed`` decoder (nvJPEG; ``hw_decoder_load`` of the JPEGs go to the A100/H100
hardware decoder, pre-allocation hints sized for ImageNet's largest images) and runs resize/crop/normalise on the
GPU; ``device="cpu"`` runs the same graph on DALI's CPU backend (libjpeg-turbo via nvImageCodec). EXIF orientation is
ignored (``adjust_orientation=False``), as in the PIL path. Grayscale, CMYK and PNG files (also PNG data named .jpg)
decode to RGB.

Errors: a file that cannot be read or whose header does not parse raises :class:`DataError` naming it before DALI
sees it. A corrupt JPEG body makes DALI raise "Critical error in pipeline … nvImageCodec failure" naming no file, and
the pipeline object is dead afterwards: the loaders catch it, re-check the files of the batches DALI was working on
(with PIL's :func:`load_rgb`, then one by one with a small DALI CPU decoder), raise ONE DataError naming the file, and
rebuild the pipeline on the next epoch. Never a hang.

This module imports without DALI installed, and imports DALI only on first use (``dali_available()`` says whether
it works); constructing a loader without it raises DataError. It imports nothing from fastmcl outside
``fastmcl.data``.
"""
from __future__ import annotations

import io
import os
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import _keyhash as kh
from .errors import DataError
from .imagefolder import ImageFolderDataset, load_rgb
from .transforms import IMAGENET_MEAN, IMAGENET_STD, RandomResizedCrop, crop_flip_params

# DALI is an optional extra (`pip install -e '.[dali]'`, nvidia-dali-cuda130), imported on first use: importing it
# costs ~0.5 s, which `import fastmcl.data` should not pay when --dali is off.
fn = dmath = types = pipeline_def = DALIGenericIterator = LastBatchPolicy = None
DALI_VERSION: str | None = None          # set once DALI is imported
_IMPORT_ERROR: str | None = None
_LOADED = False


def _load() -> bool:
    """Import nvidia.dali (once); True when it works."""
    global fn, dmath, types, pipeline_def, DALIGenericIterator, LastBatchPolicy, DALI_VERSION
    global _IMPORT_ERROR, _LOADED
    if not _LOADED:
        _LOADED = True
        try:
            import nvidia.dali as dali
            import nvidia.dali.fn as _fn
            import nvidia.dali.math as _dmath
            import nvidia.dali.types as _types
            from nvidia.dali.plugin.pytorch import DALIGenericIterator as _Iterator
            from nvidia.dali.plugin.pytorch import LastBatchPolicy as _Policy
        except Exception as e:  # ImportError, or a broken install (missing shared libraries)
            _IMPORT_ERROR = f"{type(e).__name__}: {e}"
        else:
            fn, dmath, types, pipeline_def = _fn, _dmath, _types, dali.pipeline_def
            DALIGenericIterator, LastBatchPolicy, DALI_VERSION = _Iterator, _Policy, dali.__version__
    return _IMPORT_ERROR is None

__all__ = ["DALI_VERSION", "dali_available", "dali_import_error", "resolve_dali_device", "FileList",
           "DaliIndexLoader", "DaliReaderLoader", "find_undecodable", "IMAGENET_HINTS"]

# Pre-allocation for the mixed decoder, sized for ImageNet (NVIDIA's ResNet-50 DALI example): the largest ImageNet
# image is 5980 px wide / 6430 px high; the nvJPEG paddings avoid re-allocations when a larger image comes along.
IMAGENET_HINTS = {"preallocate_width_hint": 5980, "preallocate_height_hint": 6430,
                  "device_memory_padding": 211025920, "host_memory_padding": 140544512}


def dali_available() -> bool:
    """True when ``nvidia.dali`` imports (the CPU backend then works; ``mixed`` also needs a CUDA GPU)."""
    return _load()


def dali_import_error() -> str | None:
    """Why ``nvidia.dali`` did not import (None when it did)."""
    _load()
    return _IMPORT_ERROR


def _require_dali() -> None:
    if not _load():
        raise DataError(f"--dali: NVIDIA DALI is not installed or does not import ({_IMPORT_ERROR}); install it with "
                        f"`pip install nvidia-dali-cuda130` (or `pip install -e '.[dali]'`)")


def resolve_dali_device(device: str | None, torch_device: torch.device | str | None = None) -> str:
    """``"gpu"`` or ``"cpu"``. ``None``: gpu when the training device is CUDA (or, with no training device given,
    when CUDA is available), else cpu. ``"gpu"`` without CUDA is a DataError."""
    if device is None:
        if torch_device is not None:
            return "gpu" if torch.device(torch_device).type == "cuda" else "cpu"
        return "gpu" if torch.cuda.is_available() else "cpu"
    if device not in ("gpu", "cpu"):
        raise DataError(f"--dali-device: expected gpu or cpu, got {device!r}")
    if device == "gpu" and not torch.cuda.is_available():
        raise DataError("--dali-device gpu: CUDA is not available on this machine (use --dali-device cpu)")
    return device


# ----------------------------------------------------------------------------------------------------------------
# File lists


@dataclass(frozen=True)
class FileList:
    """The dataset as DALI reads it: ``paths[i]`` is sample ``i`` with class ``labels[i]`` (LongTensor [N])."""

    paths: tuple[str, ...]
    labels: torch.Tensor
    classes: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if len(self.paths) == 0:
            raise DataError("file list: it is empty")
        if not isinstance(self.labels, torch.Tensor) or self.labels.dim() != 1 or \
                self.labels.numel() != len(self.paths):
            raise DataError(f"file list: expected {len(self.paths)} labels (one per file)")
        if int(self.labels.min()) < 0:
            raise DataError("file list: labels must be non-negative")

    def __len__(self) -> int:
        return len(self.paths)

    @classmethod
    def from_imagefolder(cls, root: str | Path) -> "FileList":
        """``root/<class>/**/<image>`` with the same classes, files and order as :class:`ImageFolderDataset`."""
        ds = ImageFolderDataset(root)
        return cls(tuple(p for p, _ in ds.samples), ds.labels.clone(), tuple(ds.classes))

    @classmethod
    def from_file(cls, list_file: str | Path, root: str | Path | None = None) -> "FileList":
        """A text file of ``<path> <label>`` lines (DALI's ``file_list`` format; the label is the last field, so a
        path may hold spaces; blank lines and ``#`` comments skipped). Relative paths are taken from ``root``
        (default: the list file's folder)."""
        list_file = Path(list_file)
        try:
            lines = list_file.read_text().splitlines()
        except OSError as e:
            raise DataError(f"file list: cannot read {list_file}: {e.strerror or e}") from None
        base = Path(root) if root is not None else list_file.parent
        paths: list[str] = []
        labels: list[int] = []
        for n, line in enumerate(lines, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.rsplit(None, 1)
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise DataError(f"file list {list_file}:{n}: expected '<path> <integer label>', got {line[:80]!r}")
            p = Path(parts[0])
            paths.append(str(p if p.is_absolute() else base / p))
            labels.append(int(parts[1]))
        if not paths:
            raise DataError(f"file list {list_file}: no entries")
        return cls(tuple(paths), torch.tensor(labels, dtype=torch.long))

    def write(self, list_file: str | Path, *, label_is_index: bool = False) -> Path:
        """Write DALI's ``file_list`` format (absolute paths); ``label_is_index`` writes the sample index as the label
        column (the index → class mapping is then ``self.labels[index]``)."""
        list_file = Path(list_file)
        col = range(len(self)) if label_is_index else self.labels.tolist()
        list_file.write_text("".join(f"{os.path.abspath(p)} {int(c)}\n" for p, c in zip(self.paths, col)))
        return list_file


def _as_filelist(files) -> FileList:
    if isinstance(files, FileList):
        return files
    if isinstance(files, (str, Path)):
        p = Path(files)
        return FileList.from_file(p) if p.is_file() else FileList.from_imagefolder(p)
    raise DataError(f"files: expected a FileList, an ImageFolder root or a file-list path, got {type(files).__name__}")


# ----------------------------------------------------------------------------------------------------------------
# Finding the file DALI could not decode


def _dali_decodes(path: str) -> bool:
    """Decode one file with a tiny DALI CPU pipeline; False when DALI fails on it."""
    data = np.fromfile(path, dtype=np.uint8)

    @pipeline_def(batch_size=1, num_threads=1, device_id=None, prefetch_queue_depth=1)
    def one():
        enc = fn.external_source(source=lambda: [data], batch=True, dtype=types.UINT8)
        return fn.decoders.image(enc, device="cpu", output_type=types.RGB, adjust_orientation=False)

    try:
        with _quiet_stderr():
            p = one()
            p.build()
            p.run()
        return True
    except Exception:
        return False


class _quiet_stderr:
    """Silence nvImageCodec's C-level "[ERROR] …" lines while we probe files one by one."""

    def __enter__(self):
        try:
            self._fd = os.dup(2)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
            os.close(devnull)
        except OSError:
            self._fd = None
        return self

    def __exit__(self, *exc):
        if self._fd is not None:
            os.dup2(self._fd, 2)
            os.close(self._fd)
        return False


def find_undecodable(paths: Sequence[str]) -> tuple[str, str] | None:
    """The first of ``paths`` that does not decode, with the reason: checked with PIL (``load_rgb``) first, then,
    for files PIL accepts, one by one with DALI's CPU decoder. None when every file decodes."""
    for p in paths:
        try:
            load_rgb(p)
        except DataError as e:
            return p, str(e)
    if _load():
        for p in paths:
            if not _dali_decodes(p):
                return p, f"cannot decode image file {p}: DALI's decoder rejects it (PIL reads it)"
    return None


def _dali_failure(err: Exception, suspects: Sequence[str], what: str) -> DataError:
    first = " ".join(str(err).split())
    reason = first[first.find("encountered:") + 12:].strip() if "encountered:" in first else first
    reason = reason.replace("Current pipeline object is no longer valid.", "").strip()[:200]
    found = find_undecodable(list(dict.fromkeys(suspects)))
    if found is not None:
        path, why = found
        return DataError(f"{why} (DALI {what} pipeline stopped: {reason})")
    return DataError(f"DALI {what} pipeline failed on one of {len(suspects)} images but every one of them decodes "
                     f"when re-checked (first: {suspects[0] if suspects else '?'}): {reason}")


def _is_dali_failure(err: Exception) -> bool:
    """A DALI pipeline error (decode failure): "Critical error in pipeline … nvImageCodec failure"."""
    text = str(err)
    return isinstance(err, RuntimeError) and ("nvImageCodec" in text or "decoders.image" in text
                                              or "Failed to decode" in text)


# ----------------------------------------------------------------------------------------------------------------
# Shared pieces of the graphs


def _decoder_kwargs(device: str, hw_decoder_load: float, hints: bool) -> dict:
    kw = {"output_type": types.RGB, "adjust_orientation": False}
    if device == "gpu":
        kw.update(device="mixed", hw_decoder_load=float(hw_decoder_load))
        if hints:
            kw.update(IMAGENET_HINTS)
    else:
        kw["device"] = "cpu"
    return kw


def _normalize(img, mean: Sequence[float], std: Sequence[float], layout: str, mirror=None):
    kw = {} if mirror is None else {"mirror": mirror}
    return fn.crop_mirror_normalize(img, dtype=types.FLOAT, output_layout=layout,
                                    mean=[255.0 * m for m in mean], std=[255.0 * s for s in std], **kw)


_SOF_MARKERS = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF))


def _jpeg_size(data: np.ndarray) -> tuple[int, int] | None:
    """(width, height) from a JPEG's SOF segment (as stored: no EXIF rotation, like PIL's ``size``), or None when
    the data is not a JPEG this little parser understands (then PIL reads the header)."""
    b = data.data
    n = len(b)
    if n < 4 or b[0] != 0xFF or b[1] != 0xD8:
        return None
    i = 2
    while i + 3 < n:
        if b[i] != 0xFF:
            return None
        marker = b[i + 1]
        if marker == 0xFF:                               # fill byte
            i += 1
            continue
        if marker in _SOF_MARKERS:
            if i + 8 >= n:
                return None
            h, w = (b[i + 5] << 8) | b[i + 6], (b[i + 7] << 8) | b[i + 8]
            return (w, h) if w and h else None
        if marker == 0xD8 or marker == 0x01 or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        if marker == 0xD9 or marker == 0xDA:             # end of image / start of scan before any SOF
            return None
        i += 2 + ((b[i + 2] << 8) | b[i + 3])
    return None


def _to_nchw(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """DALI's NHWC batch → the NCHW-shaped channels_last view (no copy); NCHW batches pass through."""
    return x.permute(0, 3, 1, 2) if channels_last else x


def _round_half(d):
    """Python's ``round(d / 2)`` (half to even, as torchvision's CenterCrop offsets) for an int64 DALI node d >= 0."""
    q = d // 2
    return q + (d - 2 * q) * (q & 1)


class _LoaderBase:
    """Common arguments and the torch side: device, label lookup, output layout."""

    def __init__(self, files, *, batch_size: int, size: int, style: str, mean, std, device: str, device_id: int | None,
                 num_threads: int, prefetch: int, hw_decoder_load: float, channels_last: bool, seed: int,
                 preallocate_hints: bool) -> None:
        _require_dali()
        self.files = _as_filelist(files)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise DataError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise DataError(f"size: expected an integer >= 1, got {size!r}")
        if style not in ("imagenet", "cifar"):
            raise DataError(f"style: expected imagenet or cifar, got {style!r}")
        if device not in ("gpu", "cpu"):
            raise DataError(f"--dali-device: expected gpu or cpu, got {device!r}")
        if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
            raise DataError(f"--dali-threads: expected an integer >= 1, got {num_threads!r}")
        if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 1:
            raise DataError(f"--dali-prefetch: expected an integer >= 1, got {prefetch!r}")
        if not 0.0 <= float(hw_decoder_load) <= 1.0:
            raise DataError(f"--hw-decoder-load: expected a fraction in [0, 1], got {hw_decoder_load!r}")
        if len(mean) != 3 or len(std) != 3 or any(float(s) <= 0 for s in std):
            raise DataError("mean/std: expected 3 values each (RGB), std > 0")
        if device == "gpu":
            if not torch.cuda.is_available():
                raise DataError("--dali-device gpu: CUDA is not available on this machine (use --dali-device cpu)")
            device_id = torch.cuda.current_device() if device_id is None else int(device_id)
            self.torch_device = torch.device("cuda", device_id)
        else:
            device_id = None
            self.torch_device = torch.device("cpu")
        self.batch_size, self.size, self.style = batch_size, size, style
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.device, self.device_id = device, device_id
        self.num_threads, self.prefetch = num_threads, prefetch
        self.hw_decoder_load = float(hw_decoder_load)
        self.channels_last = bool(channels_last)
        self.layout = "HWC" if self.channels_last else "CHW"
        self.seed = int(seed)
        self.preallocate_hints = bool(preallocate_hints)
        self.labels = self.files.labels.to(self.torch_device)
        self._pipe = None
        self._iter = None
        self._running = False   # an epoch is in flight (or was abandoned): the pipeline holds its prefetched batches

    def _pipeline_kwargs(self, seed: int) -> dict:
        return {"batch_size": self.batch_size, "num_threads": self.num_threads, "device_id": self.device_id,
                "prefetch_queue_depth": self.prefetch, "seed": seed & 0x7FFFFFFF}

    def _batch(self, out: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = _to_nchw(out["data"], self.channels_last)
        index = out["index"].view(-1).to(self.torch_device, torch.long, non_blocking=True)
        return x, self.labels[index], index

    def close(self) -> None:
        """Drop the DALI pipeline (threads, buffers); the next epoch builds a new one."""
        self._iter = None
        self._pipe = None
        self._running = False

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


# ----------------------------------------------------------------------------------------------------------------
# Training: external-source index feed


class _IndexFeed:
    """The external source: per call, one batch of (encoded files, indices, then a keyed crop + flip per view) for
    the current epoch.

    Batches handed to DALI are remembered in ``pending`` until the loader yields them: when DALI fails, those are
    the files it was decoding.
    """

    def __init__(self, loader: "DaliIndexLoader") -> None:
        self.loader = loader
        self.batches: list[np.ndarray] = []
        self.cursor = 0
        self.epoch = 0
        self.pending: deque[np.ndarray] = deque()

    def start(self, batches: list[np.ndarray], epoch: int) -> None:
        self.batches, self.cursor, self.epoch = batches, 0, int(epoch)
        self.pending.clear()

    def __iter__(self):
        return self

    def __next__(self):
        if self.cursor >= len(self.batches):
            raise StopIteration
        idx = self.batches[self.cursor]
        self.cursor += 1
        self.pending.append(idx)
        return self.loader._make_batch(idx, self.epoch)


class DaliIndexLoader(_LoaderBase):
    """Training batches in a given order of dataset indices, decoded and augmented by DALI (see the module notes).

    ``epoch_batches(indices, epoch)`` yields ``len(indices) // batch_size`` batches ``(x, labels, index)`` from
    consecutive chunks of ``indices`` (a trailing partial chunk is dropped). The DALI pipeline is built on first use
    and kept across epochs; an epoch left unfinished (``break``) makes the next call rebuild it.

    ``files``: a :class:`FileList`, an ImageFolder root or a file-list path. ``style``: ``"imagenet"``
    (RandomResizedCrop(size, scale, ratio) + flip, keyed like ``imagenet_train_transform`` with ``aug_seed=seed``) or
    ``"cifar"`` (resize to size×size, zero-pad ``padding`` random crop + flip, keyed like ``DeviceBatchLoader``).

    ``views``: independently augmented views per sample (default 1). With ``views=V > 1`` the batches are
    ``([x_0, …, x_{V-1}], labels, index)``; ``x_v`` equals what a one-view loader with ``seed=view_seed(seed, v)``
    yields. Each file is read and decoded once per sample; only the crop/resize/flip/normalise runs V times.
    """

    def __init__(self, files, *, batch_size: int, size: int = 224, style: str = "imagenet",
                 mean=IMAGENET_MEAN, std=IMAGENET_STD, device: str = "cpu", device_id: int | None = None,
                 num_threads: int = 4, prefetch: int = 2, hw_decoder_load: float = 0.65,
                 channels_last: bool = False, seed: int = 0, scale=(0.08, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0),
                 padding: int = 4, preallocate_hints: bool = True, roi_decode: bool = True, views: int = 1) -> None:
        if isinstance(views, bool) or not isinstance(views, (int, np.integer)) or views < 1:
            raise DataError(f"views: expected an integer >= 1 (augmented views per sample), got {views!r}")
        super().__init__(files, batch_size=batch_size, size=size, style=style, mean=mean, std=std, device=device,
                         device_id=device_id, num_threads=num_threads, prefetch=prefetch,
                         hw_decoder_load=hw_decoder_load, channels_last=channels_last, seed=seed,
                         preallocate_hints=preallocate_hints)
        self.views = int(views)
        self.view_seeds = tuple(kh.view_seed(self.seed, v) for v in range(self.views))   # view 0: self.seed
        self.scale = tuple(float(s) for s in scale)
        self.ratio = tuple(float(r) for r in ratio)
        self.padding = int(padding)
        self.roi_decode = bool(roi_decode)
        self._feed = _IndexFeed(self)
        self._paths = self.files.paths
        self.epoch = 0

    # -- the Python side of the feed ---------------------------------------------------------------------------------
    def _read(self, i: int) -> np.ndarray:
        path = self._paths[i]
        try:
            data = np.fromfile(path, dtype=np.uint8)
        except FileNotFoundError:
            raise DataError(f"image file not found: {path}") from None
        except OSError as e:
            raise DataError(f"cannot read image file {path}: {e.strerror or e}") from None
        if data.size == 0:
            raise DataError(f"cannot decode image file {path}: the file is empty")
        return data

    def _image_size(self, i: int, data: np.ndarray) -> tuple[int, int]:
        size = _jpeg_size(data)
        if size is not None:
            return size
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with Image.open(io.BytesIO(data.tobytes())) as im:
                    return im.size
        except Exception as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DataError(f"cannot decode image file {self._paths[i]}: {reason}") from None

    def _make_batch(self, idx: np.ndarray, epoch: int) -> tuple:
        """One external-source batch: ``(encoded files, index, *view_0 params, …, *view_{V-1} params)``; the files
        are read (and, imagenet style, their headers parsed) once, the keyed crop + flip drawn once per view."""
        enc = [self._read(int(i)) for i in idx]
        index = idx.astype(np.int64)[:, None]
        sizes = None if self.style == "cifar" else [self._image_size(int(i), data) for i, data in zip(idx, enc)]
        out: list = [enc, index]
        for seed in self.view_seeds:
            out += self._view_params(idx, sizes, epoch, seed)
        return tuple(out)

    def _view_params(self, idx: np.ndarray, sizes, epoch: int, seed: int) -> list:
        """The keyed crop + flip of one view (augmentation seed ``seed``): cifar ``[start (x, y), flip]``;
        imagenet ``[(x, y) start, (w, h) shape, flip]`` (``roi_decode``) or ``[(y, x) ROI start, ROI end, flip]``."""
        if self.style == "cifar":
            dy, dx, flip = crop_flip_params(len(idx), self.padding, "cpu", index=torch.from_numpy(idx.astype(np.int64)),
                                            seed=seed, epoch=epoch)
            start = (torch.stack([dx, dy], 1) - self.padding).to(torch.int32).numpy()
            return [start, flip.to(torch.int32).numpy()]
        box = np.empty((len(idx), 4), np.int32)                          # top, left, height, width
        flip = np.empty(len(idx), np.int32)
        g = torch.Generator()
        for k, (i, (width, height)) in enumerate(zip(idx, sizes)):
            g.manual_seed(kh.item_seed(seed, epoch, int(i)))
            box[k] = RandomResizedCrop.get_params(width, height, self.scale, self.ratio, g)
            flip[k] = torch.rand(1, generator=g).item() < 0.5
        if self.roi_decode:                                             # image_slice / slice: (x, y) start, (w, h)
            return [box[:, 1::-1].copy(), box[:, :1:-1].copy(), flip]
        start = box[:, :2].astype(np.float32)                           # resize ROI: (y, x) start and end
        return [start, start + box[:, 2:].astype(np.float32), flip]

    # -- the graph ---------------------------------------------------------------------------------------------------
    def _outputs(self) -> list[str]:
        return ["data", "index"] if self.views == 1 else [f"data{v}" for v in range(self.views)] + ["index"]

    def _build(self):
        S, V = self.size, self.views
        dec = _decoder_kwargs(self.device, self.hw_decoder_load, self.preallocate_hints)
        feed = self._feed

        @pipeline_def(**self._pipeline_kwargs(kh.seed64(self.seed, 0x0DA1)))
        def train_pipe():
            # per view: cifar (start, flip); imagenet (a, b, flip) — see _view_params
            per_view = [types.INT32, types.INT32] if self.style == "cifar" else \
                [types.INT32 if self.roi_decode else types.FLOAT] * 2 + [types.INT32]
            enc, index, *params = fn.external_source(source=feed, num_outputs=2 + V * len(per_view),
                                                     dtype=[types.UINT8, types.INT64] + per_view * V)
            views = [params[v * len(per_view):(v + 1) * len(per_view)] for v in range(V)]
            imgs = []
            if self.style == "cifar":
                img = fn.decoders.image(enc, **dec)
                img = fn.resize(img, resize_x=S, resize_y=S, antialias=True)     # view-independent: done once
                for start, flip in views:
                    crop = fn.slice(img, start=start, shape=[S, S], axis_names="WH", out_of_bounds_policy="pad",
                                    fill_values=0)
                    imgs.append(_normalize(crop, self.mean, self.std, self.layout, mirror=flip))
            elif self.roi_decode and V == 1:    # decode only the box (NVIDIA's ResNet-50 recipe), then resize it
                a, b, flip = views[0]
                img = fn.decoders.image_slice(enc, start=a, shape=b, axis_names="WH", **dec)
                img = fn.resize(img, resize_x=S, resize_y=S, antialias=True)
                imgs.append(_normalize(img, self.mean, self.std, self.layout, mirror=flip))
            else:
                # decode the whole image once; every view crops its own box from it. roi_decode: an exact slice
                # (the pixels image_slice's ROI decode gives) then resize; else crop + resize in one op (PIL's
                # resize(box=...)).
                full = fn.decoders.image(enc, **dec)
                for a, b, flip in views:
                    if self.roi_decode:
                        img = fn.slice(full, start=a, shape=b, axis_names="WH")
                        img = fn.resize(img, resize_x=S, resize_y=S, antialias=True)
                    else:
                        img = fn.resize(full, size=[S, S], roi_start=a, roi_end=b, roi_relative=False,
                                        antialias=True)
                    imgs.append(_normalize(img, self.mean, self.std, self.layout, mirror=flip))
            if self.device == "gpu":
                index = index.gpu()
            return (*imgs, index)

        pipe = train_pipe()
        pipe.build()
        return pipe

    def __len__(self) -> int:
        return len(self._feed.batches)

    def _batch(self, out: dict):
        if self.views == 1:
            return super()._batch(out)
        xs = [_to_nchw(out[f"data{v}"], self.channels_last) for v in range(self.views)]
        index = out["index"].view(-1).to(self.torch_device, torch.long, non_blocking=True)
        return xs, self.labels[index], index

    def epoch_batches(self, indices: Sequence[int] | torch.Tensor | np.ndarray, epoch: int = 0
                      ) -> Iterator[tuple[torch.Tensor | list[torch.Tensor], torch.Tensor, torch.Tensor]]:
        """Yield the batches of one epoch (``indices``: this rank's dataset indices in order). ``x`` is one tensor,
        or with ``views > 1`` a list of ``views`` tensors (view v keyed by ``view_seed(seed, v)``)."""
        idx = np.asarray(indices.tolist() if isinstance(indices, torch.Tensor) else indices, dtype=np.int64)
        if idx.ndim != 1:
            raise DataError("indices: expected a 1-D sequence of dataset indices")
        if idx.size and (idx.min() < 0 or idx.max() >= len(self.files)):
            raise DataError(f"indices: dataset indices must lie in [0, {len(self.files)})")
        nb = idx.size // self.batch_size
        batches = [idx[k * self.batch_size:(k + 1) * self.batch_size] for k in range(nb)]
        self.epoch = int(epoch)
        return self._run(batches, int(epoch))

    def _run(self, batches, epoch):
        if self._running:           # the previous epoch was abandoned mid-way: its prefetched batches are stale
            self.close()
        self._feed.start(batches, epoch)
        if not batches:
            return
        self._running = True
        try:
            if self._pipe is None:
                self._pipe = self._build()
                self._iter = DALIGenericIterator(self._pipe, self._outputs(), auto_reset=False,
                                                 last_batch_policy=LastBatchPolicy.DROP, prepare_first_batch=False)
            else:
                self._iter.reset()
            for _ in range(len(batches)):
                try:
                    out = next(self._iter)
                except StopIteration:
                    raise RuntimeError("DALI training pipeline ended before the epoch's last batch") from None
                self._feed.pending.popleft()
                yield self._batch(out[0])
            try:                    # drain: end of the source's epoch so that reset() starts the next one
                next(self._iter)
            except StopIteration:
                pass
            self._running = False
        except DataError:
            self.close()
            self._running = False
            raise
        except Exception as e:
            suspects = [self._paths[int(i)] for b in self._feed.pending for i in b]
            self.close()
            self._running = False
            if _is_dali_failure(e):
                raise _dali_failure(e, suspects, "training") from None
            raise


# ----------------------------------------------------------------------------------------------------------------
# Reader: sharded validation (and a DALI-RNG training reader)


class DaliReaderLoader(_LoaderBase):
    """``fn.readers.file`` sharded over ranks (see the module notes). Iterate it once per epoch.

    ``train=False``: in file order; ``style="imagenet"``: resize the shorter side to ``resize`` (PIL's rule: the long
    side truncated) and centre-crop ``size`` (torchvision's rounding; zero padding when the image is smaller),
    i.e. ``imagenet_val_transform(size, resize)``; ``style="cifar"``: resize to size×size. ``LastBatchPolicy.PARTIAL``:
    padding trimmed, every rank the same number of batches (the last one may be short or even empty).
    ``train=True``: ``random_shuffle`` (the shards partition every epoch), random-resized-crop (imagenet) or
    pad-crop (cifar) and flip from DALI's RNG, ``LastBatchPolicy.DROP``.
    """

    def __init__(self, files, *, batch_size: int, size: int = 224, resize: int | None = None, style: str = "imagenet",
                 train: bool = False, shard_id: int = 0, num_shards: int = 1, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 device: str = "cpu", device_id: int | None = None, num_threads: int = 4, prefetch: int = 2,
                 hw_decoder_load: float = 0.65, channels_last: bool = False, seed: int = 0,
                 scale=(0.08, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0), padding: int = 4,
                 preallocate_hints: bool = True) -> None:
        super().__init__(files, batch_size=batch_size, size=size, style=style, mean=mean, std=std, device=device,
                         device_id=device_id, num_threads=num_threads, prefetch=prefetch,
                         hw_decoder_load=hw_decoder_load, channels_last=channels_last, seed=seed,
                         preallocate_hints=preallocate_hints)
        if isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1:
            raise DataError(f"num_shards: expected an integer >= 1, got {num_shards!r}")
        if isinstance(shard_id, bool) or not isinstance(shard_id, int) or not 0 <= shard_id < num_shards:
            raise DataError(f"shard_id: expected an integer in [0, {num_shards}), got {shard_id!r}")
        if num_shards > len(self.files):
            raise DataError(f"num_shards: {num_shards} shards for only {len(self.files)} images")
        self.resize = int(resize) if resize is not None else int(round(size / 0.875))
        self.train = bool(train)
        self.shard_id, self.num_shards = shard_id, num_shards
        self.scale = tuple(float(s) for s in scale)
        self.ratio = tuple(float(r) for r in ratio)
        self.padding = int(padding)
        n = len(self.files)
        # DALI's file reader gives shard s the contiguous range [floor(s*N/S), floor((s+1)*N/S)) of its list
        self.shard_range = (n * shard_id // num_shards, n * (shard_id + 1) // num_shards)

    def _build(self):
        S, R, P = self.size, self.resize, self.padding
        dec = _decoder_kwargs(self.device, self.hw_decoder_load, self.preallocate_hints)
        paths, n = list(self.files.paths), len(self.files)
        rank_seed = kh.seed64(self.seed, self.shard_id, 0x0DA2)

        @pipeline_def(**self._pipeline_kwargs(rank_seed))
        def reader_pipe():
            enc, index = fn.readers.file(
                files=paths, labels=list(range(n)), shard_id=self.shard_id, num_shards=self.num_shards,
                pad_last_batch=True, random_shuffle=self.train, stick_to_shard=not self.train,
                seed=rank_seed & 0x7FFFFFFF, name="Reader")
            if self.train:
                mirror = fn.random.coin_flip(probability=0.5)
                img = fn.decoders.image(enc, **dec)
                if self.style == "imagenet":
                    img = fn.random_resized_crop(img, size=[S, S], random_area=list(self.scale),
                                                 random_aspect_ratio=list(self.ratio), num_attempts=10,
                                                 antialias=True)
                else:
                    img = fn.resize(img, resize_x=S, resize_y=S, antialias=True)
                    start = fn.random.uniform(range=[-P, P + 1], dtype=types.INT32, shape=[2])
                    img = fn.slice(img, start=start, shape=[S, S], axis_names="WH", out_of_bounds_policy="pad",
                                   fill_values=0)
                img = _normalize(img, self.mean, self.std, self.layout, mirror=mirror)
            elif self.style == "cifar":
                img = fn.decoders.image(enc, **dec)
                img = fn.resize(img, resize_x=S, resize_y=S, antialias=True)
                img = _normalize(img, self.mean, self.std, self.layout)
            else:
                # PIL's Resize(R) + CenterCrop(S) with its exact output size and offsets, computed from the header
                shp = fn.peek_image_shape(enc, adjust_orientation=False, dtype=types.INT64)
                h, w = shp[0], shp[1]
                w_short = fn.cast(w <= h, dtype=types.INT64)
                new_w = w_short * R + (1 - w_short) * (R * w // h)
                new_h = w_short * (R * h // w) + (1 - w_short) * R
                img = fn.decoders.image(enc, **dec)
                img = fn.resize(img, resize_x=fn.cast(new_w, dtype=types.FLOAT),
                                resize_y=fn.cast(new_h, dtype=types.FLOAT), antialias=True)
                dx, dy = new_w - S, new_h - S
                left = _round_half(dmath.max(dx, 0)) - dmath.max(-dx, 0) // 2
                top = _round_half(dmath.max(dy, 0)) - dmath.max(-dy, 0) // 2
                start = fn.cast(fn.stack(left, top), dtype=types.INT32)
                img = fn.slice(img, start=start, shape=[S, S], axis_names="WH", out_of_bounds_policy="pad",
                               fill_values=0)
                img = _normalize(img, self.mean, self.std, self.layout)
            if self.device == "gpu":
                index = index.gpu()
            return img, index

        pipe = reader_pipe()
        pipe.build()
        return pipe

    def __len__(self) -> int:
        """Batches per epoch on this rank (the same on every rank)."""
        per_shard = -(-len(self.files) // self.num_shards)      # padded shard size
        return per_shard // self.batch_size if self.train else -(-per_shard // self.batch_size)

    def num_samples(self) -> int:
        """Images this rank yields per epoch (validation: its exact shard, no padding)."""
        lo, hi = self.shard_range
        return len(self) * self.batch_size if self.train else hi - lo

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        if self._running:           # the previous epoch was abandoned mid-way: start from a fresh pipeline
            self.close()
        consumed = 0
        self._running = True
        try:
            if self._pipe is None:
                self._pipe = self._build()
                policy = LastBatchPolicy.DROP if self.train else LastBatchPolicy.PARTIAL
                self._iter = DALIGenericIterator(self._pipe, ["data", "index"], reader_name="Reader",
                                                 auto_reset=True, last_batch_policy=policy)
            for out in self._iter:
                x, y, index = self._batch(out[0])
                consumed += index.shape[0]
                yield x, y, index
            self._running = False
        except Exception as e:
            self.close()
            if not _is_dali_failure(e):
                raise
            lo, hi = self.shard_range
            if self.train:          # shuffled: any file of the shard (DALI's shards are taken after the shuffle)
                suspects = list(self.files.paths)
            else:                   # in order: the files after the ones already yielded
                window = (self.prefetch + 2) * self.batch_size
                suspects = list(self.files.paths[lo + consumed:min(hi, lo + consumed + window)])
                suspects += list(self.files.paths[lo:lo + consumed]) + list(self.files.paths[lo + consumed + window:hi])
            raise _dali_failure(e, suspects, "training reader" if self.train else "validation") from None
