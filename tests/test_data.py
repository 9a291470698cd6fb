"""Data layer: digits tree, ImageFolder, transforms, CIFAR pickles, samplers, loaders (CPU, no torchvision)."""
from __future__ import annotations

import io
import json
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

import fastmcl.data as D
from fastmcl.data import DataError
from fastmcl.data import digits as digits_mod
from support.tensor_dataset import TensorImageDataset


# ----------------------------------------------------------------------------------------------------------------
# digits


@pytest.fixture(scope="module")
def digits_tree(tmp_path_factory):
    return D.ensure_digits_imagefolder(tmp_path_factory.mktemp("data"))


def _listing(tree):
    return sorted(str(p.relative_to(tree)) for p in tree.rglob("*.jpg"))


def test_digits_tree_counts_and_decode(digits_tree):
    from sklearn.datasets import load_digits

    targets = load_digits().target
    assert digits_tree.name == "digits32"
    for part in ("train", "val"):
        assert sorted(p.name for p in (digits_tree / part).iterdir()) == [str(c) for c in range(10)]
    n_train = n_val = 0
    for c in range(10):
        n = int((targets == c).sum())
        v = len(list((digits_tree / "val" / str(c)).glob("*.jpg")))
        t = len(list((digits_tree / "train" / str(c)).glob("*.jpg")))
        assert v == round(0.2 * n) and t + v == n
        n_train += t
        n_val += v
    assert (n_train, n_val) == (1438, 359)
    # every file's name is its load_digits index and sits in its true class folder
    for rel in _listing(digits_tree)[::97]:
        part, cls, name = rel.split(os.sep)
        assert int(targets[int(name[:-4])]) == int(cls)
        with Image.open(digits_tree / rel) as im:
            assert im.format == "JPEG" and im.size == (32, 32) and im.mode == "RGB"
    manifest = json.loads((digits_tree / ".complete").read_text())
    assert manifest["counts"]["val"]["0"] == round(0.2 * int((targets == 0).sum()))


def test_digits_idempotent_and_split_fixed(digits_tree):
    from sklearn.datasets import load_digits

    before = _listing(digits_tree)
    mtime = (digits_tree / ".complete").stat().st_mtime_ns
    assert D.ensure_digits_imagefolder(digits_tree.parent) == digits_tree
    assert (digits_tree / ".complete").stat().st_mtime_ns == mtime          # not rewritten
    assert _listing(digits_tree) == before
    split = digits_mod._split(load_digits().target)
    assert split == digits_mod._split(load_digits().target)                # fixed seed
    assert sorted(int(p.stem) for p in (digits_tree / "val").rglob("*.jpg")) == split["val"]
    assert not [p for p in digits_tree.parent.iterdir() if p.name.startswith(".digits32.tmp")]


def test_digits_crash_leaves_no_tree(tmp_path, monkeypatch):
    calls = {"n": 0}
    real_save = Image.Image.save

    def flaky_save(self, *a, **k):
        calls["n"] += 1
        if calls["n"] > 5:
            raise OSError(28, "No space left on device")
        return real_save(self, *a, **k)

    monkeypatch.setattr(Image.Image, "save", flaky_save)
    with pytest.raises(DataError, match="No space left"):
        D.ensure_digits_imagefolder(tmp_path)
    assert not (tmp_path / "digits32").exists()
    assert list(tmp_path.iterdir()) == []                                   # temp tree removed too


