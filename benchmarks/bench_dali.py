"""Input pipeline throughput: DALI (CPU backend; plus the GPU `mixed` decoder when CUDA is there) vs the PIL DataLoader.

Data: an ImageNet-like JPEG ImageFolder generated once (N_IMAGES images of 400×350, quality 90, 10 classes; smooth
colour fields + texture so the files are ~50-60 KB like real photos of that size), 224-px training recipe
(RandomResizedCrop(224) + flip + normalise, keyed by (seed, epoch, index)), batch 64, float32 NCHW out.

Loaders, at EQUAL threads (THREADS = 2, the cores of our dev/CI machines):
  pil             the PIL path: `ImageFolderDataset(imagenet_train_transform(224), aug_seed)` + `build_dataloader`
                  with THREADS persistent worker processes (steady state; the reference for the ratios).
  pil_fresh_workers  the same with workers started every epoch, as `TrainData` builds its DataLoader today.
  dali_cpu        `DaliIndexLoader` (what `TrainData` uses with --dali) on the CPU backend, THREADS DALI threads:
                  ROI decoding of the keyed crop box (`fn.decoders.image_slice`), resize to 224, flip + normalise
                  (`fn.crop_mirror_normalize`). The Python side (reading the files, crop boxes from the image header
                  and the keyed generator) runs in this process's main thread.
  dali_cpu_full   the same with `roi_decode=False`: the whole image decoded, crop + resize in one `fn.resize(roi_*)`.
  dali_reader_cpu `DaliReaderLoader(train=True)`: DALI's file reader + `fn.random_resized_crop` (DALI's RNG). Built
                  afresh for every timed epoch (pipeline build included): an auto-resetting reader would otherwise
                  start the next epoch's prefetch while the other loaders run and look faster than it is.
  dali_mixed      (CUDA only) `DaliIndexLoader(device="gpu")`: nvJPEG `mixed` decoder (hw_decoder_load 0.65), the
                  augmentation on the GPU.
Method: one warm-up epoch per loader, then ROUNDS rounds in which every loader runs one full epoch in turn (interleaved,
so a busy shared machine slows all of them alike); images/sec = images / wall time of the epoch. The speed-up of a
loader is the median over rounds of its images/sec divided by the PIL loader's in the same round; best and median
images/sec are listed too. Because our 2-core machines are shared, the table also gives images per CPU-second (this
process, all threads, plus its DataLoader worker processes; median over rounds), which a busy machine barely moves: at
equal threads on an idle machine, throughput is about cores x images/CPU-second for both kinds of loader.
Peak memory: the max resident set of this process and of its reaped children (the per-epoch DataLoader workers), from
getrusage, and for GPU loaders torch's peak CUDA allocation (DALI allocates outside torch, so that is only the
handed-over batches).

Run: `.venv/bin/python -m pytest benchmarks -k dali --benchmark-only -s` (or `make bench`). Prints a table and
writes benchmarks/results/dali.json. Target: dali_cpu's speed-up over the PIL DataLoader >= TARGET.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (pip install nvidia-dali-cuda130)")

from nvidia.dali import __version__ as DALI_VERSION  # noqa: E402
from PIL import Image  # noqa: E402

from fastmcl.data import ImageFolderDataset, ShuffleSampler, build_dataloader, imagenet_train_transform  # noqa: E402
from fastmcl.data.dali import DaliIndexLoader, DaliReaderLoader, FileList  # noqa: E402

N_IMAGES = int(os.environ.get("BENCH_DALI_IMAGES", 512))
CLASSES = 10
WIDTH, HEIGHT = 400, 350
SIZE = 224
BATCH = 64
THREADS = int(os.environ.get("BENCH_DALI_THREADS", 2))
ROUNDS = int(os.environ.get("BENCH_DALI_ROUNDS", 5))
TARGET = 1.5
RESULTS = Path(__file__).resolve().parent / "results" / "dali.json"


def make_imagenet_like(root: Path) -> Path:
    rng = np.random.RandomState(0)
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    for i in range(N_IMAGES):
        d = root / f"n{i % CLASSES:08d}"
        d.mkdir(parents=True, exist_ok=True)
        f = rng.uniform(0.005, 0.05, 6)
        ph = rng.uniform(0, 6.3, 6)
        base = np.stack([np.sin(xx * f[c] + ph[c]) * np.cos(yy * f[c + 3] + ph[c + 3]) for c in range(3)], -1)
        img = 128 + 90 * base + rng.normal(0, 12, (HEIGHT, WIDTH, 3))
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(d / f"img_{i:05d}.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return make_imagenet_like(tmp_path_factory.mktemp("bench_dali") / "train")


def _maxrss_mb() -> tuple[float, float]:
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)


_TICK = os.sysconf("SC_CLK_TCK")


def _live_children_cpu() -> float:
    """utime + stime of this process's live child processes (persistent DataLoader workers), from /proc."""
    me, total = os.getpid(), 0.0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me:                     # ppid; fields[11], [12] = utime, stime (after the comm field)
            total += (int(fields[11]) + int(fields[12])) / _TICK
    return total


