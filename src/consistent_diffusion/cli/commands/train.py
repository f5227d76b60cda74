"""`consistent-diffusion train base | probes` (the embedded model and its probes) and the fine-tuning commands."""

from __future__ import annotations

import argparse
from pathlib import Path

from consistent_diffusion.core.errors import ConfigError


def _channels(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(","))


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="train models (the embedded base model)")
    kinds = parser.add_subparsers(dest="train_kind", metavar="WHAT")
    base = kinds.add_parser(
        "base",
        help="the embedded base model: VAE, cached latents/text states, UNet (resumable)",
        description=(
            "Train the embedded default model on an emoji dataset (consistent-diffusion data emoji). "
            "Each stage stops at its step or time budget, checkpoints every few minutes and on Ctrl-C/SIGTERM, "
            "and continues with --resume (a planned pause, --pause-after-minutes, exits with status 3). "
            "A long UNet stage can move between machines: --handoff FILE writes a compact state to commit, "
            "--warm-start FILE continues from it. The result is a diffusers folder OUT/pipeline (vae, unet, scheduler); "
            "--export DIR copies it (fp16) where load_pipeline('embedded') finds it."
        ),
    )
    base.add_argument("--data", required=True, type=Path, help="emoji dataset folder")
    base.add_argument("--out", required=True, type=Path, help="run folder (state/<stage>/ with each stage's log and checkpoints, cache/, pipeline/)")
    base.add_argument("--preset", choices=("cpu", "gpu", "tiny"), default="cpu",
                      help="cpu: VAE 22 min + UNet about 6 h on 2 cores (pause and resume it in stages); "
                           "gpu: larger, for a GPU; tiny: seconds (tests)")
    base.add_argument("--stage", choices=("vae", "unet", "decoder", "all"), default="all",
                      help="vae, unet (builds the caches first), decoder (fine-tune on cached latents) or all")
    base.add_argument("--resume", action="store_true", help="continue the run in --out")
    base.add_argument("--device", default=None, help="torch device (preset default: cpu, or cuda for gpu)")
    base.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    base.add_argument("--vae-minutes", type=float, default=None, help="VAE wall-time budget")
    base.add_argument("--vae-steps", type=int, default=None, help="VAE step budget")
    base.add_argument("--decoder-minutes", type=float, default=None,
                      help="decoder-only fine-tune budget (runs last, or alone with --stage decoder)")
    base.add_argument("--unet-minutes", type=float, default=None, help="UNet wall-time budget")
    base.add_argument("--unet-steps", type=int, default=None, help="UNet step budget")
    base.add_argument("--unet-channels", type=_channels, default=None, help="UNet block widths, e.g. 64,128,128")
    base.add_argument("--unet-layers", type=int, default=None, help="UNet resnets (+ transformers) per block")
    base.add_argument("--unet-lr", type=float, default=None, help="UNet peak learning rate")
    base.add_argument("--unet-batch", type=int, default=None, help="UNet latents per step")
    base.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default=None,
                      help="UNet autocast (default no). On this project's 2-core CPU bf16 measured slower than "
                           "float32 (1.02 vs 0.87 s/step); fp16 needs a GPU")
    base.add_argument("--pause-after-minutes", type=float, default=None,
                      help="pause (checkpoint; continue with --resume) once this session trained this long: "
                           "for stages that must end inside a time slot")
    base.add_argument("--vae-from", type=Path, default=None,
                      help="a trained VAE folder (e.g. a committed VAE stage) to use instead of training one")
    base.add_argument("--handoff", type=Path, default=None,
                      help="after the UNet stage ends or pauses, write its newest checkpoint here as a compact "
                           "hand-off (float16 weights and EMA, no optimizer state) to commit and continue elsewhere")
    base.add_argument("--warm-start", type=Path, default=None,
                      help="UNet stage: continue from a --handoff file (same step, schedule and EMA; fresh optimizer "
                           "moments) when --out holds no checkpoint of its own")
    base.add_argument("--export", type=Path, default=None,
                      help="after training, copy the pipeline (fp16 safetensors) into this folder; after a paused "
                           "UNet stage, its EMA weights so far")
    base.add_argument("--export-handoff", type=Path, default=None, metavar="FILE",
                      help="export only, training nothing: --export gets this hand-off's EMA UNet (a committed "
                           "stage chosen to ship, e.g. stages/.../unet.handoff.pt from git history) with the run's "
                           "VAE (and decoder stage, if run); builds the caches first when --out has none. Give the "
                           "stage's --unet-channels and --vae-from")
    base.set_defaults(func=run_base)
    probes = kinds.add_parser(
        "probes",
        help="the style and content probes (small CNNs on real emoji) used to measure generated images",
    )
    probes.add_argument("--data", required=True, type=Path, help="emoji dataset folder")
    probes.add_argument("--out", type=Path, default=None, help="folder for the probes (default: the package's)")
    probes.add_argument("--which", choices=("style", "content", "both"), default="both")
    probes.add_argument("--epochs", type=int, default=None, help="epochs (default: style 30, content 20)")
    probes.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    probes.set_defaults(func=run_probes)
    try:
        from consistent_diffusion.cli.commands.train_finetune import register_train_subcommands
    except ImportError:  # pragma: no cover - fine-tuning commands not installed
        return
    register_train_subcommands(kinds)
    from consistent_diffusion.cli.commands.train_ip_adapter import register_ip_adapter_command

    register_ip_adapter_command(kinds)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)


