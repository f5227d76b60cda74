"""Command-line options for the training-free methods, shared by `generate` (and any command
that makes a series): ``add_method_arguments(parser)`` then ``methods_from_args(args)``.

Methods are stacked in a fixed, valid order: textual inversion (it changes how prompts are
tokenized, for every method after it), img2img or ddpm_edit (they set the starting
point), then consistent_subject (it prepends its anchors), then StyleAligned (it prepends its
reference to whatever the others prepared, and takes the subject anchors into its attention), then
the image prompt (`cli/options/ip_adapter.py`: its embeddings cover every batch entry the others
added), then LoRA adapters and ControlNets (`cli/options/finetune.py`). Options only: every rule about what
the methods do (e.g. one StyleAligned reference per series) lives in the methods themselves.
"""

from __future__ import annotations

import argparse
from typing import Any

from consistent_diffusion.cli.options.finetune import add_finetune_arguments, finetune_methods_from_args
from consistent_diffusion.cli.options.ip_adapter import add_ip_adapter_arguments, ip_adapter_from_args
from consistent_diffusion.core.errors import ConfigError
from consistent_diffusion.methods.base import Method
from consistent_diffusion.methods.common import UNET_PARTS


def add_method_arguments(parser: argparse.ArgumentParser) -> None:
    _add_training_free_arguments(parser)
    add_ip_adapter_arguments(parser)
    add_finetune_arguments(parser)


