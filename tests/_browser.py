"""The app's browser tests: Debian's headless chromium driven by selenium, and small waits."""

from __future__ import annotations

import shutil
import socket
import time

import pytest

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("no browser: install Debian's chromium and chromium-driver (.ci/run does, as root)")
    pytest.importorskip("selenium", reason="selenium is part of the test extra")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,2400"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def wait_for(condition, timeout=120.0, what="the page"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = condition()
        if found:
            return found
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def open_tab(browser, title):
    from selenium.webdriver.common.by import By

    tabs = [t for t in browser.find_elements(By.CSS_SELECTOR, "button[role=tab]") if title in t.text]
    assert tabs, f"no tab {title!r}"
    browser.execute_script("arguments[0].click()", tabs[0])
