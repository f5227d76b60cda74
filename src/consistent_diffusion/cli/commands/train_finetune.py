"""`consistent-diffusion train dreambooth | lora | textual-inversion | controlnet`: fine-tune a model (resumable).

``register_train_subcommands(kinds)`` adds the four sub-subcommands to the ``train`` parser's
subparsers (``commands/train.py`` calls it).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from consistent_diffusion.cli.options.model import add_model_arguments, load_model_from_args
from consistent_diffusion.core.errors import ConfigError


def _loop_arguments(parser: argparse.ArgumentParser, lr: float, checkpoint_every: int, steps: int,
                    prompts: bool = True, batch: int = 1) -> None:
    group = parser.add_argument_group("training")
    group.add_argument("--out", required=True, type=Path, help="run folder (checkpoints, validation images, result)")
    group.add_argument("--steps", type=int, default=steps, help=f"optimisation steps in total (default {steps})")
    group.add_argument("--batch-size", type=int, default=batch, help=f"examples per step and process (default {batch})")
    group.add_argument("--learning-rate", type=float, default=lr, help=f"AdamW learning rate (default {lr:g})")
    group.add_argument("--lr-warmup-steps", type=int, default=0)
    group.add_argument("--checkpoint-every", type=int, default=checkpoint_every,
                       help=f"steps between checkpoints and validation images (default {checkpoint_every})")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--resolution", type=int, default=None, help="image side in pixels (default: model native)")
    if prompts:
        group.add_argument("--validation-prompt", action="append", default=None, dest="validation_prompts",
                           metavar="TEXT", help="generated at each checkpoint (repeatable; default: the instance prompt)")
    group.add_argument("--validation-steps", type=int, default=25)
    group.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no", help="GPU only")
    group.add_argument("--gradient-checkpointing", action="store_true", help="less memory, more compute")
    group.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    group.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    group.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def _dreambooth_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("subject")
    group.add_argument("--instance-dir", required=True, type=Path, help="folder of 3-20 images of the subject")
    group.add_argument("--instance-prompt", required=True, help="e.g. 'a photo of sks emoji' (rare token + class)")
    group.add_argument("--class-prompt", default=None, help="e.g. 'an emoji' (for prior preservation)")
    group.add_argument("--prior-preservation", action="store_true", help="mix in the loss on base-model class images")
    group.add_argument("--prior-loss-weight", type=float, default=1.0)
    group.add_argument("--num-class-images", type=int, default=100, help="class images generated once, cached")
    group.add_argument("--class-images-dir", type=Path, default=None, help="cache folder (default OUT/class_images)")
    group.add_argument("--class-steps", type=int, default=25, help="denoising steps for class images")


def register_train_subcommands(kinds: argparse._SubParsersAction) -> None:
    """Add `dreambooth`, `lora` and `controlnet` to the `train` command's subparsers."""
    dreambooth = kinds.add_parser(
        "dreambooth", help="full DreamBooth: fine-tune the UNet (and optionally the text encoder) on a subject",
        description="Bind a subject to a rare token. Writes OUT/model, a diffusers folder usable as --model. "
        "Checkpoints every --checkpoint-every steps; Ctrl-C checkpoints and stops; --resume continues.",
    )
    add_model_arguments(dreambooth)
    _dreambooth_arguments(dreambooth)
    dreambooth.add_argument("--train-text-encoder", action="store_true", help="also fine-tune the text encoder(s)")
    _loop_arguments(dreambooth, lr=5e-6, checkpoint_every=100, steps=400)
    dreambooth.set_defaults(func=run_dreambooth)

    lora = kinds.add_parser(
        "lora", help="LoRA DreamBooth: low-rank adapters on the UNet's attention (small files)",
        description="DreamBooth with LoRA adapters. Writes OUT/lora (pytorch_lora_weights.safetensors), "
        "loadable with stock diffusers pipe.load_lora_weights(OUT/lora) and by our lora method.",
    )
    add_model_arguments(lora)
    _dreambooth_arguments(lora)
    group = lora.add_argument_group("LoRA")
    group.add_argument("--rank", type=int, default=4, help="adapter rank (default 4)")
    group.add_argument("--alpha", type=float, default=None, help="scale numerator, effective scale alpha/rank (default: rank)")
    group.add_argument("--target-modules", default="to_q,to_k,to_v,to_out.0",
                       help="comma-separated module names to adapt (default: attention projections)")
    group.add_argument("--export-kohya", type=Path, default=None, metavar="FILE",
                       help="also write the adapter in the kohya/A1111 format to FILE")
    _loop_arguments(lora, lr=1e-4, checkpoint_every=100, steps=400)
    lora.set_defaults(func=run_lora)

    inversion = kinds.add_parser(
        "textual-inversion", help="textual inversion: learn a new word for a concept from 3-20 images (model frozen)",
        description="Learn the embedding of a new token (Gal et al. 2023) so that prompts with it draw the "
        "concept. Writes OUT/embeddings (learned_embeds.safetensors, + learned_embeds_2 for SDXL), loadable with stock "
        "diffusers pipe.load_textual_inversion and by `generate --textual-inversion`.",
        epilog="example:\n  consistent-diffusion train textual-inversion --instance-dir cat_photos --token '<my-cat>' "
        "--initializer cat --template '{}, twitter style' --out runs/ti-cat",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(inversion)
    group = inversion.add_argument_group("concept")
    group.add_argument("--instance-dir", required=True, type=Path, help="folder of 3-20 images of the concept")
    group.add_argument("--token", required=True, dest="placeholder_token", help="the new word, e.g. '<my-cat>' (lower case)")
    group.add_argument("--initializer", required=True, dest="initializer_token",
                       help="a word close to the concept; its embedding is the starting point (e.g. 'cat')")
    group.add_argument("--vectors", type=int, default=1, dest="num_vectors", help="vectors behind the token (default 1)")
    group.add_argument("--template", action="append", default=None, metavar="TEXT",
                       help="training prompt with {} for the token (repeatable), or 'object' / 'style' for diffusers' "
                       "template sets (default: object)")
    _loop_arguments(inversion, lr=5e-3, checkpoint_every=100, steps=500, batch=4)
    inversion.set_defaults(func=run_textual_inversion)

    controlnet = kinds.add_parser(
        "controlnet", help="train a ControlNet (canny/silhouette/scribble) for a model that has none",
        description="Train a ControlNet from the model's UNet on a captioned image set (an emoji dataset "
        "folder, or images with metadata.jsonl / NAME.txt captions). Writes OUT/controlnet.",
    )
    add_model_arguments(controlnet)
    group = controlnet.add_argument_group("data")
    group.add_argument("--condition", choices=("canny", "silhouette", "scribble"), required=True)
    group.add_argument("--data", required=True, type=Path, help="emoji dataset folder or captioned image folder")
    group.add_argument("--split", default="train", help="emoji datasets: split to train on ('all' for every row)")
    group.add_argument("--caption", default="", dest="default_caption", help="caption for images without one")
    group.add_argument("--caption-dropout", type=float, default=0.1, help="probability of the empty prompt")
    group.add_argument("--max-images", type=int, default=None, help="use at most this many images")
    group.add_argument("--validation-count", type=int, default=4, help="control images used for validation")
    group.add_argument("--init-controlnet", type=Path, default=None, metavar="DIR",
                       help="start from this ControlNet (an earlier stage's OUT/controlnet, or a pretrained one) "
                       "instead of a copy of the UNet")
    _loop_arguments(controlnet, lr=1e-4, checkpoint_every=200, steps=2000, prompts=False)
    controlnet.set_defaults(func=run_controlnet)


def _loop_options(args: argparse.Namespace) -> dict[str, Any]:
    if args.dtype != "float32":
        raise ConfigError("training keeps weights in float32; use --mixed-precision fp16|bf16 on a GPU instead of --dtype")
    return {
        "out": args.out, "steps": args.steps, "batch_size": args.batch_size, "learning_rate": args.learning_rate,
        "lr_warmup_steps": args.lr_warmup_steps, "checkpoint_every": args.checkpoint_every, "seed": args.seed,
        "resolution": args.resolution, "validation_steps": args.validation_steps, "device": args.device,
        "mixed_precision": args.mixed_precision, "gradient_checkpointing": args.gradient_checkpointing,
        "threads": args.threads, "resume": args.resume, "progress": args.progress,
    }


def _subject_options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "instance_dir": args.instance_dir, "instance_prompt": args.instance_prompt, "class_prompt": args.class_prompt,
        "prior_preservation": args.prior_preservation, "prior_loss_weight": args.prior_loss_weight,
        "num_class_images": args.num_class_images, "class_images_dir": args.class_images_dir,
        "class_steps": args.class_steps,
        "validation_prompts": tuple(args.validation_prompts or (args.instance_prompt,)),
    }


