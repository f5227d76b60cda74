"""Driving the web app in Debian's headless Chromium (selenium): what the browser tests and the
README screenshots share. Needs the ``chromium`` and ``chromium-driver`` packages and selenium
(the test extra); nothing here imports selenium until a browser is started."""

from __future__ import annotations

import shutil
import socket
import time
from collections.abc import Callable
from typing import Any

CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage")


def browser_binaries() -> tuple[str | None, str | None]:
    """The ``chromium`` and ``chromedriver`` executables on PATH (None where missing)."""
    return shutil.which("chromium"), shutil.which("chromedriver")


def free_port() -> int:
    """A localhost TCP port nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_chromium(width: int = 1400, height: int = 2400) -> Any:
    """A headless Chromium selenium driver with a ``width`` x ``height`` window; RuntimeError with
    what to install when the browser or its driver is missing."""
    chromium, driver = browser_binaries()
    if not (chromium and driver):
        raise RuntimeError("no browser: install Debian's chromium and chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (*CHROMIUM_FLAGS, f"--window-size={width},{height}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


def wait_for(condition: Callable[[], Any], timeout: float = 120.0, what: str = "the page",
             interval: float = 0.25) -> Any:
    """Poll ``condition`` until it returns something truthy (returned); TimeoutError naming ``what``."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = condition()
        if found:
            return found
        time.sleep(interval)
    raise TimeoutError(f"timed out waiting for {what}")


def open_tab(browser: Any, title: str) -> None:
    """Click the tab whose label contains ``title`` (AssertionError when there is none)."""
    from selenium.webdriver.common.by import By

    tabs = [t for t in browser.find_elements(By.CSS_SELECTOR, "button[role=tab]") if title in t.text]
    assert tabs, f"no tab {title!r}"
    browser.execute_script("arguments[0].click()", tabs[0])
