"""The DALI graphs and their loaders (imported on first use; docs/data.md "DALI").

Decode: `mixed` (nvJPEG, a `hw_decoder_load` share on the hardware decoder) when on the GPU, DALI's CPU backend
otherwise; EXIF orientation ignored, as in the PIL path. Output per sample "CHW", or "HWC" for channels_last (the
batch is NHWC, handed over as the NCHW-shaped channels_last view). Every loader yields `(x, labels, dataset_index)`.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali import math as dmath
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from .. import _keyhash as kh
from ..errors import DataError, check_int
from ..transforms import IMAGENET_MEAN, IMAGENET_STD
from .diagnosis import explain_failure, is_decode_failure
from .feed import FileList, IndexFeed
from .options import check_options, resolve_dali_device

# Pre-allocation for the mixed decoder (NVIDIA's ResNet-50 recipe): ImageNet's largest image is 5980 x 6430 px.
IMAGENET_HINTS = {"preallocate_width_hint": 5980, "preallocate_height_hint": 6430,
                  "device_memory_padding": 211025920, "host_memory_padding": 140544512}


def _round_half(d):
    """Python's `round(d / 2)` (half to even, torchvision's CenterCrop offsets) for an int64 DALI node d >= 0."""
    q = d // 2
    return q + (d - 2 * q) * (q & 1)


class _Loader:
    """Both loaders' arguments, graph steps and torch side. `files`: a `FileList`, an ImageFolder root or a file-list
    path; `style` "imagenet" (RandomResizedCrop(`scale`, `ratio`) / resize + centre crop) or "cifar" (resize to
    size x size, zero-pad-`padding` crop)."""

    def __init__(self, files, *, batch_size: int, size: int = 224, style: str = "imagenet", mean=IMAGENET_MEAN,
                 std=IMAGENET_STD, device: str | None = "cpu", device_id: int | None = None, num_threads: int = 4,
                 prefetch: int = 2, hw_decoder_load: float = 0.65, channels_last: bool = False, seed: int = 0,
                 scale=(0.08, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0), padding: int = 4,
                 preallocate_hints: bool = True) -> None:
        self.files = FileList.of(files)
        self.batch_size, self.size = check_int(batch_size, "batch_size"), check_int(size, "size")
        if style not in ("imagenet", "cifar"):
            raise DataError(f"style: expected imagenet or cifar, got {style!r}")
        check_options(device, num_threads, prefetch, hw_decoder_load)
        if len(mean) != 3 or len(std) != 3 or any(float(s) <= 0 for s in std):
            raise DataError("mean/std: expected 3 values each (RGB), std > 0")
        self.device = resolve_dali_device(device)
        if self.device == "gpu":
            self.device_id = torch.cuda.current_device() if device_id is None else int(device_id)
            self.torch_device = torch.device("cuda", self.device_id)
        else:
            self.device_id, self.torch_device = None, torch.device("cpu")
        self.style = style
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.num_threads, self.prefetch, self.hw_decoder_load = num_threads, prefetch, float(hw_decoder_load)
        self.channels_last = bool(channels_last)
        self.layout = "HWC" if self.channels_last else "CHW"
        self.seed = int(seed)
        self.scale, self.ratio = tuple(float(s) for s in scale), tuple(float(r) for r in ratio)
        self.padding = int(padding)
        self.preallocate_hints = bool(preallocate_hints)
        self.labels = self.files.labels.to(self.torch_device)
        self._pipe = self._iter = None
        self._running = False   # an epoch is in flight (or was abandoned): the pipeline holds its prefetched batches

    def _pipeline_kwargs(self, seed: int) -> dict:
        return {"batch_size": self.batch_size, "num_threads": self.num_threads, "device_id": self.device_id,
                "prefetch_queue_depth": self.prefetch, "seed": seed & 0x7FFFFFFF}

    def _decode(self, encoded, roi: tuple | None = None):
        kw = {"output_type": types.RGB, "adjust_orientation": False, "device": "cpu"}
        if self.device == "gpu":
            kw.update(device="mixed", hw_decoder_load=self.hw_decoder_load, **(IMAGENET_HINTS if self.preallocate_hints
                                                                                else {}))
        if roi is None:
            return fn.decoders.image(encoded, **kw)
        return fn.decoders.image_slice(encoded, start=roi[0], shape=roi[1], axis_names="WH", **kw)

    def _resize(self, img):
        return fn.resize(img, resize_x=self.size, resize_y=self.size, antialias=True)

    def _pad_crop(self, img, start):
        return fn.slice(img, start=start, shape=[self.size, self.size], axis_names="WH", out_of_bounds_policy="pad",
                        fill_values=0)

    def _normalize(self, img, mirror=None):
        kw = {} if mirror is None else {"mirror": mirror}
        return fn.crop_mirror_normalize(img, dtype=types.FLOAT, output_layout=self.layout,
                                        mean=[255.0 * m for m in self.mean], std=[255.0 * s for s in self.std], **kw)

    def _tensor(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 3, 1, 2) if self.channels_last else x      # NHWC -> the channels_last NCHW view

    def _batch(self, out: dict, names: Sequence[str]):
        index = out["index"].view(-1).to(self.torch_device, torch.long, non_blocking=True)
        xs = [self._tensor(out[n]) for n in names]
        return (xs[0] if len(xs) == 1 else xs), self.labels[index], index

    def _guarded(self, epoch: Iterator, suspects: Callable[[], list[str]], what: str) -> Iterator:
        """Run one epoch. After DALI's decode failure the pipeline is dead: drop it and raise one DataError naming the
        file (`diagnosis`); an epoch left unfinished leaves `_running` set, so the next one starts a fresh pipeline."""
        if self._running:
            self.close()
        self._running = True
        try:
            yield from epoch
            self._running = False
        except Exception as e:
            files = [] if isinstance(e, DataError) else suspects()
            self.close()
            if not is_decode_failure(e):
                raise
            raise explain_failure(e, files, what) from None

    def close(self) -> None:
        """Drop the DALI pipeline (threads, buffers); the next epoch builds a new one."""
        self._pipe = self._iter = None
        self._running = False

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class DaliIndexLoader(_Loader):
    """Training batches for a given order of dataset indices (the sampler's), decoded and augmented by DALI.

    `epoch_batches(indices, epoch)` yields `len(indices) // batch_size` batches; the pipeline is built once and kept
    across epochs, an epoch left unfinished makes the next call rebuild it. `style="imagenet"`: RandomResizedCrop +
    flip keyed like `imagenet_train_transform` with `aug_seed=seed`; `"cifar"`: resize to size x size, zero-pad crop +
    flip keyed like `DeviceBatchLoader`. `views=V > 1`: `x` is a list of V views, view v keyed by `view_seed(seed, v)`;
    each file is decoded once and only the crop/resize/flip/normalise runs V times.
    """

    def __init__(self, files, *, roi_decode: bool = True, views: int = 1, **options) -> None:
        self.views = check_int(views, "views")
        super().__init__(files, **options)
        self.view_seeds = tuple(kh.view_seed(self.seed, v) for v in range(self.views))   # view 0: self.seed
        self.roi_decode = bool(roi_decode)
        self.epoch = 0
        self._feed = IndexFeed(self.files.paths, style=self.style, view_seeds=self.view_seeds, scale=self.scale,
                               ratio=self.ratio, padding=self.padding, roi_decode=self.roi_decode)
        self._names = ["data"] if self.views == 1 else [f"data{v}" for v in range(self.views)]

    def _build(self):
        per_view = [types.INT32, types.INT32] if self.style == "cifar" else \
            [types.INT32 if self.roi_decode else types.FLOAT] * 2 + [types.INT32]

        @pipeline_def(**self._pipeline_kwargs(kh.seed64(self.seed, 0x0DA1)))
        def train_pipe():
            encoded, index, *params = fn.external_source(source=self._feed, num_outputs=2 + self.views * len(per_view),
                                                         dtype=[types.UINT8, types.INT64] + per_view * self.views)
            views = [params[v * len(per_view):(v + 1) * len(per_view)] for v in range(self.views)]
            if self.style == "cifar":                                   # one resize, then a pad-crop per view
                img = self._resize(self._decode(encoded))
                imgs = [self._normalize(self._pad_crop(img, start), mirror=flip) for start, flip in views]
            elif self.roi_decode and self.views == 1:                   # decode only the crop box
                start, shape, flip = views[0]
                imgs = [self._normalize(self._resize(self._decode(encoded, roi=(start, shape))), mirror=flip)]
            else:                                                       # decode once, crop every view's box
                full = self._decode(encoded)
                imgs = []
                for a, b, flip in views:
                    if self.roi_decode:         # an exact slice: the pixels image_slice's ROI decode gives
                        img = self._resize(fn.slice(full, start=a, shape=b, axis_names="WH"))
                    else:                       # crop + resize in one op (PIL's resize(box=...))
                        img = fn.resize(full, size=[self.size, self.size], roi_start=a, roi_end=b,
                                        roi_relative=False, antialias=True)
                    imgs.append(self._normalize(img, mirror=flip))
            return (*imgs, index.gpu() if self.device == "gpu" else index)

        pipe = train_pipe()
        pipe.build()
        return pipe

    def __len__(self) -> int:
        return len(self._feed.batches)

    def epoch_batches(self, indices: Sequence[int] | torch.Tensor | np.ndarray, epoch: int = 0
                      ) -> Iterator[tuple[torch.Tensor | list[torch.Tensor], torch.Tensor, torch.Tensor]]:
        """The batches of one epoch from consecutive chunks of `indices` (this rank's, in order; a partial chunk is
        dropped)."""
        idx = np.asarray(indices.tolist() if isinstance(indices, torch.Tensor) else indices, dtype=np.int64)
        if idx.ndim != 1:
            raise DataError("indices: expected a 1-D sequence of dataset indices")
        if idx.size and (idx.min() < 0 or idx.max() >= len(self.files)):
            raise DataError(f"indices: dataset indices must lie in [0, {len(self.files)})")
        batches = [idx[k * self.batch_size:(k + 1) * self.batch_size] for k in range(idx.size // self.batch_size)]
        self.epoch = int(epoch)
        return self._run(batches, self.epoch)

    def _run(self, batches: list[np.ndarray], epoch: int) -> Iterator:
        if self._running:           # the previous epoch was abandoned mid-way: its prefetched batches are stale
            self.close()
        self._feed.start(batches, epoch)
        if batches:
            yield from self._guarded(self._epoch(len(batches)), self._feed.suspects, "training")

    def _epoch(self, steps: int) -> Iterator:
        if self._pipe is None:
            self._pipe = self._build()
            self._iter = DALIGenericIterator(self._pipe, self._names + ["index"], auto_reset=False,
                                             last_batch_policy=LastBatchPolicy.DROP, prepare_first_batch=False)
        else:
            self._iter.reset()
        for _ in range(steps):
            try:
                out = next(self._iter)
            except StopIteration:
                raise RuntimeError("DALI training pipeline ended before the epoch's last batch") from None
            self._feed.pending.popleft()
            yield self._batch(out[0], self._names)
        try:                        # drain: end of the source's epoch so that reset() starts the next one
            next(self._iter)
        except StopIteration:
            pass


class DaliReaderLoader(_Loader):
    """DALI's file reader, sharded over ranks (`shard_id`/`num_shards`, `pad_last_batch`). Iterate once per epoch.

    `train=False` (validation): in file order, each rank sticks to its contiguous shard, `LastBatchPolicy.PARTIAL`
    trims the padding (every image counted once over the ranks, every rank the same number of batches);
    imagenet: `imagenet_val_transform(size, resize)` (PIL's output size and torchvision's crop offsets), cifar:
    resize to size x size. `train=True`: DALI shuffles and draws crop + flip from its own RNG, `LastBatchPolicy.DROP`
    (no sampler, so no m-per-class batches).
    """

    def __init__(self, files, *, resize: int | None = None, train: bool = False, shard_id: int = 0,
                 num_shards: int = 1, **options) -> None:
        super().__init__(files, **options)
        self.num_shards = check_int(num_shards, "num_shards")
        if isinstance(shard_id, bool) or not isinstance(shard_id, int) or not 0 <= shard_id < num_shards:
            raise DataError(f"shard_id: expected an integer in [0, {num_shards}), got {shard_id!r}")
        if num_shards > len(self.files):
            raise DataError(f"num_shards: {num_shards} shards for only {len(self.files)} images")
        self.shard_id = shard_id
        self.resize = int(resize) if resize is not None else int(round(self.size / 0.875))
        self.train = bool(train)
        n = len(self.files)     # DALI's reader gives shard s the contiguous range [floor(s*N/S), floor((s+1)*N/S))
        self.shard_range = (n * shard_id // num_shards, n * (shard_id + 1) // num_shards)

    def _build(self):
        S, R, P = self.size, self.resize, self.padding
        rank_seed = kh.seed64(self.seed, self.shard_id, 0x0DA2)

        @pipeline_def(**self._pipeline_kwargs(rank_seed))
        def reader_pipe():
            encoded, index = fn.readers.file(
                files=list(self.files.paths), labels=list(range(len(self.files))), shard_id=self.shard_id,
                num_shards=self.num_shards, pad_last_batch=True, random_shuffle=self.train,
                stick_to_shard=not self.train, seed=rank_seed & 0x7FFFFFFF, name="Reader")
            if self.train:
                mirror = fn.random.coin_flip(probability=0.5)
                img = self._decode(encoded)
                if self.style == "imagenet":
                    img = fn.random_resized_crop(img, size=[S, S], random_area=list(self.scale),
                                                 random_aspect_ratio=list(self.ratio), num_attempts=10, antialias=True)
                else:
                    img = self._pad_crop(self._resize(img), fn.random.uniform(range=[-P, P + 1], dtype=types.INT32,
                                                                              shape=[2]))
                img = self._normalize(img, mirror=mirror)
            elif self.style == "cifar":
                img = self._normalize(self._resize(self._decode(encoded)))
            else:   # PIL's Resize(R) (long side truncated) + CenterCrop(S), sizes from the header
                shape = fn.peek_image_shape(encoded, adjust_orientation=False, dtype=types.INT64)
                h, w = shape[0], shape[1]
                w_short = fn.cast(w <= h, dtype=types.INT64)
                new_w = w_short * R + (1 - w_short) * (R * w // h)
                new_h = w_short * (R * h // w) + (1 - w_short) * R
                img = fn.resize(self._decode(encoded), resize_x=fn.cast(new_w, dtype=types.FLOAT),
                                resize_y=fn.cast(new_h, dtype=types.FLOAT), antialias=True)
                dx, dy = new_w - S, new_h - S
                left = _round_half(dmath.max(dx, 0)) - dmath.max(-dx, 0) // 2
                top = _round_half(dmath.max(dy, 0)) - dmath.max(-dy, 0) // 2
                img = self._normalize(self._pad_crop(img, fn.cast(fn.stack(left, top), dtype=types.INT32)))
            return img, index.gpu() if self.device == "gpu" else index

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
        self._consumed = 0
        return self._guarded(self._epoch(), self._suspects, "training reader" if self.train else "validation")

    def _epoch(self) -> Iterator:
        if self._pipe is None:
            self._pipe = self._build()
            self._iter = DALIGenericIterator(self._pipe, ["data", "index"], reader_name="Reader", auto_reset=True,
                                             last_batch_policy=LastBatchPolicy.DROP if self.train else
                                             LastBatchPolicy.PARTIAL)
        for out in self._iter:
            batch = self._batch(out[0], ["data"])
            self._consumed += batch[2].shape[0]
            yield batch

    def _suspects(self) -> list[str]:
        """The files DALI may have failed on: any file when shuffled, else those after the ones yielded first."""
        paths, (lo, hi), done = self.files.paths, self.shard_range, self._consumed
        if self.train:
            return list(paths)
        end = min(hi, lo + done + (self.prefetch + 2) * self.batch_size)
        return list(paths[lo + done:end]) + list(paths[lo:lo + done]) + list(paths[end:hi])
