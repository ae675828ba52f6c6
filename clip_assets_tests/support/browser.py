"""Playwright driving Debian's Chromium (/usr/bin/chromium): no browser download."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from clip_assets_tests.support.chromium import CHROMIUM


@contextlib.contextmanager
def chromium_page() -> Iterator:
    """A fresh page of a headless Chromium, closed (with its browser) when the block ends."""
    from playwright.sync_api import sync_playwright  # the dev dependency, imported by the browser tests alone

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            yield page
        finally:
            browser.close()
