"""Damaging a stored file as a disk, a cut-short copy or an editor would: the three kinds every
damaged-file test is run with (clip_assets.storage.damaged_files)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

DAMAGES = ["truncated", "zero_bytes", "garbage"]


def damage(path: Path, how: str) -> bytes:
    """Damage `path` in place: cut to half its length, emptied, or overwritten with random bytes of its
    length. Returns the bytes it held before."""
    path = Path(path)
    before = path.read_bytes()
    if how == "truncated":
        path.write_bytes(before[: len(before) // 2])
    elif how == "zero_bytes":
        path.write_bytes(b"")
    elif how == "garbage":
        path.write_bytes(np.random.default_rng(len(before)).integers(0, 256, max(len(before), 64), np.uint8).tobytes())
    else:
        raise ValueError(f"unknown damage {how!r}: one of {DAMAGES}")
    return before