def test_digits_incomplete_existing_tree_is_reported(tmp_path):
    (tmp_path / "digits32" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="digits32.*not a complete"):
        D.ensure_digits_imagefolder(tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# ImageFolder


def _save(path, img, fmt, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt, **kw)


@pytest.fixture()
def mixed_tree(tmp_path):
    rng = np.random.RandomState(0)
    root = tmp_path / "imgs"
    gray = Image.fromarray(rng.randint(0, 256, (7, 13), dtype=np.uint8), "L")
    _save(root / "cat" / "a_gray.jpg", gray, "JPEG")
    cmyk = Image.fromarray(rng.randint(0, 256, (9, 11, 4), dtype=np.uint8), "CMYK")
    _save(root / "cat" / "b_cmyk.JPG", cmyk, "JPEG")
    pal = Image.fromarray(rng.randint(0, 256, (5, 6, 3), dtype=np.uint8), "RGB").convert("P")
    _save(root / "dog" / "c_pal.png", pal, "PNG", transparency=0)
    rgba = Image.fromarray(rng.randint(0, 256, (6, 5, 4), dtype=np.uint8), "RGBA")
    _save(root / "dog" / "sub" / "d_rgba.PNG", rgba, "PNG")
    i16 = Image.fromarray(np.full((4, 3), 65535, dtype=np.uint16))
    _save(root / "dog" / "sub" / "e_16bit.png", i16, "PNG")
    (root / "dog" / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    return root


def test_imagefolder_labels_indices_and_rgb(mixed_tree):
    ds = D.ImageFolderDataset(mixed_tree)
    assert ds.classes == ["cat", "dog"] and ds.class_to_idx == {"cat": 0, "dog": 1}
    names = [os.path.basename(p) for p, _ in ds.samples]
    assert names == ["a_gray.jpg", "b_cmyk.JPG", "c_pal.png", "d_rgba.PNG", "e_16bit.png"]
    assert ds.targets == [0, 0, 1, 1, 1] and ds.labels.dtype == torch.long
    assert ds.labels.tolist() == ds.targets
    sizes = [(7, 13), (9, 11), (5, 6), (6, 5), (4, 3)]
    for i in range(len(ds)):
        x, y, idx = ds[i]
        assert idx == i and y == ds.targets[i]
        assert x.dtype == torch.float32 and x.shape == (3, *sizes[i])
        assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    g = ds[0][0]
    assert torch.equal(g[0], g[1]) and torch.equal(g[1], g[2])             # grayscale -> R=G=B
    assert torch.allclose(ds[4][0], torch.ones(3, 4, 3))                    # 16-bit white stays white
    for p, _ in ds.samples:
        assert D.load_rgb(p).mode == "RGB"


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DataError, match="not found.*nope"):
        D.ImageFolderDataset(tmp_path / "nope")
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "flat" / "x.jpg")
    with pytest.raises(DataError, match="no class folders"):
        D.ImageFolderDataset(tmp_path / "flat")
    root = tmp_path / "r"
    _save(root / "a" / "x.png", Image.new("RGB", (4, 4)), "PNG")
    (root / "b_empty").mkdir()
    (root / "b_empty" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="b_empty") as e:
        D.ImageFolderDataset(root)
    assert "\n" not in str(e.value)


def test_imagefolder_corrupt_jpeg_named(tmp_path):
    root = tmp_path / "r"
    _save(root / "a" / "good.jpg", Image.new("RGB", (8, 8), (10, 20, 30)), "JPEG")
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 0, 0)).save(buf, format="JPEG")
    bad = root / "a" / "bad.jpg"
    bad.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])             # truncated
    (root / "b").mkdir()
    (root / "b" / "garbage.jpeg").write_bytes(b"this is not a jpeg at all")
    ds = D.ImageFolderDataset(root)
    for i, (path, _) in enumerate(ds.samples):
        if path.endswith("good.jpg"):
            assert ds[i][0].shape == (3, 8, 8)
            continue
        with pytest.raises(DataError) as e:
            ds[i]
        assert path in str(e.value) and "\n" not in str(e.value)
    # re-raised from a DataLoader worker (torch's ExceptionWrapper.reraise, what the main process runs) the message
    # is still one line naming the file. (A real worker run costs ~5 s: torch joins an errored worker with a timeout.)
    from torch._utils import ExceptionWrapper

    bad_i = next(i for i, (p, _) in enumerate(ds.samples) if p.endswith("bad.jpg"))
    try:
        ds[bad_i]
    except DataError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(DataError) as e:
        wrapped.reraise()
    msg = str(e.value)
    assert "\n" not in msg and "bad.jpg" in msg and "worker" in msg


# ----------------------------------------------------------------------------------------------------------------
# transforms


def _grid_image(w, h):
    a = np.arange(w * h * 3, dtype=np.int64).reshape(h, w, 3) % 251
    return Image.fromarray(a.astype(np.uint8), "RGB")