def _report(result: Any, what: str) -> int:
    if result.stopped:
        print(f"stopped at step {result.step}; continue with the same command plus --resume")
        return 130
    print(f"trained {what}: {result.result} ({result.step} steps; log {result.out / 'log.jsonl'})")
    return 0


def run_dreambooth(args: argparse.Namespace) -> int:
    from consistent_diffusion.training.dreambooth import DreamBoothConfig, train_dreambooth
    from consistent_diffusion.training.loop import check_out_folder

    config = DreamBoothConfig(**_loop_options(args), **_subject_options(args), train_text_encoder=args.train_text_encoder)
    check_out_folder(config)  # before the (slow) model load
    result = train_dreambooth(config, load_model_from_args(args))
    return _report(result, "DreamBooth model (use it with --model)")


def run_lora(args: argparse.Namespace) -> int:
    from consistent_diffusion.training.loop import check_out_folder
    from consistent_diffusion.training.lora import LoraDreamBoothConfig, export_kohya, train_lora

    targets = tuple(t.strip() for t in args.target_modules.split(",") if t.strip())
    config = LoraDreamBoothConfig(**_loop_options(args), **_subject_options(args), rank=args.rank, alpha=args.alpha,
                                  target_modules=targets)
    check_out_folder(config)  # before the (slow) model load
    result = train_lora(config, load_model_from_args(args))
    code = _report(result, "LoRA")
    if code == 0 and args.export_kohya is not None:
        print(f"kohya/A1111 format: {export_kohya(result.result, args.export_kohya)}")
    return code


