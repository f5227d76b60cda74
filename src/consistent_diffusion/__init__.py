"""consistent-diffusion: make, combine, measure and choose methods for consistent image series.

The public face (imported lazily, so ``import consistent_diffusion`` stays cheap)::

    from consistent_diffusion import load_pipeline, SeriesConfig, generate_series, get_method, score

    pipe = load_pipeline("embedded")
    style = get_method("style_aligned", reference_prompt="grinning face, twitter style")
    result = generate_series(pipe, SeriesConfig(prompts=("cat face",), seeds=(0, 1, 2)), [style], out_dir="runs/api")
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "load_pipeline": "consistent_diffusion.models.loading",
    "SeriesConfig": "consistent_diffusion.series",
    "generate_series": "consistent_diffusion.series",
    "get_method": "consistent_diffusion.methods.base",
    "available_methods": "consistent_diffusion.methods.base",
    "run": "consistent_diffusion.methods.base",
    "score": "consistent_diffusion.metrics.score",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'consistent_diffusion' has no attribute {name!r}")