def test_train_transform_shapes_ranges_and_reproducible():
    img = _grid_image(50, 37)
    t = D.imagenet_train_transform(32)
    torch.manual_seed(0)
    a = t(img)
    torch.manual_seed(0)
    b = t(img)
    assert a.shape == (3, 32, 32) and a.dtype == torch.float32 and torch.equal(a, b)
    lo = (0 - max(D.IMAGENET_MEAN)) / min(D.IMAGENET_STD)
    hi = (1 - min(D.IMAGENET_MEAN)) / min(D.IMAGENET_STD)
    assert lo - 1e-5 <= float(a.min()) and float(a.max()) <= hi + 1e-5
    raw = D.Compose([D.RandomResizedCrop((20, 24)), D.ToTensorNormalize(None, None)])(img)
    assert raw.shape == (3, 20, 24) and 0 <= float(raw.min()) and float(raw.max()) <= 1
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(t(img, generator=g1), t(img, generator=g2))
    params = {D.RandomResizedCrop.get_params(50, 37, (0.08, 1.0), (0.75, 4 / 3)) for _ in range(20)}
    assert len(params) > 1
    for i, j, h, w in params:
        assert 0 <= i and i + h <= 37 and 0 <= j and j + w <= 50


def test_random_resized_crop_fallback_center():
    # scale > 1: no try can fit, so the fallback central crop with the ratio clamped to [3/4, 4/3] is used
    assert D.RandomResizedCrop.get_params(100, 30, (2.0, 3.0), (0.75, 4 / 3)) == (0, 30, 30, 40)
    assert D.RandomResizedCrop.get_params(30, 100, (2.0, 3.0), (0.75, 4 / 3)) == (30, 0, 40, 30)
    assert D.RandomResizedCrop.get_params(40, 36, (2.0, 3.0), (0.75, 4 / 3)) == (0, 0, 36, 40)


def test_val_transform_is_resize_then_center_crop():
    img = _grid_image(8, 6)
    x = D.imagenet_val_transform(4, resize=6)(img)                          # shorter side already 6: no resample
    a = torch.from_numpy(np.asarray(img)[1:5, 2:6].copy()).permute(2, 0, 1).float() / 255
    m = torch.tensor(D.IMAGENET_MEAN).view(3, 1, 1)
    s = torch.tensor(D.IMAGENET_STD).view(3, 1, 1)
    assert torch.allclose(x, (a - m) / s, atol=1e-6)
    # with a real resize: shorter side -> 5, long side truncated as torchvision (13*5/7 = 9.28 -> 9)
    img = _grid_image(13, 7)
    assert D.Resize(5)(img).size == (9, 5)
    assert D.Resize((4, 6))(img).size == (6, 4)
    y = D.Compose([D.Resize(5), D.CenterCrop(4), D.ToTensorNormalize(None, None)])(img)
    ref = np.asarray(img.resize((9, 5), Image.Resampling.BILINEAR))[0:4, 2:6]   # top=round(0.5)=0, left=round(2.5)=2
    assert torch.equal(y, torch.from_numpy(ref.copy()).permute(2, 0, 1).float() / 255)
    assert D.imagenet_val_transform(224).transforms[0].size == 256
    # center crop larger than the image pads with zeros
    z = D.Compose([D.CenterCrop(5), D.ToTensorNormalize(None, None)])(Image.new("RGB", (3, 3), (255, 255, 255)))
    assert z.shape == (3, 5, 5) and float(z[:, 0].sum()) == 0 and float(z[:, 1:4, 1:4].min()) == 1


def test_cifar_augment_matches_reference_and_keyed():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    g = torch.Generator().manual_seed(3)
    out = D.cifar_augment(x, generator=g)
    from fastmcl.data.transforms import crop_flip_params

    dy, dx, fl = crop_flip_params(6, 4, x.device, torch.Generator().manual_seed(3))
    pad = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for b in range(6):
        ref = pad[b, :, dy[b]:dy[b] + 32, dx[b]:dx[b] + 32]
        if fl[b]:
            ref = ref.flip(-1)
        assert torch.equal(out[b], ref)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    assert torch.equal(D.cifar_augment(x, padding=0, flip=False), x)
    cl = D.cifar_augment(x.float().contiguous(memory_format=torch.channels_last))
    assert cl.is_contiguous(memory_format=torch.channels_last)
    # keyed: a sample's crop does not depend on its batch
    idx = torch.tensor([5, 17, 2, 99, 3, 40])
    full = D.cifar_augment(x, index=idx, seed=1, epoch=2)
    part = torch.cat([D.cifar_augment(x[:2], index=idx[:2], seed=1, epoch=2),
                      D.cifar_augment(x[2:], index=idx[2:], seed=1, epoch=2)])
    assert torch.equal(full, part)
    assert not torch.equal(full, D.cifar_augment(x, index=idx, seed=1, epoch=3))
    with pytest.raises(DataError, match="index"):
        D.cifar_augment(x, index=idx[:3])


