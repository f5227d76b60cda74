"""Fast tests of the metrics: invariants on tiny inputs (identical images -> maximal consistency and
zero diversity, permutation invariance, ranges), tiny random CLIP/DINO/DINOv2, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from consistent_diffusion.core import imageops as pixel
from consistent_diffusion.core.errors import ConfigError, ImageInputError, ModelNotFoundError
from consistent_diffusion.metrics import (
    as_batch,
    available_features,
    concept_consistency,
    diversity,
    fidelity,
    load_features,
    object_consistency,
    roc_auc,
    shape_consistency,
    style_consistency,
    text_alignment,
)
from consistent_diffusion.metrics.common import cosine_matrix, mean_off_diagonal


def emoji_like(n: int = 4, size: int = 32, seed: int = 0) -> torch.Tensor:
    """(n, 3, size, size) in [-1, 1]: coloured discs/squares of varied size on white."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.ones(n, 3, size, size)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for i in range(n):
        colour = torch.rand(3, generator=generator) * 1.6 - 0.9
        r = int(size * (0.2 + 0.2 * torch.rand(1, generator=generator)))
        c = size // 2 + int(torch.randint(-3, 4, (1,), generator=generator))
        shape = ((yy - c) ** 2 + (xx - c) ** 2 < r * r) if i % 2 == 0 else (
            ((yy - c).abs() < r) & ((xx - c).abs() < r))
        images[i][:, shape] = colour[:, None]
        images[i][:, c - 1: c + 1, c - r // 2: c + r // 2] = -1.0  # a dark stroke
    return images


# ----------------------------------------------------------------------------- primitives


def test_roc_auc_matches_pairwise_definition():
    rng = np.random.default_rng(0)
    pos, neg = rng.normal(1, 1, 40).round(1), rng.normal(0, 1, 50).round(1)
    brute = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert roc_auc(pos, neg) == pytest.approx(brute)
    assert roc_auc([2, 3], [0, 1]) == 1.0 and roc_auc([1], [1]) == 0.5
    with pytest.raises(ConfigError):
        roc_auc([], [1])


def test_as_batch_accepts_arrays_pil_and_reports_mismatched_sizes(tmp_path):
    array = np.full((2, 8, 8, 3), 255, np.uint8)
    assert torch.allclose(as_batch(array), torch.ones(2, 3, 8, 8))
    with pytest.raises(ImageInputError, match="different sizes"):
        as_batch([Image.new("RGB", (8, 8)), Image.new("RGB", (9, 8))])
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    with pytest.raises(ImageInputError, match="not an image"):
        as_batch([bad])


def test_canny_finds_square_outline_and_edge_f1():
    image = torch.ones(1, 3, 32, 32)
    image[:, :, 8:24, 8:24] = -1.0
    edges = pixel.canny(image)
    assert edges.shape == (1, 1, 32, 32) and edges.any()
    ys, xs = torch.nonzero(edges[0, 0], as_tuple=True)
    assert ys.min() >= 6 and ys.max() <= 25 and xs.min() >= 6 and xs.max() <= 25
    assert not edges[0, 0, 14:18, 14:18].any()  # no edges inside the flat square
    assert pixel.edge_f1(edges, edges).item() == 1.0
    shifted = torch.roll(edges, 1, dims=-1)
    assert pixel.edge_f1(shifted, edges, tolerance=1).item() == 1.0
    assert pixel.edge_f1(shifted, edges, tolerance=0).item() < 1.0
    empty = torch.zeros_like(edges)
    assert pixel.edge_f1(empty, empty).item() == 1.0 and pixel.edge_f1(empty, edges).item() == 0.0


def test_foreground_mask_fills_holes_and_iou():
    image = torch.ones(1, 3, 16, 16)
    image[:, :, 4:12, 4:12] = 0.0
    image[:, :, 7:9, 7:9] = 1.0  # a white hole (an eye)
    mask = pixel.foreground_mask(image)
    assert mask[0, 0, 7, 7] and mask.sum() == 64
    assert not pixel.foreground_mask(image, fill=False)[0, 0, 7, 7]
    assert pixel.mask_iou(mask, mask).item() == 1.0
    assert pixel.foreground_mask(torch.ones(1, 3, 8, 8)).sum() == 0


def test_psnr_ssim_identical_and_ranges():
    a = emoji_like(3)
    b = (a + 0.1 * torch.randn_like(a)).clamp(-1, 1)
    assert torch.all(pixel.psnr(a, a) == pixel.PSNR_CAP_DB)
    assert torch.allclose(pixel.ssim(a, a), torch.ones(3))
    s = pixel.ssim(a, b)
    assert torch.all(s < 1) and torch.all(s > -1)


def test_style_statistics_shape_and_finite():
    stats = pixel.style_statistics(emoji_like(3))
    assert stats.shape == (3, 36) and torch.isfinite(stats).all()


# ----------------------------------------------------------------------------- metric invariants


@pytest.mark.parametrize("extractor", ["palette", "edges", "silhouette"])
def test_identical_images_are_maximally_consistent_with_zero_diversity(extractor):
    image = emoji_like(1)
    same = image.repeat(4, 1, 1, 1)
    res = style_consistency(same, extractor)
    assert res.aggregate == pytest.approx(1.0, abs=1e-5)
    assert res.details["diversity"] == pytest.approx(0.0, abs=1e-6)
    assert object_consistency(same, image, extractor).aggregate == pytest.approx(1.0, abs=1e-5)
    assert diversity(same).aggregate == pytest.approx(0.0, abs=1e-6)
    assert diversity(same, extractor).aggregate == pytest.approx(0.0, abs=1e-5)


def test_permutation_invariance_and_ranges():
    images = emoji_like(5)
    order = torch.tensor([3, 0, 4, 1, 2])
    for fn in (lambda x: style_consistency(x, "palette"), lambda x: object_consistency(x, None, "silhouette"),
               lambda x: diversity(x), lambda x: diversity(x, "edges")):
        a, b = fn(images), fn(images[order])
        assert a.aggregate == pytest.approx(b.aggregate, abs=1e-6)
        assert np.allclose(np.asarray(a.per_image)[order.numpy()], b.per_image, atol=1e-6)
        low, high = a.range
        assert all(low - 1e-6 <= v <= high + 1e-6 for v in a.per_image)
    div = diversity(images)
    assert div.aggregate > 0.01


def test_style_to_reference_and_details():
    images = emoji_like(4)
    res = style_consistency(images, "palette", reference=images[:1])
    assert res.per_image[0] == pytest.approx(1.0, abs=1e-5)
    assert {"to_reference", "within_set", "diversity"} <= set(res.details)
    assert res.validated in (True, False, None)


def test_shape_consistency_identical_map_kind_and_size_errors():
    images = emoji_like(3)
    for mode in ("edges", "silhouette"):
        res = shape_consistency(images, images, mode=mode)
        assert res.per_image == pytest.approx([1.0, 1.0, 1.0])
    maps = pixel.canny(images).float().repeat(1, 3, 1, 1) * 2 - 1  # white edges on black, ControlNet-style
    assert shape_consistency(images, maps, control_kind="map").aggregate == pytest.approx(1.0)
    shared = shape_consistency(images, images[:1], mode="silhouette")
    assert shared.per_image[0] == pytest.approx(1.0) and len(shared.per_image) == 3
    with pytest.raises(ImageInputError, match="same size"):
        shape_consistency(images, emoji_like(3, size=24))
    with pytest.raises(ImageInputError):
        shape_consistency(images, images[:2])
    with pytest.raises(ConfigError):
        shape_consistency(images, images, mode="depth")


def test_fidelity_identical_and_noisy():
    images = emoji_like(2)
    same = fidelity(images, images, extractor="palette")
    assert same["psnr"].aggregate == pixel.PSNR_CAP_DB and same["ssim"].aggregate == pytest.approx(1.0)
    assert same["feature_distance"].aggregate == pytest.approx(0.0, abs=1e-5)
    noisy = fidelity((images + 0.2 * torch.randn_like(images)).clamp(-1, 1), images)
    assert 5 < noisy["psnr"].aggregate < 40 and noisy["ssim"].aggregate < 1


def test_concept_consistency_guard_and_range():
    images = emoji_like(4)
    same = images[:1].repeat(3, 1, 1, 1)
    collapsed = concept_consistency(same, exemplars=images[:1], extractor="palette")
    assert collapsed.aggregate == pytest.approx(1.0, abs=1e-4)
    assert collapsed.details["guard"] in ("collapsed", "copies_exemplars")
    varied = concept_consistency(images[1:], exemplars=images[:1], extractor="palette")
    assert 0 <= varied.aggregate <= 1 and varied.details["guard"] is None
    copying = concept_consistency(images, exemplars=images[:1], extractor="palette")
    assert copying.details["guard"] == "copies_exemplars"
    with pytest.raises(ConfigError):
        concept_consistency(images, extractor="palette")


def test_cosine_helpers():
    x = torch.randn(4, 6)
    sims = cosine_matrix(x)
    assert torch.allclose(sims.diagonal(), torch.ones(4), atol=1e-5)
    assert mean_off_diagonal(torch.ones(3, 3)).tolist() == [1.0, 1.0, 1.0]


# ----------------------------------------------------------------------------- extractors


def test_registry_lists_extractors_and_rejects_unknown():
    names = available_features()
    for name in ("efficientnet-lite0", "clip", "dino", "dinov2", "palette", "edges", "silhouette", "emoji-style",
                 "emoji-object", "emoji-text", "style-stats", "csd", "dreamsim"):
        assert name in names
    with pytest.raises(ConfigError, match="unknown feature extractor"):
        load_features("nope")


def test_efficientnet_lite0_embeds_and_maps():
    extractor = load_features("efficientnet-lite0", image_size=64)
    images = emoji_like(2)
    emb = extractor.embed(images)
    assert emb.shape == (2, 1280) and torch.isfinite(emb).all()
    maps = extractor.feature_maps(images)
    assert set(maps) == {"block1", "block3", "block5", "block8", "block15", "head"}
    assert maps["head"].shape[:2] == (2, 1280)
    res = object_consistency(images[:1].repeat(2, 1, 1, 1), images[:1], extractor)
    assert res.aggregate == pytest.approx(1.0, abs=1e-4)


def _tiny_clip():
    from transformers import CLIPConfig, CLIPModel

    text = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=99,
                max_position_embeddings=32, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, image_size=32,
                  patch_size=8)
    torch.manual_seed(0)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))


