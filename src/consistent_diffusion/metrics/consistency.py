"""One function per consistency axis. Each is batched and returns a ``MetricResult`` with one value per
image (input order) and an aggregate; consistency results carry the set's diversity in
``details["diversity"]`` so that "all images identical" never reads as success, and a
``validated`` flag from the shipped validation table (None: never validated).

Images: anything ``as_batch`` accepts (tensors (N, 3, H, W) in [-1, 1], uint8 arrays, PIL, paths).
Extractors: a name for ``load_features`` or a ``FeatureExtractor``. ``diversity_with``: how the set's
diversity beside a consistency score is measured ("pixel": 1 - SSIM, or an extractor); None skips it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

import torch

from consistent_diffusion.core import imageops as pixel
from consistent_diffusion.core.assets import ASSETS_DIR
from consistent_diffusion.core.errors import ConfigError, ImageInputError
from consistent_diffusion.metrics.common import (
    ImagesLike,
    MetricResult,
    as_batch,
    cosine_matrix,
    mean_off_diagonal,
    resize_batch,
    result,
)
from consistent_diffusion.metrics.extractors import FeatureExtractor, load_features

ExtractorLike = str | FeatureExtractor

# Default extractor per metric: the validated choice for the embedded (emoji) world.
DEFAULT_EXTRACTORS = {
    "style": "emoji-style",
    "object": "emoji-object",
    "text": "emoji-text",
    "diversity": "pixel",
    "concept": "emoji-object",
}
VALIDATION_FILE = "validation.json"


# ----------------------------------------------------------------------------- helpers


_EXTRACTORS: dict[tuple[str, str, str, str], FeatureExtractor] = {}


def get_extractor(extractor: ExtractorLike, device: str = "cpu", dtype: torch.dtype = torch.float32,
                  options: Mapping[str, Any] | None = None) -> FeatureExtractor:
    """A FeatureExtractor as given, or the named one loaded with ``options`` (e.g. ``model=PATH``),
    once per process for each name, device, dtype and options."""
    if isinstance(extractor, FeatureExtractor):
        return extractor
    options = dict(options or {})
    key = (str(extractor), str(device), str(dtype), json.dumps(options, sort_keys=True, default=str))
    if key not in _EXTRACTORS:
        _EXTRACTORS[key] = load_features(str(extractor), device=device, dtype=dtype, **options)
    return _EXTRACTORS[key]


def extractor_name(extractor: ExtractorLike) -> str:
    return extractor if isinstance(extractor, str) else extractor.name


@lru_cache(maxsize=1)
def validation_table() -> dict[tuple[str, str], dict[str, Any]]:
    """{(metric, extractor): record} of the shipped ``assets/metrics/validation.json`` ({} if absent).

    A pair validated by several barred protocols (style on trained and on unseen styles, to sets and
    to a reference) passes only when every one passed; its record gives the weakest AUC and lists them all.
    """
    path = ASSETS_DIR / "metrics" / VALIDATION_FILE
    if not path.is_file():
        return {}
    return summarise_validation(json.loads(path.read_text()).get("results", []))


def summarise_validation(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """Validation rows -> {(metric, extractor): record}, as ``validation_table`` describes."""
    grouped: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        if row.get("primary", True) and row.get("bar") is not None:
            grouped.setdefault((row["metric"], row["extractor"]), []).append(row)
    table = {}
    for key, group in grouped.items():
        weakest = min(group, key=lambda r: r["auc"] - r["bar"])
        table[key] = {
            "passed": all(r["passed"] for r in group), "auc": weakest["auc"], "bar": weakest["bar"],
            "protocol": weakest["protocol"],
            "protocols": [{k: r.get(k) for k in ("protocol_id", "protocol", "auc", "bar", "passed")} for r in group],
        }
    return table


def validation_status(metric: str, extractor: str | None) -> tuple[bool | None, dict[str, Any] | None]:
    """(validated, record) of ``metric`` with ``extractor`` in the shipped validation table.

    validated: True when its AUC on held-out real emoji reached the metric's bar in every barred
    protocol, False when it missed one, None when this pair was never validated (e.g. CLIP or DINO,
    whose weights are not here). record: the weakest protocol's AUC, bar and name, and all of them."""
    record = validation_table().get((metric, extractor or ""))
    if record is None:
        return None, None
    return bool(record["passed"]), {k: record[k] for k in ("auc", "bar", "protocol", "protocols")}


