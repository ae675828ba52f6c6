"""Headless Chromium for the tests that check a page loads in a real browser (marker `browser`)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

HEADLESS_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def chromium_dump_dom(url: str, tmp_path: Path) -> str:
    """The page's DOM after its scripts ran (and its images loaded), as Chromium serialises it."""
    done = subprocess.run(
        [CHROMIUM, *HEADLESS_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}",
         "--virtual-time-budget=5000", "--dump-dom", url],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout
