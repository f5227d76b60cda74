"""The embedded model's quality evaluation: prompt sets, colour classifier, R^2, retrieval, the table.

Everything here runs on hand-made data (a few synthetic images, embeddings, a fake results dict)
or the tiny random pipelines of ``consistent_diffusion.testing``; expected values are worked out
by hand in the comments.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from consistent_diffusion.core.errors import ConfigError
from consistent_diffusion.data.emoji import EmojiDataset
from consistent_diffusion.testing import tiny_sd_pipeline
from consistent_diffusion.training.recipes import evaluation as ev

# sRGB fills that a person names so; the classifier must agree on each.
DISC_FILLS = {"red": (220, 30, 40), "orange": (245, 140, 20), "yellow": (250, 220, 40), "green": (60, 170, 60),
              "blue": (40, 90, 220), "purple": (140, 60, 190), "brown": (130, 80, 50), "black": (30, 30, 30)}


def disc(fill, size: int = 64, radius: int = 20, outline: tuple[int, int, int] | None = None) -> np.ndarray:
    """uint8 (size, size, 3): a filled disc on white, with an optional 3 px outline ring."""
    image = np.full((size, size, 3), 255, dtype=np.uint8)
    yy, xx = np.mgrid[:size, :size]
    distance = np.hypot(yy - size / 2, xx - size / 2)
    image[distance < radius] = fill
    if outline is not None:
        image[(distance >= radius - 3) & (distance < radius)] = outline
    return image


def make_dataset(categories=("A", "B", "C"), trained=("s1", "s2", "s3"), heldout=("h1",), per_category: int = 4,
                 missing: dict | None = None, extra: list[dict] | None = None) -> EmojiDataset:
    """A labelled dataset: ``per_category`` train identities per category (+ one val identity), drawn
    in every style except where ``missing`` = {identity: style} says; ``extra`` records are appended
    (each with an 'image' array). Images are noise except for extra records."""
    missing = missing or {}
    records, images = [], []
    rng = np.random.default_rng(0)
    for category in categories:
        for k in range(per_category + 1):
            identity = f"{category.lower()}{k}"
            split = "val" if k == per_category else "train"
            for style in (*trained, *heldout):
                if missing.get(identity) == style:
                    continue
                records.append({"style": style, "identity": identity, "name": f"thing {identity}", "category": category,
                                "caption": f"thing {identity}, {style} style", "split": split,
                                "style_split": "heldout" if style in heldout else "trained"})
                images.append(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    for record in extra or []:
        images.append(record.pop("image"))
        records.append(record)
    meta = {"styles": [*trained, *heldout], "heldout_styles": list(heldout), "categories": list(categories),
            "sources": []}
    return EmojiDataset(images=np.stack(images), records=records, meta=meta)


def write_probe(folder, name: str, labels: list[str]):
    """A random-init probe of the shipped format (weights + json with labels)."""
    from safetensors.torch import save_file

    from consistent_diffusion.metrics.extractors.probes import Probe

    torch.manual_seed(0)
    model = Probe(len(labels), width=8, embed_dim=16)
    save_file(model.state_dict(), str(folder / f"{name}.safetensors"))
    (folder / f"{name}.json").write_text(json.dumps({"name": name, "labels": labels,
                                                     "config": {"width": 8, "embed_dim": 16}}))
    return folder


# ----------------------------------------------------------------------------- prompt sets


def test_default_per_category_reaches_300_images_for_five_and_two_styles():
    dataset = make_dataset(categories=[f"c{i}" for i in range(9)], trained=("a", "b", "c", "d", "e"), per_category=1)
    assert ev.default_per_category(dataset, dataset.trained_styles) == 7  # 9 x 7 x 5 = 315 >= 300 > 9 x 6 x 5
    assert ev.default_per_category(dataset, ["a", "b"]) == 17  # 9 x 17 x 2 = 306 >= 300 > 9 x 16 x 2


def test_prompt_set_counts_styles_and_seeds():
    dataset = make_dataset()
    prompts = ev.prompt_set(dataset, 2)
    assert len(prompts) == 3 * 2 * 3  # categories x identities x trained styles (never the held-out h1)
    assert {p["style"] for p in prompts} == {"s1", "s2", "s3"}
    assert [p["seed"] for p in prompts] == list(range(1000, 1018))
    assert all(p["prompt"] == f"{p['name']}, {p['style']} style" for p in prompts)
    assert all(p["identity"][-1] != "4" for p in prompts)  # the val identity k = 4 is never prompted
    two = ev.prompt_set(dataset, 2, styles=["s1", "s3"])
    assert len(two) == 3 * 2 * 2
    assert {p["identity"] for p in two} == {p["identity"] for p in prompts}  # same identities, fewer styles


def test_prompt_set_nests_skips_partly_drawn_identities_and_tuning_is_disjoint():
    dataset = make_dataset(per_category=5, missing={"a0": "s2"})  # a0 is not drawn in s2: never eligible
    small, large = ev.prompt_set(dataset, 1), ev.prompt_set(dataset, 3)
    assert {p["identity"] for p in small} <= {p["identity"] for p in large}
    assert "a0" not in {p["identity"] for p in ev.prompt_set(dataset, 5)}
    tuning, measured = ev.prompt_set(dataset, 2, tuning=True), ev.prompt_set(dataset, 2)
    assert not {p["identity"] for p in tuning} & {p["identity"] for p in measured}  # 2 + 2 <= 4 eligible in A
    assert {p["identity"] for p in ev.prompt_set(dataset, 3, tuning=True)} & {p["identity"] for p in large}  # 6 > 4
    assert len(ev.prompt_set(dataset, 100)) == (4 + 5 + 5) * 3  # capped at the eligible identities


def test_measured_styles_follow_the_style_probe_or_the_given_list(tmp_path):
    dataset = make_dataset()
    write_probe(tmp_path, "style", ["s1", "s3"])
    assert ev.measured_styles(dataset, None, tmp_path) == ["s1", "s3"]
    assert ev.measured_styles(dataset, ("s3",), tmp_path) == ["s3"]
    with pytest.raises(ConfigError):
        ev.measured_styles(dataset, ("s2",), tmp_path)  # a trained style the probe cannot label
    with pytest.raises(ConfigError):
        ev.measured_styles(dataset, ("h1",), tmp_path)  # a held-out style


# ----------------------------------------------------------------------------- guidance rescale, generation


def test_generate_uses_given_latents_and_guidance_rescale():
    pipe = tiny_sd_pipeline(zero_snr=True)
    items = [{"prompt": "a red heart", "seed": 1}, {"prompt": "a red heart", "seed": 2}]
    noise = ev.starting_noise(pipe, [7, 7])
    assert noise.shape == (2, 4, 16, 16)
    assert torch.equal(noise[0], torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(7))[0])
    plain = ev.Sampling(steps=2, guidance=5.0, guidance_rescale=0.0)
    same = ev.generate(pipe, items, plain, latents=noise)
    assert torch.allclose(same[0], same[1], atol=1e-5)  # one noise, two generator seeds: the noise decides
    assert not torch.allclose(ev.generate(pipe, items, plain)[0], ev.generate(pipe, items, plain)[1])
    rescaled = ev.generate(pipe, items, ev.Sampling(2, 5.0, 0.7), latents=noise)
    assert (rescaled - same).abs().max() > 1e-4  # the rescale reached the pipeline


def test_noise_colour_r2_reports_channels_control_and_chance():
    result = ev.noise_colour_r2(tiny_sd_pipeline(zero_snr=True), ev.Sampling(2, 1.0), "a heart", seeds=9)
    assert set(result["r2"]) == set(result["shuffled_r2"]) == {"R", "G", "B"}
    assert result["chance_r2"] == round(4 / 8, 4)  # p / (n - 1) with 4 noise channels, 9 seeds
    assert all(0.0 <= v <= 1.0 for v in result["r2"].values())
    assert result["r2_max"] == max(result["r2"].values())
    assert set(result["r2_interval95"]) == {"R", "G", "B"}
    assert all(0.0 <= low <= high <= 1.0 for low, high in result["r2_interval95"].values())


# ----------------------------------------------------------------------------- colour


def test_srgb_to_lab_known_values():
    lab = ev.srgb_to_lab(np.array([[255, 255, 255], [0, 0, 0], [255, 0, 0]], dtype=np.uint8))
    np.testing.assert_allclose(lab[0], [100, 0, 0], atol=0.01)
    np.testing.assert_allclose(lab[1], [0, 0, 0], atol=0.01)
    np.testing.assert_allclose(lab[2], [53.24, 80.09, 67.20], atol=0.05)  # CIE Lab of sRGB red


@pytest.mark.parametrize("colour", list(DISC_FILLS))
def test_dominant_colour_of_a_disc_on_white(colour):
    assert ev.dominant_colour(disc(DISC_FILLS[colour])) == colour
    # a black outline (about a quarter of the disc's pixels) does not outvote the fill
    assert ev.dominant_colour(disc(DISC_FILLS[colour], outline=(20, 20, 20))) == colour


def test_dominant_colour_ignores_white_and_light_grey():
    assert ev.dominant_colour(np.full((64, 64, 3), 255, dtype=np.uint8)) is None
    grey = disc((200, 200, 200))
    assert ev.dominant_colour(grey) is None
    grey[:4, :4] = DISC_FILLS["blue"]  # 16 blue pixels, everything else votes for nothing
    assert ev.dominant_colour(grey) == "blue"


def test_wilson_interval_by_hand():
    # p = 0.8, n = 10: centre (0.8 + 1.96^2/20) / (1 + 1.96^2/10) = 0.7167, half-width 0.2266
    low, high = ev.wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-3) and high == pytest.approx(0.9433, abs=1e-3)
    low, high = ev.wilson_interval(0, 20)
    assert low == 0.0 and high == pytest.approx(0.1611, abs=1e-3)  # z^2 / (n + z^2)


def test_validate_colour_classifier_counts_trained_style_hearts_only():
    extra = [{"style": style, "identity": f"heart-{colour}", "name": f"{colour} heart", "category": "A",
              "split": "train", "image": disc(DISC_FILLS[colour], outline=(20, 20, 20) if style == "s2" else None)}
             for colour in ev.COLOURS for style in ("s1", "s2", "h1")]
    dataset = make_dataset(extra=extra)
    for record in dataset.records:
        record.setdefault("style_split", "heldout" if record["style"] == "h1" else "trained")
    result = ev.validate_colour_classifier(dataset)
    assert result == {"images": 16, "accuracy": 1.0, "misses": []}  # 8 colours x 2 trained styles


# ----------------------------------------------------------------------------- R^2


def test_r_squared_is_one_for_a_linear_relation_and_near_zero_for_independent_noise():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 4))
    y = np.stack([3 + x @ [1.0, -2.0, 0.5, 0.0], -1 + 0.1 * x[:, 3]], axis=1)
    np.testing.assert_allclose(ev.r_squared(x, y), [1.0, 1.0], atol=1e-12)
    big = rng.normal(size=(5000, 4))
    assert ev.r_squared(big, rng.normal(size=5000))[0] < 0.01  # expected 4 / 4999
    half = x[:, 0] + rng.normal(size=200)  # var(signal) = var(noise): R^2 about 1/2
    assert ev.r_squared(x, half)[0] == pytest.approx(0.5, abs=0.12)
    assert np.isnan(ev.r_squared(x, np.ones(200))[0])  # a constant has nothing to explain


# ----------------------------------------------------------------------------- retrieval


def test_top_k_identity_hits_by_hand():
    gallery = torch.tensor([[1.0, 0, 0], [0.9, 0.1, 0], [0, 1.0, 0], [0.1, 0.9, 0], [0, 0, 1.0]])
    g_ids, g_styles = ["A", "A", "B", "B", "C"], ["s1", "s2", "s1", "s2", "s2"]
    # q0: A in s1 -> searches the s2 images (A, B, C); nearest A s2: hit; chance 1 of 3.
    # q1: B in s2 but drawn like A -> searches s1 (A, B); nearest A s1: a miss at k = 1; chance 1/2.
    # q2: A in s2, exactly A's own s2 image -> that image is not searched; nearest A s1: hit.
    query = torch.tensor([[1.0, 0, 0], [0.95, 0.05, 0], [0.9, 0.1, 0]])
    hits, chance = ev.top_k_identity_hits(query, ["A", "B", "A"], ["s1", "s2", "s2"], gallery, g_ids, g_styles, k=1)
    assert hits.tolist() == [True, False, True]
    np.testing.assert_allclose(chance, [1 / 3, 1 / 2, 1 / 2])
    hits, chance = ev.top_k_identity_hits(query, ["A", "B", "A"], ["s1", "s2", "s2"], gallery, g_ids, g_styles, k=2)
    assert hits.tolist() == [True, True, True]
    np.testing.assert_allclose(chance, [1 - (2 / 3) * (1 / 2), 1.0, 1.0])  # 1 - C(2,2)/C(3,2) for q0


def test_identity_retrieval_gallery_is_train_split_of_trained_styles(tmp_path):
    dataset = make_dataset()
    write_probe(tmp_path, "content", ["A", "B", "C"])
    prompts = ev.prompt_set(dataset, 1)
    row = {(r["identity"], r["style"]): i for i, r in enumerate(dataset.records)}
    real = dataset.images[[row[p["identity"], p["style"]] for p in prompts]]
    generated = torch.from_numpy(real).permute(0, 3, 1, 2).float() / 127.5 - 1  # the prompts' real images
    result = ev.identity_retrieval(generated, prompts, dataset, tmp_path, k=5)
    assert result["hit_rate"] == result["real_hit_rate"]  # generated == real: the same queries
    assert result["gallery_images"] == 3 * 4 * 3  # categories x train identities x trained styles
    assert result["queries"] == len(prompts) == 9
    # 24 searched images (the two other styles), 2 of the query's identity: 1 - C(22,5)/C(24,5)
    assert result["chance"] == pytest.approx(1 - math.comb(22, 5) / math.comb(24, 5), abs=1e-5)
    assert 0.0 <= result["hit_rate"] <= 1.0


# ----------------------------------------------------------------------------- table, sheet, config


def fake_results(hit_rate: float = 0.25, colour: float = 0.85, r2: float = 0.2) -> dict:
    return {
        "styles": ["google", "twitter"], "heldout_real_images": 262, "vae_psnr_db_heldout": 27.5,
        "heldout_style_images": 300, "vae_psnr_db_heldout_styles": 24.0,
        "generation": {"images": 306, "steps": 30, "guidance": 5.0, "guidance_rescale": 0.7, "seconds": 80.0},
        "style_accuracy": 0.92, "style_accuracy_per_style": {"google": 0.9, "twitter": 0.94}, "style_chance": 0.2,
        "category_accuracy": 0.6, "category_chance": 0.1111,
        "identity_retrieval": {"k": 5, "hit_rate": hit_rate, "chance": 0.003, "queries": 306, "gallery_images": 8500},
        "colour_binding": {"accuracy": colour, "interval95": [0.7, 0.9], "images": 64, "chance": 0.125,
                           "classifier_on_real_hearts": {"images": 40, "accuracy": 1.0}},
        "noise_colour": {"r2": {"R": r2, "G": 0.1, "B": 0.05}, "r2_max": r2, "shuffled_r2": {"R": 0.1, "G": 0.0,
                         "B": 0.1}, "chance_r2": 0.085, "seeds": 48},
        "frechet_efficientnet_lite0": {"trained_vs_heldout": 100.0, "untrained_vs_heldout": 400.0,
                                       "real_train_vs_heldout": 80.0, "unstyled_vs_heldout": 120.0,
                                       "gap_closed": 0.9375, "unstyled_ratio": 1.2},
        "cpu_seconds_8_images_30_steps": {"1_threads": 4.0, "2_threads": 3.0},
    }


def _rows(markdown: str) -> dict[str, list[str]]:
    rows = [line.strip("|").split(" | ") for line in markdown.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows[1:]}


def test_quality_markdown_without_baseline():
    markdown = ev.quality_markdown(fake_results())
    assert markdown.splitlines()[0] == "| measure | old model | new model | bar | met? |"
    rows = _rows(markdown)
    assert len(rows) == len(ev.QUALITY_ROWS)
    assert rows["style-probe accuracy, generated"][0] == "not given"
    assert rows["style-probe accuracy, generated"][1].startswith("92.0% (2 styles")
    assert rows["style-probe accuracy, generated"][3] == "yes"
    assert rows["category-probe accuracy, generated"][1].startswith("60.0% = 5.40x chance")  # 0.6 / 0.1111
    assert rows["category-probe accuracy, generated"][3] == "**no**"  # 5.40x < 6x
    assert rows["identity retrieval, top-5 among real images of the other styles"][3] == "n/a"  # needs the old one
    assert rows["Frechet gap closed (EfficientNet-Lite0)"][1].startswith("93.8%")
    assert rows["8 images x 30 steps, CPU"][3] == "yes"
    assert rows["VAE PSNR, held-out identities of the measured styles"][1:] == ["27.50 dB (262 images)", ">= 27 dB", "yes"]
    assert rows["VAE PSNR, held-out styles (never trained on), held-out identities"][1:] == [
        "24.00 dB (300 images)", ">= 25 dB", "**no**"]
    older = fake_results()
    del older["vae_psnr_db_heldout_styles"]  # a results file from before the held-out styles were measured
    assert _rows(ev.quality_markdown(older))["VAE PSNR, held-out styles (never trained on), held-out identities"][
        1:] == ["not measured", ">= 25 dB", "n/a"]


def test_quality_markdown_with_baseline_judges_against_it():
    old = fake_results(hit_rate=0.1, colour=0.12, r2=0.92)
    rows = _rows(ev.quality_markdown(fake_results(hit_rate=0.25), old))
    retrieval = rows["identity retrieval, top-5 among real images of the other styles"]
    assert retrieval[0].startswith("10.0%") and retrieval[1].startswith("25.0%") and retrieval[3] == "yes"
    assert rows["output mean colour explained by the noise's channel means (R^2)"][0].startswith("max 0.92")
    with_interval = fake_results(r2=0.25)
    with_interval["noise_colour"]["r2_interval95"] = {"R": [0.1, 0.4], "G": [0.0, 0.2], "B": [0.0, 0.1]}
    noise_row = _rows(ev.quality_markdown(with_interval))["output mean colour explained by the noise's channel means (R^2)"]
    assert "95% R [0.10, 0.40], G [0.00, 0.20], B [0.00, 0.10]" in noise_row[1] and noise_row[3] == "yes"
    rows = _rows(ev.quality_markdown(fake_results(hit_rate=0.19, colour=0.5, r2=0.31), old))
    assert rows["identity retrieval, top-5 among real images of the other styles"][3] == "**no**"  # 0.19 < 2 x 0.1
    assert rows["colour binding, eight colour-named hearts (Wilson 95%)"][3] == "**no**"
    assert rows["output mean colour explained by the noise's channel means (R^2)"][3] == "**no**"
    rows = _rows(ev.quality_markdown(fake_results(hit_rate=0.0), fake_results(hit_rate=0.0)))
    assert rows["identity retrieval, top-5 among real images of the other styles"][3] == "**no**"  # 0 is not 2 x 0


def test_quality_markdown_with_an_older_baseline_file():
    old = {k: v for k, v in fake_results().items() if k not in ("identity_retrieval", "colour_binding",
                                                                 "noise_colour", "styles")}
    rows = _rows(ev.quality_markdown(fake_results(), old))
    assert rows["colour binding, eight colour-named hearts (Wilson 95%)"][0] == "not measured"
    assert rows["identity retrieval, top-5 among real images of the other styles"][3] == "n/a"
    assert rows["style-probe accuracy, generated"][0].startswith("92.0%")


def test_comparison_sheet_layout():
    first, second = tiny_sd_pipeline(seed=0), tiny_sd_pipeline(seed=1)
    sampling = ev.Sampling(steps=2, guidance=2.0)
    sheet = ev.comparison_sheet([("new", first, sampling), ("old", second, sampling)], prompts=["a", "b"], seeds=4)
    # label 260 + 2 models x (4 seeds x (64 + 2) + 12); header 28 + 2 prompts x (64 + 2); 32 px images x 2
    assert sheet.size == (260 + 2 * (4 * 66 + 12), 28 + 2 * 66)
    pixels = np.asarray(sheet)
    left, right = pixels[28:28 + 64, 260:260 + 64], pixels[28:28 + 64, 260 + 4 * 66 + 12:260 + 4 * 66 + 12 + 64]
    assert not np.array_equal(left, right)  # two different models' first image of prompt "a"
    narrow = ev.comparison_sheet([("new", first, sampling)], prompts=["a"], seeds=1)
    assert narrow.width > 260 + 66 + 12  # one seed: the block widens to its settings line


def test_eval_config_validation():
    with pytest.raises(ConfigError):
        ev.EvalConfig(data="d", per_category=0)
    with pytest.raises(ConfigError):
        ev.EvalConfig(data="d", guidance_rescale=1.5)
    with pytest.raises(ConfigError):
        ev.EvalConfig(data="d", noise_seeds=4)
    with pytest.raises(ConfigError):
        ev.EvalConfig(data="d", styles=())
    config = ev.EvalConfig(data="d", styles=["google"], guidance_sweep=[3, 5])
    assert config.styles == ("google",) and config.guidance_sweep == (3.0, 5.0) and config.per_category is None


def _weights_folder(folder, step: int = 19005):
    pipe = tiny_sd_pipeline(zero_snr=True)
    pipe.vae.save_pretrained(folder / "vae", safe_serialization=True)
    pipe.unet.save_pretrained(folder / "unet", safe_serialization=True)
    pipe.scheduler.save_pretrained(folder / "scheduler")
    recipe = {"vae": {"channels": [32, 64, 64], "mse_weight": 1.0, "kl_weight": 1e-6, "lr": 1e-3, "batch": 32,
                      "crop": 32, "crop_fraction": 0.75},
              "unet": {"channels": [64, 128, 192], "min_snr_gamma": 5.0, "lr": 4e-4, "warmup": 200, "steps": 30000,
                       "batch": 32, "ema_decay": 0.999, "caption_dropout": 0.1},
              "max_length": 16, "threads": 2, "paused_at_step": step}
    (folder / "training.json").write_text(json.dumps(recipe))
    return folder


def test_model_card_of_a_staged_model_lists_every_stage_its_cost_and_the_notes(tmp_path):
    folder = _weights_folder(tmp_path)
    results = fake_results() | {"styles": ["google", "twitter"], "scheduler": {"prediction_type": "v_prediction"},
                                "probe_heldout_real": {"style": {"accuracy": 0.99}, "content": {"accuracy": 0.7}}}
    record = {"stages": [
        {"stage": "vae", "steps": [0, 2926], "train_minutes": 30.0, "seconds_per_step": 0.621, "machine": "x86_64",
         "note": "The VAE. Ended by its budget."},
        {"stage": "unet", "steps": [0, 6495], "train_minutes": 95.4, "seconds_per_step": 0.843, "machine": "x86_64",
         "note": "From random init | stopped by SIGTERM."},
        {"stage": "unet", "steps": [6495, 19005], "train_minutes": 84.6, "seconds_per_step": 1.4, "machine": "x86_64",
         "note": "Exact resume."},
    ]}
    notes = "- why the noise bar is missed: measured with 48 seeds."
    card = ev.write_model_card(folder, results, ev.quality_markdown(results), make_dataset(), None, record, notes)
    text = card.read_text()
    assert "| 1 | vae | 0 -> 2,926 | 30.0 | 0.62 | x86_64 | The VAE. |" in text
    assert "| 2 | unet | 0 -> 6,495 | 95.4 | 0.84 | x86_64 | From random init / stopped by SIGTERM. |" in text
    assert "vae 0.5 h over 1 stage(s), unet 3.0 h over 2 stage(s)" in text  # (95.4 + 84.6) / 60
    assert "EMA weights at step 19,005" in text and "v-prediction" in text
    assert notes in text and "stages/embedded-v2/README.md" in text and "## Recipe (as run)" not in text
    one_run = ev.write_model_card(folder, results, ev.quality_markdown(results), make_dataset()).read_text()
    assert "## Recipe (as run)" in one_run and "| 1 | vae |" not in one_run and notes not in one_run
