"""Measure the embedded model's quality (old model beside new) and write it into its model card.

    python scripts/eval_embedded.py --data DATA_DIR [--weights DIR] [--probes DIR] [--out DIR]
        [--guidance-sweep 3,5,7.5] [--baseline OLD_WEIGHTS --baseline-styles google,twitter
        | --baseline-results OLD_RESULTS_JSON] [--write-card [--record RECORD] [--card-notes NOTES]]
    python scripts/eval_embedded.py --data DATA_DIR --weights DIR --out DIR --card-only [--record ...]
    python scripts/eval_embedded.py --data DATA_DIR --out DIR --retime [--baseline OLD_WEIGHTS]

The measurements, the quality table, the comparison sheet and the model card are library code
(``consistent_diffusion.training.recipes.evaluation``); this script parses, calls and writes
OUT/results.json, OUT/quality.md, OUT/samples.png, OUT/comparison.png (and, with --baseline,
OUT/baseline.json and OUT/baseline/samples.png) and, with --write-card, the weights folder's
MODEL_CARD.md, samples.png and comparison.png.

The old model is measured with the same probes as the new one (unless --baseline-probes), on the
styles it was trained on: --baseline-styles, else the trained styles its style probe labels.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from dataclasses import replace
from pathlib import Path

from consistent_diffusion.core.images import save_png_atomic
from consistent_diffusion.core.outputs import atomic_path, write_text_atomic
from consistent_diffusion.data.emoji import load_emoji_dataset
from consistent_diffusion.models.embedded import EMBEDDED_DIR, load_embedded_pipeline
from consistent_diffusion.models.sampling import DEFAULT_STEPS
from consistent_diffusion.training.recipes.evaluation import (
    EvalConfig,
    comparison_sheet,
    evaluate,
    quality_markdown,
    sampling_of,
    time_generation,
    write_model_card,
)


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x)


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, type=Path, help="emoji dataset folder")
    parser.add_argument("--weights", type=Path, default=None, help="embedded weights folder (default: package)")
    parser.add_argument("--probes", type=Path, default=None, help="probes folder (default: package)")
    parser.add_argument("--out", type=Path, default=None, help="folder for results.json, quality.md and images")
    parser.add_argument("--styles", type=_names, default=None,
                        help="comma-separated styles to measure (default: trained styles the style probe labels)")
    parser.add_argument("--per-category", type=int, default=None,
                        help="identities per category x styles (default: enough for >= 300 images)")
    parser.add_argument("--tuning-per-category", type=int, default=2, help="identities per category, tuning set")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--guidance-sweep", type=_floats, default=(),
                        help="comma-separated guidance scales to choose from on a separate tuning prompt set")
    parser.add_argument("--guidance-rescale", type=float, default=None,
                        help="default: 0.7 for a zero-terminal-SNR scheduler, else 0")
    parser.add_argument("--colour-seeds", type=int, default=4, help="seeds per colour and style")
    parser.add_argument("--noise-seeds", type=int, default=48, help="seeds of the noise -> colour regression")
    parser.add_argument("--sheet-seeds", type=int, default=4, help="seeds per prompt on the comparison sheet")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--timing-threads", type=lambda t: tuple(int(x) for x in t.split(",")), default=(1, 2),
                        help="comma-separated thread counts of the CPU timing (1 always runs)")
    parser.add_argument("--baseline", type=Path, default=None, help="weights folder of the old model to measure")
    parser.add_argument("--baseline-styles", type=_names, default=None,
                        help="styles the old model was trained on (e.g. google,twitter)")
    parser.add_argument("--baseline-probes", type=Path, default=None, help="probes for the old model (default: --probes)")
    parser.add_argument("--baseline-results", type=Path, default=None,
                        help="results.json of an earlier run on the old model (instead of --baseline)")
    parser.add_argument("--write-card", action="store_true", help="write MODEL_CARD.md into the weights folder")
    parser.add_argument("--record", type=Path, default=None,
                        help="a staged model's record.json (stages/embedded-v2/record.json): the card's recipe")
    parser.add_argument("--card-notes", type=Path, default=None,
                        help="markdown for the card's 'Bars missed' section: why, and what would reach them")
    parser.add_argument("--card-only", action="store_true",
                        help="measure nothing: write the card from --out's results.json (and baseline.json)")
    parser.add_argument("--retime", action="store_true",
                        help="measure only the CPU time, the new model and --baseline interleaved in one process "
                             "(run it alone on the machine), into --out's results.json and baseline.json")
    parser.add_argument("--retime-repeats", type=int, default=3, help="timings per model and thread count (median)")
    args = parser.parse_args()
    if args.baseline and args.baseline_results:
        parser.error("give --baseline or --baseline-results, not both")
    return args


def _write_card(args: argparse.Namespace, results: dict, table: str, baseline: dict | None) -> None:
    record = json.loads(args.record.read_text()) if args.record else None
    notes = args.card_notes.read_text() if args.card_notes else None
    write_model_card(args.weights or EMBEDDED_DIR, results, table, load_emoji_dataset(args.data), baseline, record,
                     notes)


def _retime(args: argparse.Namespace) -> None:
    """Re-measure ``cpu_seconds_8_images_30_steps`` of results.json (and baseline.json with --baseline):
    the models take turns, so a load that comes and goes hits both; each number is the median."""
    files = {"results.json": args.weights}
    if args.baseline:
        files["baseline.json"] = args.baseline
    records = {name: json.loads((args.out / name).read_text()) for name in files}
    pipes = {name: load_embedded_pipeline(folder=folder) for name, folder in files.items()}
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    threads = sorted({1, *args.timing_threads})
    seconds = {(name, t): [] for name in files for t in threads}
    for _ in range(args.retime_repeats):
        for name, pipe in pipes.items():
            for t in threads:
                seconds[name, t].append(time_generation(pipe, t, sampling_of(records[name])))
    for name, record in records.items():
        record["cpu_seconds_8_images_30_steps"] = {f"{t}_threads": round(statistics.median(seconds[name, t]), 2)
                                                   for t in threads}
        record.setdefault("machine", {})["timing_load_average_1min"] = round(os.getloadavg()[0], 2)
        write_text_atomic(json.dumps(record, indent=1), args.out / name)
        print(name, record["cpu_seconds_8_images_30_steps"])
    baseline = records.get("baseline.json")
    if baseline is None and (args.out / "baseline.json").is_file():
        baseline = json.loads((args.out / "baseline.json").read_text())
    write_text_atomic(quality_markdown(records["results.json"], baseline) + "\n", args.out / "quality.md")


def main() -> None:
    args = parse_args()
    if args.retime:
        if not args.out or not (args.out / "results.json").is_file():
            raise SystemExit("--retime needs --out DIR with the results.json of an earlier run")
        _retime(args)
        return
    if args.card_only:
        if not args.out or not (args.out / "results.json").is_file():
            raise SystemExit("--card-only needs --out DIR with the results.json of an earlier run")
        results = json.loads((args.out / "results.json").read_text())
        baseline_file = args.out / "baseline.json"
        baseline = json.loads(baseline_file.read_text()) if baseline_file.is_file() else None
        _write_card(args, results, quality_markdown(results, baseline), baseline)
        return
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    config = EvalConfig(
        data=args.data, weights=args.weights, probes=args.probes, out=args.out, styles=args.styles,
        per_category=args.per_category, tuning_per_category=args.tuning_per_category, steps=args.steps,
        guidance=args.guidance, guidance_sweep=args.guidance_sweep, guidance_rescale=args.guidance_rescale,
        colour_seeds=args.colour_seeds, noise_seeds=args.noise_seeds, threads=args.threads,
        timing_threads=args.timing_threads,
    )
    results = evaluate(config)
    baseline = None
    if args.baseline_results:
        baseline = json.loads(args.baseline_results.read_text())
    elif args.baseline:
        baseline = evaluate(replace(config, weights=args.baseline, styles=args.baseline_styles,
                                    probes=args.baseline_probes or args.probes, guidance_rescale=None,
                                    out=args.out / "baseline" if args.out else None))
    table = quality_markdown(results, baseline)
    print(json.dumps(results, indent=1))
    print(table)
    folder = args.weights or EMBEDDED_DIR
    models = [("new model" if baseline else "model", load_embedded_pipeline(folder=args.weights), sampling_of(results))]
    if args.baseline:
        models.append(("old model", load_embedded_pipeline(folder=args.baseline), sampling_of(baseline)))
    for _, pipe, _ in models:
        pipe.set_progress_bar_config(disable=True)
    sheet = comparison_sheet(models, seeds=args.sheet_seeds) if (args.out or args.write_card) else None
    if args.out:
        write_text_atomic(json.dumps(results, indent=1), args.out / "results.json")
        if args.baseline:
            write_text_atomic(json.dumps(baseline, indent=1), args.out / "baseline.json")
        write_text_atomic(table + "\n", args.out / "quality.md")
        save_png_atomic(sheet, args.out / "comparison.png")
    if args.write_card:
        save_png_atomic(sheet, folder / "comparison.png")
        if args.out and (args.out / "samples.png").is_file():
            with atomic_path(folder / "samples.png") as temp:
                temp.write_bytes((args.out / "samples.png").read_bytes())
        _write_card(args, results, table, baseline)


if __name__ == "__main__":
    main()
