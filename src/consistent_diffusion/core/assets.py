"""Where the package's shipped weights and data live (``consistent_diffusion/assets``)."""

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
