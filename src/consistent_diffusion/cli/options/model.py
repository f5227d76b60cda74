"""Arguments shared by commands that load a model."""

from __future__ import annotations

import argparse
from typing import Any

from consistent_diffusion.models.loading import EMBEDDED, load_pipeline, parse_dtype


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        default=EMBEDDED,
        metavar="SPEC",
        help="'embedded' (default, ships with the package, runs offline), a diffusers folder "
        "(SD 1.x/2.x/SDXL), a .safetensors/.ckpt checkpoint, or a hub id in your local cache",
    )
    group.add_argument("--config", metavar="DIR", help="single-file checkpoints: a local diffusers folder of the same architecture")
    group.add_argument("--revision", help="hub ids: the revision to load")
    group.add_argument("--allow-download", action="store_true", help="hub ids: allow downloading from the hub")
    group.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1, mps (default: cpu)")
    group.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="weights dtype (default: float32)")


def model_argv(args: argparse.Namespace) -> list[str]:
    """The model arguments of ``args`` as a command line (to start another command on the same model)."""
    argv = ["--model", str(args.model), "--device", str(args.device), "--dtype", str(args.dtype)]
    for name in ("config", "revision"):
        if getattr(args, name, None):
            argv += [f"--{name}", str(getattr(args, name))]
    return argv + (["--allow-download"] if getattr(args, "allow_download", False) else [])


def load_model_from_args(args: argparse.Namespace, spec: str | None = None, dtype: str | None = None) -> Any:
    """The pipeline ``args`` name, with the low-memory switches of ``cli.options.memory`` on where the
    command has them (offloaded pipelines load on the CPU; the hooks move them to ``--device``)."""
    from consistent_diffusion.cli.options.memory import apply_memory_from_args, low_memory_from_args

    offload = low_memory_from_args(args).offload is not None
    pipe = load_pipeline(
        spec or args.model,
        device="cpu" if offload else args.device,
        dtype=parse_dtype(dtype or args.dtype),
        config=args.config,
        revision=args.revision,
        allow_download=args.allow_download,
    )
    return apply_memory_from_args(pipe, args)
