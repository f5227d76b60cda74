"""The low-memory switches (``models.memory.LowMemory``) as command-line options, for every
command that generates: ``add_memory_arguments(parser)``; ``load_model_from_args`` applies them."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from consistent_diffusion.models.memory import OFFLOAD_MODES, LowMemory, apply_low_memory


def add_memory_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("low memory (same images, less memory, slower)")
    group.add_argument("--offload", choices=OFFLOAD_MODES, default=None,
                       help="keep the weights on the CPU and move them to --device when used: 'model' one component "
                       "at a time, 'sequential' one layer at a time (least memory, slowest; needs an accelerator)")
    group.add_argument("--vae-slicing", action="store_true", help="decode the batch one image at a time")
    group.add_argument("--vae-tiling", action="store_true",
                       help="encode/decode large images in overlapping tiles (blends tile seams: close, not identical)")
    group.add_argument("--attention-slicing", action="store_true",
                       help="compute attention a slice of heads at a time")


def low_memory_from_args(args: argparse.Namespace) -> LowMemory:
    return LowMemory(offload=getattr(args, "offload", None), vae_slicing=bool(getattr(args, "vae_slicing", False)),
                     vae_tiling=bool(getattr(args, "vae_tiling", False)),
                     attention_slicing=bool(getattr(args, "attention_slicing", False)))


def apply_memory_from_args(pipe: Any, args: argparse.Namespace) -> Any:
    """``pipe`` with the switches of ``args`` on (offload onto ``args.device``)."""
    options = low_memory_from_args(args)
    if options.offload and str(args.device) == "cpu":
        print(f"note: --offload {options.offload} with --device cpu keeps everything on the CPU (nothing to offload to)",
              file=sys.stderr)
    return apply_low_memory(pipe, options, device=args.device) if options.any else pipe
