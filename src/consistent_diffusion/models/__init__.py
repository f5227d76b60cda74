"""Models: load any SD-family pipeline (or the embedded one), its identity, VAE helpers, export."""

from consistent_diffusion.models.loading import (
    EMBEDDED,
    SCHEDULERS,
    ModelIdentity,
    load_pipeline,
    model_identity,
    parse_dtype,
    set_scheduler,
)

__all__ = ["EMBEDDED", "SCHEDULERS", "ModelIdentity", "load_pipeline", "model_identity", "parse_dtype", "set_scheduler"]
