"""Command-line entry point: thin, parse -> config dataclass -> library call -> files.

Each subcommand lives in ``consistent_diffusion.cli.commands.<name>`` and exposes
``register(subparsers)``, which adds its parser and sets ``func`` (args -> exit code).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from consistent_diffusion import __version__
from consistent_diffusion.core.errors import ConsistentDiffusionError

# Order here is the order in `--help`.
COMMAND_MODULES = [
    "generate",
    "invert",
    "edit",
    "data",
    "train",
    "control",
    "export",
    "bench",
    "advise",
    "metrics",
    "score",
    "inspect",
    "app",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="consistent-diffusion",
        description=(
            "Make consistent image series with diffusion models (style, object, concept, shape), "
            "measure their consistency and choose methods from measured evidence. "
            "Everything runs offline on the embedded default model unless --model says otherwise."
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"consistent_diffusion.cli.commands.{name}").register(subparsers)
    return parser


def _quiet_libraries() -> None:
    """Library chatter (prompt truncation notes, type warnings) hides our own messages."""
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


def main(argv: list[str] | None = None) -> int:
    _quiet_libraries()
    parser = build_parser()
    args = parser.parse_args(argv)
    args.command_argv = list(sys.argv[1:] if argv is None else argv)  # e.g. for bench --workers to re-run itself
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except ConsistentDiffusionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing half-written was left behind", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