class _WordTokenizer:
    """Stands in for CLIPTokenizer: word -> id by hash, padded."""

    def __call__(self, texts, padding=True, truncation=True, return_tensors="pt"):
        ids = [[2 + (hash(w) % 90) for w in t.split()] + [1] for t in texts]
        length = max(map(len, ids))
        input_ids = torch.tensor([i + [1] * (length - len(i)) for i in ids])
        mask = torch.tensor([[1] * len(i) + [0] * (length - len(i)) for i in ids])
        return {"input_ids": input_ids, "attention_mask": mask}


def test_tiny_random_clip_dino_dinov2():
    from transformers import Dinov2Config, Dinov2Model, ViTConfig, ViTModel

    small = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, image_size=32,
                 patch_size=8)
    images = emoji_like(3)
    clip = load_features("clip", model=_tiny_clip(), tokenizer=_WordTokenizer())
    assert clip.embed(images).shape == (3, 16)
    assert clip.feature_maps(images)["patches"].shape == (3, 32, 4, 4)
    assert clip.embed_text(["a red disc", "a blue square"]).shape == (2, 16)
    res = text_alignment(images, ["a red disc", "a blue square", "a red disc"], clip)
    assert len(res.per_image) == 3 and all(-1 <= v <= 1 for v in res.per_image)
    dino = load_features("dino", model=ViTModel(ViTConfig(**small), add_pooling_layer=False))
    assert dino.embed(images).shape == (3, 32)
    dinov2 = load_features("dinov2", model=Dinov2Model(Dinov2Config(**small)))
    assert dinov2.embed(images).shape == (3, 32)
    same = images[:1].repeat(2, 1, 1, 1)
    assert object_consistency(same, images[:1], dinov2).aggregate == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(ConfigError, match="no text tower"):
        text_alignment(images, ["a"] * 3, dino)


