"""`consistent-diffusion train ip-adapter`: the embedded model's style or subject IP-Adapter (resumable, staged).

``register_ip_adapter_command(kinds)`` adds it to the ``train`` command's subparsers.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from consistent_diffusion.cli.options.model import add_model_arguments, load_model_from_args
from consistent_diffusion.core.errors import ConfigError

PAUSED_STATUS = 3  # as `train base`: a planned pause checkpointed; continue with --resume or --warm-start


def register_ip_adapter_command(kinds: argparse._SubParsersAction) -> None:
    parser = kinds.add_parser(
        "ip-adapter", help="an image-prompt adapter for the embedded model, trained on paired emoji (style or subject)",
        description="Train an IP-Adapter (frozen EfficientNet-Lite0 image features, decoupled cross-attention) on "
        "emoji pairs: --pairing style (prompt image and target share only the style; captions without a style word) "
        "or subject (they share only the emoji; captions without its name). Writes OUT/ip_adapter, usable as "
        "--ip-adapter OUT/ip_adapter. Checkpoints every --checkpoint-every steps and on Ctrl-C/SIGTERM; --resume "
        "continues; a planned pause (--pause-after-minutes) exits with status 3; --handoff FILE writes a compact "
        "state to commit, --warm-start FILE continues from it on another machine.",
    )
    add_model_arguments(parser)
    group = parser.add_argument_group("data")
    group.add_argument("--data", required=True, type=Path, help="emoji dataset folder (consistent-diffusion data emoji)")
    group.add_argument("--pairing", choices=("style", "subject"), required=True, help="what the adapter may carry")
    group.add_argument("--cache", type=Path, default=None, metavar="FILE",
                       help="latents + image features cache (default OUT/cache.pt); share one between both adapters")
    group.add_argument("--dropout", type=float, default=0.05,
                       help="probability of dropping the image, the caption, and both, each (default 0.05)")
    group = parser.add_argument_group("training")
    group.add_argument("--out", required=True, type=Path, help="run folder (checkpoints, log, result)")
    group.add_argument("--steps", type=int, default=20000, help="optimisation steps in total (default 20000)")
    group.add_argument("--batch-size", type=int, default=32)
    group.add_argument("--learning-rate", type=float, default=1e-4)
    group.add_argument("--lr-warmup-steps", type=int, default=100)
    group.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant")
    group.add_argument("--checkpoint-every", type=int, default=250)
    group.add_argument("--checkpoint-minutes", type=float, default=None, help="also checkpoint after this much wall time")
    group.add_argument("--pause-after-minutes", type=float, default=None,
                       help="pause (checkpoint, exit status 3) once this session trained this long")
    group.add_argument("--handoff", type=Path, default=None, metavar="FILE",
                       help="after the run ends or pauses, write its newest checkpoint here (weights in float16)")
    group.add_argument("--warm-start", type=Path, default=None, metavar="FILE",
                       help="continue from a --handoff file when OUT has no checkpoint (fresh optimizer moments)")
    group.add_argument("--validation-pairs", type=int, default=64, help="fixed val-identity pairs per checkpoint")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    group.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    group.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    parser.set_defaults(func=run_ip_adapter)


def run_ip_adapter(args: argparse.Namespace) -> int:
    from consistent_diffusion.training.checkpoints import write_handoff
    from consistent_diffusion.training.ip_adapter import IPAdapterTrainConfig, train_ip_adapter
    from consistent_diffusion.training.loop import check_out_folder

    if args.dtype != "float32":
        raise ConfigError("training keeps weights in float32; leave --dtype at float32")
    config = IPAdapterTrainConfig(
        out=args.out, data=args.data, pairing=args.pairing, cache=args.cache, dropout=args.dropout, steps=args.steps,
        batch_size=args.batch_size, learning_rate=args.learning_rate, lr_warmup_steps=args.lr_warmup_steps,
        lr_schedule=args.lr_schedule, checkpoint_every=args.checkpoint_every,
        checkpoint_minutes=args.checkpoint_minutes, pause_after_minutes=args.pause_after_minutes,
        warm_start=args.warm_start, validation_pairs=args.validation_pairs, seed=args.seed, threads=args.threads,
        resume=args.resume, progress=args.progress, device=args.device,
    )
    check_out_folder(config)  # before the (slow) model load
    result = train_ip_adapter(config, load_model_from_args(args))
    if args.handoff is not None:
        print(f"hand-off: {write_handoff(config.out, args.handoff)}")
    if result.stopped:
        print(f"paused at step {result.step}; continue with the same command plus --resume (or --warm-start HANDOFF)")
        return PAUSED_STATUS
    print(f"trained the {args.pairing} IP-Adapter: {result.result} ({result.step} steps; log {config.out / 'log.jsonl'})")
    return 0
