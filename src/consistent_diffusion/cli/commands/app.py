"""`consistent-diffusion app`: the web app over the library (make, fine-tune, measure, compare)."""

from __future__ import annotations

import argparse
import ipaddress
import sys

from consistent_diffusion.cli.options.model import add_model_arguments, load_model_from_args, model_argv

EXAMPLES = """examples:
  consistent-diffusion app                                 # the embedded model, http://127.0.0.1:7860
  consistent-diffusion app --model path/to/sd15 --device cuda --out runs/app
  consistent-diffusion app --model path/to/sd15 --ip-adapter IP-Adapter/models/ip-adapter_sd15.safetensors
  consistent-diffusion app --host 0.0.0.0 --port 8080      # reachable from other machines: read the warning
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "app",
        help="start the web app: make series, fine-tune a subject, run and read the bench in a browser",
        description="A web app (Gradio) over the library. Tabs: Make a series (prompts, seeds and a method stack "
        "assembled in the page; images, scores, manifest and a zip), Fine-tune a subject (LoRA or DreamBooth "
        "from 3-20 uploads, with progress and cancel), Compare (run the quick bench or open a report; the "
        "advisor). Every job writes one folder under --out with its manifest, as the CLI would. One job runs "
        "at a time; others wait in a queue.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(parser)
    parser.add_argument("--out", default="runs/app", metavar="DIR", help="where jobs write their folders (default: runs/app)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--max-upload-mb", type=int, default=20, help="largest upload accepted, per file (default 20)")
    parser.add_argument("--max-pixels", type=int, default=4096 * 4096, help="largest image accepted, in pixels")
    parser.add_argument("--max-files", type=int, default=20, help="most files per upload field (default 20)")
    parser.add_argument("--ip-adapter", action="append", default=[], metavar="PATH",
                        help="an IP-Adapter (released layout: a folder with models/ or sdxl_models/ and "
                        "image_encoder/, or the weight file) offered in the image prompt section; repeat for several "
                        "(the embedded model's own are offered once installed)")
    parser.set_defaults(func=run)


def loopback(host: str) -> bool:
    """Whether ``host`` only listens on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    from consistent_diffusion.app import jobs
    from consistent_diffusion.app.ui import App, launch

    if not loopback(args.host):
        print(f"warning: listening on {args.host}: anyone who can reach this machine can use the app, run jobs "
              "and read what they write; there is no login", file=sys.stderr)
    limits = jobs.UploadLimits(max_bytes=args.max_upload_mb * 2**20, max_pixels=args.max_pixels,
                               max_files=args.max_files)
    from consistent_diffusion.cli.commands.bench import default_workers

    app = App(lambda: load_model_from_args(args), args.out, limits, model_label=args.model or "embedded",
              model_argv=model_argv(args), bench_workers=default_workers(args.device), ip_adapters=args.ip_adapter)
    print(f"serving on http://{args.host}:{args.port} (Ctrl-C stops); jobs write under {args.out}")
    launch(app, host=args.host, port=args.port, block=True)
    return 0
