"""Feature extractors (inference only) behind one registry.

- ``registry``: ``FeatureExtractor``, ``register_features``, ``available_features``, ``load_features``;
- ``pretrained``: EfficientNet-Lite0, transformers CLIP / DINO / DINOv2;
- ``pixel``: palette, edges, silhouette, style statistics;
- ``heads``: the shipped emoji-style / emoji-text heads on frozen EfficientNet-Lite0 features;
- ``probes``: the embedded model's style / content probes.
"""

from consistent_diffusion.metrics.extractors.registry import (
    FeatureExtractor,
    available_features,
    describe_features,
    load_features,
    register_features,
)

__all__ = ["FeatureExtractor", "available_features", "describe_features", "load_features", "register_features"]