def finish_result(res: MetricResult, metric: str, diversity_value: float | None = None) -> MetricResult:
    res.validated, res.validation = validation_status(metric, res.extractor)
    if diversity_value is not None:
        res.details["diversity"] = float(diversity_value)
    return res


def _check_same_count(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if a.shape[0] != b.shape[0]:
        raise ImageInputError(f"{what}: {a.shape[0]} images but {b.shape[0]} counterparts; give one per image")


def _match_size(batch: torch.Tensor, size: tuple[int, int], what: str, resize: bool) -> torch.Tensor:
    if tuple(batch.shape[-2:]) == tuple(size):
        return batch
    if not resize:
        raise ImageInputError(
            f"{what} are {batch.shape[-1]}x{batch.shape[-2]} but the images are {size[1]}x{size[0]}; "
            "give them at the same size (or allow resizing)"
        )
    return resize_batch(batch, size)


def foreground_crop(batch: torch.Tensor, margin: float = 0.08) -> torch.Tensor:
    """Each image's foreground (mask bounding box plus a margin) on a white square canvas, resized back
    to the input size; the background outside the mask becomes white. Empty masks: image unchanged."""
    masks = pixel.foreground_mask(batch)
    height, width = batch.shape[-2:]
    out = []
    for image, mask in zip(batch, masks, strict=True):
        ys, xs = torch.nonzero(mask[0], as_tuple=True)
        if ys.numel() == 0:
            out.append(image)
            continue
        image = torch.where(mask, image, torch.ones_like(image))
        top, bottom, left, right = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
        side = max(bottom - top, right - left)
        side = int(side * (1 + 2 * margin)) + 1
        cy, cx = (top + bottom) // 2, (left + right) // 2
        canvas = torch.ones(3, side, side)
        y0, x0 = cy - side // 2, cx - side // 2
        sy0, sx0 = max(0, y0), max(0, x0)
        sy1, sx1 = min(height, y0 + side), min(width, x0 + side)
        canvas[:, sy0 - y0: sy1 - y0, sx0 - x0: sx1 - x0] = image[:, sy0:sy1, sx0:sx1]
        out.append(resize_batch(canvas[None], (height, width))[0].clamp(-1, 1))
    return torch.stack(out)


# ----------------------------------------------------------------------------- diversity


def diversity(images: ImagesLike, extractor: ExtractorLike | None = None, device: str = "cpu") -> MetricResult:
    """Mean pairwise distance inside a set; 0 when all images are identical.

    extractor None or "pixel": distance 1 - SSIM (range [0, 2]); otherwise cosine distance
    1 - cos of the extractor's embeddings (range [0, 2]). Per image: mean distance to the others.
    """
    batch = as_batch(images)
    n = batch.shape[0]
    if extractor is None or extractor == "pixel":
        distance = torch.zeros(n, n)
        for i in range(n):
            if i + 1 < n:
                others = batch[i + 1:]
                d = 1.0 - pixel.ssim(batch[i: i + 1].expand_as(others), others)
                distance[i, i + 1:] = d
                distance[i + 1:, i] = d
        name = "pixel"
    else:
        extractor = get_extractor(extractor, device)
        distance = 1.0 - cosine_matrix(extractor.embed(batch))
        name = extractor_name(extractor)
    per_image = mean_off_diagonal(distance.clamp(0.0, 2.0)) if n > 1 else torch.zeros(n)
    return finish_result(result("diversity", name, per_image, higher_is_better=True, range=(0.0, 2.0)), "diversity")


def _diversity_value(batch: torch.Tensor, guard: ExtractorLike | None) -> float | None:
    """The set's diversity with ``guard`` ("pixel" or an extractor); None (or False) skips it."""
    if guard is None or guard is False:
        return None
    return diversity(batch, guard).aggregate


# ----------------------------------------------------------------------------- style


def style_consistency(images: ImagesLike, extractor: ExtractorLike = DEFAULT_EXTRACTORS["style"],
                      reference: ImagesLike | None = None, device: str = "cpu",
                      diversity_with: ExtractorLike | None = "pixel") -> MetricResult:
    """Agreement of style descriptors inside a set (and with a style reference, when given).

    Per image: mean cosine similarity of its style descriptor to the other images' (within-set), or,
    with ``reference`` (one or more images), to the references'. ``details``: both parts.
    Range [-1, 1]; identical images give 1.
    """
    batch = as_batch(images)
    ext = get_extractor(extractor, device)
    embeddings = ext.embed(batch)
    within = mean_off_diagonal(cosine_matrix(embeddings)) if batch.shape[0] > 1 else torch.ones(1)
    details: dict[str, Any] = {"within_set": float(within.mean())}
    values = within
    if reference is not None:
        to_reference = cosine_matrix(embeddings, ext.embed(as_batch(reference))).mean(dim=1)
        details["to_reference"] = float(to_reference.mean())
        details["within_set_per_image"] = [float(v) for v in within]
        values = to_reference
    res = result("style_consistency", extractor_name(ext), values, range=(-1.0, 1.0), details=details)
    return finish_result(res, "style", _diversity_value(batch, diversity_with))


# ----------------------------------------------------------------------------- object


def object_consistency(images: ImagesLike, references: ImagesLike | None = None,
                       extractor: ExtractorLike = DEFAULT_EXTRACTORS["object"], foreground: bool | None = None,
                       device: str = "cpu", diversity_with: ExtractorLike | None = "pixel") -> MetricResult:
    """Similarity of each image's subject to reference images of that subject (DreamBooth's DINO /
    CLIP-I protocol); without references, to the other images of the set.

    ``foreground``: crop each image to its foreground mask (on white) first, so the subject, not the
    background or scene, is compared (None: as the extractor was validated, ``extractor.foreground``;
    ``emoji-object`` reads whole emoji). Per image: mean cosine similarity; range [-1, 1].
    """
    batch = as_batch(images)
    ext = get_extractor(extractor, device)
    foreground = ext.foreground if foreground is None else foreground
    prepared = foreground_crop(batch) if foreground else batch
    embeddings = ext.embed(prepared)
    if references is None:
        values = mean_off_diagonal(cosine_matrix(embeddings)) if batch.shape[0] > 1 else torch.ones(1)
        mode = "within_set"
    else:
        refs = as_batch(references)
        refs = foreground_crop(refs) if foreground else refs
        values = cosine_matrix(embeddings, ext.embed(refs)).mean(dim=1)
        mode = "to_references"
    res = result("object_consistency", extractor_name(ext), values, range=(-1.0, 1.0),
                 details={"mode": mode, "foreground": foreground})
    return finish_result(res, "object", _diversity_value(batch, diversity_with))


# ----------------------------------------------------------------------------- text


def text_alignment(images: ImagesLike, prompts: Sequence[str], extractor: ExtractorLike = DEFAULT_EXTRACTORS["text"],
                   device: str = "cpu") -> MetricResult:
    """Cosine similarity of each image to its prompt in a joint image-text space (CLIP-T with
    ``clip``; ``emoji-text`` for the embedded world). Range [-1, 1]. ``details["retrieval_top1"]``:
    share of images whose own prompt is the most similar among the set's distinct prompts."""
    batch = as_batch(images)
    prompts = list(prompts)
    if len(prompts) != batch.shape[0]:
        raise ConfigError(f"text_alignment: {batch.shape[0]} images but {len(prompts)} prompts")
    ext = get_extractor(extractor, device)
    if not ext.has_text:
        raise ConfigError(f"feature extractor {ext.name!r} has no text tower; use clip or emoji-text")
    image_emb = ext.embed(batch)
    distinct = sorted(set(prompts))
    text_emb = ext.embed_text(distinct)
    sims = cosine_matrix(image_emb, text_emb)
    own = torch.tensor([distinct.index(p) for p in prompts])
    values = sims.gather(1, own[:, None])[:, 0]
    details: dict[str, Any] = {}
    if len(distinct) > 1:
        details["retrieval_top1"] = float((sims.argmax(1) == own).float().mean())
    return finish_result(result("text_alignment", extractor_name(ext), values, range=(-1.0, 1.0), details=details), "text")


# ----------------------------------------------------------------------------- shape


def control_maps(controls: ImagesLike, mode: str, control_kind: str = "image") -> torch.Tensor:
    """Binary maps (N, 1, H, W) from control inputs.

    control_kind "image": extract (Canny edges or silhouette) from ordinary images; "map": the inputs
    already are maps as ControlNet takes them (white = edge / foreground on black): threshold luma at 0.5.
    """
    batch = as_batch(controls)
    if control_kind == "map":
        return pixel.luma(batch) > 0.5
    if control_kind != "image":
        raise ConfigError(f"control_kind must be 'image' or 'map', got {control_kind!r}")
    return pixel.foreground_mask(batch) if mode == "silhouette" else pixel.canny(batch)


SHAPE_MODES = ("edges", "edges-f1", "silhouette")


def shape_scores(output_maps: torch.Tensor, control: torch.Tensor, mode: str = "edges", tolerance: int = 2
                 ) -> torch.Tensor:
    """Per pair (N,): agreement of maps (N, 1, H, W) bool extracted from the outputs (``control_maps``
    of the images) with the control maps; the arithmetic of ``shape_consistency``."""
    if mode == "silhouette":
        return pixel.mask_iou(output_maps, control)
    if mode == "edges-f1":
        return pixel.edge_f1(output_maps, control, tolerance=tolerance)
    return pixel.edge_f1_corrected(output_maps, control, tolerance=tolerance)


def shape_consistency(images: ImagesLike, controls: ImagesLike, mode: str = "edges", control_kind: str = "image",
                      tolerance: int = 2, resize: bool = False, diversity_with: ExtractorLike | None = "pixel"
                      ) -> MetricResult:
    """Shape re-extracted from each output against its control (ControlNet's protocol).

    mode "edges": chance-corrected F1 of Canny edges within ``tolerance`` pixels, (F1 - F1_0) /
    (1 - F1_0) with F1_0 the F1 of edges of the same extent placed at random (``imageops.
    edge_f1_corrected``), range [-1, 1], unrelated emoji about 0.14; "edges-f1": the plain F1, [0, 1]
    (unrelated emoji 0.45: every emoji is a round centred shape); "silhouette": IoU of foreground
    masks, [0, 1]. ``controls``: one per image, or one shared by all. Identical shapes give 1.
    """
    if mode not in SHAPE_MODES:
        raise ConfigError(f"shape mode must be one of {', '.join(SHAPE_MODES)}, got {mode!r}")
    batch = as_batch(images)
    maps = control_maps(controls, mode, control_kind).float()
    if maps.shape[0] == 1 and batch.shape[0] > 1:
        maps = maps.expand(batch.shape[0], -1, -1, -1)
    _check_same_count(batch, maps, "shape_consistency")
    if tuple(maps.shape[-2:]) != tuple(batch.shape[-2:]):
        if not resize:
            raise ImageInputError(
                f"controls are {maps.shape[-1]}x{maps.shape[-2]} but the images are "
                f"{batch.shape[-1]}x{batch.shape[-2]}; give them at the same size (or allow resizing)"
            )
        maps = torch.nn.functional.interpolate(maps, size=batch.shape[-2:], mode="nearest")
    values = shape_scores(control_maps(batch, mode), maps > 0.5, mode, tolerance)
    value_range = (-1.0, 1.0) if mode == "edges" else (0.0, 1.0)
    res = result("shape_consistency", mode, values, range=value_range,
                 details={"mode": mode, "tolerance": None if mode == "silhouette" else tolerance})
    return finish_result(res, "shape", _diversity_value(batch, diversity_with))


# ----------------------------------------------------------------------------- fidelity


def fidelity(images: ImagesLike, sources: ImagesLike, extractor: ExtractorLike | None = None,
             resize: bool = False, device: str = "cpu") -> dict[str, MetricResult]:
    """Faithfulness of each image to its source (inversion reconstructions, edits).

    Returns {"psnr": dB (capped at 100 for identical images), "ssim": [-1, 1], and with an
    extractor "feature_distance": 1 - cosine similarity, [0, 2] (lower is closer)}.
    ``sources``: one per image, or one shared by all.
    """
    batch = as_batch(images)
    src = as_batch(sources)
    if src.shape[0] == 1 and batch.shape[0] > 1:
        src = src.expand(batch.shape[0], -1, -1, -1)
    _check_same_count(batch, src, "fidelity")
    src = _match_size(src, tuple(batch.shape[-2:]), "sources", resize)
    out = {
        "psnr": result("fidelity_psnr", "pixel", pixel.psnr(batch, src), range=(0.0, pixel.PSNR_CAP_DB)),
        "ssim": result("fidelity_ssim", "pixel", pixel.ssim(batch, src), range=(-1.0, 1.0)),
    }
    if extractor is not None:
        ext = get_extractor(extractor, device)
        distance = 1.0 - (torch.nn.functional.normalize(ext.embed(batch), dim=1)
                          * torch.nn.functional.normalize(ext.embed(src), dim=1)).sum(1)
        out["feature_distance"] = result("fidelity_feature_distance", extractor_name(ext), distance.clamp(0, 2),
                                         higher_is_better=False, range=(0.0, 2.0))
    for res in out.values():
        finish_result(res, "fidelity")
    return out