def run_controlnet(args: argparse.Namespace) -> int:
    from consistent_diffusion.training.controlnet import ControlNetTrainConfig, train_controlnet
    from consistent_diffusion.training.loop import check_out_folder

    config = ControlNetTrainConfig(
        **_loop_options(args), data=args.data, condition=args.condition, split=None if args.split == "all" else args.split,
        default_caption=args.default_caption, caption_dropout=args.caption_dropout, max_images=args.max_images,
        validation_count=args.validation_count, init_controlnet=args.init_controlnet,
    )
    check_out_folder(config)  # before the (slow) model load
    result = train_controlnet(config, load_model_from_args(args))
    return _report(result, f"{args.condition} ControlNet")


def run_textual_inversion(args: argparse.Namespace) -> int:
    from consistent_diffusion.training.loop import check_out_folder
    from consistent_diffusion.training.textual_inversion import (
        TextualInversionConfig,
        train_textual_inversion,
    )

    config = TextualInversionConfig(
        **_loop_options(args), instance_dir=args.instance_dir, placeholder_token=args.placeholder_token,
        initializer_token=args.initializer_token, num_vectors=args.num_vectors,
        templates=tuple(args.template or ("object",)), validation_prompts=tuple(args.validation_prompts or ()),
    )
    check_out_folder(config)  # before the (slow) model load
    result = train_textual_inversion(config, load_model_from_args(args))
    return _report(result, f"textual inversion {args.placeholder_token!r} (use it with --textual-inversion)")
