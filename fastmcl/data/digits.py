"""scikit-learn's bundled handwritten digits, written once as a small JPEG ImageFolder (the demo/test dataset).

Tree: ``root/digits32/{train,val}/<class 0..9>/<i>.jpg`` (i = the sample's index in ``load_digits()``, 4 digits).
Each 8x8 image (values 0..16) is scaled to 0..255, upscaled to 32x32 with bicubic interpolation, converted to RGB and
saved as a JPEG (quality 95), so the real decode path runs. Split: stratified, 20 % of every class to ``val``, chosen
by a fixed seed (numpy's legacy RandomState, stable across numpy versions) -> 1438 train / 359 val images.

Written atomically: the tree is built in a temporary sibling folder and renamed into place, and a ``.complete``
manifest is written before the rename, so a crash never leaves a tree that looks complete; a concurrent writer (e.g.
another torchrun rank) that loses the race discards its copy.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import DataError

__all__ = ["ensure_digits_imagefolder", "DIGITS_DIRNAME"]

DIGITS_DIRNAME = "digits32"
_SIZE = 32
_VAL_FRACTION = 0.2
_SEED = 0
_MARKER = ".complete"
_FORMAT_VERSION = 1


def _split(targets: np.ndarray) -> dict[str, list[int]]:
    rng = np.random.RandomState(_SEED)
    val: list[int] = []
    train: list[int] = []
    for c in range(10):
        idx = np.flatnonzero(targets == c)
        perm = idx[rng.permutation(len(idx))]
        n_val = int(round(_VAL_FRACTION * len(idx)))
        val.extend(int(i) for i in perm[:n_val])
        train.extend(int(i) for i in perm[n_val:])
    return {"train": sorted(train), "val": sorted(val)}


def _is_complete(tree: Path) -> bool:
    marker = tree / _MARKER
    if not marker.is_file():
        return False
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return info.get("version") == _FORMAT_VERSION


def ensure_digits_imagefolder(root: str | Path) -> Path:
    """Write the digits ImageFolder under ``root`` unless already complete; return ``root/digits32``.

    The returned folder holds ``train/`` and ``val/``, each with class folders ``0`` .. ``9``.
    Raises DataError if ``root`` cannot be created/written, or if ``root/digits32`` exists but is not a complete tree
    written by this function (it is never deleted automatically).
    """
    root = Path(root).expanduser()
    tree = root / DIGITS_DIRNAME
    if _is_complete(tree):
        return tree
    if tree.exists():
        raise DataError(f"{tree} exists but is not a complete digits tree (no valid {_MARKER} manifest); "
                        f"remove it to have it rewritten")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create data root {root}: {e.strerror or e}") from None

    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    digits = load_digits()
    images = np.asarray(digits.images, dtype=np.float64)      # [1797, 8, 8], 0..16
    targets = np.asarray(digits.target, dtype=np.int64)
    split = _split(targets)

    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{DIGITS_DIRNAME}.tmp-", dir=root))
    except OSError as e:
        raise DataError(f"cannot write into data root {root}: {e.strerror or e}") from None
    try:
        counts: dict[str, dict[str, int]] = {}
        for part, indices in split.items():
            counts[part] = {}
            for c in range(10):
                (tmp / part / str(c)).mkdir(parents=True)
                counts[part][str(c)] = 0
            for i in indices:
                c = int(targets[i])
                pix = np.clip(np.rint(images[i] * (255.0 / 16.0)), 0, 255).astype(np.uint8)
                img = Image.fromarray(pix, mode="L").resize((_SIZE, _SIZE), Image.Resampling.BICUBIC).convert("RGB")
                img.save(tmp / part / str(c) / f"{i:04d}.jpg", format="JPEG", quality=95)
                counts[part][str(c)] += 1
        manifest = {"version": _FORMAT_VERSION, "source": "sklearn.datasets.load_digits", "size": _SIZE,
                    "val_fraction": _VAL_FRACTION, "seed": _SEED, "counts": counts}
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        with open(tmp / _MARKER, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.rename(tmp, tree)
        except OSError:
            # Another process finished first (rename onto a non-empty folder fails): keep theirs if complete.
            if _is_complete(tree):
                return tree
            raise
    except OSError as e:
        raise DataError(f"cannot write digits tree into {root}: {e.strerror or e}") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return tree
