"""The one score dispatcher: extractor choice per model (bug 7), the bench's per-kind plan, not-measured
results, and the extractor registry's shape (no import cycle, no training import, order-independent)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image

from consistent_diffusion.bench.scoring import make_scorer
from consistent_diffusion.bench.suite import Cell, MethodSpec, Task
from consistent_diffusion.core.errors import ConfigError, ModelNotFoundError
from consistent_diffusion.metrics import (
    diversity,
    fidelity,
    object_consistency,
    shape_consistency,
    style_consistency,
)
from consistent_diffusion.metrics.common import cosine_matrix
from consistent_diffusion.metrics.extractors import pretrained
from consistent_diffusion.metrics.score import NotChosen, resolve_extractors, score
from consistent_diffusion.models.loading import ModelIdentity

PALETTE = {"style": "palette", "object": "palette", "concept": "palette", "text": None}
FOLDER_MODEL = ModelIdentity(spec="some/sd-folder", kind="folder", pipeline_class="StableDiffusionPipeline")


def squares(n: int = 4, size: int = 32) -> list[Image.Image]:
    """Coloured squares of varied size and colour on white."""
    images = []
    for i in range(n):
        image = Image.new("RGB", (size, size), "white")
        image.paste((40 * i + 30, 200 - 40 * i, 90), (4 + i, 6, 20 + 2 * i, 24))
        images.append(image)
    return images


@pytest.fixture
def no_clip(monkeypatch):
    """CLIP's default hub id points at a model no cache holds (the machine's cache must not matter)."""
    monkeypatch.setitem(pretrained.HF_DEFAULTS, "clip", "nobody-here/clip-not-cached")


def _cell(kind: str, references=(), description: str = "") -> Cell:
    task = Task(name=f"t-{kind}", kind=kind, prompts=("a red cat", "a blue dog"), seeds=(0, 1), methods=("plain",),
                references=tuple(references), description=description)
    return Cell(task=task, method=MethodSpec(name="plain"))


# ----------------------------------------------------------------------------- bug 7


def test_extractor_defaults_depend_on_the_model():
    assert resolve_extractors(model="embedded")["text"] == "emoji-text"
    for model in (FOLDER_MODEL, {"kind": "hub"}, None):  # off the embedded model nothing is chosen for you
        chosen = resolve_extractors(model=model)
        assert all(isinstance(chosen[axis], NotChosen) for axis in ("style", "object", "concept", "text"))
        assert chosen["diversity"] == "pixel"
    dreambooth = resolve_extractors(model=FOLDER_MODEL, sets=["dreambooth"])
    assert (dreambooth["object"], dreambooth["clip_i"], dreambooth["text"]) == ("dino", "clip", "clip")
    assert isinstance(dreambooth["style"], NotChosen)
    both = resolve_extractors(model=FOLDER_MODEL, sets=["consistory", "csd"])
    assert (both["object"], both["style"]) == ("dreamsim", "csd")
    assert resolve_extractors({"text": "palette"}, model="folder")["text"] == "palette"
    assert resolve_extractors({"text": None}, model="embedded")["text"] is None
    with pytest.raises(ConfigError, match="unknown extractor axes"):
        resolve_extractors({"colour": "palette"})
    with pytest.raises(ConfigError, match="unknown extractor sets"):
        resolve_extractors(sets=["lpips"])


def test_off_the_embedded_model_unchosen_axes_are_not_measured():
    """No emoji head scores a user's SD model unless asked: the axis says how to choose one."""
    scores = score(squares(), prompts=["a square"] * 4, model=FOLDER_MODEL)
    for axis in ("style", "object", "text"):
        assert not scores[axis].measured and "--metrics dreambooth" in scores[axis].details["not_measured"]
    assert scores["diversity"].aggregate is not None
    asked = score(squares(), metrics=["style"], model=FOLDER_MODEL, extractor_sets=["emoji"])["style"]
    assert asked.extractor == "emoji-style" and asked.aggregate is not None and asked.validated is None
    with pytest.raises(ConfigError, match="separate runs"):  # whole images vs foreground crops
        score(squares(), metrics=["object"], model=FOLDER_MODEL, extractor_sets=["dreambooth", "consistory"])


def test_bench_text_off_the_embedded_model_is_not_measured_with_the_emoji_head(no_clip):
    """Bug 7: the bench scored text alignment with the emoji-only text head on a user's SD model."""
    scorer = make_scorer({"style": "palette"}, extractor_sets=["dreambooth"])
    scores = scorer(_cell("style"), squares(), [], model=FOLDER_MODEL)
    text = scores["text"]
    assert text["extractor"] == "clip" and text["aggregate"] is None and text["per_image"] == []
    assert "nobody-here/clip-not-cached" in text["details"]["not_measured"]
    assert scores["style"]["aggregate"] is not None  # the other axes are measured
    unchosen = make_scorer({"style": "palette"})(_cell("style"), squares(), [], model=FOLDER_MODEL)["text"]
    assert unchosen["extractor"] is None and "no extractor chosen" in unchosen["details"]["not_measured"]


