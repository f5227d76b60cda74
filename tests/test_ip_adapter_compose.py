"""ip_adapter with the methods that swap the pipeline (ControlNet, img2img) or change the prompt's
tokens (textual inversion): the adapter acts in the sibling pipeline's call, equals diffusers' own
sibling + load_ip_adapter path, and everything is restored afterwards."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from _finetune_data import COLOURS, one_thread, random_controlnet, shape_image, step_spy
from _ip_adapter_files import save_noise_image, save_random_adapter
from consistent_diffusion.methods.base import GenerationContext, run
from consistent_diffusion.methods.ip_adapter import IPAdapter
from consistent_diffusion.testing import tiny_sd_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")
_ = one_thread
PROMPTS = ("a red circle", "a blue square")
CALL = {"num_inference_steps": 2, "guidance_scale": 5.0, "height": 32, "width": 32}


def _generators() -> list[torch.Generator]:
    return [torch.Generator().manual_seed(i) for i in range(len(PROMPTS))]


def _run(pipe, methods, **call) -> np.ndarray:
    ctx = GenerationContext(pipe=pipe, prompts=list(PROMPTS), negative_prompts=None, generators=_generators(),
                            call_kwargs={**CALL, **call})
    return np.stack(run(ctx, methods, output_type="np"))


def _is_ip(processor) -> bool:
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    while hasattr(processor, "inner"):
        processor = processor.inner
    return isinstance(processor, IPAdapterAttnProcessor2_0)


@pytest.fixture
def files(tmp_path):
    folder = save_random_adapter(tmp_path / "ip", tiny_sd_pipeline().unet)
    return folder, save_noise_image(tmp_path / "prompt.png", 0)


def _snapshot(pipe) -> dict:
    return {"processors": dict(pipe.unet.attn_processors), "hid_proj": pipe.unet.encoder_hid_proj,
            "hid_type": pipe.unet.config.encoder_hid_dim_type, "encoder": pipe.image_encoder,
            "extractor": pipe.feature_extractor, "config": dict(pipe.config)}


def _assert_restored(pipe, before: dict) -> None:
    after = _snapshot(pipe)
    assert all(after["processors"][k] is v for k, v in before["processors"].items())
    assert {k: v for k, v in after.items() if k != "processors"} == {k: v for k, v in before.items() if k != "processors"}


@pytest.mark.parametrize("ip_first", [True, False])
def test_controlnet_sibling_gets_the_adapter_and_equals_diffusers(files, ip_first):
    from diffusers import StableDiffusionControlNetPipeline

    from consistent_diffusion.methods.controlnet import ControlNet

    folder, image = files
    pipe = tiny_sd_pipeline()
    model = random_controlnet(pipe)
    control = shape_image("circle", COLOURS["red"], 32)
    before = _snapshot(pipe)
    seen = {}

    def spy(pipeline, step, timestep, callback_kwargs):
        seen["pipeline"] = type(pipeline).__name__
        seen["ip"] = sum(_is_ip(p) for p in pipeline.unet.attn_processors.values())
        return callback_kwargs

    net, ip = ControlNet(controlnets=model, images=control), IPAdapter(adapters=str(folder), images=image)
    ours = _run(pipe, [ip, net, step_spy(spy)] if ip_first else [net, ip, step_spy(spy)])
    assert seen["pipeline"] == "StableDiffusionControlNetPipeline" and seen["ip"] > 0
    _assert_restored(pipe, before)

    reference = StableDiffusionControlNetPipeline.from_pipe(tiny_sd_pipeline(), controlnet=model)
    reference.load_ip_adapter(str(folder), subfolder="models", weight_name="ip-adapter_sd15.safetensors",
                              local_files_only=True)
    theirs = reference(list(PROMPTS), image=control, ip_adapter_image=Image.open(image).convert("RGB"),
                       generator=_generators(), output_type="np", **CALL).images
    assert np.abs(ours - theirs).max() < 1e-5
    assert np.abs(ours - _run(tiny_sd_pipeline(), [net])).max() > 1e-3  # the adapter acted


def test_img2img_sibling_gets_the_adapter_and_equals_diffusers(files):
    from diffusers import StableDiffusionImg2ImgPipeline

    from consistent_diffusion.methods.img2img import Img2Img

    folder, image = files
    init = shape_image("square", COLOURS["blue"], 32)
    pipe = tiny_sd_pipeline()
    before = _snapshot(pipe)
    ours = _run(pipe, [Img2Img(image=init, strength=0.8), IPAdapter(adapters=str(folder), images=image)])
    _assert_restored(pipe, before)

    reference = StableDiffusionImg2ImgPipeline.from_pipe(tiny_sd_pipeline())
    reference.load_ip_adapter(str(folder), subfolder="models", weight_name="ip-adapter_sd15.safetensors",
                              local_files_only=True)
    call = {k: v for k, v in CALL.items() if k not in ("height", "width")}
    theirs = reference(list(PROMPTS), image=[init] * len(PROMPTS), strength=0.8,
                       ip_adapter_image=Image.open(image).convert("RGB"), generator=_generators(),
                       output_type="np", **call).images
    assert np.abs(ours - theirs).max() < 1e-5
    assert np.abs(ours - _run(tiny_sd_pipeline(), [Img2Img(image=init, strength=0.8)])).max() > 1e-3


def test_textual_inversion_word_with_the_adapter_equals_diffusers(files, tmp_path):
    from safetensors.torch import save_file

    from consistent_diffusion.methods.textual_inversion import TextualInversion

    folder, image = files
    token = "<my-shape>"
    (tmp_path / "ti").mkdir()
    save_file({token: torch.randn(1, 32, generator=torch.Generator().manual_seed(4))},
              str(tmp_path / "ti" / "learned_embeds.safetensors"))
    prompts = [f"a photo of a {token}", f"a {token} in snow"]
    pipe = tiny_sd_pipeline()
    before, vocabulary = _snapshot(pipe), len(pipe.tokenizer)
    ctx = GenerationContext(pipe=pipe, prompts=list(prompts), negative_prompts=None, generators=_generators(),
                            call_kwargs=dict(CALL))
    ours = np.stack(run(ctx, [TextualInversion(embeddings=str(tmp_path / "ti")),
                              IPAdapter(adapters=str(folder), images=image)], output_type="np"))
    _assert_restored(pipe, before)
    assert len(pipe.tokenizer) == vocabulary

    stock = tiny_sd_pipeline()
    stock.load_textual_inversion(str(tmp_path / "ti"))
    stock.load_ip_adapter(str(folder), subfolder="models", weight_name="ip-adapter_sd15.safetensors",
                          local_files_only=True)
    theirs = stock(prompts, ip_adapter_image=Image.open(image).convert("RGB"), generator=_generators(),
                   output_type="np", **CALL).images
    assert np.abs(ours - theirs).max() < 1e-5


def test_ddpm_edit_with_the_adapter(files):
    """The edit replays its inversion's noise with the adapter loaded: scale 0 gives the edit
    alone exactly, scale 1 changes it; the scheduler and processors come back."""
    from consistent_diffusion.methods.inversion import DdpmEdit, invert

    folder, image = files
    pipe = tiny_sd_pipeline()
    source = invert(pipe, shape_image("circle", COLOURS["red"], 32), "a photo", steps=3, cfg=3.0,
                    generator=torch.Generator().manual_seed(0))
    before, scheduler = _snapshot(pipe), pipe.scheduler
    edit = DdpmEdit(inversion=source, skip=1)
    alone = _run(pipe, [edit], num_inference_steps=3)
    off = _run(pipe, [edit, IPAdapter(adapters=str(folder), images=image, scales=0.0)], num_inference_steps=3)
    on = _run(pipe, [edit, IPAdapter(adapters=str(folder), images=image)], num_inference_steps=3)
    assert np.abs(off - alone).max() < 1e-5
    assert np.abs(on - alone).max() > 1e-3
    assert pipe.scheduler is scheduler
    _assert_restored(pipe, before)
