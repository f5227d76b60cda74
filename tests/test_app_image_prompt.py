"""The app's image prompt: style and/or subject images through IP-Adapters on "Make a series" (the
method stack it builds, its errors, the adapters it offers, the recipe it records), and the section
in a real browser. Tiny pipelines with random adapters saved in the released layout."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _browser import browser, free_port, wait_for
from _finetune_data import one_thread
from _ip_adapter_files import adapter_weights, save_noise_image, save_random_adapter
from consistent_diffusion.app import jobs
from consistent_diffusion.app.image_prompt import ImagePromptForm, adapter_choices
from consistent_diffusion.core.errors import ConfigError
from consistent_diffusion.methods.ip_adapter.available import EMBEDDED_ADAPTERS, available_adapters
from consistent_diffusion.testing import tiny_sd_pipeline, tiny_sdxl_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")
_ = (browser, one_thread)  # the fixtures, imported


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Random SD adapters in the released layout: one alone in its folder, two sharing one encoder (two
    weight files in one ``models/``, named by file), one made for SDXL's cross-attention width, one
    without its encoder; prompt images; a corrupt file."""
    root = tmp_path_factory.mktemp("ip")
    unet = tiny_sd_pipeline().unet
    folder = save_random_adapter(root / "IP-Adapter", unet, seed=0)
    pair = root / "pair" / "models"  # a released models/ with two weight files and one encoder
    for seed, slot in enumerate(("style", "subject"), start=1):
        made = save_random_adapter(root / slot, unet, seed=seed)
        if not (pair / "image_encoder").is_dir():
            shutil.copytree(made / "models" / "image_encoder", pair / "image_encoder")
        shutil.move(adapter_weights(made), pair / f"ip-adapter_{slot}.safetensors")
    sdxl = save_random_adapter(root / "sdxl-width", tiny_sdxl_pipeline().unet, seed=3)
    no_encoder = save_random_adapter(root / "no-encoder", unet, seed=4)
    shutil.rmtree(no_encoder / "models" / "image_encoder")
    corrupt = root / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\nnot an image")
    return {"style": str(pair / "ip-adapter_style.safetensors"), "subject": str(pair / "ip-adapter_subject.safetensors"),
            "folder": str(folder), "pair": str(pair.parent),
            "sdxl": str(sdxl), "no_encoder": str(no_encoder), "corrupt": str(corrupt),
            "style_image": save_noise_image(root / "style.png", 1, size=32),
            "subject_image": save_noise_image(root / "subject.png", 2, size=32)}


def _form(**image_prompt) -> jobs.SeriesForm:
    return jobs.SeriesForm(prompts="a cat", seeds="0", steps=2, image_prompt=ImagePromptForm(**image_prompt))


def test_one_image_is_one_adapter_at_its_scale_after_style_aligned(files):
    form = jobs.SeriesForm(prompts="a cat", subject="cat", style_aligned=True,
                           image_prompt=ImagePromptForm(style_image=files["style_image"], style_adapter=files["folder"],
                                                        style_scale=0.7))
    methods = jobs.form_methods(form)
    assert [m.name for m in methods] == ["consistent_subject", "style_aligned", "ip_adapter"], "the CLI's order"
    ip = methods[-1]
    assert (ip.adapters, ip.images, ip.scales, ip.preset) == ((files["folder"],), (files["style_image"],), (0.7,), None)
    subject_only = jobs.form_methods(_form(subject_image=files["subject_image"], subject_adapter=files["subject"],
                                           subject_scale=0.4, style_adapter=files["style"]))
    assert [(m.adapters, m.images, m.scales) for m in subject_only] == [
        ((files["subject"],), (files["subject_image"],), (0.4,))], "an adapter without an image is off"
    assert jobs.form_methods(_form(style_adapter=files["style"], subject_adapter=files["subject"])) == []


def test_both_images_are_two_adapters_in_one_method_style_first(files):
    (ip,) = jobs.form_methods(_form(subject_image=files["subject_image"], subject_adapter=files["subject"],
                                    subject_scale=0.3, style_image=files["style_image"], style_adapter=files["style"],
                                    style_scale=0.8, preset="style"))
    assert ip.adapters == (files["style"], files["subject"])
    assert ip.images == (files["style_image"], files["subject_image"])
    assert ip.scales == (0.8, 0.3) and ip.preset == "style"


