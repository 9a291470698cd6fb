"""scikit-learn's bundled handwritten digits as a small JPEG ImageFolder (the demo and test data; docs/data.md).

`root/digits32/{train,val}/<class>/<i>.jpg`: every 8x8 digit upscaled to 32x32 (bicubic), RGB JPEG quality 95, a
fixed stratified 20 % of every class in `val` (1438 train / 359 val). Written atomically (a temporary sibling folder,
a `.complete` manifest, then a rename), so a crash or a concurrent rank never leaves a tree that looks complete.
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
    try:
        return json.loads((tree / _MARKER).read_text()).get("version") == _FORMAT_VERSION
    except (OSError, ValueError):
        return False


def ensure_digits_imagefolder(root: str | Path) -> Path:
    """Write the digits tree under `root` unless complete; return `root/digits32`. DataError if `root` cannot be
    written, or if `root/digits32` exists but is not a complete tree (it is never deleted automatically)."""
    root = Path(root).expanduser()
    tree = root / DIGITS_DIRNAME
    if _is_complete(tree):
        return tree
    if tree.exists():
        raise DataError(f"{tree} exists but is not a complete digits tree (no valid {_MARKER} manifest); "
                        f"remove it to have it rewritten")
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    digits = load_digits()
    images = np.asarray(digits.images, dtype=np.float64)      # [1797, 8, 8], 0..16
    targets = np.asarray(digits.target, dtype=np.int64)
    split = _split(targets)
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{DIGITS_DIRNAME}.tmp-", dir=root))
    except OSError as e:
        raise DataError(f"cannot write into data root {root}: {e.strerror or e}") from None
    try:
        for part, indices in split.items():
            for c in range(10):
                (tmp / part / str(c)).mkdir(parents=True)
            for i in indices:
                pix = np.clip(np.rint(images[i] * (255.0 / 16.0)), 0, 255).astype(np.uint8)
                img = Image.fromarray(pix, mode="L").resize((_SIZE, _SIZE), Image.Resampling.BICUBIC).convert("RGB")
                img.save(tmp / part / str(targets[i]) / f"{i:04d}.jpg", format="JPEG", quality=95)
        counts = {part: {str(c): int((targets[ids] == c).sum()) for c in range(10)} for part, ids in split.items()}
        manifest = {"version": _FORMAT_VERSION, "source": "sklearn.datasets.load_digits", "size": _SIZE,
                    "val_fraction": _VAL_FRACTION, "seed": _SEED, "counts": counts}
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        with open(tmp / _MARKER, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.rename(tmp, tree)
        except OSError:     # another process finished first (a rename onto a full folder fails): keep a complete tree
            if _is_complete(tree):
                return tree
            raise
    except OSError as e:
        raise DataError(f"cannot write digits tree into {root}: {e.strerror or e}") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return tree
