#!/usr/bin/env python
"""Screenshots of the web app's three tabs, taken in headless Chromium, for the README.

    python scripts/app_screenshots.py --out docs/app [--report docs/bench] [--model embedded]

Run it from the repository root (the page shows the relative job and report folders). Starts the
app on a free localhost port, generates the default series in "Make a series" (and
prints the time from the click to the first image), shows "Fine-tune a subject", opens the bench
report folder in "Compare" and asks the advisor; writes make.png, finetune.png and compare.png.
Needs Debian's chromium and chromium-driver and the app extra (gradio).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import time
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait(condition, timeout: float = 300.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = condition()
        if found:
            return found
        time.sleep(0.25)
    raise TimeoutError("the page did not get there in time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--report", type=Path, default=Path("docs/bench"))
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    from consistent_diffusion.app.ui import App, launch
    from consistent_diffusion.models.loading import load_pipeline

    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model)
    args.out.mkdir(parents=True, exist_ok=True)
    # relative folders, so the page (and the screenshots) show no path of this machine
    jobs = Path("runs") / f"app-screenshots-{os.getpid()}"
    try:
        app = App(lambda: pipe, jobs, model_label=args.model)
        port = _free_port()
        page = launch(app, port=port, block=False)
        options = webdriver.ChromeOptions()
        options.binary_location = shutil.which("chromium")
        for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1500"):
            options.add_argument(flag)
        browser = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
        try:
            browser.get(f"http://127.0.0.1:{port}/")
            _wait(lambda: browser.find_elements(By.CSS_SELECTOR, "#generate"))
            start = time.monotonic()
            browser.find_element(By.CSS_SELECTOR, "#generate").click()
            _wait(lambda: browser.find_elements(By.CSS_SELECTOR, "#gallery img"))
            print(f"click to first image ({args.model}, 8 images, 30 steps): {time.monotonic() - start:.1f} s")
            time.sleep(1.0)
            browser.save_screenshot(str(args.out / "make.png"))

            def tab(title: str) -> None:
                found = [t for t in browser.find_elements(By.CSS_SELECTOR, "button[role=tab]") if title in t.text]
                browser.execute_script("arguments[0].click()", found[0])
                time.sleep(1.0)

            tab("Fine-tune a subject")
            browser.save_screenshot(str(args.out / "finetune.png"))
            tab("Compare")
            box = [b for b in browser.find_elements(By.CSS_SELECTOR, "textarea") if b.is_displayed()][0]
            box.send_keys(str(args.report))
            [b for b in browser.find_elements(By.TAG_NAME, "button") if b.text == "Open"][0].click()
            _wait(lambda: "opened" in browser.page_source)
            [b for b in browser.find_elements(By.TAG_NAME, "button") if b.text == "Advise"][0].click()
            _wait(lambda: any("for style, object" in (b.get_attribute("value") or "")
                              for b in browser.find_elements(By.CSS_SELECTOR, "textarea")))
            height = browser.execute_script("return document.documentElement.scrollHeight")
            browser.set_window_size(1400, int(height) + 40)  # the whole tab: table, claims, plots, images, advice
            browser.execute_script("window.scrollTo(0, 0)")
            time.sleep(1.5)
            browser.save_screenshot(str(args.out / "compare.png"))
        finally:
            browser.quit()
            page.close()
    finally:
        shutil.rmtree(jobs, ignore_errors=True)
    print(f"wrote {args.out}/make.png, finetune.png, compare.png")


if __name__ == "__main__":
    main()
