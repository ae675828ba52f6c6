"""A small real file system that can be filled to the last block: a tmpfs mounted for one test.

`fill(leave_bytes)` writes a filler file until the kernel answers ENOSPC, then gives `leave_bytes`
back, so the next write of any size past that fails the way a full disk fails (the real error from
the real file system, not a mock). Mounting needs root (or CAP_SYS_ADMIN): elsewhere the fixture skips
and says why. CI runs as root on Debian, as this sandbox does.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from clip_assets.storage.atomic_files import TEMP_MARKER

FILLER = "filler.bin"
_BLOCK = b"\0" * (1 << 16)


@dataclass
class SmallFilesystem:
    root: Path

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def fill(self, leave_bytes: int = 0) -> None:
        """Fill it to the last block, then free about `leave_bytes` (rounded to its 4 KiB pages)."""
        filler = self.root / FILLER
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            while True:
                os.write(fd, _BLOCK)  # unbuffered: a short write, then ENOSPC
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
        finally:
            os.close(fd)
        os.truncate(filler, max(0, filler.stat().st_size - leave_bytes))

    def empty(self) -> None:
        """Give the filler's space back."""
        (self.root / FILLER).unlink(missing_ok=True)

    def files(self) -> dict[str, str]:
        """Every file under it but the filler, by relative path: its sha256."""
        return {
            str(p.relative_to(self.root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(self.root.rglob("*"))
            if p.is_file() and p.name != FILLER
        }

    def temp_files(self) -> list[Path]:
        """Files and folders of this project's atomic writers left under it."""
        return [p for p in self.root.rglob("*") if TEMP_MARKER in p.name]


def mount_small_filesystem(mount_point: Path, size: str) -> Iterator[SmallFilesystem]:
    mount_point.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        pytest.skip("no `mount` command here: the full-disk tests need a tmpfs they can fill")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {mounted.stderr.strip()}")
    try:
        yield SmallFilesystem(mount_point)
    finally:
        if subprocess.run(["umount", str(mount_point)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)  # a file still open: detach


@pytest.fixture(name="small_filesystem")
def small_filesystem_fixture(tmp_path) -> Iterator[SmallFilesystem]:
    """A 64 MiB tmpfs (RAM only as it is filled) at tmp_path/small, unmounted after the test."""
    yield from mount_small_filesystem(tmp_path / "small", "64m")
