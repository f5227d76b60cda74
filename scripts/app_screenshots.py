#!/usr/bin/env python
"""Screenshots of the web app's three tabs, taken in headless Chromium, for the README.

    python scripts/app_screenshots.py --out docs/app [--report docs/bench] [--model embedded] \
        [--ip-adapter PATH ...] [--ip-style IMG] [--ip-subject IMG]

Run it from the repository root (the page shows the relative job and report folders). Starts the
app on a free localhost port, opens the image prompt section of "Make a series" (its note says
which adapters the model has, or why none; with --ip-style / --ip-subject the images go in with
the section's default adapters), generates the default series (and prints the time from the click
to the first image), shows "Fine-tune a subject", opens the bench report folder in "Compare" and
asks the advisor; writes make.png, finetune.png and compare.png, each the whole tab.
Needs Debian's chromium and chromium-driver and the app extra (gradio).
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

from consistent_diffusion.app.browser import free_port, open_tab, start_chromium, wait_for


def _image_prompt(browser, style: str | None, subject: str | None) -> None:
    """Open the image prompt section, wait for its note (the adapters found, or why none) and put in
    the given images (each slot keeps the adapter the page chose for it)."""
    from selenium.webdriver.common.by import By

    section = [b for b in browser.find_elements(By.CSS_SELECTOR, "#image-prompt button") if "Image prompt" in b.text][0]
    browser.execute_script("arguments[0].click()", section)
    wait_for(lambda: [e for e in browser.find_elements(By.CSS_SELECTOR, "#ip-note") if "Looking" not in e.text and e.text])
    for slot, image in (("style", style), ("subject", subject)):
        if image:
            browser.find_element(By.CSS_SELECTOR, f"#ip-{slot}-image input[type=file]").send_keys(str(Path(image).resolve()))
            wait_for(lambda slot=slot: browser.find_elements(By.CSS_SELECTOR, f"#ip-{slot}-image img"))


def _whole_page(browser, path: Path, least: int = 0) -> None:
    """A screenshot of the whole page (the window grown to its height, at least ``least`` pixels)."""
    browser.set_window_size(1400, max(least, 600))  # measured from a short window: the page's own height
    time.sleep(0.5)
    height = browser.execute_script("return document.documentElement.scrollHeight")
    for _ in range(3):  # the window holds the browser's frame too: grow it until the viewport holds the page
        browser.set_window_size(1400, max(least, int(height)) + browser.get_window_size()["height"]
                                - int(browser.execute_script("return window.innerHeight")))
        time.sleep(0.3)
    browser.execute_script("window.scrollTo(0, 0)")
    time.sleep(1.5)
    browser.save_screenshot(str(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--report", type=Path, default=Path("docs/bench"))
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ip-adapter", action="append", default=[], help="an IP-Adapter offered in the page")
    parser.add_argument("--ip-style", help="a style image for the image prompt section")
    parser.add_argument("--ip-subject", help="a subject image for the image prompt section")
    args = parser.parse_args()

    import torch
    from selenium.webdriver.common.by import By

    from consistent_diffusion.app.ui import App, launch
    from consistent_diffusion.models.loading import load_pipeline

    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model)
    args.out.mkdir(parents=True, exist_ok=True)
    # relative folders, so the page (and the screenshots) show no path of this machine
    jobs = Path("runs") / f"app-screenshots-{os.getpid()}"
    try:
        app = App(lambda: pipe, jobs, model_label=args.model, ip_adapters=args.ip_adapter)
        port = free_port()
        page = launch(app, port=port, block=False)
        browser = start_chromium(height=1500)
        try:
            browser.get(f"http://127.0.0.1:{port}/")
            wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#generate"))
            _image_prompt(browser, args.ip_style, args.ip_subject)
            start = time.monotonic()
            browser.find_element(By.CSS_SELECTOR, "#generate").click()
            try:
                wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#gallery img"), timeout=300, what="the first image")
            except TimeoutError:  # the page's own message (a refused form, a failed job) is in the screenshot
                _whole_page(browser, args.out / "make-failed.png")
                raise SystemExit(f"no image after 300 s; the page as it stood: {args.out / 'make-failed.png'}") from None
            print(f"click to first image ({args.model}, the page's default series): {time.monotonic() - start:.1f} s")
            time.sleep(1.0)
            _whole_page(browser, args.out / "make.png")

            open_tab(browser, "Fine-tune a subject")
            time.sleep(1.0)
            _whole_page(browser, args.out / "finetune.png", 900)
            open_tab(browser, "Compare")
            time.sleep(1.0)
            box = [b for b in browser.find_elements(By.CSS_SELECTOR, "textarea") if b.is_displayed()][0]
            box.send_keys(str(args.report))
            [b for b in browser.find_elements(By.TAG_NAME, "button") if b.text == "Open"][0].click()
            wait_for(lambda: "opened" in browser.page_source)
            [b for b in browser.find_elements(By.TAG_NAME, "button") if b.text == "Advise"][0].click()
            wait_for(lambda: any("for style, object" in (b.get_attribute("value") or "")
                              for b in browser.find_elements(By.CSS_SELECTOR, "textarea")), timeout=300, what="the advice")
            _whole_page(browser, args.out / "compare.png")  # table, claims, plots, images, advice
        finally:
            browser.quit()
            page.close()
    finally:
        shutil.rmtree(jobs, ignore_errors=True)
    print(f"wrote {args.out}/make.png, finetune.png, compare.png")


if __name__ == "__main__":
    main()
