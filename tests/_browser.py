"""The app's browser tests: the headless Chromium of ``app.browser`` as a fixture."""

from __future__ import annotations

import pytest

from consistent_diffusion.app.browser import browser_binaries, free_port, open_tab, start_chromium, wait_for

__all__ = ["browser", "free_port", "open_tab", "wait_for"]


@pytest.fixture
def browser():
    if not all(browser_binaries()):
        pytest.skip("no browser: install Debian's chromium and chromium-driver (.ci/run does, as root)")
    pytest.importorskip("selenium", reason="selenium is part of the test extra")
    driver = start_chromium()
    yield driver
    driver.quit()
