"""Which feature extractor reads each axis of ``score``: *extractor sets* and the model's default.

``emoji``, the heads validated on held-out real emoji (``DEFAULT_EXTRACTORS``), is the embedded
model's default; the published protocols ``dreambooth`` (DINO ViT-S/16, CLIP-I, CLIP-T),
``consistory`` (DreamSim on foreground crops) and ``csd`` (CSD style) load their weights from local
folders. On any other model no set is chosen for the user: an axis left without an extractor is
``NOT_CHOSEN`` and ``score`` returns it not measured, with ``NOT_CHOSEN_REASON``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from consistent_diffusion.core.errors import ConfigError
from consistent_diffusion.metrics.consistency import DEFAULT_EXTRACTORS, ExtractorLike

METRIC_NAMES = ("style", "object", "text", "diversity", "shape", "fidelity", "concept", "within_series")
DEFAULT_METRICS = ("style", "object", "text", "diversity")
TASK_KINDS = ("style", "object", "concept", "shape")  # the bench's task kinds (``score(kind=...)``)
EXTRACTOR_AXES = ("style", "object", "concept", "text", "diversity", "clip_i")  # what ``extractors`` may set
EMBEDDED = "embedded"  # ModelIdentity.kind of the embedded model, whose world (emoji) the defaults fit


@dataclass(frozen=True)
class ExtractorSet:
    """Extractors for some axes, and the protocol they reproduce."""

    extractors: Mapping[str, str]
    protocol: str
    foreground: bool | None = None  # object / concept on foreground crops (None: as each extractor was validated)


EXTRACTOR_SETS: dict[str, ExtractorSet] = {
    "emoji": ExtractorSet({k: v for k, v in DEFAULT_EXTRACTORS.items() if k != "diversity"},
                          "heads validated on held-out real emoji (docs/metrics.md)"),
    "dreambooth": ExtractorSet({"object": "dino", "clip_i": "clip", "text": "clip", "concept": "dino"},
                               "DreamBooth (Ruiz et al. 2023): DINO ViT-S/16 and CLIP-I (mean cosine to the real "
                               "images), CLIP-T (image-prompt cosine), whole images", foreground=False),
    "consistory": ExtractorSet({"object": "dreamsim", "concept": "dreamsim"},
                               "ConsiStory (Tewel et al. 2024): DreamSim similarity on foreground crops",
                               foreground=True),
    "csd": ExtractorSet({"style": "csd"}, "CSD (Somepalli et al. 2024): cosine of CSD ViT-L style descriptors"),
}


class NotChosen(str):
    """An axis no extractor was chosen for (off the embedded model, without a set or an override)."""


NOT_CHOSEN = NotChosen("")
NOT_CHOSEN_REASON = ("no extractor chosen for this model's images (the emoji heads are validated on the embedded "
                     "model's only): pick a published protocol with --metrics dreambooth / consistory / csd "
                     "(weights from local folders, --feature-model NAME=PATH), --metrics emoji to use the emoji "
                     "heads anyway, or an extractor (--style-features ...)")



def model_kind(model: Any) -> str | None:
    """The kind ("embedded", "folder", "single_file", "hub", "in_memory") of ``model``: a
    ``ModelIdentity``, a manifest's model record (a mapping with "kind"), a kind string, a pipeline
    (its recorded identity), or None (unknown)."""
    if model is None or isinstance(model, str):
        return model
    if isinstance(model, Mapping):
        return model.get("kind")
    if hasattr(model, "kind") and hasattr(model, "spec"):  # a ModelIdentity
        return model.kind
    from consistent_diffusion.models.loading import model_identity

    return model_identity(model).kind


def resolve_extractors(overrides: Mapping[str, ExtractorLike | None] | None = None, model: Any = None,
                       sets: Sequence[str] | None = None) -> dict[str, ExtractorLike | None]:
    """The extractor of each axis in ``EXTRACTOR_AXES``: the ``EXTRACTOR_SETS`` named in ``sets``
    (default: "emoji" on the embedded model, none elsewhere; ``model`` as ``model_kind`` takes it,
    None counts as not embedded), then ``overrides``. An axis left without one is ``NOT_CHOSEN``
    (scored as not measured); an explicit None skips "text" and "clip_i"; diversity is pixel by default."""
    unknown = sorted(set(overrides or {}) - set(EXTRACTOR_AXES))
    if unknown:
        raise ConfigError(f"unknown extractor axes {unknown}; accepted: {', '.join(EXTRACTOR_AXES)}")
    chosen: dict[str, ExtractorLike | None] = {axis: NOT_CHOSEN for axis in ("style", "object", "concept", "text")}
    chosen.update({"diversity": DEFAULT_EXTRACTORS["diversity"], "clip_i": None})
    for name in chosen_sets(sets, model):
        chosen.update(EXTRACTOR_SETS[name].extractors)
    chosen.update(overrides or {})
    return chosen


def chosen_sets(sets: Sequence[str] | None, model: Any = None) -> tuple[str, ...]:
    """``sets`` checked, or the model's default ("emoji" on the embedded model, none elsewhere)."""
    if sets:
        unknown = [name for name in sets if name not in EXTRACTOR_SETS]
        if unknown:
            raise ConfigError(f"unknown extractor sets {unknown}; accepted: {', '.join(EXTRACTOR_SETS)}")
        return tuple(sets)
    return ("emoji",) if model_kind(model) == EMBEDDED else ()


def parse_metric_list(values: Sequence[str] | None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """--metrics a b,c -> (metrics, extractor sets): names of ``EXTRACTOR_SETS`` choose sets, the
    others metrics; "all": every metric. Only sets given: the metrics their extractors serve (and
    diversity); nothing: the defaults."""
    names = tuple(v.strip() for value in values or () for v in value.split(",") if v.strip())
    sets = tuple(n for n in names if n in EXTRACTOR_SETS)
    metrics = tuple(n for n in names if n not in EXTRACTOR_SETS)
    if metrics == ("all",):
        return METRIC_NAMES, sets
    if not metrics and sets:
        served = {axis for name in sets for axis in EXTRACTOR_SETS[name].extractors} - {"clip_i", "concept"}
        return tuple(n for n in METRIC_NAMES if n in served or n == "diversity"), sets
    return metrics or DEFAULT_METRICS, sets


def parse_feature_models(values: Sequence[str]) -> dict[str, str]:
    """["dino=DIR", "csd=FILE"] -> {"dino": "DIR", "csd": "FILE"}, with a clear error for a bad item."""
    models = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ConfigError(f"--feature-model takes NAME=PATH (e.g. dino=weights/dino-vits16), got {value!r}")
        models[name.strip()] = path.strip()
    return models