def test_bad_image_prompts_get_one_line_errors(files):
    cases = [
        (dict(style_image=files["corrupt"], style_adapter=files["style"]), "style image prompt corrupt.png is not a readable image"),
        (dict(subject_image=files["subject_image"]), "choose an adapter for the subject image"),
        (dict(style_image=files["style_image"], style_adapter=files["folder"] + "-missing"), "IP-Adapter not found"),
    ]
    for options, message in cases:
        with pytest.raises(ConfigError, match=message) as caught:
            jobs.form_methods(_form(**options))
        assert "\n" not in str(caught.value)
    pipe = tiny_sd_pipeline()  # with the pipeline, adapters that cannot fit it are refused before any work
    with pytest.raises(ConfigError, match="style image prompt: .*sdxl-width is made for cross-attention width 80, this model's is 32"):
        jobs.form_methods(_form(style_image=files["style_image"], style_adapter=files["sdxl"]), pipe=pipe)
    with pytest.raises(ConfigError, match="subject image prompt: IP-Adapter image encoder missing"):
        jobs.form_methods(_form(subject_image=files["subject_image"], subject_adapter=files["no_encoder"]), pipe=pipe)


def test_the_section_offers_what_fits_the_loaded_model_or_says_why_not(files):
    pipe = tiny_sd_pipeline()
    offered = [files["folder"], files["sdxl"], files["no_encoder"], files["pair"], files["subject"], files["style"]]
    names, defaults, note = adapter_choices(pipe, offered)
    assert names == [files["folder"], files["subject"], files["style"]] and note == ""
    assert defaults == {"style": files["style"], "subject": files["subject"]}, "a name saying its slot is its default"
    assert adapter_choices(pipe, [files["folder"]])[1] == {"style": files["folder"], "subject": files["folder"]}
    refused = available_adapters(pipe, [files["sdxl"]])
    assert refused.names == () and "no IP-Adapter fits this model" in refused.reason and "width 80" in refused.reason
    none = available_adapters(pipe)  # the shipped adapters are installed, for the embedded model's width only
    assert none.names == () and "the embedded model's own fit only the embedded model" in none.reason
    assert "\n" not in refused.reason + none.reason
    assert adapter_choices(tiny_sdxl_pipeline(), [files["sdxl"]])[0] == [files["sdxl"]]


def test_the_embedded_model_is_offered_its_shipped_adapters_by_name(monkeypatch, tmp_path):
    from types import SimpleNamespace

    from consistent_diffusion.methods.ip_adapter import embedded

    width = json.loads((embedded.shipped_folder("embedded-style") / embedded.ADAPTER_META).read_text())["cross_attention_dim"]
    pipe = SimpleNamespace(unet=SimpleNamespace(config=SimpleNamespace(cross_attention_dim=width)))  # the embedded model's
    names, defaults, note = adapter_choices(pipe)
    assert names == list(EMBEDDED_ADAPTERS) and note == ""
    assert defaults == {"style": "embedded-style", "subject": "embedded-subject"}
    monkeypatch.setattr(embedded, "SHIPPED_ROOT", tmp_path)  # a package without them
    missing = available_adapters(pipe)
    assert missing.names == () and all(n in missing.reason for n in EMBEDDED_ADAPTERS) and "not installed" in missing.reason


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_a_series_with_an_image_prompt_records_it_and_its_images_are_made_again(files, tmp_path):
    from consistent_diffusion.core.recipe import read_recipe
    from consistent_diffusion.series import load_series_request, recreate_image, series_request

    pipe = tiny_sd_pipeline()
    upload = Path(shutil.copy(files["style_image"], tmp_path / "upload.png"))  # the browser's temporary copy
    plain = jobs.make_series(pipe, _form(), tmp_path / "jobs", progress=False)
    styled = jobs.make_series(pipe, _form(style_image=str(upload), style_adapter=files["style"], style_scale=0.9),
                              tmp_path / "jobs", progress=False)
    both = jobs.make_series(pipe, _form(style_image=str(upload), style_adapter=files["style"], style_scale=0.9,
                                        subject_image=files["subject_image"], subject_adapter=files["subject"]),
                            tmp_path / "jobs", progress=False)
    assert np.abs(_pixels(styled.images[0]) - _pixels(plain.images[0])).max() > 2, "the image prompt acts"
    assert np.abs(_pixels(both.images[0]) - _pixels(styled.images[0])).max() > 2, "the subject adapter acts too"
    (recorded,) = json.loads(styled.manifest.read_text())["methods"]
    kept = Path(recorded["options"]["images"][0])
    assert recorded["name"] == "ip_adapter" and recorded["options"]["scales"] == [0.9]
    assert kept.parent == (tmp_path / "jobs" / "inputs").resolve() and kept.read_bytes() == upload.read_bytes()
    assert [len(m["options"]["adapters"]) for m in json.loads(both.manifest.read_text())["methods"]] == [2]
    upload.unlink()  # the upload is gone: the recipe names the kept copy
    request = series_request(read_recipe(styled.images[0])["request"], "recipe")
    again = recreate_image(tiny_sd_pipeline(), request, 0, 0)
    assert np.array_equal(np.asarray(again.convert("RGB"), dtype=np.int16), _pixels(styled.images[0]))
    assert [m.name for m in load_series_request(both.manifest).methods] == ["ip_adapter"]


