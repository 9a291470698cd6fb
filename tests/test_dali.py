"""The NVIDIA DALI input pipeline (fastmcl.data.dali + TrainData --dali) on DALI's CPU backend.

Generated JPEG ImageFolder trees with odd sizes, grayscale, CMYK, PNG data named .jpg and a real .png. Checked: every
image exactly once per epoch with the right label and dataset index; shards that together cover the dataset once;
agreement with the PIL path (val preprocessing, keyed train crops, the CIFAR-style in-memory path); one DataError naming
a corrupt file (no hang); TrainData feeding DALI the same global batches (sampler, ranks, mid-epoch skip) as the PIL
path; the trainer end to end with exact mid-epoch resume. `mixed` (GPU) decoding is covered by @pytest.mark.gpu tests
that skip without CUDA.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (pip install nvidia-dali-cuda130); "
                                          "the DALI pipeline cannot be tested")

from PIL import Image  # noqa: E402

from fastmcl.build import resolve  # noqa: E402
from fastmcl.config import TrainConfig  # noqa: E402
from fastmcl.data import (IMAGENET_MEAN, IMAGENET_STD, DataError, DeviceBatchLoader, ImageFolderDataset,  # noqa: E402
                          ShuffleSampler, imagenet_train_transform, imagenet_val_transform, load_rgb)
from fastmcl.data.dali import (DaliIndexLoader, DaliReaderLoader, FileList, dali_available,  # noqa: E402
                               find_undecodable, resolve_dali_device)
from fastmcl.data._keyhash import view_seed  # noqa: E402
from fastmcl.pipeline import TrainData, detect_source  # noqa: E402
from fastmcl.train import main  # noqa: E402

CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU for DALI's mixed decoder")

# One uint8 level after ImageNet normalisation is 1 / (255 * 0.225) = 0.0174 (the smallest std).
LEVEL = 1.0 / (255.0 * min(IMAGENET_STD))


def _image(rng, w, h):
    """Smooth gradient + texture (JPEG-friendly, not constant)."""
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 200 / w, yy * 200 / h, (xx + yy) * 100 / (w + h)], -1)
    noise = rng.randint(0, 50, (h, w, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def make_tree(root: Path, *, classes=3, per_class=(7, 5), sizes=(40, 130), odd=True, seed=0) -> Path:
    """train/ and val/ with per_class images per class: random (odd) sizes, a grayscale JPEG, a CMYK JPEG, PNG data
    named .jpg and a .png in every class."""
    rng = np.random.RandomState(seed)
    for split, n in zip(("train", "val"), per_class):
        for c in range(classes):
            d = root / split / f"class_{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                w, h = (int(v) | odd for v in rng.randint(sizes[0], sizes[1], 2))
                img = _image(rng, w, h)
                if i == 0:
                    img.convert("L").save(d / f"{i:03d}_gray.jpg", quality=92)
                elif i == 1:
                    img.convert("CMYK").save(d / f"{i:03d}_cmyk.jpg", quality=92)
                elif i == 2:
                    img.save(d / f"{i:03d}_png_named.jpg", format="PNG")
                elif i == 3:
                    img.save(d / f"{i:03d}.png")
                else:
                    img.save(d / f"{i:03d}.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return make_tree(tmp_path_factory.mktemp("dali") / "tree")


@pytest.fixture(scope="module")
def small_tree(tmp_path_factory) -> Path:
    """A CIFAR-style tree: every image 32x32 (routed through the pad-crop recipe)."""
    return make_tree(tmp_path_factory.mktemp("dali_small") / "tree", classes=4, per_class=(8, 4), sizes=(32, 33),
                     odd=False)


@pytest.fixture
def no_hang():
    """Fail (instead of hanging CI) if a test body takes more than 120 s."""
    def boom(signum, frame):
        raise TimeoutError("DALI test hung for 120 s")
    previous = signal.signal(signal.SIGALRM, boom)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def _bounds(mean=IMAGENET_MEAN, std=IMAGENET_STD):
    lo = torch.tensor([-m / s for m, s in zip(mean, std)]).view(1, 3, 1, 1)
    hi = torch.tensor([(1 - m) / s for m, s in zip(mean, std)]).view(1, 3, 1, 1)
    return lo - 1e-4, hi + 1e-4


# ---------------------------------------------------------------------------------------------------------------
# Loaders


def test_dali_imports_and_cpu_default():
    assert dali_available()
    assert resolve_dali_device(None, "cpu") == "cpu"
    assert resolve_dali_device("cpu") == "cpu"
    if not CUDA:
        with pytest.raises(DataError, match="CUDA is not available"):
            resolve_dali_device("gpu")


@pytest.mark.parametrize("channels_last", [False, True], ids=["CHW", "HWC"])
def test_index_loader_every_image_once_with_labels_and_range(tree, channels_last):
    files = FileList.from_imagefolder(tree / "train")
    n = len(files)
    assert n == 21 and files.labels.tolist() == [c for c in range(3) for _ in range(7)]
    loader = DaliIndexLoader(files, batch_size=3, size=24, num_threads=2, channels_last=channels_last, seed=1)
    lo, hi = _bounds()
    sampler = ShuffleSampler(n, seed=5)
    for epoch in range(2):                                # the pipeline is reused across epochs
        sampler.set_epoch(epoch)
        order = list(sampler)
        seen = []
        for x, y, index in loader.epoch_batches(order, epoch):
            assert x.shape == (3, 3, 24, 24) and x.dtype == torch.float32
            if channels_last:   # per-sample HWC from DALI -> NHWC batch -> NCHW-shaped channels_last view
                assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
            else:
                assert x.is_contiguous()
            assert index.dtype == y.dtype == torch.long
            assert torch.equal(y, files.labels[index])
            assert torch.isfinite(x).all() and (x >= lo).all() and (x <= hi).all()
            assert x.std() > 0.1
            seen += index.tolist()
        assert seen == order                               # exactly once, in the sampler's order (21 = 7 x 3)


def test_index_loader_drops_partial_batch_and_survives_abandoned_epoch(tree):
    files = FileList.from_imagefolder(tree / "train")
    loader = DaliIndexLoader(files, batch_size=4, size=16, num_threads=1)
    order = list(range(20, -1, -1))
    assert [i for _, _, idx in loader.epoch_batches(order, 0) for i in idx.tolist()] == order[:20]
    it = loader.epoch_batches(order, 1)
    next(it)
    it.close()                                              # abandoned mid-epoch: stale prefetched batches dropped
    got = [i for _, _, idx in loader.epoch_batches(list(range(8)), 2) for i in idx.tolist()]
    assert got == list(range(8))


# Per-member views (KDCL / PCL): views=V > 1 yields V independently augmented views, view v keyed by view_seed(seed, v)


def _views_vs_single(files, views, **kw):
    """Every batch of a views-V loader next to the V one-view loaders at the view seeds (2 epochs: keyed by epoch)."""
    multi = DaliIndexLoader(files, views=views, **kw)
    seed = kw.pop("seed")
    singles = [DaliIndexLoader(files, seed=view_seed(seed, v), **kw) for v in range(views)]
    order = list(np.random.RandomState(1).permutation(len(files)))
    for epoch in (0, 3):
        want = [list(s.epoch_batches(order, epoch)) for s in singles]
        got = list(multi.epoch_batches(order, epoch))
        assert len(got) == len(order) // kw["batch_size"] and all(len(w) == len(got) for w in want)
        yield epoch, got, want


@pytest.mark.parametrize("style,views,kw", [("cifar", 2, {}), ("cifar", 3, {"channels_last": True}),
                                            ("imagenet", 2, {}), ("imagenet", 3, {"channels_last": True}),
                                            ("imagenet", 2, {"roi_decode": False})],
                         ids=["cifar-2", "cifar-3-HWC", "imagenet-2", "imagenet-3-HWC", "imagenet-2-full-decode"])
def test_index_loader_views_equal_one_view_loaders_at_view_seeds(tree, small_tree, style, views, kw):
    """View v of a views-V loader is bit-identical to a one-view loader with seed=view_seed(seed, v): same crop, same
    flip, same pixels (imagenet: one full decode + an exact slice per view equals image_slice's ROI decode)."""
    root, size = (small_tree, 32) if style == "cifar" else (tree, 24)
    files = FileList.from_imagefolder(root / "train")
    lo, hi = _bounds()
    for epoch, got, want in _views_vs_single(files, views, batch_size=5, size=size, style=style, num_threads=2,
                                             seed=7, **kw):
        for step, (xs, y, index) in enumerate(got):
            assert isinstance(xs, list) and len(xs) == views
            for v, x in enumerate(xs):
                wx, wy, windex = want[v][step]
                assert torch.equal(index, windex) and torch.equal(y, wy) and torch.equal(y, files.labels[index])
                assert x.shape == wx.shape == (5, 3, size, size) and x.dtype == torch.float32
                assert x.stride() == wx.stride()                       # the same layout (channels_last or not)
                assert torch.equal(x, wx), (epoch, step, v, float((x - wx).abs().max()))
                if style == "imagenet":     # cifar normalises with the default ImageNet stats too, but pads zeros
                    assert (x >= lo).all() and (x <= hi).all()
        # the views are different augmentations of the same images
        for a in range(views):
            for b in range(a + 1, views):
                assert all(not torch.equal(xs[a], xs[b]) for xs, _, _ in got)
                assert float(torch.stack([(xs[a] - xs[b]).abs().mean() for xs, _, _ in got]).mean()) > 0.05


def test_index_loader_views_one_is_a_plain_tensor(tree):
    """views=1 (the default) keeps the one-tensor batches; view 0 of a multi-view loader is the plain loader's view."""
    files = FileList.from_imagefolder(tree / "train")
    assert view_seed(11, 0) == 11 and view_seed(11, 1) != 11
    order = list(range(12))
    plain = DaliIndexLoader(files, batch_size=4, size=16, num_threads=2, seed=11)
    one = DaliIndexLoader(files, batch_size=4, size=16, num_threads=2, seed=11, views=1)
    two = DaliIndexLoader(files, batch_size=4, size=16, num_threads=2, seed=11, views=2)
    assert plain.views == one.views == 1 and two.views == 2 and two.view_seeds == (11, view_seed(11, 1))
    for (x, y, i), (ox, oy, oi), (xs, ty, ti) in zip(plain.epoch_batches(order, 2), one.epoch_batches(order, 2),
                                                     two.epoch_batches(order, 2), strict=True):
        assert isinstance(x, torch.Tensor) and torch.equal(x, ox) and torch.equal(i, oi) and torch.equal(y, oy)
        assert torch.equal(xs[0], x) and torch.equal(ti, i) and torch.equal(ty, y)


@pytest.mark.parametrize("views", [0, -1, 1.5, True, "2", None])
def test_index_loader_rejects_bad_views(tree, views):
    with pytest.raises(DataError, match="views: expected an integer >= 1") as e:
        DaliIndexLoader(tree / "train", batch_size=2, size=16, num_threads=1, views=views)
    assert isinstance(e.value, ValueError)


def test_file_list_with_index_label_column(tree, tmp_path):
    """A DALI file list whose label column is the sample index; the class comes from a tensor lookup."""
    files = FileList.from_imagefolder(tree / "val")
    list_file = files.write(tmp_path / "val.txt", label_is_index=True)
    assert list_file.read_text().splitlines()[4].endswith(" 4")
    as_index = FileList.from_file(list_file)
    assert as_index.paths == tuple(os.path.abspath(p) for p in files.paths)
    assert as_index.labels.tolist() == list(range(len(files)))
    relative = tmp_path / "rel.txt"
    relative.write_text("# comment\n\n" + "".join(f"{Path(p).relative_to(tree)} {c}\n"
                                                  for p, c in zip(files.paths, files.labels.tolist())))
    rel = FileList.from_file(relative, root=tree)
    loader = DaliReaderLoader(rel, batch_size=4, size=16, num_threads=1)
    got = {}
    for _, y, index in loader:
        got.update(zip(index.tolist(), y.tolist()))
    assert got == dict(enumerate(files.labels.tolist()))
    with pytest.raises(DataError, match="rel.txt:1"):
        relative.write_text("just-a-path\n")
        FileList.from_file(relative)


@pytest.mark.parametrize("num_shards", [1, 2])
def test_val_reader_shards_cover_dataset_exactly_once(tree, num_shards):
    files = FileList.from_imagefolder(tree / "val")                       # 15 images
    per_rank, steps = [], set()
    for shard in range(num_shards):
        loader = DaliReaderLoader(files, batch_size=4, size=16, shard_id=shard, num_shards=num_shards, num_threads=1)
        for epoch in range(2):
            got, nsteps = [], 0
            for x, y, index in loader:
                assert torch.equal(y, files.labels[index]) and x.shape[1:] == (3, 16, 16)
                got += index.tolist()
                nsteps += 1
            assert len(got) == loader.num_samples() and len(set(got)) == len(got)   # padding trimmed
            steps.add((nsteps, len(loader)))
            if epoch == 0:
                per_rank.append(got)
            else:
                assert got == per_rank[-1]                                          # in order, every epoch
    everything = [i for part in per_rank for i in part]
    assert sorted(everything) == list(range(len(files)))                            # each image counted once
    assert len(steps) == 1 and next(iter(steps))[0] == next(iter(steps))[1]         # every rank: same step count


def test_train_reader_shards_partition_each_epoch(tree):
    """The DALI-RNG training reader: shard_id/num_shards/pad_last_batch + DROP; the two shards never overlap."""
    files = FileList.from_imagefolder(tree / "train")                     # 21 images, shards of 11 (padded)
    loaders = [DaliReaderLoader(files, batch_size=3, size=20, train=True, shard_id=s, num_shards=2, num_threads=1,
                                seed=3) for s in range(2)]
    lo, hi = _bounds()
    for epoch in range(2):
        parts = []
        for loader in loaders:
            got = []
            for x, y, index in loader:
                assert x.shape == (3, 3, 20, 20) and torch.equal(y, files.labels[index])
                assert (x >= lo).all() and (x <= hi).all()
                got += index.tolist()
            assert len(got) == len(loader) * 3 == 9                             # DROP: 3 full batches per rank
            parts.append(got)
        assert not set(parts[0]) & set(parts[1])
        assert len(set(parts[0]) | set(parts[1])) == 18


# ---------------------------------------------------------------------------------------------------------------
# Agreement with the PIL path


@pytest.mark.parametrize("size,resize", [(224, 256), (24, 28), (33, 37), (24, 20)],
                         ids=["224-from-256", "24-from-28", "odd-33-from-37", "crop-larger-than-resize"])
def test_val_preprocessing_matches_pil(tree, size, resize):
    """Resize (shorter side) + centre crop + normalise, DALI vs imagenet_val_transform, on every val image (odd sizes,
    gray, CMYK, PNG; up- and downscaled): the same output size and crop offsets, pixels apart only by the resize
    filters (docs/data.md "DALI"). Tolerance in uint8 levels: max <= 3, mean <= 0.25, at most 1 % more than 1 apart."""
    ds = ImageFolderDataset(tree / "val", imagenet_val_transform(size, resize))
    loader = DaliReaderLoader(tree / "val", batch_size=4, size=size, resize=resize, num_threads=2)
    count = 0
    for x, y, index in loader:
        assert x.shape[1:] == (3, size, size)
        for k, i in enumerate(index.tolist()):
            ref, label, _ = ds[i]
            assert label == int(y[k])
            d = (x[k] - ref).abs() / LEVEL
            name = ds.samples[i][0]
            assert float(d.max()) <= 3.01, (name, float(d.max()))
            assert float(d.mean()) <= 0.25, (name, float(d.mean()))
            assert float((d > 1.01).float().mean()) <= 0.01, (name, float((d > 1.01).float().mean()))
            count += 1
    assert count == len(ds) == 15


@pytest.mark.parametrize("roi_decode", [True, False], ids=["roi-decode", "full-decode"])
def test_train_crops_and_flips_match_pil_keyed_path(tree, roi_decode):
    """The DALI train feed draws RandomResizedCrop + flip with the PIL path's keyed generator (seed, epoch, index):
    the same boxes and flips, whether DALI decodes just the box (ROI decoding, the default) or the whole image.
    Pixels differ by the resize filters only: mean |diff| below 1 uint8 level per image; a different epoch's draw
    (other boxes) differs far more, so the check is sensitive."""
    files = FileList.from_imagefolder(tree / "train")
    loader = DaliIndexLoader(files, batch_size=7, size=32, num_threads=2, seed=11, roi_decode=roi_decode)
    ds = ImageFolderDataset(tree / "train", imagenet_train_transform(32), aug_seed=11)
    order = list(range(21))
    ds.set_epoch(3)
    close, other = [], []
    for x, _, index in loader.epoch_batches(order, 3):
        for k, i in enumerate(index.tolist()):
            close.append(float((x[k] - ds[i][0]).abs().mean()))
    ds.set_epoch(4)
    for x, _, index in loader.epoch_batches(order, 3):
        for k, i in enumerate(index.tolist()):
            other.append(float((x[k] - ds[i][0]).abs().mean()))
    assert max(close) < LEVEL, close
    assert np.median(other) > 10 * max(close), (other, close)


def test_cifar_style_matches_in_memory_device_loader(small_tree):
    """<= 64 px trees under DALI: resize to S + zero-pad-4 crop + flip keyed like DeviceBatchLoader (the in-memory
    path). Same crops and flips; JPEG decode (libjpeg-turbo) identical up to 1 level of the dataset-normalised value."""
    files = FileList.from_imagefolder(small_tree / "train")
    mean, std = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)
    loader = DaliIndexLoader(files, batch_size=8, size=32, style="cifar", mean=mean, std=std, num_threads=2, seed=7)
    images = torch.stack([torch.from_numpy(np.array(load_rgb(p))).permute(2, 0, 1) for p in files.paths])
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(0)).tolist()
    ref = DeviceBatchLoader(images, files.labels, batch_size=8, sampler=order, train=True, mean=mean, std=std,
                            aug_seed=7)
    ref.set_epoch(2)
    level = 1.0 / (255 * min(std))
    for (x, y, index), (rx, ry, rindex) in zip(loader.epoch_batches(order, 2), ref, strict=True):
        assert torch.equal(index, rindex) and torch.equal(y, ry)
        assert float((x - rx).abs().max()) <= 1.01 * level