def test_normalize():
    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    y = D.normalize(x, D.CIFAR100_MEAN, D.CIFAR100_STD)
    m = torch.tensor(D.CIFAR100_MEAN).view(3, 1, 1)
    s = torch.tensor(D.CIFAR100_STD).view(3, 1, 1)
    assert torch.allclose(y, (x.float() / 255 - m) / s)
    assert D.normalize(x[0], D.CIFAR100_MEAN, D.CIFAR100_STD, dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(DataError, match="mean"):
        D.normalize(x, (0.5,), (0.5,))


# ----------------------------------------------------------------------------------------------------------------
# CIFAR


def _fake_cifar(folder, n_train=10, n_test=4):
    folder.mkdir(parents=True)
    rng = np.random.RandomState(0)
    out = {}
    for name, n in (("train", n_train), ("test", n_test)):
        data = rng.randint(0, 256, (n, 3072)).astype(np.uint8)
        labels = [int(v) for v in rng.randint(0, 100, n)]
        with open(folder / name, "wb") as f:
            pickle.dump({b"filenames": [b"x"] * n, b"data": data, b"fine_labels": labels,
                         b"coarse_labels": [0] * n, b"batch_label": b"training batch 1 of 1"}, f)
        out[name] = (data, labels)
    return out


def test_load_cifar100_fake_pickle(tmp_path):
    ref = _fake_cifar(tmp_path / "cifar-100-python")
    for root in (tmp_path, tmp_path / "cifar-100-python"):
        for train, name in ((True, "train"), (False, "test")):
            images, labels = D.load_cifar100(root, train=train)
            data, lab = ref[name]
            assert images.dtype == torch.uint8 and images.shape == (len(lab), 3, 32, 32)
            assert labels.dtype == torch.long and labels.tolist() == lab
            assert torch.equal(images[1, 2], torch.from_numpy(data[1, 2048:].reshape(32, 32)))   # blue plane
    with pytest.raises(DataError, match="not found"):
        D.load_cifar100(tmp_path / "missing", train=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no CIFAR-100 pickles.*empty"):
        D.load_cifar100(empty, train=True)


def test_load_cifar100_corrupt_or_hostile(tmp_path):
    folder = tmp_path / "cifar-100-python"
    _fake_cifar(folder)
    (folder / "test").write_bytes(b"\x80\x04garbage")
    with pytest.raises(DataError, match="corrupt CIFAR-100 file .*test"):
        D.load_cifar100(tmp_path, train=False)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(folder / "train", "wb") as f:
        pickle.dump({b"data": Evil()}, f)
    with pytest.raises(DataError, match="refusing"):
        D.load_cifar100(tmp_path, train=True)


def test_tensor_image_dataset(tmp_path):
    _fake_cifar(tmp_path / "cifar-100-python", n_train=8)
    images, labels = D.load_cifar100(tmp_path, train=True)
    val = TensorImageDataset(images, labels, train=False)
    x, y, i = val[3]
    assert x.shape == (3, 32, 32) and y == int(labels[3]) and i == 3
    assert torch.allclose(x, D.normalize(images[3], D.CIFAR100_MEAN, D.CIFAR100_STD))
    nhwc = TensorImageDataset(images.permute(0, 2, 3, 1).contiguous(), labels, train=False)
    assert torch.equal(nhwc[3][0], x)
    tr = TensorImageDataset(images, labels, train=True, aug_seed=7)
    tr.set_epoch(4)
    idx = torch.arange(8)
    batch = D.normalize(D.cifar_augment(images, index=idx, seed=7, epoch=4), D.CIFAR100_MEAN, D.CIFAR100_STD)
    assert torch.equal(torch.stack([tr[k][0] for k in range(8)]), batch)        # per-item == on-device batch
    with pytest.raises(DataError, match="labels"):
        TensorImageDataset(images, labels[:3], train=True)


def test_synthetic_dataset():
    ds = D.SyntheticDataset(50, 7, (5, 6), seed=3)
    x, y, i = ds[12]
    assert x.shape == (3, 5, 6) and y == 12 % 7 and i == 12
    assert torch.equal(x, D.SyntheticDataset(50, 7, (5, 6), seed=3)[12][0])
    assert not torch.equal(x, ds[13][0]) and not torch.equal(x, D.SyntheticDataset(50, 7, (5, 6), seed=4)[12][0])
    assert ds.labels.tolist() == [k % 7 for k in range(50)]


# ----------------------------------------------------------------------------------------------------------------
# samplers


def _labels_with_small_classes():
    counts = [1, 3, 5, 8, 2] + [6] * 15                                      # 20 classes, some below m
    labels = torch.tensor(sum(([c] * n for c, n in enumerate(counts)), []))
    return labels[torch.randperm(sum(counts), generator=torch.Generator().manual_seed(1))]


@pytest.mark.parametrize("m,batch_size", [(2, 16), (4, 24), (1, 8)])
def test_mperclass_batches(m, batch_size):
    labels = _labels_with_small_classes()
    s = D.MPerClassSampler(labels, m, batch_size, seed=0, length=400)
    assert len(s) == 400 // batch_size * batch_size
    idx = list(s)
    assert len(idx) == len(s)
    for k in range(0, len(idx), batch_size):
        b = torch.tensor(idx[k:k + batch_size])
        classes, counts = torch.unique(labels[b], return_counts=True)
        assert len(classes) == batch_size // m and (counts == m).all()
        for c in classes:
            members = b[labels[b] == c]
            if int((labels == c).sum()) >= m:
                assert len(set(members.tolist())) == m                     # without replacement
    assert list(s) == idx                                                    # same epoch -> same
    s.set_epoch(1)
    assert list(s) != idx
    s2 = D.MPerClassSampler(labels, m, batch_size, seed=0, length=400)
    s2.set_epoch(1)
    assert list(s2) == list(s)


def test_mperclass_official_cifar_shape_and_errors():
    labels = torch.arange(50000) % 100
    s = D.MPerClassSampler(labels, 2, 128)
    assert len(s) == 49920 and s.batches().shape == (390, 128)
    with pytest.raises(DataError, match="multiple of m"):
        D.MPerClassSampler(labels, 3, 128)
    with pytest.raises(DataError, match="only 100 classes"):
        D.MPerClassSampler(labels, 1, 128)
    with pytest.raises(DataError, match="length"):
        D.MPerClassSampler(labels, 2, 128, length=100)
    with pytest.raises(DataError, match="m"):
        D.MPerClassSampler(labels, 0, 128)
    with pytest.raises(DataError, match="labels"):
        D.MPerClassSampler(torch.rand(10), 2, 4)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_sharded_slices_concatenate_to_global_batch(world):
    labels = torch.arange(300) % 30
    glob = D.MPerClassSampler(labels, 2, 16, seed=5)
    glob.set_epoch(3)
    g = glob.batches()
    shards = []
    for r in range(world):
        inner = D.MPerClassSampler(labels, 2, 16, seed=5)
        sh = D.ShardedSampler(inner, r, world)
        sh.set_epoch(3)
        part = list(sh)
        assert len(part) == len(sh) == len(glob) // world
        shards.append(torch.tensor(part).view(-1, 16 // world))
    assert torch.equal(torch.cat(shards, dim=1), g)


def test_sharded_tail_and_errors():
    base = list(range(23))
    parts = [list(D.ShardedSampler(base, r, 4, batch_size=8, drop_last=False)) for r in range(4)]
    assert [len(D.ShardedSampler(base, r, 4, batch_size=8, drop_last=False)) for r in range(4)] == \
        [len(p) for p in parts]
    assert sorted(sum(parts, [])) == base
    assert parts[0][:2] == [0, 1] and parts[1][:2] == [2, 3]
    assert [len(p) for p in parts] == [6, 6, 6, 5]                          # tail 7 -> 2, 2, 2, 1
    assert len(list(D.ShardedSampler(base, 0, 4, batch_size=8))) == 4
    with pytest.raises(DataError, match="divisible"):
        D.ShardedSampler(base, 0, 3, batch_size=8)
    with pytest.raises(DataError, match="rank"):
        D.ShardedSampler(base, 4, 4, batch_size=8)
    with pytest.raises(DataError, match="batch_size"):
        D.ShardedSampler(base, 0, 2)


# ----------------------------------------------------------------------------------------------------------------
# loaders


def test_build_dataloader_deterministic():
    ds = D.SyntheticDataset(30, 3, 4)
    a = [b[2].tolist() for b in D.build_dataloader(ds, batch_size=8, train=True, seed=1)]
    b = [b[2].tolist() for b in D.build_dataloader(ds, batch_size=8, train=True, seed=1)]
    assert a == b and len(a) == 3 and all(len(x) == 8 for x in a)          # drop_last in training
    val = [b[2].tolist() for b in D.build_dataloader(ds, batch_size=8, train=False)]
    assert sum(val, []) == list(range(30))
    loader = D.build_dataloader(ds, batch_size=8, train=True, seed=1)
    loader.sampler.set_epoch(1)
    assert [b[2].tolist() for b in loader] != a
    with pytest.raises(DataError, match="batch_size"):
        D.build_dataloader(ds, batch_size=0, train=True)


def test_keyed_augmentation_independent_of_workers(digits_tree):
    ds = D.ImageFolderDataset(digits_tree / "val", D.imagenet_train_transform(24, scale=(0.3, 1.0)), aug_seed=11)
    sampler = D.ShardedSampler(list(range(64)), 0, 1, batch_size=16)
    ds.set_epoch(2)
    ref = torch.cat([b[0] for b in D.build_dataloader(ds, batch_size=16, train=True, sampler=sampler)])
    with_workers = torch.cat([b[0] for b in D.build_dataloader(ds, batch_size=8, train=True, sampler=sampler,
                                                               num_workers=2, persistent_workers=True)])
    assert torch.equal(ref, with_workers)
    ds.set_epoch(3)
    assert not torch.equal(ref[:16], torch.stack([ds[k][0] for k in range(16)]))


def test_device_batch_loader_split_invariant():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(64) % 8
    B = 16

    def run(world):
        outs = []
        for r in range(world):
            s = D.ShardedSampler(D.MPerClassSampler(labels, 2, B, seed=2), r, world)
            dl = D.DeviceBatchLoader(images, labels, batch_size=B // world, sampler=s, train=True,
                                     mean=D.CIFAR100_MEAN, std=D.CIFAR100_STD, aug_seed=9)
            dl.set_epoch(1)
            outs.append(list(dl))
        steps = len(outs[0])
        return [tuple(torch.cat([outs[r][k][j] for r in range(world)]) for j in range(3)) for k in range(steps)]

    one, two = run(1), run(2)
    assert len(one) == len(two) == 4
    for a, b in zip(one, two):
        for u, v in zip(a, b):
            assert torch.equal(u, v)
    x, y, idx = one[0]
    assert x.shape == (B, 3, 32, 32) and x.dtype == torch.float32 and torch.equal(y, labels[idx])


def test_member_views_are_keyed_per_view():
    """KDCL/PCL views: view v of a V-view loader == a 1-view loader seeded `view_seed(seed, v)`; view 0 == today's."""
    from fastmcl.data._keyhash import view_seed
    torch.manual_seed(0)
    images = torch.randint(0, 256, (32, 3, 16, 16), dtype=torch.uint8)
    labels = torch.arange(32) % 4

    def loader(seed, views=1, train=True):
        dl = D.DeviceBatchLoader(images, labels, batch_size=8, sampler=list(range(32)), train=train,
                                 mean=D.CIFAR100_MEAN, std=D.CIFAR100_STD, aug_seed=seed, views=views)
        dl.set_epoch(2)
        return list(dl)

    multi = loader(5, views=3)
    assert isinstance(multi[0][0], list) and len(multi[0][0]) == 3
    for v in range(3):
        single = loader(view_seed(5, v))
        for (xs, y, i), (x1, y1, i1) in zip(multi, single):
            assert torch.equal(xs[v], x1) and torch.equal(y, y1) and torch.equal(i, i1)
    assert view_seed(5, 0) == 5
    assert not torch.equal(multi[0][0][0], multi[0][0][1])
    assert torch.is_tensor(loader(5, views=3, train=False)[0][0])   # val batches have no views
    with pytest.raises(DataError, match="views"):
        D.DeviceBatchLoader(images, labels, batch_size=8, sampler=[0], train=True, mean=D.CIFAR100_MEAN,
                            std=D.CIFAR100_STD, views=0)


def test_imagefolder_views_decode_once(digits_tree):
    from fastmcl.data._keyhash import view_seed
    t = D.imagenet_train_transform(24)
    multi = D.ImageFolderDataset(digits_tree / "train", t, aug_seed=3, views=2)
    multi.set_epoch(1)
    x, y, i = multi[7]
    assert x.shape == (2, 3, 24, 24)
    for v in range(2):
        single = D.ImageFolderDataset(digits_tree / "train", t, aug_seed=view_seed(3, v))
        single.set_epoch(1)
        assert torch.equal(single[7][0], x[v])
    with pytest.raises(DataError, match="views"):
        D.ImageFolderDataset(digits_tree / "train", t, views=0)