def test_the_section_in_a_real_browser_offers_the_adapter_and_runs_it(browser, files, tmp_path):
    pytest.importorskip("gradio", reason="gradio is part of the app extra")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    from consistent_diffusion.app.ui import App, launch

    pipe = tiny_sd_pipeline()
    app = App(lambda: pipe, tmp_path / "jobs", model_label="tiny-sd (built in code)", ip_adapters=[files["folder"]])
    port = free_port()
    page = launch(app, port=port, block=False)
    try:
        browser.get(f"http://127.0.0.1:{port}/")
        section = wait_for(lambda: [b for b in browser.find_elements(By.CSS_SELECTOR, "#image-prompt button")
                                    if "Image prompt" in b.text], what="the image prompt section")[0]
        browser.execute_script("arguments[0].click()", section)
        note = wait_for(lambda: [e for e in browser.find_elements(By.CSS_SELECTOR, "#ip-note")
                                 if "Adapters for this model" in e.text], what="the adapters offered")[0]
        assert files["folder"] in note.text
        adapter = browser.find_element(By.CSS_SELECTOR, "#ip-style-adapter input")
        assert adapter.get_attribute("value") == files["folder"], "the offered adapter is preselected"
        wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#ip-style-image input[type=file]"),
                 what="the style image field")[0].send_keys(files["style_image"])
        wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#ip-style-image img"), what="the uploaded image")
        steps = browser.find_element(By.CSS_SELECTOR, "#steps input[type=number]")
        steps.clear()
        steps.send_keys("2")
        browser.find_element(By.CSS_SELECTOR, "#generate").click()
        manifests = wait_for(lambda: list((tmp_path / "jobs").glob("series-*/manifest.json")), what="the manifest")
        (method,) = json.loads(manifests[0].read_text())["methods"]
        assert method["name"] == "ip_adapter" and method["options"]["adapters"] == [str(Path(files["folder"]).resolve())]
        wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#gallery img"), what="the images")
        # a corrupt image, then a typed adapter that is not there: one-line errors in the page, no job
        browser.find_element(By.CSS_SELECTOR, "#ip-subject-image input[type=file]").send_keys(files["corrupt"])
        wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#ip-subject-image img"), what="the subject image")
        browser.find_element(By.CSS_SELECTOR, "#generate").click()
        wait_for(lambda: "subject image prompt corrupt.png is not a readable image" in browser.page_source,
                 what="the corrupt image's error")
        typed = browser.find_element(By.CSS_SELECTOR, "#ip-subject-adapter input")
        typed.send_keys(Keys.CONTROL, "a")
        typed.send_keys(files["folder"] + "-missing", Keys.ENTER)
        browser.find_element(By.CSS_SELECTOR, "#prompts textarea").click()  # the typed value is committed on blur
        browser.find_element(By.CSS_SELECTOR, "#generate").click()
        wait_for(lambda: "subject image prompt: IP-Adapter not found: " + files["folder"] + "-missing" in browser.page_source,
                 what="the error")
        assert len(list((tmp_path / "jobs").glob("series-*/manifest.json"))) == 1
    finally:
        page.close()
    bare = App(lambda: pipe, tmp_path / "jobs")  # no adapter for this model: the note says why, in one line
    assert bare.image_prompt_section()[2].startswith("No IP-Adapter for this model: the embedded model's own")
