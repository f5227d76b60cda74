"""Command-line options for the image prompt (``ip_adapter``: IP-Adapter / InstantStyle).

``add_ip_adapter_arguments(parser)`` adds them, ``ip_adapter_from_args(args)`` builds the method
(or None when ``--ip-adapter`` is not given). Options only: the rules (released folder layout,
presets per model family, per-row images over a series) live in ``methods/ip_adapter``.
"""

from __future__ import annotations

import argparse
from typing import Any

from consistent_diffusion.core.errors import ConfigError
from consistent_diffusion.methods.base import Method

_IP_ONLY = ("ip_image", "ip_scale", "ip_preset", "ip_mask")


def add_ip_adapter_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the IP-Adapter options to ``parser``."""
    group = parser.add_argument_group("image prompt (IP-Adapter / InstantStyle)")
    group.add_argument("--ip-adapter", action="append", default=[], metavar="PATH",
                       help="an IP-Adapter in the released layout: a folder with models/ (SD 1.x) or sdxl_models/ "
                       "(SDXL) holding the weights and image_encoder/, or the weight file itself; for the embedded "
                       "model embedded-style / embedded-subject or a `train ip-adapter` folder; repeat for "
                       "several adapters (one --ip-image each)")
    group.add_argument("--ip-image", action="append", default=[], metavar="IMG",
                       help="the image prompt (repeat: one per adapter, one per subject with --ip-mask, or one per "
                       "--prompt with --ip-per-row)")
    group.add_argument("--ip-scale", type=float, action="append", default=[], metavar="S",
                       help="adapter strength (one per --ip-adapter; default: 1.0; 0 = off); with --ip-preset it "
                       "scales the preset's blocks")
    group.add_argument("--ip-preset", choices=("style", "style+layout"),
                       help="InstantStyle: the image acts only in the style (or style and layout) blocks")
    group.add_argument("--ip-per-row", action="store_true",
                       help="image i is the image prompt of --prompt i (default: every image gets all --ip-image)")
    group.add_argument("--ip-mask", action="append", default=[], metavar="IMG",
                       help="region mask (white = where the image acts), one per --ip-image (or per adapter)")


def ip_adapter_from_args(args: argparse.Namespace) -> Method | None:
    """The ``ip_adapter`` method the options ask for, or None. ConfigError on options without it."""
    adapters = list(getattr(args, "ip_adapter", None) or [])
    if not adapters:
        given = [f"--{name.replace('_', '-')}" for name in _IP_ONLY if getattr(args, name, None)]
        if getattr(args, "ip_per_row", False):
            given.append("--ip-per-row")
        if given:
            raise ConfigError(f"{', '.join(given)} only apply with --ip-adapter")
        return None
    from consistent_diffusion.methods.ip_adapter import IPAdapter

    if not args.ip_image:
        raise ConfigError("--ip-adapter needs at least one --ip-image")
    options: dict[str, Any] = {
        "adapters": tuple(adapters),
        "images": tuple(args.ip_image),
        "scales": tuple(args.ip_scale),
        "preset": args.ip_preset,
        "per_row": bool(args.ip_per_row),
        "masks": tuple(args.ip_mask),
    }
    return IPAdapter(**options)
