"""NVIDIA DALI input pipelines (docs/data.md "DALI"): decode and augment JPEG files on the GPU
(`mixed`) or on DALI's CPU backend, with the same batches and keyed augmentation as the PIL path.

`options`: whether DALI imports and the one check of its options; `feed`: the file list and the training index
feed; `reader`: the DALI graphs and their loaders; `diagnosis`: naming
the file DALI failed on. DALI is optional and imported on first use, so `import fastmcl.data` does not pay for it.
"""
from __future__ import annotations

from .diagnosis import find_undecodable
from .feed import FileList
from .options import (check_options, dali_available, dali_import_error, dali_version, require_dali,
                      resolve_dali_device)

__all__ = ["dali_available", "dali_import_error", "dali_version", "require_dali", "check_options",
           "resolve_dali_device", "FileList", "find_undecodable", "DaliIndexLoader", "DaliReaderLoader"]


def __getattr__(name: str):
    """The loaders import DALI, so they load on first use."""
    if name in ("DaliIndexLoader", "DaliReaderLoader"):
        require_dali()
        from . import reader
        return getattr(reader, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