def run_base(args: argparse.Namespace) -> int:
    from consistent_diffusion.training.checkpoints import list_checkpoints
    from consistent_diffusion.training.recipes.embedded import (
        TrainingStopped,
        export_embedded,
        preset,
        publish_handoff_unet,
        publish_paused_unet,
        stage_dir,
        train_base,
        write_unet_handoff,
    )

    config = preset(
        args.preset, args.data, args.out, stage=args.stage, resume=args.resume, device=args.device,
        threads=args.threads, vae_minutes=args.vae_minutes, vae_decoder_minutes=args.decoder_minutes, vae_steps=args.vae_steps,
        unet_minutes=args.unet_minutes, unet_steps=args.unet_steps, unet_channels=args.unet_channels,
        unet_layers_per_block=args.unet_layers, unet_lr=args.unet_lr, unet_batch=args.unet_batch,
        unet_mixed_precision=args.mixed_precision, pause_minutes=args.pause_after_minutes, warm_start=args.warm_start,
        pretrained_vae=args.vae_from,
    )
    if args.export_handoff is not None:
        if args.export is None:
            raise ConfigError("--export-handoff exports a hand-off: give --export DIR too")
        print(f"exported {args.export_handoff.name}'s EMA UNet: "
              f"{export_embedded(publish_handoff_unet(config, args.export_handoff), args.export)}")
        return 0
    try:
        pipeline, paused = train_base(config), None
    except TrainingStopped as stopped:
        pipeline, paused = None, stopped
    unet_trained = bool(list_checkpoints(stage_dir(config.out, "unet")))
    if args.handoff is not None and unet_trained:
        print(f"hand-off: {write_unet_handoff(config, args.handoff)}")
    if paused is not None:
        if args.export is not None and unet_trained:
            print(f"exported the paused UNet's EMA weights: {export_embedded(publish_paused_unet(config), args.export)}")
        print(f"paused: {paused}")
        return 3
    print(f"trained: {pipeline} (loss logs: {config.out / 'state'}/<stage>/log.jsonl)")
    if args.export is not None and (config.out / "pipeline" / "unet").is_dir():
        print(f"exported: {export_embedded(pipeline, args.export)}")
    return 0


def run_probes(args: argparse.Namespace) -> int:
    from consistent_diffusion.metrics.extractors.probes import PROBES_DIR
    from consistent_diffusion.training.recipes.probes import ProbeTrainConfig, save_probe, train_probe

    names = ("style", "content") if args.which == "both" else (args.which,)
    defaults = {"style": {"epochs": 30, "blur": 0.25}, "content": {"epochs": 20, "blur": 0.5}}  # as shipped
    for name in names:
        config = ProbeTrainConfig(name, **{**defaults[name], **({"epochs": args.epochs} if args.epochs else {})})
        model, meta = train_probe(config, args.data, threads=args.threads)
        path = save_probe(model, meta, args.out or PROBES_DIR)
        print(f"{name} probe: held-out {meta['val']} -> {path}")
    return 0
