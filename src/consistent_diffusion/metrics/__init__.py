"""Consistency metrics: feature extractors behind one registry and one function per axis.

    from consistent_diffusion.metrics import load_features, style_consistency, object_consistency

Every metric returns a ``MetricResult`` (per-image values in input order, an aggregate, the set's
diversity next to consistency scores, and ``validated``: whether the metric with that extractor
passed its bar on held-out real emoji; see docs/metrics.md).
"""

from consistent_diffusion.metrics.common import MetricResult, as_batch, roc_auc
from consistent_diffusion.metrics.concept import concept_consistency
from consistent_diffusion.metrics.consistency import (
    DEFAULT_EXTRACTORS,
    diversity,
    fidelity,
    object_consistency,
    shape_consistency,
    style_consistency,
    text_alignment,
    validation_status,
)
from consistent_diffusion.metrics.extractors import (
    FeatureExtractor,
    available_features,
    describe_features,
    load_features,
    register_features,
)

__all__ = [
    "DEFAULT_EXTRACTORS",
    "FeatureExtractor",
    "MetricResult",
    "as_batch",
    "available_features",
    "concept_consistency",
    "describe_features",
    "diversity",
    "fidelity",
    "load_features",
    "object_consistency",
    "register_features",
    "roc_auc",
    "shape_consistency",
    "style_consistency",
    "text_alignment",
    "validation_status",
]
