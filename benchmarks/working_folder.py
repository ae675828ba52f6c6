"""The folder a benchmark works in, with the machine's load printed around it (timings on a shared
machine depend on it)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


@contextlib.contextmanager
def working_folder(kept: Path | None, prefix: str) -> Iterator[Path]:
    """`kept` (created if needed, left in place for the next run) or a temporary folder removed after."""
    folder = kept or Path(tempfile.mkdtemp(prefix=prefix))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"load average at start: {load_average()}; {os.cpu_count()} CPUs")
    try:
        yield folder
    finally:
        print(f"load average at end:   {load_average()}")
        if kept is None:
            shutil.rmtree(folder, ignore_errors=True)
