"""ip_adapter: equality with diffusers' own IP-Adapter path, stacking, reversibility, per-row
images and region masks, on tiny pipelines with a random adapter saved in the released layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from _finetune_data import one_thread
from _ip_adapter_files import adapter_weights, save_noise_image, save_random_adapter
from consistent_diffusion.core.errors import ConfigError, ConsistentDiffusionError
from consistent_diffusion.methods.base import GenerationContext, available_methods, run
from consistent_diffusion.methods.ip_adapter import INSTANTSTYLE_PRESETS, IPAdapter
from consistent_diffusion.methods.ip_adapter.loading import _is_ip_processor
from consistent_diffusion.testing import tiny_sd_pipeline, tiny_sdxl_pipeline

BUILDERS = {"sd": tiny_sd_pipeline, "sdxl": tiny_sdxl_pipeline}
CALL = {"num_inference_steps": 2, "guidance_scale": 5.0, "height": 32, "width": 32}


pytestmark = pytest.mark.usefixtures("one_thread")
_ = one_thread  # the fixture, imported


def ctx_for(pipe, prompts=("a cat",), seeds=None) -> GenerationContext:
    seeds = seeds or list(range(len(prompts)))
    return GenerationContext(pipe=pipe, prompts=list(prompts), negative_prompts=None,
                             generators=[torch.Generator("cpu").manual_seed(s) for s in seeds], call_kwargs=dict(CALL))


def images(pipe, methods, prompts=("a cat",), seeds=None) -> np.ndarray:
    return np.stack(run(ctx_for(pipe, prompts, seeds), methods, output_type="np"))


@pytest.fixture
def adapter(tmp_path):
    def make(kind: str = "sd", suffix: str = ".safetensors") -> tuple[Path, str]:
        folder = tmp_path / f"ip-{kind}{suffix}"
        save_random_adapter(folder, BUILDERS[kind]().unet, suffix=suffix)
        return folder, save_noise_image(tmp_path / "image.png", 1, size=32)
    return make


def test_registered():
    assert "ip_adapter" in available_methods()


@pytest.mark.parametrize(("kind", "suffix"), [("sd", ".safetensors"), ("sd", ".bin"), ("sdxl", ".safetensors")])
def test_equals_diffusers_load_ip_adapter(adapter, kind, suffix):
    folder, image = adapter(kind, suffix)
    ours = images(BUILDERS[kind](), [IPAdapter(adapters=str(folder), images=image, scales=0.8)])
    stock = BUILDERS[kind]()
    stock.load_ip_adapter(str(folder), subfolder="models", weight_name=adapter_weights(folder, suffix).name, local_files_only=True)
    stock.set_ip_adapter_scale(0.8)
    theirs = stock("a cat", ip_adapter_image=Image.open(image), generator=torch.Generator("cpu").manual_seed(0),
                   output_type="np", **CALL).images
    plain = images(BUILDERS[kind](), [])
    assert np.abs(ours - plain).max() > 1e-3  # the adapter acts
    assert np.abs(ours - theirs).max() < 1e-5


def _state(pipe) -> dict:
    unet = pipe.unet
    return {"processors": dict(unet.attn_processors), "hid_proj": unet.encoder_hid_proj,
            "hid_type": unet.config.encoder_hid_dim_type, "encoder": pipe.image_encoder,
            "extractor": pipe.feature_extractor, "config": {k: pipe.config.get(k) for k in ("image_encoder", "feature_extractor")},
            "has_text_proj": hasattr(unet, "text_encoder_hid_proj"), "params": sorted(n for n, _ in unet.named_parameters())}


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_leaving_restores_the_pipeline(adapter, kind):
    folder, image = adapter(kind)
    pipe = BUILDERS[kind]()
    before = _state(pipe)
    images(pipe, [IPAdapter(adapters=str(folder), images=image)])
    after = _state(pipe)
    assert set(after["processors"]) == set(before["processors"])
    assert all(after["processors"][k] is v for k, v in before["processors"].items())
    assert {k: v for k, v in after.items() if k != "processors"} == {k: v for k, v in before.items() if k != "processors"}
    assert np.abs(images(pipe, []) - images(BUILDERS[kind](), [])).max() < 1e-6


def innermost(processor):
    while hasattr(processor, "inner"):
        processor = processor.inner
    return processor


def test_stacks_with_style_aligned_after_it(adapter):
    from consistent_diffusion.methods.style_aligned import StyleAligned
    from consistent_diffusion.methods.style_aligned.attention import SharedAttentionProcessor

    folder, image = adapter()
    ip = IPAdapter(adapters=str(folder), images=image)
    seen = {}
    pipe = tiny_sd_pipeline()

    def spy(module, args, kwargs):
        procs = module.attn_processors.values()
        seen["shared"] = sum(isinstance(p, SharedAttentionProcessor) for p in procs)
        seen["ip"] = sum(_is_ip_processor(innermost(p)) for p in procs)

    handle = pipe.unet.register_forward_pre_hook(spy, with_kwargs=True)
    prompts = ("a cat", "a dog")
    both = images(pipe, [StyleAligned(), ip], prompts)
    handle.remove()
    assert seen["shared"] > 0 and seen["ip"] > 0
    only_style = images(tiny_sd_pipeline(), [StyleAligned()], prompts)
    only_ip = images(tiny_sd_pipeline(), [ip], prompts)
    assert np.abs(both - only_style).max() > 1e-3  # the adapter acts under StyleAligned
    assert np.abs(both[1:] - only_ip[1:]).max() > 1e-3  # StyleAligned still shares (row 0 is its reference)
    before = images(pipe, [], prompts)
    assert np.abs(before - images(tiny_sd_pipeline(), [], prompts)).max() < 1e-6


def test_entering_before_a_method_that_adds_rows_is_refused(adapter):
    from consistent_diffusion.methods.style_aligned import StyleAligned

    folder, image = adapter()
    pipe = tiny_sd_pipeline()
    original = dict(pipe.unet.attn_processors)
    second = save_noise_image(folder / "b.png", 2, size=32)
    per_row = IPAdapter(adapters=str(folder), images=(image, second), per_row=True)
    with pytest.raises(ConfigError, match="stack ip_adapter after"):
        images(pipe, [per_row, StyleAligned(reference_prompt="red", reference_seed=3)], ("a cat", "a dog"))
    assert all(pipe.unet.attn_processors[k] is v for k, v in original.items())


def test_stacks_with_consistent_subject(adapter, monkeypatch):
    from consistent_diffusion.methods.consistent_subject import ConsistentSubject
    from consistent_diffusion.methods.consistent_subject.attention import (
        SubjectAttentionProcessor,
        SubjectMapRecorder,
    )

    folder, image = adapter()
    ip = IPAdapter(adapters=str(folder), images=image)
    recorded, original_record = [], SubjectMapRecorder._record

    def record(self, attn, hidden_states, encoder_hidden_states):
        recorded.append(type(encoder_hidden_states))
        return original_record(self, attn, hidden_states, encoder_hidden_states)

    monkeypatch.setattr(SubjectMapRecorder, "_record", record)
    seen = {}
    pipe = tiny_sd_pipeline()
    original = dict(pipe.unet.attn_processors)

    def spy(module, args, kwargs):
        procs = list(module.attn_processors.values())
        seen["subject"] = sum(isinstance(p, SubjectAttentionProcessor) for p in procs)
        seen["ip_under_recorder"] = sum(isinstance(getattr(p, "inner", None), SubjectMapRecorder)
                                        and _is_ip_processor(innermost(p)) for p in procs)

    handle = pipe.unet.register_forward_pre_hook(spy, with_kwargs=True)
    prompts = ("a cat on grass", "a cat in snow")
    subject = ConsistentSubject(subject="cat", anchors=2, mask_window=1)
    both = images(pipe, [subject, ip], prompts)
    handle.remove()
    assert seen["subject"] > 0 and seen["ip_under_recorder"] > 0
    assert recorded and all(t is torch.Tensor for t in recorded)  # its maps, from the text states only
    assert np.abs(both - images(tiny_sd_pipeline(), [subject], prompts)).max() > 1e-3  # the adapter acts
    assert all(pipe.unet.attn_processors[k] is v for k, v in original.items())


def _save_tiny_lora(folder: Path) -> str:
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = tiny_sd_pipeline()
    torch.manual_seed(3)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False))
    StableDiffusionPipeline.save_lora_weights(str(folder), unet_lora_layers=get_peft_model_state_dict(pipe.unet))
    return str(folder / "pytorch_lora_weights.safetensors")


@pytest.mark.parametrize("ip_first", [True, False])
def test_stacks_with_lora_either_order(adapter, tmp_path, ip_first):
    from consistent_diffusion.methods.lora import LoRA

    folder, image = adapter()
    lora, ip = LoRA(weights=_save_tiny_lora(tmp_path / "lora")), IPAdapter(adapters=str(folder), images=image)
    pipe = tiny_sd_pipeline()
    before = _state(pipe)
    both = images(pipe, [ip, lora] if ip_first else [lora, ip])
    assert np.abs(both - images(tiny_sd_pipeline(), [lora])).max() > 1e-3
    assert np.abs(both - images(tiny_sd_pipeline(), [ip])).max() > 1e-3
    after = _state(pipe)
    assert all(after["processors"][k] is v for k, v in before["processors"].items())
    assert after["params"] == before["params"] and after["hid_proj"] is None
    assert np.abs(images(pipe, []) - images(tiny_sd_pipeline(), [])).max() < 1e-6


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_per_row_images(adapter, tmp_path, kind):
    folder, image = adapter(kind)
    build = BUILDERS[kind]
    second, third = save_noise_image(tmp_path / "b.png", 2, size=32), save_noise_image(tmp_path / "c.png", 3, size=32)
    prompts = ("a cat", "a dog")
    first = images(build(), [IPAdapter(adapters=str(folder), images=(image, second), per_row=True)], prompts)
    changed = images(build(), [IPAdapter(adapters=str(folder), images=(image, third), per_row=True)], prompts)
    assert np.abs(first[0] - changed[0]).max() < 1e-6
    assert np.abs(first[1] - changed[1]).max() > 1e-3
    # row i uses image i: row 1 equals a one-image call with the second image on that row alone
    alone = images(build(), [IPAdapter(adapters=str(folder), images=second)], ("a dog",), seeds=[1])
    assert np.abs(first[1] - alone[0]).max() < 1e-5


def test_per_row_follows_series_prompt_indices(adapter, tmp_path):
    folder, image = adapter()
    second = save_noise_image(tmp_path / "b.png", 2, size=32)
    method = IPAdapter(adapters=str(folder), images=(image, second), per_row=True)
    series = method.for_series([(1, "a dog", 7), (0, "a cat", 4)], batch_size=1)
    one = images(tiny_sd_pipeline(), [series], ("a dog",), seeds=[7])
    alone = images(tiny_sd_pipeline(), [IPAdapter(adapters=str(folder), images=second)], ("a dog",), seeds=[7])
    assert np.abs(one - alone).max() < 1e-6
    with pytest.raises(ConfigError, match="2 images for 3 series rows"):
        method.for_series([(2, "x", 1)], batch_size=1)


def _latents(methods, steps: int = 1) -> np.ndarray:
    """The denoised latents after ``steps`` steps, (B, 4, 16, 16): before the VAE decoder's
    convolutions spread a change across the image."""
    ctx = ctx_for(tiny_sd_pipeline())
    ctx.call_kwargs["num_inference_steps"] = steps
    return np.stack([x.numpy() for x in run(ctx, methods, output_type="latent")])


def test_mask_restricts_the_adapter_to_its_region(adapter, tmp_path):
    folder, image = adapter()
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[:, :16] = 255
    Image.fromarray(mask).save(tmp_path / "left.png")
    plain = _latents([])
    masked = _latents([IPAdapter(adapters=str(folder), images=image, masks=str(tmp_path / "left.png"))])
    full = _latents([IPAdapter(adapters=str(folder), images=image)])
    # columns away from the mask's edge (the UNet's 3x3 convolutions carry a change a few cells on)
    left, right = np.abs(masked - plain)[..., :6].mean(), np.abs(masked - plain)[..., 10:].mean()
    assert left > 2 * right
    assert np.abs(full - plain)[..., 10:].mean() > 1.5 * right  # unmasked, the right side changes too


def test_two_subjects_two_adapters_with_masks(adapter, tmp_path):
    folder, image = adapter()
    other = tmp_path / "other"
    save_random_adapter(other, tiny_sd_pipeline().unet, seed=5)
    # one encoder for both: the second adapter's weights beside the first's encoder
    weights = adapter_weights(other)
    target = folder / "models" / "second.safetensors"
    target.write_bytes(weights.read_bytes())
    halves = []
    for name, cols in (("left.png", slice(0, 16)), ("right.png", slice(16, 32))):
        mask = np.zeros((32, 32), dtype=np.uint8)
        mask[:, cols] = 255
        Image.fromarray(mask).save(tmp_path / name)
        halves.append(str(tmp_path / name))
    first = str(adapter_weights(folder))
    second_image = save_noise_image(tmp_path / "b.png", 2, size=32)
    third = save_noise_image(tmp_path / "c.png", 3, size=32)
    out = _latents([IPAdapter(adapters=(first, str(target)), images=(image, second_image), masks=halves)])
    swapped = _latents([IPAdapter(adapters=(first, str(target)), images=(image, third), masks=halves)])
    diff = np.abs(out - swapped)
    assert diff[..., 10:].mean() > 2 * diff[..., :6].mean()  # the second subject's image acts on its half


def test_presets_and_bad_input(adapter, tmp_path):
    folder, image = adapter()
    assert INSTANTSTYLE_PRESETS["sdxl"]["style"] == {"up": {"block_0": [0.0, 1.0, 0.0]}}
    method = IPAdapter(adapters=str(folder), images=image, preset="style", scales=0.5)
    assert method.scale_configs(tiny_sdxl_pipeline()) == [{"up": {"block_0": [0.0, 0.5, 0.0]}}]
    assert method.scale_configs(tiny_sd_pipeline()) == [{"up": {"block_1": 0.5}}]
    sdxl_folder, _ = adapter("sdxl")
    with pytest.raises(ConfigError, match="does not fit"):  # SDXL's block layout on a tiny UNet
        images(tiny_sdxl_pipeline(), [IPAdapter(adapters=str(sdxl_folder), images=image, preset="style")])
    with pytest.raises(ConsistentDiffusionError, match="is it made for this model family"):
        images(tiny_sdxl_pipeline(), [IPAdapter(adapters=str(folder), images=image)])
    custom = IPAdapter(adapters=str(folder), images=image, block_scale={"down": {"block_1": [1.0]}})
    assert np.abs(images(tiny_sd_pipeline(), [custom]) - images(tiny_sd_pipeline(), [])).max() > 1e-3
    for kwargs, message in [({"images": image, "preset": "nope"}, "unknown IP-Adapter preset"),
                            ({"images": str(tmp_path / "missing.png")}, "image not found"),
                            ({"images": (image, image), "masks": image}, "one IP-Adapter mask per image"),
                            ({"images": image, "scales": (1.0, 2.0)}, "one IP-Adapter scale per adapter")]:
        with pytest.raises(ConfigError, match=message):
            IPAdapter(adapters=str(folder), **kwargs)
    (folder / "models" / "image_encoder" / "config.json").unlink()
    with pytest.raises(ConfigError, match="image encoder missing"):
        images(tiny_sd_pipeline(), [IPAdapter(adapters=str(folder), images=image)])


def test_masks_reach_the_adapter_under_another_methods_cross_attention_wrapper(adapter, tmp_path):
    """consistent_subject wraps every cross-attention layer; the mask must still restrict the adapter."""
    from consistent_diffusion.methods.consistent_subject import ConsistentSubject

    folder, image = adapter()
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[:, :16] = 255
    Image.fromarray(mask).save(tmp_path / "left.png")
    subject = ConsistentSubject(subject="cat", anchors=1, share=False)

    def latents(methods):
        ctx = ctx_for(tiny_sd_pipeline(), ("a cat",))
        ctx.call_kwargs["num_inference_steps"] = 1
        return np.stack([x.numpy() for x in run(ctx, methods, output_type="latent")])

    plain = latents([subject])
    masked = latents([subject, IPAdapter(adapters=str(folder), images=image, masks=str(tmp_path / "left.png"))])
    diff = np.abs(masked - plain)
    assert diff[..., :6].mean() > 2 * diff[..., 10:].mean()


SD15_UNET = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SDXL_UNET = dict(block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), use_linear_projection=True, addition_embed_type="text_time",
                 addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)


@pytest.mark.parametrize(("family", "config", "expected"), [
    ("sd15", SD15_UNET, {"style": ["up_blocks.1.attentions.0", "up_blocks.1.attentions.1", "up_blocks.1.attentions.2"],
                         "style+layout": ["down_blocks.2.attentions.0", "down_blocks.2.attentions.1", "mid_block.attentions.0",
                                          "up_blocks.1.attentions.0", "up_blocks.1.attentions.1", "up_blocks.1.attentions.2"]}),
    ("sdxl", SDXL_UNET, {"style": ["up_blocks.0.attentions.1"],
                         "style+layout": ["down_blocks.2.attentions.1", "up_blocks.0.attentions.1"]}),
])
def test_presets_select_instantstyles_blocks_on_the_real_layouts(family, config, expected):
    """On the real SD 1.5 / SDXL block layouts (built on the meta device: no memory), diffusers expands
    the presets to exactly InstantStyle's target blocks (SDXL README; SD 1.5 infer_style_sd15.py)."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.unet_loader_utils import _maybe_expand_lora_scales

    with init_empty_weights():
        unet = UNet2DConditionModel(**config)
    for name, blocks in expected.items():
        scales = _maybe_expand_lora_scales(unet, [INSTANTSTYLE_PRESETS[family][name]], default_scale=0.0)[0]
        assert sorted(k for k, v in scales.items() if v) == blocks
