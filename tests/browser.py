"""Debian's chromium, driven by Playwright for Python. Never `playwright install`."""

from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"

# Without these, chromium phones home at start and this machine's closed network refuses it.
FLAGS = [
    "--no-sandbox",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-default-apps",
]


@contextmanager
def chromium(extra_args: list[str] | None = None, headless: bool = True):
    from playwright.sync_api import sync_playwright

    profile = tempfile.mkdtemp(prefix="bchat-chromium-")
    try:
        with sync_playwright() as p:
            context = p.chromium.launch_persistent_context(
                profile,
                executable_path=CHROMIUM,
                headless=headless,
                args=FLAGS + (extra_args or []),
            )
            try:
                yield context
            finally:
                context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


@contextmanager
def chromium_browser(extra_args: list[str] | None = None, headless: bool = True):
    """A chromium whose ``new_context()`` calls are separate visitors (own cookies, storage)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, headless=headless, args=FLAGS + (extra_args or [])
        )
        try:
            yield browser
        finally:
            browser.close()