def test_dreambooth_set_scores_dino_clip_i_and_clip_t_on_whole_images():
    from transformers import ViTConfig, ViTModel

    from consistent_diffusion.metrics import load_features
    from test_metrics import _tiny_clip, _WordTokenizer

    clip = load_features("clip", model=_tiny_clip(), tokenizer=_WordTokenizer())
    dino = load_features("dino", model=ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                          intermediate_size=64, image_size=32, patch_size=8),
                                                add_pooling_layer=False))
    images, references = squares(3), squares(2)
    scores = score(images, metrics=["object", "text"], prompts=["a square"] * 3, references=references,
                   model=FOLDER_MODEL, extractor_sets=["dreambooth"], extractors={"object": dino, "clip_i": clip,
                                                                                "text": clip})
    assert set(scores) == {"object", "object_clip_i", "text"}
    for name in scores:
        assert scores[name].validated is None and "DreamBooth" in scores[name].details["protocol"]
    # DreamBooth's protocol: mean cosine of each generated image to the real ones, whole images (no crop)
    expected = cosine_matrix(clip.embed(images), clip.embed(references)).mean(1)
    assert scores["object_clip_i"].per_image == pytest.approx(expected.tolist(), abs=1e-5)


def test_bench_text_off_the_embedded_model_uses_the_configured_extractor():
    from consistent_diffusion.metrics import load_features
    from test_metrics import _tiny_clip, _WordTokenizer

    clip = load_features("clip", model=_tiny_clip(), tokenizer=_WordTokenizer())
    scores = make_scorer({"style": "palette", "text": clip})(_cell("style"), squares(), [], model=FOLDER_MODEL)
    assert scores["text"]["extractor"] == "clip" and len(scores["text"]["per_image"]) == 4


def test_concept_text_part_off_the_embedded_model(no_clip, tmp_path):
    refs = []
    for i, image in enumerate(squares(2)):
        image.save(tmp_path / f"ref{i}.png")
        refs.append(str(tmp_path / f"ref{i}.png"))
    with_exemplars = make_scorer(PALETTE)(_cell("concept", refs, "a square"), squares(), refs, model=FOLDER_MODEL)
    concept = with_exemplars["concept"]
    assert concept["aggregate"] is not None and "to_text" not in concept["details"]
    assert "no extractor chosen" in concept["details"]["text_not_measured"]
    clip_missing = make_scorer(PALETTE, extractor_sets=["dreambooth"])(_cell("concept", refs, "a square"), squares(),
                                                                      refs, model=FOLDER_MODEL)["concept"]
    assert "clip" in clip_missing["details"]["text_not_measured"]
    text_only = make_scorer(PALETTE)(_cell("concept", (), "a square"), squares(), [], model=FOLDER_MODEL)
    assert text_only["concept"]["aggregate"] is None and "not_measured" in text_only["concept"]["details"]


def test_validation_does_not_apply_off_the_embedded_model():
    images = squares()
    on = score(images, metrics=["shape"], references=images[:1], model="embedded")["shape"]
    off = score(images, metrics=["shape"], references=images[:1], model=FOLDER_MODEL)["shape"]
    assert on.validated is True  # shape/edges passed its bar on held-out real emoji
    assert off.validated is None and off.validation["applies"] is False
    assert off.aggregate == on.aggregate


def test_strict_raises_where_weights_are_missing(no_clip):
    with pytest.raises(ModelNotFoundError):
        score(squares(), metrics=["text"], prompts=["a"] * 4, model=FOLDER_MODEL, strict=True)
    res = score(squares(), metrics=["text"], prompts=["a"] * 4, model=FOLDER_MODEL)["text"]
    assert not res.measured and res.to_dict()["aggregate"] is None


# ----------------------------------------------------------------------------- the bench's plan


