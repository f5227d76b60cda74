"""Command-line options for DreamBooth, LoRA and ControlNet at generation time.

``add_finetune_arguments(parser)`` adds ``--textual-inversion PATH[:TOKEN]``, ``--dreambooth RUN``,
``--lora PATH[:SCALE]`` (repeatable) and
``--controlnet SPEC --control-image IMG [--control-scale S] [--control-preprocess P]`` (each
repeatable, matched by position); ``finetune_methods_from_args(args)`` returns the methods to
append after the training-free ones (textual inversion, DreamBooth, LoRA, then ControlNet; they
compose with each other and with StyleAligned).
"""

from __future__ import annotations

import argparse
import os

from consistent_diffusion.core.errors import ConfigError
from consistent_diffusion.methods.base import Method


def add_finetune_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("DreamBooth and LoRA")
    group.add_argument("--dreambooth", default=None, metavar="RUN",
                       help="use the subject of a full DreamBooth run (its folder or RUN/model) on top of --model: "
                       "its fine-tuned weights are swapped in for the call, so it stacks with the other methods")
    group.add_argument("--lora", action="append", default=None, metavar="PATH[:SCALE]",
                       help="apply a LoRA (file or folder; our LoRA DreamBooth output, diffusers or kohya/A1111 format) "
                       "with a strength (default 1); repeat to mix several")
    group.add_argument("--textual-inversion", action="append", default=None, metavar="PATH[:TOKEN]",
                       help="use learned token embeddings (our `train textual-inversion` folder, diffusers' or A1111's "
                       "file); put the token in --prompt; :TOKEN renames it; repeat for several")
    group = parser.add_argument_group("ControlNet")
    group.add_argument("--controlnet", action="append", default=None, metavar="SPEC",
                       help="a ControlNet folder, cached hub id, embedded-<condition>, or 'default' (the embedded "
                       "model's own, chosen by --control-preprocess); repeat for several")
    group.add_argument("--control-image", action="append", default=None, metavar="IMG",
                       help="one control image per --controlnet (or a picture, with --control-preprocess)")
    group.add_argument("--control-scale", action="append", type=float, default=None, metavar="S",
                       help="conditioning scale per --controlnet (default 1)")
    group.add_argument("--control-preprocess", action="append", default=None,
                       choices=("none", "canny", "silhouette", "scribble"),
                       help="per --controlnet: make the control image from --control-image (default none)")
    group.add_argument("--control-start", type=float, default=0.0, help="fraction of steps before ControlNets act")
    group.add_argument("--control-end", type=float, default=1.0, help="fraction of steps after which they stop")


def parse_lora_spec(spec: str) -> tuple[str, float]:
    """``PATH[:SCALE]`` -> (path, scale); a path that exists as given wins over a colon split."""
    if os.path.exists(spec) or ":" not in spec:
        return spec, 1.0
    path, _, scale = spec.rpartition(":")
    try:
        return path, float(scale)
    except ValueError:
        raise ConfigError(f"--lora {spec!r}: expected PATH or PATH:SCALE with a number as SCALE") from None


def finetune_methods_from_args(args: argparse.Namespace) -> list[Method]:
    from consistent_diffusion.methods.controlnet import ControlNet
    from consistent_diffusion.methods.dreambooth import DreamBooth
    from consistent_diffusion.methods.lora import LoRA
    from consistent_diffusion.methods.textual_inversion import TextualInversion

    methods: list[Method] = []
    for spec in getattr(args, "textual_inversion", None) or ():
        path, token = (spec, None) if os.path.exists(spec) or ":" not in spec else spec.rsplit(":", 1)
        methods.append(TextualInversion(embeddings=path, token=token))
    if getattr(args, "dreambooth", None):
        methods.append(DreamBooth(model=args.dreambooth))
    loras = getattr(args, "lora", None)
    if loras:
        parsed = [parse_lora_spec(spec) for spec in loras]
        methods.append(LoRA(weights=tuple(p for p, _ in parsed), scales=tuple(s for _, s in parsed)))
    controlnets = getattr(args, "controlnet", None)
    images = getattr(args, "control_image", None)
    if controlnets or images:
        if not controlnets or not images:
            raise ConfigError("--controlnet and --control-image go together (one image per ControlNet)")
        methods.append(ControlNet(
            controlnets=tuple(controlnets), images=tuple(images),
            scales=tuple(getattr(args, "control_scale", None) or ()),
            preprocess=tuple(getattr(args, "control_preprocess", None) or ()),
            guidance_start=args.control_start, guidance_end=args.control_end,
        ))
    return methods