def test_missing_weights_give_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="folder not found"):
        load_features("clip", model=str(tmp_path / "no-such-clip"))
    with pytest.raises(ModelNotFoundError, match="Hugging Face cache"):
        load_features("dino", model="nobody-here/dino-not-cached")
    with pytest.raises(ModelNotFoundError, match="metric heads not found"):
        load_features("emoji-style", heads=tmp_path / "missing.safetensors")


# ----------------------------------------------------------------------------- heads


def test_int8_rows_are_within_half_a_step_of_the_weights():
    from consistent_diffusion.metrics.extractors.heads import dequantize_int8, quantize_rows_int8

    weight = torch.randn(32, 200) * torch.logspace(-4, 1, 32)[:, None]  # rows of very different sizes
    q, scale = quantize_rows_int8(weight)
    assert q.dtype == torch.int8 and scale.shape == (32, 1) and q.abs().max() == 127
    restored = dequantize_int8({"w": q, "w.int8_scale": scale, "b": torch.ones(3)})
    assert set(restored) == {"w", "b"}
    assert ((restored["w"] - weight).abs() <= scale / 2 + 1e-9).all()


def test_heads_train_save_load_roundtrip(tmp_path):
    from consistent_diffusion.metrics.extractors.heads import load_heads
    from consistent_diffusion.training.recipes.heads import HeadTrainingConfig, save_heads, train_heads

    n = 12
    records = [{"style": ["google", "twitter"][i % 2], "identity": f"id{i // 2}", "caption": f"thing {i // 2}",
                "split": "train" if i < 8 else "val"} for i in range(n)]
    records += [{"style": "line", "identity": f"id{i}", "caption": f"thing {i}", "split": "train",
                 "style_split": "heldout"} for i in range(4)]  # a held-out style: never a class, never trained on
    n = len(records)
    inputs = {"pooled": torch.randn(n, 1280), "maps": torch.randn(n, 1152), "grid": torch.randn(n, 3072),
              "pixel": torch.randn(n, 36)}
    config = HeadTrainingConfig(style_steps=2, object_steps=3, text_steps=2, identities_per_batch=2, text_batch=4,
                                hidden=8, style_dim=4, object_dim=6, object_hard_batches=1.0)
    tensors, meta = train_heads(inputs, records, config, log=lambda message: None)
    assert meta["styles"] == ["google", "twitter"] and meta["training"]["train_images"] == 8
    assert meta["heads"]["object"]["in_dim"] == 1280 + 1152 + 3072  # the object head reads the layout grid
    assert meta["heads"]["text"]["in_dim"] == 1280 + 1152
    path = save_heads(tensors, meta, tmp_path / "heads.safetensors")
    heads = load_heads(path)
    assert heads.meta["heads"]["style"]["out_dim"] == 4
    style = load_features("emoji-style", heads=path)
    assert style.embed(emoji_like(2)).shape == (2, 4) and style.foreground
    item = load_features("emoji-object", heads=path)
    assert item.embed(emoji_like(2)).shape == (2, 6) and not item.foreground  # compared on whole emoji
    text = load_features("emoji-text", heads=path)
    assert text.embed(emoji_like(2)).shape == (2, 384) and text.has_text
    half = save_heads(tensors, meta, tmp_path / "half.safetensors", int8=False)
    assert path.stat().st_size < 0.7 * half.stat().st_size  # int8 weight matrices
    images = emoji_like(3)
    for kind in ("style", "object", "text"):
        stored = load_features(f"emoji-{kind}", heads=path).embed(images)
        reference = load_features(f"emoji-{kind}", heads=half).embed(images)
        assert torch.nn.functional.cosine_similarity(stored, reference).min() > 0.999
    old = dict(heads.meta)
    old["heads"] = {k: v for k, v in old["heads"].items() if k != "object"}
    (tmp_path / "old.json").write_text(json.dumps(old))
    (tmp_path / "old.safetensors").write_bytes(path.read_bytes())
    with pytest.raises(ModelNotFoundError, match="no object head"):
        load_features("emoji-object", heads=tmp_path / "old.safetensors")