def test_kind_plan_equals_the_single_metrics(tmp_path):
    images = squares()
    refs = []
    for i, image in enumerate(squares(2, size=40)):  # references at another size: fidelity resizes
        image.save(tmp_path / f"ref{i}.png")
        refs.append(str(tmp_path / f"ref{i}.png"))
    object_scores = score(images, kind="object", references=refs, extractors=PALETTE, model="embedded")
    assert list(object_scores) == ["object", "reference_object", "reference_style", "reference_fidelity",
                                   "reference_psnr", "within_series", "diversity"]
    expected = object_consistency(images, refs, "palette")
    assert object_scores["object"].per_image == expected.per_image
    assert object_scores["reference_object"].per_image == expected.per_image
    source = fidelity(images, refs[:1], resize=True)
    assert object_scores["reference_fidelity"].per_image == source["ssim"].per_image
    assert object_scores["reference_psnr"].per_image == source["psnr"].per_image
    assert object_scores["diversity"].per_image == diversity(images).per_image

    style_scores = score(images, kind="style", references=refs, extractors=PALETTE, model="embedded")
    assert style_scores["style"].per_image == style_consistency(images, "palette").per_image  # within the set
    to_reference = style_consistency(images, "palette", reference=refs)  # the to-reference protocol
    assert style_scores["reference_style"].per_image == to_reference.per_image != style_scores["style"].per_image
    assert style_scores["reference_object"].per_image == object_consistency(images, refs, "palette").per_image  # leakage
    shape_scores = score(images, kind="shape", references=refs, extractors=PALETTE, model="embedded")
    assert "reference_fidelity" not in shape_scores and "reference_object" in shape_scores
    assert shape_scores["shape"].per_image == shape_consistency(images, [refs[0]] * 4, resize=True).per_image
    with pytest.raises(ConfigError, match="shape task needs a reference"):
        score(images, kind="shape", extractors=PALETTE)
    with pytest.raises(ConfigError, match="metrics or a task kind"):
        score(images, kind="style", metrics=["style"])


def test_metrics_mode_errors_and_names():
    images = squares()
    with pytest.raises(ConfigError, match="unknown metrics"):
        score(images, metrics=["colour"])
    with pytest.raises(ConfigError, match="control image"):
        score(images, metrics=["shape"])
    with pytest.raises(ConfigError, match="one per series image"):
        score(images, metrics=["fidelity"], references=images[:2])
    with pytest.raises(ConfigError, match="needs the images' prompts"):
        score(images, metrics=["text"], extractors={"text": "emoji-text"}, model="embedded")
    results = score(images, metrics=["fidelity", "diversity"], references=images[0], extractors=PALETTE)
    assert list(results) == ["fidelity_psnr", "fidelity_ssim", "fidelity_feature_distance", "diversity"]


def test_public_face_points_at_the_dispatcher():
    import consistent_diffusion

    assert consistent_diffusion.score is score


# ----------------------------------------------------------------------------- registry shape


def test_registry_is_complete_without_import_order_cycles_or_training():
    """In a fresh process, the bare registry imported first lists every built-in extractor (it imports
    them itself), and nothing under metrics imports consistent_diffusion.training."""
    program = """
import importlib, json, sys
from consistent_diffusion.metrics.extractors.registry import available_features
names = available_features()
for name in ("common", "consistency", "score", "validation", "extractors.heads", "extractors.probes"):
    importlib.import_module("consistent_diffusion.metrics." + name)
print(json.dumps([names, sorted(m for m in sys.modules if m.startswith("consistent_diffusion.training"))]))
"""
    out = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True)
    names, training = json.loads(out.stdout.strip().splitlines()[-1])
    assert training == []
    assert {"probe-style", "probe-content", "emoji-style", "emoji-text", "style-stats", "clip", "palette",
            "efficientnet-lite0"} <= set(names)


def test_bench_passes_the_model_to_the_scorer(tiny_sd_folder, tmp_path, no_clip):
    """The runner hands the pipeline's identity to the scorer: the same tiny pipeline labelled as
    the embedded model is scored with emoji-text, as a user's folder model it is not measured."""
    import dataclasses

    from consistent_diffusion.bench.runner import run_bench
    from consistent_diffusion.bench.suite import load_suite
    from consistent_diffusion.models.loading import load_pipeline, model_identity, set_model_identity

    suite_file = tmp_path / "suite.toml"
    suite_file.write_text('name = "one"\nsteps = 2\nguidance = 3.0\n[methods.plain]\nuses = []\n'
                          '[[tasks]]\nname = "s"\nkind = "style"\nprompts = ["a red cat"]\nseeds = [0, 1]\n'
                          'methods = ["plain"]\n')
    suite = load_suite(suite_file)
    texts = {}
    for label in ("embedded", "folder"):
        def load(label=label):
            pipe = load_pipeline(str(tiny_sd_folder))
            set_model_identity(pipe, dataclasses.replace(model_identity(pipe), kind=label))
            return pipe

        out = tmp_path / label
        run_bench(suite, out, load, make_scorer({"style": "palette"}), progress=False)
        texts[label] = json.loads((out / "cells" / "s__plain" / "cell.json").read_text())["scores"]["text"]
    assert texts["embedded"]["extractor"] == "emoji-text" and texts["embedded"]["aggregate"] is not None
    assert texts["folder"]["extractor"] is None and texts["folder"]["aggregate"] is None
    assert "not_measured" in texts["folder"]["details"]
