"""The web app: its jobs as library calls, and the page in a real (headless) browser."""

from __future__ import annotations

import json
import threading
import time
import zipfile

import pytest
from PIL import Image

from _browser import browser, free_port, open_tab, wait_for
from consistent_diffusion.app import jobs
from consistent_diffusion.core.errors import ConfigError


@pytest.fixture
def uploads(tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGB", (32, 32), (200, 40, 40)).save(good)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    return {"good": good, "corrupt": corrupt, "empty": empty, "root": tmp_path}


def test_uploads_are_checked_with_messages_a_person_can_act_on(uploads):
    assert jobs.check_image(uploads["good"]) == uploads["good"]
    with pytest.raises(ConfigError, match="corrupt.png is not a readable image"):
        jobs.check_image(uploads["corrupt"])
    with pytest.raises(ConfigError, match="empty.png is empty"):
        jobs.check_image(uploads["empty"])
    with pytest.raises(ConfigError, match="the limit is 100 pixels"):
        jobs.check_image(uploads["good"], jobs.UploadLimits(max_pixels=100))
    with pytest.raises(ConfigError, match="MB; the limit"):
        jobs.check_image(uploads["good"], jobs.UploadLimits(max_bytes=10))
    with pytest.raises(ConfigError, match="the limit is 2"):
        jobs.check_images([uploads["good"]] * 3, jobs.UploadLimits(max_files=2))


def test_the_form_is_read_as_the_cli_would(uploads):
    form = jobs.SeriesForm(prompts="a cat\n\n a dog ", seeds="0, 7 9", subject="cat", style_aligned=True,
                           init_image=str(uploads["good"]))
    assert form.prompt_list() == ("a cat", "a dog") and form.seed_list() == (0, 7, 9)
    assert [m.name for m in jobs.form_methods(form)] == ["img2img", "consistent_subject", "style_aligned"]
    with pytest.raises(ConfigError, match="at least one prompt"):
        jobs.SeriesForm(prompts=" \n").prompt_list()
    with pytest.raises(ConfigError, match="whole numbers"):
        jobs.SeriesForm(prompts="x", seeds="one").seed_list()
    with pytest.raises(ConfigError, match="not a readable image"):
        jobs.form_methods(jobs.SeriesForm(prompts="x", init_image=str(uploads["corrupt"])))


def test_a_series_job_writes_what_the_cli_would(tiny_sd, tmp_path):
    from consistent_diffusion.series import load_series_request

    job = jobs.make_series(tiny_sd, jobs.SeriesForm(prompts="a cat\na dog", seeds="0 1", steps=2), tmp_path,
                           progress=False)
    assert len(job.images) == 4 and all(p.is_file() for p in job.images) and job.contact_sheet.is_file()
    assert load_series_request(job.manifest).config.prompts == ("a cat", "a dog"), "the CLI can re-create it"
    with zipfile.ZipFile(job.archive) as archive:
        assert f"{job.folder.name}/manifest.json" in archive.namelist()
    assert {"style", "object", "text", "diversity"} <= set(job.scores)
    assert all("validated" in s for s in job.scores.values())
    again = jobs.make_series(tiny_sd, jobs.SeriesForm(prompts="a cat", seeds="0", steps=2), tmp_path, progress=False)
    assert again.folder != job.folder, "one folder per job"


def test_a_series_job_with_the_low_memory_switches_gives_the_same_images_and_leaves_the_pipeline(tiny_sd, tmp_path):
    import numpy as np
    from PIL import Image

    before = dict(tiny_sd.unet.attn_processors)
    plain = jobs.make_series(tiny_sd, jobs.SeriesForm(prompts="a cat", seeds="0 1", steps=2), tmp_path / "a",
                             progress=False)
    low = jobs.make_series(tiny_sd, jobs.SeriesForm(prompts="a cat", seeds="0 1", steps=2, offload="model",
                                                    vae_slicing=True, vae_tiling=True, attention_slicing=True),
                           tmp_path / "b", progress=False)
    for a, b in zip(plain.images, low.images, strict=True):
        assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
    assert not hasattr(tiny_sd.unet, "_hf_hook") and not tiny_sd.vae.use_slicing and not tiny_sd.vae.use_tiling
    assert {k: id(v) for k, v in tiny_sd.unet.attn_processors.items()} == {k: id(v) for k, v in before.items()}


def test_training_from_the_page_cancels_and_keeps_the_last_checkpoint(uploads):
    from consistent_diffusion.testing import tiny_sd_pipeline

    images = []
    for index in range(3):
        path = uploads["root"] / f"subject{index}.png"
        Image.new("RGB", (32, 32), (40 * index, 90, 200)).save(path)
        images.append(path)
    cancel = threading.Event()

    def on_step(step, loss):
        if step == 27:
            cancel.set()

    result = jobs.train_subject(tiny_sd_pipeline(), images, uploads["root"] / "out", steps=40, on_step=on_step,
                                cancel=cancel)
    assert result.cancelled and result.steps == 25 and result.result is None
    with pytest.raises(ConfigError, match="3-20 images"):
        jobs.train_subject(tiny_sd_pipeline(), images[:2], uploads["root"] / "out")
    with pytest.raises(ConfigError, match="not a readable image"):
        jobs.train_subject(tiny_sd_pipeline(), [*images, uploads["corrupt"]], uploads["root"] / "out")


def test_the_cli_teaches_and_warns_off_loopback(capsys):
    from consistent_diffusion.cli.commands.app import loopback
    from consistent_diffusion.cli.main import main

    with pytest.raises(SystemExit):
        main(["app", "--help"])
    text = capsys.readouterr().out
    assert "examples:" in text and "127.0.0.1" in text and "--max-upload-mb" in text and "--ip-adapter" in text
    assert loopback("127.0.0.1") and loopback("localhost") and loopback("::1") and not loopback("0.0.0.0")


# -- the page in a real browser -----------------------------------------------------------------

_ = browser  # the fixture, imported


def _hand_made_report():
    """A small report.json: plain and StyleAligned on one style task, eight images each."""
    def cell(method, stack, style):
        return {"cell": f"s__{method}", "task": "s", "kind": "style", "method": method, "stack": stack,
                "num_images": 8, "scores": {"style": {"aggregate": style, "per_image": [style] * 8, "validated": True},
                                            "diversity": {"aggregate": 0.7, "per_image": [0.7] * 8}},
                "cost": {"seconds_per_image": 0.3}}

    return {"cells": [cell("plain", [], 0.5), cell("style_aligned", [{"method": "style_aligned"}], 0.8)],
            "suite": {"name": "hand-made", "tasks": [{"name": "s", "kind": "style", "prompts": ["a"], "seeds": list(range(8))}]}}


def test_the_page_generates_and_shows_errors_in_a_real_browser(browser, uploads, tmp_path):
    pytest.importorskip("gradio", reason="gradio is part of the app extra")
    from selenium.webdriver.common.by import By

    from consistent_diffusion.app.ui import App, launch
    from consistent_diffusion.testing import tiny_sd_pipeline

    pipe = tiny_sd_pipeline()
    app = App(lambda: pipe, tmp_path / "jobs", model_label="tiny-sd (built in code)")
    port = free_port()
    page = launch(app, port=port, block=False)
    try:
        started = time.monotonic()
        browser.get(f"http://127.0.0.1:{port}/")
        prompts = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#prompts textarea"), what="the prompt box")[0]
        prompts.clear()
        prompts.send_keys("a red cat\na blue dog")
        steps = browser.find_element(By.CSS_SELECTOR, "#steps input[type=number]")
        steps.clear()
        steps.send_keys("3")
        browser.find_element(By.CSS_SELECTOR, "#generate").click()
        images = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#gallery img"), what="the images")
        click_to_image = time.monotonic() - started
        assert len(images) >= 1
        folders = wait_for(lambda: list((tmp_path / "jobs").glob("series-*/manifest.json")), what="the manifest")
        manifest = json.loads(folders[0].read_text())
        assert manifest["config"]["prompts"] == ["a red cat", "a blue dog"] and manifest["config"]["steps"] == 3
        browser.save_screenshot(str(tmp_path / "make.png"))
        # a fine-tune that succeeds, then offered to "Make a series"
        open_tab(browser, "Fine-tune a subject")
        subjects = []
        for index in range(3):
            subjects.append(tmp_path / f"subject{index}.png")
            Image.new("RGB", (32, 32), (60 * index, 120, 200)).save(subjects[-1])
        upload = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#train-files input[type=file]"),
                       what="the upload field")[0]
        upload.send_keys("\n".join(str(p) for p in subjects))
        wait_for(lambda: "subject2.png" in browser.page_source, what="the uploaded subject images")
        steps_box = browser.find_element(By.CSS_SELECTOR, "#train-steps input[type=number]")
        steps_box.clear()
        steps_box.send_keys("10")
        browser.find_element(By.CSS_SELECTOR, "#train").click()
        wait_for(lambda: "it is now in 'Make a series'" in browser.page_source, what="the trained LoRA")
        assert list((tmp_path / "jobs").glob("train-lora-*/run/lora/pytorch_lora_weights.safetensors"))
        # a corrupt upload: the error shows in the page and the app keeps serving
        clear = [b for b in browser.find_elements(By.CSS_SELECTOR, "#train-files button")
                 if (b.get_attribute("aria-label") or "").lower().startswith("clear")]
        assert clear, "the file field's clear button"
        browser.execute_script("arguments[0].click()", clear[0])
        upload = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#train-files input[type=file]"),
                       what="the upload field")[0]
        upload.send_keys("\n".join(str(uploads[k]) for k in ("good", "corrupt")) + "\n" + str(uploads["good"]))
        wait_for(lambda: "corrupt.png" in browser.page_source, what="the uploaded files")
        browser.find_element(By.CSS_SELECTOR, "#train").click()
        wait_for(lambda: "is not a readable image" in browser.page_source, what="the error message")
        open_tab(browser, "Make a series")
        browser.find_element(By.CSS_SELECTOR, "#generate").click()
        wait_for(lambda: len(list((tmp_path / "jobs").glob("series-*/manifest.json"))) == 2, what="a second job")
        # Compare: open a report folder, read the claims, ask the advisor
        report = tmp_path / "report"
        report.mkdir()
        (report / "report.json").write_text(json.dumps(_hand_made_report()))
        open_tab(browser, "Compare")
        folder = next(b for b in browser.find_elements(By.CSS_SELECTOR, "#report-folder textarea, #report-folder input"))
        folder.send_keys(str(report))
        browser.find_element(By.CSS_SELECTOR, "#open-report").click()
        wait_for(lambda: "StyleAligned gives style consistency" in browser.page_source, what="the claims")
        browser.find_element(By.CSS_SELECTOR, "#advise").click()
        wait_for(lambda: "for style, object" in (browser.find_element(By.CSS_SELECTOR, "#advice textarea")
                                              .get_attribute("value") or ""), what="the advice")
        print(f"click to first image: {click_to_image:.1f} s")
    finally:
        page.close()