# ---------------------------------------------------------------------------------------------------------------
# Corrupt files


def _corrupt_tree(tmp_path: Path, kind: str) -> tuple[Path, Path]:
    """A tree whose class_1 (train and val) holds 005_bad.jpg, made from a good JPEG:
    invalid-marker: intact headers, then bytes that break the marker structure (DALI: "nvImageCodec failure");
    truncated: the headers and the first eighth of the scan: every crop box reaches below it, so ROI decoding fails
    too (DALI: "Failed to decode sample");
    not-an-image: text (the header parse fails before DALI sees it; the val reader hands it to DALI)."""
    root = make_tree(tmp_path / "tree", classes=2, per_class=(6, 6))
    data = (root / "train" / "class_1" / "004.jpg").read_bytes()
    sos = data.find(b"\xff\xda")
    scan = sos + 2 + int.from_bytes(data[sos + 2:sos + 4], "big")
    bad = {"invalid-marker": data[:sos - 40] + b"\x00garbage" * 60,
           "truncated": data[:scan + (len(data) - scan) // 8],
           "not-an-image": b"this is not a JPEG at all" * 10}[kind]
    for split in ("train", "val"):
        (root / split / "class_1" / "005_bad.jpg").write_bytes(bad)
    return root, root / "train" / "class_1" / "005_bad.jpg"


@pytest.mark.parametrize("kind", ["invalid-marker", "truncated", "not-an-image"])
def test_corrupt_jpeg_one_error_naming_the_file(tmp_path, kind, no_hang):
    root, bad = _corrupt_tree(tmp_path, kind)
    files = FileList.from_imagefolder(root / "train")
    bad_index = files.paths.index(str(bad))
    others = [i for i in range(len(files)) if i != bad_index]
    order = others[:5] + [bad_index] + others[5:]                  # in the 3rd batch of 2, behind the prefetch
    loader = DaliIndexLoader(files, batch_size=2, size=16, num_threads=2)
    seen = []
    with pytest.raises(DataError) as err:
        for _, _, index in loader.epoch_batches(order, 0):
            seen += index.tolist()
    assert "005_bad.jpg" in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert bad_index not in seen
    # the pipeline was dead: the loader rebuilds it, and an epoch without the bad file runs
    assert [i for _, _, idx in loader.epoch_batches(others[:8], 1) for i in idx.tolist()] == others[:8]
    val = DaliReaderLoader(root / "val", batch_size=3, size=16, num_threads=2)
    with pytest.raises(DataError, match="005_bad.jpg"):
        for _ in val:
            pass


def test_missing_file_is_one_clear_error(tmp_path, no_hang):
    root = make_tree(tmp_path / "tree", classes=2, per_class=(4, 2))
    files = FileList.from_imagefolder(root / "train")
    os.remove(files.paths[5])
    loader = DaliIndexLoader(files, batch_size=2, size=16, num_threads=1)
    with pytest.raises(DataError, match=f"image file not found: {files.paths[5]}"):
        list(loader.epoch_batches(range(8), 0))
    assert len(list(loader.epoch_batches([0, 1, 2, 3], 1))) == 2


def test_find_undecodable_pil_first_then_dali_one_by_one(tmp_path, monkeypatch):
    root, bad = _corrupt_tree(tmp_path, "invalid-marker")
    paths = [str(p) for p in sorted((root / "train").rglob("*.jpg"))]
    path, why = find_undecodable(paths)
    assert path == str(bad) and str(bad) in why
    assert find_undecodable([p for p in paths if p != str(bad)]) is None       # DALI decodes every good file
    # a file PIL would accept but DALI rejects: found by the one-by-one DALI check
    import fastmcl.data.dali.diagnosis as diagnosis
    monkeypatch.setattr(diagnosis, "load_rgb", lambda p: None)
    path, why = find_undecodable(paths)
    assert path == str(bad) and "DALI's decoder rejects it" in why


def test_trainer_dali_corrupt_file_exits_with_one_line(tmp_path, capsys, no_hang):
    root, _ = _corrupt_tree(tmp_path, "invalid-marker")
    rc = main(["--data", str(root), "--dali", "--dali-device", "cpu", "--batch-size", "4", "--image-size", "16",
               "--method", "dml", "--epochs", "1", "--no-progress", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "005_bad.jpg" in err and err.count("\n") == 0, err


# ---------------------------------------------------------------------------------------------------------------
# TrainData / trainer


def _cfg(root: Path, **kw) -> TrainConfig:
    cfg = TrainConfig(data=str(root), workers=0, **kw)
    source = detect_source(cfg)
    return resolve(cfg, cifar_style=source.cifar_style, demo=source.demo).cfg, source


@pytest.mark.parametrize("m_per_class,rank_split", [(0, False), (2, False), (2, True)],
                         ids=["shuffle", "m-per-class", "2-ranks"])
def test_traindata_dali_feeds_the_same_global_batches_as_pil(tree, m_per_class, rank_split):
    """--dali TrainData: the same sampler, the same global batches (ranks concatenated), the same mid-epoch skip, and
    (ImageNet style, > 64 px) the same keyed crops as the PIL DataLoader path."""
    cfg, source = _cfg(tree, batch_size=6, image_size=72, dali=True, dali_device="cpu", dali_threads=2)
    pil_cfg, _ = _cfg(tree, batch_size=6, image_size=72)
    assert not source.cifar_style
    world = 2 if rank_split else 1
    dali = [TrainData(cfg, source, torch.device("cpu"), m_per_class=m_per_class, rank=r, world_size=world)
            for r in range(world)]
    pil = TrainData(pil_cfg, source, torch.device("cpu"), m_per_class=m_per_class)
    assert dali[0].steps_per_epoch() == pil.steps_per_epoch() == 3 and "DALI" in dali[0].loader_name
    for epoch, skip in ((0, 0), (1, 1)):
        want = [(x, y, i) for x, y, i in pil.train_batches(epoch, skip)]
        got = [list(d.train_batches(epoch, skip)) for d in dali]
        assert len(want) == 3 - skip and all(len(g) == len(want) for g in got)
        for step, (wx, wy, wi) in enumerate(want):
            x = torch.cat([g[step][0] for g in got])
            y = torch.cat([g[step][1] for g in got])
            index = torch.cat([g[step][2] for g in got])
            assert torch.equal(index, wi) and torch.equal(y, wy)
            if m_per_class:
                assert torch.bincount(y).max() <= 6 and (torch.bincount(y)[torch.bincount(y) > 0] % 2 == 0).all()
            assert float((x - wx).abs().mean()) < LEVEL
    # validation: sharded over the ranks, each image once
    val_idx = sorted(i for d in dali for _, _, idx in d.val_batches() for i in idx.tolist())
    assert val_idx == list(range(15))


def test_traindata_dali_small_tree_matches_in_memory_path(small_tree):
    """<= 64 px trees (the digits demo's route) under --dali: DALI decodes them (no in-memory copy), normalises with
    the tree's own mean/std as the in-memory path does, and yields that path's batches (same indices, crops, flips)."""
    cfg, source = _cfg(small_tree, batch_size=8, dali=True, dali_device="cpu", dali_threads=2)
    mem_cfg, _ = _cfg(small_tree, batch_size=8)
    assert source.cifar_style and cfg.image_size == 32
    dali = TrainData(cfg, source, torch.device("cpu"), m_per_class=2)
    mem = TrainData(mem_cfg, source, torch.device("cpu"), m_per_class=2)
    assert dali.loader_name.startswith("DALI") and mem.loader_name == "in-memory tensors on the device"
    mean, std = mem.batches.mean, mem.batches.std
    assert np.allclose(dali.batches.mean, mean, atol=1e-6) and np.allclose(dali.batches.std, std, atol=1e-6)
    level = 1.0 / (255 * min(std))
    for (x, y, index), (mx, my, mindex) in zip(dali.train_batches(1, 1), mem.train_batches(1, 1), strict=True):
        assert torch.equal(index, mindex) and torch.equal(y, my)
        assert float((x - mx).abs().max()) <= 1.01 * level
    got = sorted(i for _, _, idx in dali.val_batches() for i in idx.tolist())
    assert got == list(range(16))


def test_traindata_dali_refuses_non_image_data(tmp_path):
    cfg, source = _cfg("synthetic", dali=True, image_size=16)
    with pytest.raises(DataError, match="--dali decodes image files"):
        TrainData(cfg, source, torch.device("cpu"), m_per_class=0)


def test_traindata_dali_gpu_needs_cuda_device(tree):
    cfg, source = _cfg(tree, batch_size=6, image_size=72, dali=True, dali_device="gpu")
    with pytest.raises(DataError, match="dali-device gpu"):
        TrainData(cfg, source, torch.device("cpu"), m_per_class=0)


@pytest.mark.parametrize("flag,value,match", [("--dali-device", "tpu", "dali-device"),
                                              ("--hw-decoder-load", "1.5", "hw-decoder-load"),
                                              ("--dali-threads", "0", "dali-threads"),
                                              ("--dali-prefetch", "0", "dali-prefetch")])
def test_cli_rejects_bad_dali_flags(tmp_path, capsys, flag, value, match):
    rc = main(["--data", "synthetic", "--dali", flag, value, "--out", str(tmp_path / "r"), "--no-progress"])
    assert rc == 2 and match in capsys.readouterr().err


@pytest.mark.parametrize("field,value,match", [("dali_device", "tpu", "--dali-device"),
                                               ("hw_decoder_load", 1.5, "--hw-decoder-load"),
                                               ("dali_threads", 0, "--dali-threads"),
                                               ("dali_prefetch", 0, "--dali-prefetch")])
def test_traindata_checks_dali_options_before_the_source(field, value, match):
    """The data layer checks the DALI options itself (whatever the config validated), before refusing the source."""
    cfg, source = _cfg("synthetic", dali=True, image_size=16)
    with pytest.raises(DataError, match=match):
        TrainData(dataclasses.replace(cfg, **{field: value}), source, torch.device("cpu"), m_per_class=0)


def test_trainer_dali_cpu_end_to_end_with_exact_resume(small_tree, tmp_path):
    """`--dali --dali-device cpu` on a small ImageFolder (CIFAR-style route, in-batch MCL with m per class):
    4 steps straight == 2 steps + resume mid-epoch + 2 steps (the DALI feed restarts after 2 global batches)."""
    from run_checks import assert_resume_is_exact
    base = ["--data", str(small_tree), "--dali", "--dali-device", "cpu", "--dali-threads", "2", "--batch-size", "8",
            "--m-per-class", "2", "--image-size", "16", "--method", "mcl", "--no-memory-bank", "--epochs", "2",
            "--no-progress", "--deterministic", "--log-every", "1"]
    full = assert_resume_is_exact(base, tmp_path)                       # 32 images / 8: one epoch
    assert (full / "checkpoints" / "last.pt").exists()


def test_import_without_dali_is_clean(tree):
    """`import fastmcl.data` works when nvidia.dali cannot be imported, and --dali then fails with one clear line."""
    code = ("import sys; sys.modules['nvidia.dali'] = None\n"
            "import fastmcl.data as d, fastmcl.pipeline\n"
            "assert not d.dali_available()\n"
            "from fastmcl.train import main\n"
            f"sys.exit(main(['--data', {str(tree)!r}, '--dali', '--image-size', '72', '--no-progress', "
            f"'--out', {str(tree.parent / 'nodali')!r}]))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "DALI does not import" in r.stderr and "nvidia-dali-cuda130" in r.stderr


# ---------------------------------------------------------------------------------------------------------------
# GPU (mixed decoder): skipped without CUDA


@gpu
@needs_cuda
@pytest.mark.parametrize("channels_last", [False, True], ids=["CHW", "HWC"])
def test_gpu_mixed_decoder_train_batches(tree, channels_last):
    files = FileList.from_imagefolder(tree / "train")
    loader = DaliIndexLoader(files, batch_size=7, size=32, device="gpu", hw_decoder_load=0.65,
                             channels_last=channels_last, num_threads=2, seed=11)
    cpu = DaliIndexLoader(files, batch_size=7, size=32, device="cpu", channels_last=channels_last, num_threads=2,
                          seed=11)
    order = list(range(21))
    for (x, y, index), (cx, cy, cindex) in zip(loader.epoch_batches(order, 0), cpu.epoch_batches(order, 0),
                                               strict=True):
        assert x.is_cuda and y.is_cuda and index.is_cuda and x.shape == (7, 3, 32, 32)
        assert x.is_contiguous(memory_format=torch.channels_last) == channels_last
        assert torch.equal(index.cpu(), cindex) and torch.equal(y.cpu(), cy)
        # nvJPEG (GPU IDCT/upsampling) vs libjpeg-turbo: a few levels apart on average at most
        assert float((x.cpu() - cx).abs().mean()) < 3 * LEVEL


@gpu
@needs_cuda
@pytest.mark.parametrize("style", ["imagenet", "cifar"])
def test_gpu_mixed_decoder_views(tree, small_tree, style):
    """views=2 on the mixed decoder: one nvJPEG decode per image, two crop branches on the GPU. View v against a
    one-view GPU loader at view_seed(seed, v) (imagenet: that one ROI-decodes the box with nvJPEG, the views crop a
    full decode, so allow decoder-level differences) and against the CPU backend's views."""
    root, size = (small_tree, 32) if style == "cifar" else (tree, 24)
    files = FileList.from_imagefolder(root / "train")
    common = dict(batch_size=5, size=size, style=style, num_threads=2)
    multi = DaliIndexLoader(files, device="gpu", views=2, seed=5, **common)
    cpu = DaliIndexLoader(files, device="cpu", views=2, seed=5, **common)
    singles = [DaliIndexLoader(files, device="gpu", seed=view_seed(5, v), **common) for v in range(2)]
    order = list(range(len(files)))
    want = [list(s.epoch_batches(order, 1)) for s in singles]
    for step, ((xs, y, index), (cxs, cy, cindex)) in enumerate(zip(multi.epoch_batches(order, 1),
                                                                 cpu.epoch_batches(order, 1), strict=True)):
        assert len(xs) == 2 and torch.equal(index.cpu(), cindex) and torch.equal(y.cpu(), cy)
        for v in range(2):
            wx, _, windex = want[v][step]
            assert xs[v].is_cuda and xs[v].shape == (5, 3, size, size) and torch.equal(index, windex)
            assert float((xs[v] - wx).abs().mean()) < LEVEL
            assert float((xs[v].cpu() - cxs[v]).abs().mean()) < 3 * LEVEL
        assert not torch.equal(xs[0], xs[1])


@gpu
@needs_cuda
def test_gpu_mixed_decoder_val_matches_cpu(tree):
    gpu_loader = DaliReaderLoader(tree / "val", batch_size=4, size=24, resize=28, device="gpu", num_threads=2)
    cpu_loader = DaliReaderLoader(tree / "val", batch_size=4, size=24, resize=28, device="cpu", num_threads=2)
    n = 0
    for (x, y, index), (cx, cy, cindex) in zip(gpu_loader, cpu_loader, strict=True):
        assert x.is_cuda and torch.equal(index.cpu(), cindex) and torch.equal(y.cpu(), cy)
        assert float((x.cpu() - cx).abs().mean()) < 3 * LEVEL
        n += len(index)
    assert n == 15


@gpu
@needs_cuda
def test_gpu_corrupt_jpeg_one_error(tmp_path, no_hang):
    root, bad = _corrupt_tree(tmp_path, "invalid-marker")
    loader = DaliIndexLoader(root / "train", batch_size=2, size=16, device="gpu", num_threads=2)
    with pytest.raises(DataError, match="005_bad.jpg"):
        for _ in loader.epoch_batches(list(range(len(loader.files))), 0):
            pass


@gpu
@needs_cuda
def test_gpu_trainer_dali_mixed_end_to_end(small_tree, tmp_path):
    rc = main(["--data", str(small_tree), "--dali", "--device", "cuda", "--batch-size", "8", "--m-per-class", "2",
               "--image-size", "16", "--method", "lmcl", "--no-memory-bank", "--epochs", "1", "--channels-last",
               "--hw-decoder-load", "0.5", "--no-progress", "--out", str(tmp_path / "run")])
    assert rc == 0