def _add_training_free_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the img2img, ddpm_edit and StyleAligned options to ``parser``."""
    group = parser.add_argument_group("img2img / SDEdit")
    group.add_argument("--init-image", metavar="IMG", help="start every image from this image (img2img / SDEdit)")
    group.add_argument("--strength", type=float, default=0.6,
                       help="img2img: how far from --init-image to move, in (0, 1] (default: 0.6)")

    group = parser.add_argument_group("edit-friendly DDPM inversion")
    group.add_argument("--edit-inversion", metavar="DIR",
                       help="edit an inversion folder (from `consistent-diffusion invert`) with each --prompt; "
                       "steps and size become the inversion's, --guidance is the target cfg")
    group.add_argument("--edit-skip", type=int, default=0, metavar="N",
                       help="with --edit-inversion: leading steps to skip (more keeps more structure; default: 0)")

    group = parser.add_argument_group("consistent subject (ConsiStory / StoryDiffusion shared attention)")
    group.add_argument("--subject", metavar="WORD",
                       help="keep this subject (a word or phrase of every prompt, e.g. 'cat') the same across the "
                       "series without training (Tewel et al. 2024): images share the anchors' subject features")
    group.add_argument("--subject-mode", choices=("subject", "story"), default="subject",
                       help="subject: ConsiStory's masked sharing (default); story: StoryDiffusion's sampled tokens "
                       "(no masks; --subject optional)")
    group.add_argument("--subject-anchors", type=int, default=None, metavar="N",
                       help="the series' first N images are the anchors (default: 2, or 0 with a reference image)")
    group.add_argument("--subject-dropout", type=float, default=0.5, metavar="P",
                       help="share of the anchors' subject patches hidden each step, keeps layouts varied (default: 0.5)")
    group.add_argument("--subject-sample-rate", type=float, default=0.5, metavar="R",
                       help="story mode: share of the anchors' tokens shared each step (default: 0.5)")
    group.add_argument("--subject-reference-image", metavar="IMG",
                       help="a real image of the subject as the anchor, brought in by edit-friendly DDPM inversion")
    group.add_argument("--subject-reference-prompt", default="", metavar="TEXT",
                       help="describes --subject-reference-image and names the subject (e.g. 'a photo of a cat')")
    group.add_argument("--subject-feature-injection", action="store_true",
                       help="also pull each image's subject features towards the anchors' (DIFT correspondences; "
                       "a first full pass: about twice the cost)")
    group.add_argument("--subject-vanilla-queries", action=argparse.BooleanOptionalAction, default=True,
                       help="blend plain queries over the first tenth of the steps for layout variety (default: on)")

    group = parser.add_argument_group("StyleAligned (shared attention)")
    group.add_argument("--style-aligned", action="store_true",
                       help="share the style of a reference across the series (Hertz et al. 2023)")
    ref = group.add_mutually_exclusive_group()
    ref.add_argument("--style-reference-prompt", metavar="TEXT",
                     help="generate the reference from this prompt (not saved); default: the first image")
    ref.add_argument("--style-reference-image", metavar="IMG",
                     help="a real reference image, brought in by edit-friendly DDPM inversion")
    ref.add_argument("--style-reference-inversion", metavar="DIR",
                     help="a real reference already inverted with `consistent-diffusion invert`")
    group.add_argument("--style-reference-seed", type=int, default=None, metavar="N",
                       help="seed of the generated reference / of the reference image's inversion (default: first seed)")
    group.add_argument("--style-reference-image-prompt", default="", metavar="TEXT",
                       help="a description of --style-reference-image, used to invert it")
    group.add_argument("--style-share-group-norm", action=argparse.BooleanOptionalAction, default=True,
                       help="pool GroupNorm statistics with the reference (default: on)")
    group.add_argument("--style-share-attention", action=argparse.BooleanOptionalAction, default=True,
                       help="attend to the reference's keys/values (default: on)")
    group.add_argument("--style-adain-queries", action=argparse.BooleanOptionalAction, default=True,
                       help="AdaIN queries to the reference (default: on)")
    group.add_argument("--style-adain-keys", action=argparse.BooleanOptionalAction, default=True,
                       help="AdaIN keys to the reference (default: on)")
    group.add_argument("--style-adain-values", action=argparse.BooleanOptionalAction, default=False,
                       help="AdaIN values to the reference (default: off)")
    group.add_argument("--style-score-scale", type=float, default=1.0, metavar="S",
                       help="scale of the reference keys (> 0; < 1 weakens the shared style; default: 1)")
    group.add_argument("--style-score-shift", type=float, default=0.0, metavar="S",
                       help="added to the logits of reference tokens (default: 0)")
    group.add_argument("--style-only-self-level", type=float, default=0.0, metavar="F",
                       help="fraction of self-attention layers left unshared, in [0, 1] (default: 0)")
    group.add_argument("--style-min-shared-tokens", type=int, default=None, metavar="N",
                       help="self-attention layers with fewer spatial tokens (h*w) stay unshared "
                            "(default: the method's)")
    group.add_argument("--style-full-share", action="store_true",
                       help="every image attends to every image (quadratic in the batch)")
    group.add_argument("--style-share-parts", nargs="+", choices=UNET_PARTS, default=None, metavar="PART",
                       help="UNet parts whose self-attention shares: down, mid, up (default: all, as the paper; "
                            "'up' alone is InstantStyle's decoder-only injection)")


_STYLE_ONLY = (
    "style_reference_prompt",
    "style_reference_image",
    "style_reference_inversion",
    "style_reference_seed",
    "style_min_shared_tokens",
    "style_share_parts",
)


def methods_from_args(args: argparse.Namespace) -> list[Method]:
    """The methods the parsed options ask for, in stacking order. Raises ConfigError on conflicts."""
    from consistent_diffusion.methods.consistent_subject import ConsistentSubject
    from consistent_diffusion.methods.img2img import Img2Img
    from consistent_diffusion.methods.inversion import DdpmEdit
    from consistent_diffusion.methods.style_aligned import StyleAligned

    methods: list[Method] = []
    init_image = getattr(args, "init_image", None)
    edit_inversion = getattr(args, "edit_inversion", None)
    if init_image and edit_inversion:
        raise ConfigError("--init-image and --edit-inversion both set the starting point; choose one")
    if init_image:
        methods.append(Img2Img(image=init_image, strength=args.strength))
    if edit_inversion:
        methods.append(DdpmEdit(inversion=edit_inversion, skip=args.edit_skip))
    subject, story = getattr(args, "subject", None), getattr(args, "subject_mode", "subject") == "story"
    if subject is not None or story:
        methods.append(ConsistentSubject(**_subject_options(args)))
    elif getattr(args, "subject_reference_image", None):
        raise ConfigError("--subject-reference-image needs --subject WORD (the subject it shows)")
    if getattr(args, "style_aligned", False):
        methods.append(StyleAligned(**_style_options(args)))
    else:
        given = [f"--{name.replace('_', '-')}" for name in _STYLE_ONLY if getattr(args, name, None) is not None]
        if given:
            raise ConfigError(f"{', '.join(given)} only apply with --style-aligned")
    image_prompt = ip_adapter_from_args(args)
    if image_prompt is not None:
        methods.append(image_prompt)
    finetuned = finetune_methods_from_args(args)
    # Textual inversion goes first: it changes the tokenizer, and the methods after it (the subject
    # search of consistent_subject, a real reference's inversion) must read prompts as the call does.
    words = [m for m in finetuned if m.name == "textual_inversion"]
    return words + methods + [m for m in finetuned if m.name != "textual_inversion"]  # LoRA, ControlNet last


def _subject_options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {
        "subject": args.subject, "mode": args.subject_mode, "anchors": args.subject_anchors,
        "mask_dropout": args.subject_dropout, "sample_rate": args.subject_sample_rate,
        "vanilla_queries": args.subject_vanilla_queries, "feature_injection": args.subject_feature_injection,
    }
    if args.subject_reference_image:
        options["reference_image"] = args.subject_reference_image
        options["reference_image_prompt"] = args.subject_reference_prompt
    return options


def _style_options(args: argparse.Namespace) -> dict[str, Any]:
    seeds = list(getattr(args, "seeds", None) or [0])
    seed = args.style_reference_seed if args.style_reference_seed is not None else seeds[0]
    options: dict[str, Any] = {
        "share_group_norm": args.style_share_group_norm,
        "share_attention": args.style_share_attention,
        "adain_queries": args.style_adain_queries,
        "adain_keys": args.style_adain_keys,
        "adain_values": args.style_adain_values,
        "shared_score_scale": args.style_score_scale,
        "shared_score_shift": args.style_score_shift,
        "only_self_level": args.style_only_self_level,
        "full_attention_share": args.style_full_share,
        "reference_seed": seed,
    }
    if args.style_min_shared_tokens is not None:
        options["min_shared_tokens"] = args.style_min_shared_tokens
    if args.style_share_parts:
        options["share_parts"] = tuple(args.style_share_parts)
    if args.style_reference_image:
        options["reference_image"] = args.style_reference_image
        options["reference_image_prompt"] = args.style_reference_image_prompt
    elif args.style_reference_inversion:
        options["reference_inversion"] = args.style_reference_inversion
    elif args.style_reference_prompt is not None:
        options["reference_prompt"] = args.style_reference_prompt
    # Without a reference source the series' first image is the reference of every batch: the
    # library's rule (StyleAligned.for_series), not the CLI's.
    return options
