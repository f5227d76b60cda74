#!/usr/bin/env python
"""An interim look at an embedded IP-Adapter stage: does the image move the outputs toward it?

    python scripts/peek_ip_adapter.py --data DATA --adapter RUN/ip_adapter --out PEEK.json
    python scripts/peek_ip_adapter.py --data DATA --state RUN/checkpoints/step_001000.pt --pairing style --out PEEK.json

Reference images are rows of identities never trained on (holdout and val splits): for the style
adapter in the two held-out styles (never trained on either) and, for comparison, in the trained
styles; for the subject adapter in every style. Each reference gets a caption as the adapter was
trained with: the style adapter another never-trained identity's name (no style word), the
subject adapter ``"<another trained style> style"`` (no name). Plain (caption only) and adapter
(caption + reference image, scale ``--scale``) images share seeds, 20 DDIM steps, guidance 5 and the
model's guidance rescale.

Scores: cosine similarity of each output to its reference under several extractors, adapter minus
plain per image, mean and two-stage bootstrap 95% interval over references (``bench.stats``):
``emoji-style`` and ``emoji-object`` (the shipped heads, on the adapter encoder's own backbone,
EfficientNet-Lite0), and ``probe-style`` / ``probe-content`` (small CNNs on real emoji) and
``style-stats`` / ``palette`` (hand-made statistics), which share nothing with the encoder. For the
style adapter ``emoji-object`` is leakage (it should not rise); for the subject adapter it is the point.
Writes the numbers to ``--out`` and a sheet (references, plain, adapter) beside it.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

STYLE_EXTRACTORS = ("emoji-style", "probe-style", "style-stats", "palette", "emoji-object", "probe-content")
SUBJECT_EXTRACTORS = ("emoji-object", "probe-content", "emoji-style", "probe-style", "palette")


def references(records: list[dict], pairing: str, per_style: int, seed: int) -> list[tuple[int, str]]:
    """(row, caption) pairs: references of never-trained identities, captions under the pairing's rule."""
    rng = np.random.default_rng(seed)
    unseen = [i for i, r in enumerate(records) if r["split"] in ("holdout", "val")]
    styles = sorted({records[i]["style"] for i in unseen})
    trained = sorted({r["style"] for r in records if r.get("style_split", "trained") == "trained"})
    chosen = []
    for style in styles:
        rows = [i for i in unseen if records[i]["style"] == style]
        for row in rng.choice(rows, size=min(per_style, len(rows)), replace=False):
            row = int(row)
            if pairing == "style":
                others = [i for i in unseen if records[i]["identity"] != records[row]["identity"]]
                caption = records[int(rng.choice(others))]["name"]
            else:
                caption = f"{rng.choice([s for s in trained if s != records[row]['style']])} style"
            chosen.append((row, caption))
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--adapter", type=Path, help="an adapter folder (OUT/ip_adapter or a shipped one)")
    parser.add_argument("--state", type=Path, help="or a checkpoint / hand-off of a `train ip-adapter` run")
    parser.add_argument("--pairing", choices=("style", "subject"), help="with --state: which adapter it is")
    parser.add_argument("--out", required=True, type=Path, help="the peek json (a sheet PNG goes beside it)")
    parser.add_argument("--per-style", type=int, default=3, help="references per style")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from PIL import Image

    from consistent_diffusion.bench.stats import bootstrap_interval
    from consistent_diffusion.core.images import contact_sheet, save_png_atomic
    from consistent_diffusion.core.outputs import write_json_atomic
    from consistent_diffusion.data.emoji import load_emoji_dataset
    from consistent_diffusion.methods.base import GenerationContext, default_guidance_rescale, run
    from consistent_diffusion.methods.ip_adapter import IPAdapter
    from consistent_diffusion.methods.ip_adapter.embedded import read_meta
    from consistent_diffusion.metrics.extractors.registry import load_features
    from consistent_diffusion.models.embedded import load_embedded_pipeline
    from consistent_diffusion.training.ip_adapter import export_state

    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="peek-ip-"))
    if args.state is not None:
        if args.pairing is None:
            parser.error("--state needs --pairing")
        adapter, pairing = export_state(args.state, work / "adapter", {"pairing": args.pairing}), args.pairing
    elif args.adapter is not None:
        adapter, pairing = args.adapter, (read_meta(args.adapter) or {}).get("pairing")
    else:
        parser.error("give --adapter or --state")
    dataset = load_emoji_dataset(args.data)
    refs = references(dataset.records, pairing, args.per_style, seed=0)
    pipe = load_embedded_pipeline()
    pipe.set_progress_bar_config(disable=True)
    rescale = default_guidance_rescale(pipe)
    call = {"num_inference_steps": args.steps, "guidance_scale": 5.0, "height": 64, "width": 64,
            **({} if rescale is None else {"guidance_rescale": rescale})}
    outputs: dict[str, list] = {"plain": [], "adapter": []}
    ref_images = []
    for k, (row, caption) in enumerate(refs):
        image = Image.fromarray(dataset.images[row])
        path = work / f"ref{k}.png"
        image.save(path)
        method = IPAdapter(adapters=(str(adapter),), images=(str(path),), scales=(args.scale,))
        for side, methods in (("plain", ()), ("adapter", (method,))):
            ctx = GenerationContext(pipe=pipe, prompts=[caption] * args.seeds, negative_prompts=None,
                                    generators=[torch.Generator().manual_seed(s) for s in range(args.seeds)],
                                    call_kwargs=dict(call))
            outputs[side] += run(ctx, methods)
        ref_images += [image] * args.seeds
    extractors = STYLE_EXTRACTORS if pairing == "style" else SUBJECT_EXTRACTORS
    heldout = set(dataset.heldout_styles)
    report: dict = {"pairing": pairing, "adapter": Path(args.state or args.adapter).name, "scale": args.scale,
                    "references": [{"row": r, "style": dataset.records[r]["style"], "name": dataset.records[r]["name"],
                                    "caption": c} for r, c in refs],
                    "seeds": args.seeds, "steps": args.steps, "scores": {}}
    for name in extractors:
        features = load_features(name)

        def unit(images, features=features):
            e = features.embed(images).float()
            return e / e.norm(dim=1, keepdim=True).clamp_min(1e-8)

        ref = unit(ref_images)
        sims = {side: (unit(images) * ref).sum(1).numpy() for side, images in outputs.items()}
        for subset, keep in (("heldout_styles", True), ("trained_styles", False), ("all", None)):
            groups = [[float(sims["adapter"][k * args.seeds + s] - sims["plain"][k * args.seeds + s])
                       for s in range(args.seeds)]
                      for k, (row, _) in enumerate(refs)
                      if keep is None or (dataset.records[row]["style"] in heldout) == keep]
            interval = bootstrap_interval(groups)
            if interval is None:
                continue
            mask = [keep is None or (dataset.records[row]["style"] in heldout) == keep
                    for row, _ in refs for _ in range(args.seeds)]
            report["scores"].setdefault(name, {})[subset] = {
                "plain": float(sims["plain"][mask].mean()), "adapter": float(sims["adapter"][mask].mean()),
                "gain": interval.mean, "low": interval.low, "high": interval.high, "images": interval.samples}
    report["seconds"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(report, args.out)
    columns = len(refs)
    firsts = [k * args.seeds for k in range(columns)]
    sheet = [ref_images[i] for i in firsts] + [outputs["plain"][i] for i in firsts] + [outputs["adapter"][i] for i in firsts]
    save_png_atomic(contact_sheet(sheet, columns=columns), args.out.with_suffix(".png"))
    for name, subsets in report["scores"].items():
        for subset, value in subsets.items():
            print(f"{name:14s} {subset:15s} plain {value['plain']:.3f} adapter {value['adapter']:.3f} "
                  f"gain {value['gain']:+.3f} [{value['low']:+.3f}, {value['high']:+.3f}]")
    print(f"{report['seconds']} s")


if __name__ == "__main__":
    main()