def _cpu_seconds() -> float:
    """CPU time of this process (all threads: DALI's included) and of its children, live (persistent DataLoader
    workers) and reaped (per-epoch workers)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime + _live_children_cpu()


class Case:
    def __init__(self, name: str, make_epoch, images: int):
        self.name, self.make_epoch, self.images = name, make_epoch, images
        self.rates: list[float] = []
        self.per_cpu_s: list[float] = []

    def run_epoch(self) -> float:
        c0, t0 = _cpu_seconds(), time.perf_counter()
        n = 0
        for x, y, index in self.make_epoch():
            if x.is_cuda:
                torch.cuda.synchronize()
            n += x.shape[0]
        dt = time.perf_counter() - t0
        self.last_per_cpu_s = n / max(_cpu_seconds() - c0, 1e-9)
        assert n == self.images, (self.name, n, self.images)
        return n / dt

    def timed(self) -> None:
        self.rates.append(self.run_epoch())
        self.per_cpu_s.append(self.last_per_cpu_s)


def _cases(root: Path) -> list[Case]:
    files = FileList.from_imagefolder(root)
    n = len(files)
    order = list(ShuffleSampler(n, seed=0))
    images = n // BATCH * BATCH
    ds = ImageFolderDataset(root, imagenet_train_transform(SIZE), aug_seed=0)
    pil_loader = build_dataloader(ds, batch_size=BATCH, train=True, sampler=order, num_workers=THREADS, seed=0,
                                  persistent_workers=True)
    # as TrainData builds it today: workers started afresh every epoch (start-up cost included in each epoch)
    pil_fresh = build_dataloader(ds, batch_size=BATCH, train=True, sampler=order, num_workers=THREADS, seed=0)
    common = dict(batch_size=BATCH, size=SIZE, num_threads=THREADS, seed=0)
    dali_cpu = DaliIndexLoader(files, device="cpu", **common)
    dali_full = DaliIndexLoader(files, device="cpu", roi_decode=False, **common)

    def reader_epoch():
        return iter(DaliReaderLoader(files, device="cpu", train=True, **common))
    cases = [Case("pil", lambda: iter(pil_loader), images),
             Case("pil_fresh_workers", lambda: iter(pil_fresh), images),
             Case("dali_cpu", lambda: dali_cpu.epoch_batches(order, 0), images),
             Case("dali_cpu_full", lambda: dali_full.epoch_batches(order, 0), images),
             Case("dali_reader_cpu", reader_epoch, n // BATCH * BATCH)]
    if torch.cuda.is_available():
        mixed = DaliIndexLoader(files, device="gpu", hw_decoder_load=0.65, **common)
        cases.append(Case("dali_mixed", lambda: mixed.epoch_batches(order, 0), images))
    return cases


def test_dali_vs_pil_throughput(tree, benchmark):
    cases = _cases(tree)
    for case in cases:                      # warm-up: worker start, pipeline build, page cache
        case.run_epoch()
    for _ in range(ROUNDS):
        for case in cases:
            case.timed()
    rss_self, rss_children = _maxrss_mb()
    by_name = {c.name: c for c in cases}
    pil = by_name["pil"]
    rows = []
    for c in cases:
        per_round = [r / p for r, p in zip(c.rates, pil.rates)]     # same round = same machine load
        rows.append({"loader": c.name, "images_per_sec_best": round(max(c.rates), 1),
                     "images_per_sec_median": round(statistics.median(c.rates), 1),
                     "speedup_vs_pil": round(statistics.median(per_round), 2),
                     "images_per_cpu_second": round(statistics.median(c.per_cpu_s), 1),
                     "cpu_efficiency_vs_pil": round(statistics.median(c.per_cpu_s) / statistics.median(pil.per_cpu_s),
                                                    2)})
    # pytest-benchmark's own record: one more timed epoch of the loader TrainData uses with --dali
    benchmark.pedantic(by_name["dali_cpu"].run_epoch, rounds=1, iterations=1)
    report = {"dali_version": DALI_VERSION, "torch": torch.__version__, "machine": platform.machine(),
              "cores": os.cpu_count(), "load_avg_1min": round(os.getloadavg()[0], 2), "images": pil.images,
              "image_size": [WIDTH, HEIGHT], "crop": SIZE, "batch": BATCH, "threads": THREADS, "rounds": ROUNDS,
              "peak_rss_mb": {"self": round(rss_self), "children": round(rss_children)},
              "cuda_peak_mb": round(torch.cuda.max_memory_allocated() / 2**20) if torch.cuda.is_available() else None,
              "results": rows}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2))
    print(f"\nDALI {DALI_VERSION} vs PIL DataLoader: {pil.images} JPEGs {WIDTH}x{HEIGHT} -> {SIZE}, batch {BATCH}, "
          f"{THREADS} threads/workers, {ROUNDS} interleaved epochs (load avg {report['load_avg_1min']} on "
          f"{report['cores']} cores)")
    print(f"{'loader':<19}{'img/s best':>11}{'median':>9}{'x PIL':>8}{'img/CPU-s':>11}{'x PIL':>7}")
    for r in rows:
        print(f"{r['loader']:<19}{r['images_per_sec_best']:>11}{r['images_per_sec_median']:>9}"
              f"{r['speedup_vs_pil']:>8}{r['images_per_cpu_second']:>11}{r['cpu_efficiency_vs_pil']:>7}")
    print("x PIL: median over rounds of (loader / pil) images/sec in the same round; img/CPU-s: median images per "
          "CPU-second")
    print(f"peak RSS: this process {rss_self:.0f} MB, DataLoader workers {rss_children:.0f} MB")
    dali = rows[[r["loader"] for r in rows].index("dali_cpu")]
    assert dali["speedup_vs_pil"] >= TARGET, rows
