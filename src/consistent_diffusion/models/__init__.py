"""Models: load any SD-family pipeline (or the embedded one), its identity, VAE helpers, export.

The names below load lazily (PEP 562), so that a torch-free module can import a constant from a
submodule (``models.sampling.DEFAULT_STEPS`` for a suite file) without importing torch."""

from __future__ import annotations

from typing import Any

__all__ = ["EMBEDDED", "SCHEDULERS", "ModelIdentity", "load_pipeline", "model_identity", "parse_dtype", "set_scheduler"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from consistent_diffusion.models import loading

        return getattr(loading, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
