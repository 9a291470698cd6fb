"""Naming the file DALI could not decode.

A corrupt image body stops a DALI pipeline with "Critical error in pipeline … nvImageCodec failure" naming no file
(the failed batch yields no output, so not even its `source_info`), and the pipeline is dead. The loaders then hand
the files DALI held to `explain_failure`, which re-checks them and returns ONE DataError naming the file.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import contextmanager

import numpy as np

from ..errors import DataError
from ..imagefolder import load_rgb
from .options import dali_available


def is_decode_failure(err: Exception) -> bool:
    text = str(err)
    return isinstance(err, RuntimeError) and any(s in text for s in ("nvImageCodec", "decoders.image",
                                                                      "Failed to decode"))


@contextmanager
def _quiet_stderr():
    """Silence nvImageCodec's C-level "[ERROR] …" lines while files are probed one by one."""
    try:
        saved = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
    except OSError:
        saved = None
    try:
        yield
    finally:
        if saved is not None:
            os.dup2(saved, 2)
            os.close(saved)


def _dali_decodes(path: str) -> bool:
    """Decode one file with a one-sample DALI CPU pipeline."""
    from nvidia.dali import fn, pipeline_def, types
    data = np.fromfile(path, dtype=np.uint8)

    @pipeline_def(batch_size=1, num_threads=1, device_id=None, prefetch_queue_depth=1)
    def one():
        encoded = fn.external_source(source=lambda: [data], batch=True, dtype=types.UINT8)
        return fn.decoders.image(encoded, device="cpu", output_type=types.RGB, adjust_orientation=False)

    try:
        with _quiet_stderr():
            pipe = one()
            pipe.build()
            pipe.run()
        return True
    except Exception:
        return False


def find_undecodable(paths: Sequence[str]) -> tuple[str, str] | None:
    """The first of `paths` that does not decode and why: PIL (`load_rgb`) first, then, for the files PIL reads, DALI's
    CPU decoder one file at a time. None when every file decodes."""
    for p in paths:
        try:
            load_rgb(p)
        except DataError as e:
            return p, str(e)
    if dali_available():
        for p in paths:
            if not _dali_decodes(p):
                return p, f"cannot decode image file {p}: DALI's decoder rejects it (PIL reads it)"
    return None


def explain_failure(err: Exception, suspects: Sequence[str], what: str) -> DataError:
    """One DataError for DALI's failure `err` on one of `suspects` (the `what` pipeline: training, validation …)."""
    text = " ".join(str(err).split())
    reason = text[text.find("encountered:") + 12:].strip() if "encountered:" in text else text
    reason = reason.replace("Current pipeline object is no longer valid.", "").strip()[:200]
    found = find_undecodable(list(dict.fromkeys(suspects)))
    if found is not None:
        return DataError(f"{found[1]} (DALI {what} pipeline stopped: {reason})")
    return DataError(f"DALI {what} pipeline failed on one of {len(suspects)} images but every one of them decodes "
                     f"when re-checked (first: {suspects[0] if suspects else '?'}): {reason}")
