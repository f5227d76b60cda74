"""The quality table: one row per measure (old model, new model, bar, met?) and its markdown."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def _yes(ok: bool | None) -> str:
    return "n/a" if ok is None else ("yes" if ok else "**no**")


def _cpu_one_thread(r: dict) -> float:
    return r["cpu_seconds_8_images_30_steps"]["1_threads"]


def _style_text(r: dict) -> str:
    per = ", ".join(f"{k} {v:.0%}" for k, v in r["style_accuracy_per_style"].items())
    return f"{r['style_accuracy']:.1%} ({len(r['style_accuracy_per_style'])} styles: {per}; chance {r['style_chance']:.0%})"


def _category_text(r: dict) -> str:
    return f"{r['category_accuracy']:.1%} = {r['category_accuracy'] / r['category_chance']:.2f}x chance " \
           f"({r['category_chance']:.1%})"


def _retrieval_text(r: dict) -> str:
    t = r["identity_retrieval"]
    real = f"; real images as queries {t['real_hit_rate']:.0%}" if t.get("real_hit_rate") is not None else ""
    return f"{t['hit_rate']:.1%} (chance {t['chance']:.2%}{real}; {t['queries']} queries, {t['gallery_images']} " \
           "real images)"


def _colour_text(r: dict) -> str:
    c = r["colour_binding"]
    real = c["classifier_on_real_hearts"]
    return f"{c['accuracy']:.1%} [{c['interval95'][0]:.0%}, {c['interval95'][1]:.0%}] of {c['images']} (chance " \
           f"{c['chance']:.1%}; classifier on {real['images']} real hearts: {real['accuracy']:.0%})"


def _noise_text(r: dict) -> str:
    n = r["noise_colour"]
    fit = "/".join(f"{v:.2f}" for v in n["r2"].values())
    control = "/".join(f"{v:.2f}" for v in n["shuffled_r2"].values())
    spread = ""
    if "r2_interval95" in n:
        spread = "; 95% " + ", ".join(f"{c} [{a:.2f}, {b:.2f}]" for c, (a, b) in n["r2_interval95"].items())
    return f"max {n['r2_max']:.2f} (R/G/B {fit}{spread}; shuffled {control}; chance {n['chance_r2']:.2f}; " \
           f"{n['seeds']} seeds)"


def _unstyled_text(r: dict) -> str:
    fd = r["frechet_efficientnet_lite0"]
    return f"{fd['unstyled_ratio']:.2f}x (FD {fd['unstyled_vs_heldout']:.1f} without vs {fd['trained_vs_heldout']:.1f} with)"


def _gap_text(r: dict) -> str:
    fd = r["frechet_efficientnet_lite0"]
    return f"{fd['gap_closed']:.1%} (FD {fd['trained_vs_heldout']:.1f}; untrained {fd['untrained_vs_heldout']:.1f}; " \
           f"real {fd['real_train_vs_heldout']:.1f})" if fd["gap_closed"] is not None else "n/a"


def _cpu_text(r: dict) -> str:
    return ", ".join(f"{v} s ({k.replace('_', ' ')})" for k, v in r["cpu_seconds_8_images_30_steps"].items())


def _retrieval_met(r: dict, baseline: dict | None) -> bool | None:
    if baseline is None or "identity_retrieval" not in baseline:
        return None
    new, old = r["identity_retrieval"]["hit_rate"], baseline["identity_retrieval"]["hit_rate"]
    return new > 0 and new >= 2 * old  # (0 >= 2 x 0 is no improvement)


# (measure, value text, bar, met(new, baseline)) of each row of the quality table.
QUALITY_ROWS: tuple[tuple[str, Callable[[dict], str], str, Callable[[dict, dict | None], bool | None]], ...] = (
    ("style-probe accuracy, generated", _style_text, ">= 90%", lambda r, b: r["style_accuracy"] >= 0.9),
    ("category-probe accuracy, generated", _category_text, ">= 6x chance",
     lambda r, b: r["category_accuracy"] >= 6 * r["category_chance"]),
    ("identity retrieval, top-5 among real images of the other styles", _retrieval_text, ">= 2x the old model",
     _retrieval_met),
    ("colour binding, eight colour-named hearts (Wilson 95%)", _colour_text, ">= 80%",
     lambda r, b: r["colour_binding"]["accuracy"] >= 0.8),
    ("output mean colour explained by the noise's channel means (R^2)", _noise_text, "<= 0.3",
     lambda r, b: r["noise_colour"]["r2_max"] <= 0.3),
    ("no style word: FD to real vs with a style word", _unstyled_text, "<= 1.25x",
     lambda r, b: r["frechet_efficientnet_lite0"]["unstyled_ratio"] <= 1.25),
    ("Frechet gap closed (EfficientNet-Lite0)", _gap_text, ">= 75%",
     lambda r, b: (r["frechet_efficientnet_lite0"]["gap_closed"] or 0.0) >= 0.75),
    ("8 images x 30 steps, CPU", _cpu_text, "<= 6 s (1 thread)", lambda r, b: _cpu_one_thread(r) <= 6.0),
    ("VAE PSNR, held-out identities of the measured styles", lambda r: f"{r['vae_psnr_db_heldout']:.2f} dB "
     f"({r['heldout_real_images']} images)", ">= 27 dB", lambda r, b: r["vae_psnr_db_heldout"] >= 27.0),
    ("VAE PSNR, held-out styles (never trained on), held-out identities",
     lambda r: f"{r['vae_psnr_db_heldout_styles']:.2f} dB ({r['heldout_style_images']} images)", ">= 25 dB",
     lambda r, b: r["vae_psnr_db_heldout_styles"] >= 25.0),
)


def _safe(function: Callable[..., Any], *args: Any, missing: Any = "not measured") -> Any:
    """function(*args), or ``missing`` when a results dict lacks a field (an older results file)."""
    try:
        return function(*args)
    except (KeyError, TypeError):
        return missing


def quality_rows(results: dict, baseline: dict | None = None) -> list[tuple[str, str, str, str, str]]:
    """(measure, old model, new model, bar, met) rows of the quality table."""
    return [(measure, _safe(text, baseline) if baseline is not None else "not given", _safe(text, results), bar,
             _yes(_safe(met, results, baseline, missing=None)))
            for measure, text, bar, met in QUALITY_ROWS]


def _generation_note(name: str, r: dict) -> str:
    g = r["generation"]
    note = (f"{name}: {g['images']} images over {len(r.get('styles', [])) or '?'} styles "
            f"({', '.join(r.get('styles', []))}), {g['steps']} {r.get('scheduler', {}).get('class', 'DDIMScheduler')} steps, guidance {g['guidance']}, guidance "
            f"rescale {g.get('guidance_rescale', 0.0)}, one fixed seed per prompt; {g['seconds']} s.")
    if "guidance_tuning" in r:
        t = r["guidance_tuning"]
        note += (f" Guidance {t['chosen']} was chosen on a separate tuning set ({t['images_per_setting']} images per "
                 f"setting, other identities and seeds): {t['sweep']}.")
    return note


def quality_markdown(results: dict, baseline: dict | None = None) -> str:
    """The quality table (measure | old model | new model | bar | met?) and how it was measured."""
    lines = ["| measure | old model | new model | bar | met? |", "|---|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} | {e} |" for a, b, c, d, e in quality_rows(results, baseline)]
    lines += ["", "Prompts `<name>, <style> style` for train identities drawn in every trained style, balanced over "
              "categories; each model prompted in the styles it was trained on. Held-out real images: the val and "
              "holdout identities of those styles. Identity retrieval ranks, in the content probe's embedding, the "
              "real train-split images of every trained style but the prompt's. Colour binding: `<colour> heart, "
              "<style> style`, the same seeds for every colour. Noise R^2: one prompt, least squares of each image's "
              "mean R, G, B on the 4 channel means of its starting noise.", "",
              "- " + _generation_note("new model", results)]
    if baseline is not None:
        lines.append("- " + _safe(_generation_note, "old model", baseline, missing="old model: settings not recorded"))
    met = [row[4] for row in quality_rows(results, baseline)]
    lines += ["", f"Bars met: {met.count('yes')} of {len(met) - met.count('n/a')} judged."]
    return "\n".join(lines)
