"""`consistent-diffusion export`: write a model as ONE original-format (LDM) .safetensors file."""

from __future__ import annotations

import argparse
from pathlib import Path

EXAMPLES = """examples:
  consistent-diffusion export --out embedded.safetensors
  consistent-diffusion export --model path/to/sd15-folder --dtype float16 --out sd15.safetensors
  consistent-diffusion export --model path/to/sdxl-folder --dtype float16 --out sdxl.safetensors

load the file back offline (diffusers needs the configs of a local folder of the same architecture):
  consistent-diffusion generate --model sd15.safetensors --config path/to/sd15-folder ...
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    from consistent_diffusion.cli.options.model import add_model_arguments

    parser = subparsers.add_parser(
        "export",
        help="export a model as one original-format .safetensors checkpoint (A1111 / ComfyUI)",
        description="Write the model's UNet, VAE and text encoder(s) into one .safetensors file in the "
        "original Stable Diffusion key layout (model.diffusion_model.*, first_stage_model.*, "
        "cond_stage_model.* / conditioner.embedders.*), as A1111, ComfyUI and diffusers' "
        "from_single_file read it. SD 1.x, SD 2.x and SDXL-shaped models. The file is written "
        "atomically; --dtype also sets the dtype stored in the file.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(parser)
    parser.add_argument(
        "--out", required=True, type=Path, metavar="FILE.safetensors", help="the checkpoint to write"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from consistent_diffusion.core.errors import ConfigError
    from consistent_diffusion.models.export import save_single_file
    from consistent_diffusion.models.loading import load_pipeline, parse_dtype

    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise ConfigError(f"--out must end in .safetensors, got {str(out)!r}")
    if out.exists() and not args.overwrite:
        raise ConfigError(f"--out {out} exists; pass --overwrite to replace it")
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give a file name ending in .safetensors")
    dtype = parse_dtype(args.dtype)
    pipe = load_pipeline(
        args.model,
        device=args.device,
        dtype=dtype,
        config=args.config,
        revision=args.revision,
        allow_download=args.allow_download,
    )
    path = save_single_file(pipe, out, dtype=dtype)
    size_mb = path.stat().st_size / 2**20
    print(f"wrote {path} ({size_mb:.1f} MiB, {args.dtype}, {type(pipe).__name__})")
    return 0