# ----------------------------------------------------------------------------- score command


def _write_series(folder, sizes=((32, 32),) * 3):
    folder.mkdir(parents=True)
    records = []
    images = emoji_like(len(sizes))
    for i, size in enumerate(sizes):
        name = f"p00_s{i:04d}.png"
        array = ((images[i].permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.uint8)
        Image.fromarray(array).resize(size).save(folder / name)
        records.append({"file": name, "prompt_index": 0, "prompt": "a disc", "seed": i})
    manifest = {"format": "consistent-diffusion/series/v1", "images": records, "model": {"kind": "in_memory"}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_score_command_writes_scores_json(tmp_path, capsys):
    from consistent_diffusion.cli.main import main

    series = _write_series(tmp_path / "series")
    code = main(["score", str(series), "--reference", str(series / "p00_s0000.png"),
                 "--metrics", "diversity,shape", "fidelity", "--style-features", "palette"])
    assert code == 0
    scores = json.loads((series / "scores.json").read_text())
    assert {"diversity", "shape", "fidelity_psnr", "fidelity_ssim"} <= set(scores["metrics"])
    assert scores["metrics"]["shape"]["per_image"][0] == pytest.approx(1.0)
    assert "validated" in scores["metrics"]["shape"]
    out = capsys.readouterr().out
    assert "diversity" in out and "scores.json" in out


def test_score_command_clear_errors(tmp_path, capsys):
    from consistent_diffusion.cli.main import main

    plain = tmp_path / "plain"
    plain.mkdir()
    assert main(["score", str(plain)]) == 2
    assert "no manifest.json" in capsys.readouterr().err
    mixed = _write_series(tmp_path / "mixed", sizes=((32, 32), (24, 24)))
    assert main(["score", str(mixed), "--metrics", "diversity"]) == 2
    assert "different sizes" in capsys.readouterr().err
    broken = _write_series(tmp_path / "broken")
    (broken / "p00_s0001.png").write_text("garbage")
    assert main(["score", str(broken), "--metrics", "diversity"]) == 2
    assert "not an image" in capsys.readouterr().err
    assert main(["score", str(broken), "--metrics", "nonsense"]) == 2
    assert "unknown metrics" in capsys.readouterr().err


def test_validation_table_markdown_flags_failures():
    from consistent_diffusion.metrics.validation import _row
    from consistent_diffusion.metrics.validation_report import markdown_table

    report = {"results": [_row("style", "palette", "style-sets-trained", "sets", [0.9, 0.8], [0.1, 0.85]),
                          _row("object", "efficientnet-lite0", "object", "pairs", [0.9], [0.1]),
                          _row("object", "palette", "object-unseen", "info", [0.9], [0.1], primary=False)]}
    table = markdown_table(report)
    assert "FAILED (validated: false)" in table and "**passed**" in table and "| info |" in table
    assert "0.750 [" in table  # the AUC with its interval


def test_score_skips_metrics_whose_weights_are_missing(tmp_path, capsys):
    from consistent_diffusion.cli.main import main

    series = _write_series(tmp_path / "series")  # not the embedded model: text alignment needs CLIP
    assert main(["score", str(series), "--metrics", "text", "diversity",
                 "--text-features", "clip"]) == 0
    scores = json.loads((series / "scores.json").read_text())
    assert "text" in scores["skipped"] and "diversity" in scores["metrics"]
    assert "skipped text" in capsys.readouterr().out


def test_hard_batches_take_look_alike_emoji_group_by_group():
    from consistent_diffusion.training.recipes.heads import _grouped_batch

    by_group = {"faces": [0, 1, 2], "hands": [3, 4], "food": [5, 6, 7, 8]}
    for seed in range(5):
        chosen = _grouped_batch(by_group, sorted(by_group), 5, np.random.default_rng(seed))
        assert len(chosen) == len(set(chosen)) == 5
        touched = [g for g, members in by_group.items() if set(members) & set(chosen)]
        partial = [g for g in touched if not set(by_group[g]) <= set(chosen)]
        assert len(partial) <= 1  # whole groups first, so look-alike emoji meet as negatives
