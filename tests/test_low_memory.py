"""Low-memory switches (models/memory.py): every method gives the same images under model CPU
offload, VAE slicing/tiling and attention slicing, and leaves the pipeline's hooks and processors
as it found them.

Model offload runs its real accelerate hooks here with the CPU as the execution device (the hooks
are installed and called on every forward; nothing moves). Sequential offload cannot execute on the
CPU (accelerate's per-layer on-load fails there), so it is refused on the CPU and its image test runs
only where CUDA exists.
"""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from _finetune_data import COLOURS, noise_image, one_thread, random_controlnet, shape_image
from _ip_adapter_files import save_noise_image, save_random_adapter
from consistent_diffusion.core.errors import ConfigError
from consistent_diffusion.methods.base import GenerationContext, get_method, run
from consistent_diffusion.methods.inversion import invert
from consistent_diffusion.models.memory import LowMemory, apply_low_memory, offload_mode
from consistent_diffusion.testing import tiny_sd_pipeline
from consistent_diffusion.training.lora import DEFAULT_TARGETS, add_lora, save_lora

pytestmark = pytest.mark.usefixtures("one_thread")
_ = one_thread
TOKEN = "<tok>"
PROMPTS = [f"a {TOKEN} cat", "a cat on grass", "a cat"]
METHODS = ["plain", "img2img", "ddpm_edit", "style_aligned", "consistent_subject", "story", "controlnet", "lora",
           "dreambooth", "textual_inversion", "style_aligned+controlnet+lora", "ip_adapter", "ip_adapter_per_row"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Random inputs for every method, built in code: a LoRA, a DreamBooth folder, embeddings, an
    inversion, a ControlNet, an init image, an IP-Adapter (released layout) and its prompt images."""
    root = tmp_path_factory.mktemp("low-memory")
    with_lora = tiny_sd_pipeline()
    torch.manual_seed(1)
    add_lora(with_lora.unet, 4, 4.0, DEFAULT_TARGETS)
    with torch.no_grad():
        for name, param in with_lora.unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)  # gaussian init leaves B = 0: make the adapter act
    save_lora(with_lora, root / "lora")
    tiny_sd_pipeline(seed=3).save_pretrained(root / "dreambooth")
    (root / "ti").mkdir()
    save_file({TOKEN: torch.randn(2, 32, generator=torch.Generator().manual_seed(2))},
              str(root / "ti" / "learned_embeds.safetensors"))
    base = tiny_sd_pipeline()
    image = noise_image(0)
    save_random_adapter(root / "ip", base.unet)
    prompt_images = tuple(save_noise_image(root / f"ip{i}.png", i) for i in range(len(PROMPTS)))
    return {"root": root, "image": image, "ip_images": prompt_images, "controlnet": random_controlnet(base),
            "inversion": invert(base, image, "a photo", steps=2, cfg=3.0, generator=torch.Generator().manual_seed(0)),
            "control": shape_image("circle", COLOURS["red"], size=32)}


def methods_for(name: str, inputs: dict) -> list:
    root = inputs["root"]
    build = {
        "plain": lambda: [],
        "img2img": lambda: [get_method("img2img", image=inputs["image"], strength=0.6)],
        "ddpm_edit": lambda: [get_method("ddpm_edit", inversion=inputs["inversion"])],
        "style_aligned": lambda: [get_method("style_aligned")],
        "consistent_subject": lambda: [get_method("consistent_subject", subject="cat")],
        "story": lambda: [get_method("consistent_subject", subject="cat", mode="story")],
        "controlnet": lambda: [get_method("controlnet", controlnets=inputs["controlnet"], images=inputs["control"])],
        "lora": lambda: [get_method("lora", weights=str(root / "lora"))],
        "dreambooth": lambda: [get_method("dreambooth", model=str(root / "dreambooth"))],
        "textual_inversion": lambda: [get_method("textual_inversion", embeddings=str(root / "ti"))],
        "style_aligned+controlnet+lora": lambda: [
            get_method("style_aligned"),
            get_method("controlnet", controlnets=inputs["controlnet"], images=inputs["control"]),
            get_method("lora", weights=str(root / "lora"))],
        "ip_adapter": lambda: [get_method("ip_adapter", adapters=str(root / "ip"), images=inputs["ip_images"][0])],
        "ip_adapter_per_row": lambda: [
            get_method("ip_adapter", adapters=str(root / "ip"), images=inputs["ip_images"], per_row=True)],
    }
    return build[name]()


def images(pipe, methods) -> np.ndarray:
    ctx = GenerationContext(pipe=pipe, prompts=list(PROMPTS), negative_prompts=None,
                            generators=[torch.Generator().manual_seed(s) for s in range(len(PROMPTS))],
                            call_kwargs={"num_inference_steps": 2, "guidance_scale": 3.0, "height": 32, "width": 32})
    return np.stack(run(ctx, methods, output_type="np"))


def hook_state(pipe) -> dict:
    """What the switches installed: each component's accelerate hook type, the execution device,
    the UNet's attention processors (objects) and the VAE's slicing/tiling flags."""
    return {
        "hooks": {name: type(getattr(c, "_hf_hook", None)).__name__ for name, c in pipe.components.items()
                  if isinstance(c, torch.nn.Module)},
        "offload": offload_mode(pipe),
        "device": str(pipe._execution_device),
        "processors": {name: id(p) for name, p in pipe.unet.attn_processors.items()},
        "processor_types": {type(p).__name__ for p in pipe.unet.attn_processors.values()},
        "vae": (pipe.vae.use_slicing, pipe.vae.use_tiling),
    }


SWITCHES = {
    "model_offload": LowMemory(offload="model"),
    "vae_slicing": LowMemory(vae_slicing=True),
    "vae_tiling": LowMemory(vae_tiling=True),  # 32 px fits one tile: unchanged (larger images blend tiles)
    "attention_slicing": LowMemory(attention_slicing=True),
    "all": LowMemory(offload="model", vae_slicing=True, attention_slicing=True),
}


def tolerance(name: str, switch: LowMemory) -> float:
    """1e-5 on [0, 1] pixels. Offload and VAE slicing run the same kernels (bit-equal here); sliced
    attention is another kernel (baddbmm + softmax, not SDPA): ~5e-7 per image, which the DDPM edit's
    replayed noise maps amplify to 1.4e-5 (measured), so that one cell gets 3e-5."""
    return 3e-5 if switch.attention_slicing and name == "ddpm_edit" else 1e-5


@pytest.fixture(scope="module")
def reference(inputs):
    pipe = tiny_sd_pipeline()
    return {name: images(pipe, methods_for(name, inputs)) for name in METHODS}


@pytest.mark.parametrize("switch", sorted(SWITCHES))
def test_every_method_gives_the_same_images_and_restores_the_hooks(switch, inputs, reference):
    pipe = apply_low_memory(tiny_sd_pipeline(), SWITCHES[switch], device="cpu")
    before = hook_state(pipe)
    if SWITCHES[switch].offload:
        assert before["offload"] == "model" and before["hooks"]["unet"] == "CpuOffload"
    if SWITCHES[switch].attention_slicing:
        assert before["processor_types"] == {"SlicedAttnProcessor"}
    for name in METHODS:
        got = images(pipe, methods_for(name, inputs))
        assert np.abs(got - reference[name]).max() <= tolerance(name, SWITCHES[switch]), f"{name} under {switch}"
        after = hook_state(pipe)
        assert after == before, f"{name} under {switch} left the pipeline's hooks or processors changed"


def test_methods_swap_in_their_own_processors_over_sliced_attention_for_the_call(inputs):
    from consistent_diffusion.methods.style_aligned import SharedAttentionProcessor

    pipe = apply_low_memory(tiny_sd_pipeline(), LowMemory(attention_slicing=True), device="cpu")
    seen: list[set[str]] = []

    def spy(pipeline, step, timestep, callback_kwargs):
        seen.append({type(p).__name__ for p in pipeline.unet.attn_processors.values()})
        return callback_kwargs

    ctx = GenerationContext(pipe=pipe, prompts=["a", "b"], negative_prompts=None,
                            generators=[torch.Generator().manual_seed(s) for s in (0, 1)],
                            call_kwargs={"num_inference_steps": 2, "height": 32, "width": 32,
                                         "callback_on_step_end": spy})
    run(ctx, [get_method("style_aligned")], output_type="np")
    assert seen and all({SharedAttentionProcessor.__name__, "SlicedAttnProcessor"} <= types for types in seen)
    assert {type(p).__name__ for p in pipe.unet.attn_processors.values()} == {"SlicedAttnProcessor"}


def test_offload_moves_nothing_it_should_not_and_frees_after_a_sibling_call(inputs):
    """After an img2img (sibling pipeline) call under model offload every component is offloaded
    again, as the text-to-image pipeline's own call leaves them."""
    pipe = apply_low_memory(tiny_sd_pipeline(), LowMemory(offload="model"), device="cpu")
    calls = []
    original = type(pipe).maybe_free_model_hooks

    def counting(self):
        calls.append(type(self).__name__)
        return original(self)

    type(pipe).maybe_free_model_hooks = counting
    try:
        images(pipe, methods_for("img2img", inputs))
    finally:
        type(pipe).maybe_free_model_hooks = original
    assert "StableDiffusionPipeline" in calls


@pytest.mark.parametrize("name", ["ip_adapter", "ip_adapter_per_row"])
def test_the_ip_adapters_image_encoder_is_offloaded_with_the_pipeline_for_its_call(inputs, name):
    """The image encoder the adapter adds joins model offload for the call (a CpuOffload hook, so it
    follows the other components onto the accelerator) and leaves with the adapter; the UNet's hook
    sees the adapter's ``encoder_hid_proj`` (the pipeline is offloaded again after loading)."""
    pipe = apply_low_memory(tiny_sd_pipeline(), LowMemory(offload="model"), device="cpu")
    before = hook_state(pipe)
    seen: list[tuple[str, str, bool]] = []

    def spy(pipeline, step, timestep, callback_kwargs):
        encoder = pipeline.image_encoder
        seen.append((type(getattr(encoder, "_hf_hook", None)).__name__, offload_mode(pipeline),
                     pipeline.unet.encoder_hid_proj is not None))
        return callback_kwargs

    ctx = GenerationContext(pipe=pipe, prompts=list(PROMPTS), negative_prompts=None,
                            generators=[torch.Generator().manual_seed(s) for s in range(len(PROMPTS))],
                            call_kwargs={"num_inference_steps": 2, "guidance_scale": 3.0, "height": 32, "width": 32,
                                         "callback_on_step_end": spy})
    run(ctx, methods_for(name, inputs), output_type="np")
    assert seen == [("CpuOffload", "model", True)] * 2
    assert pipe.image_encoder is None and hook_state(pipe) == before


def test_switches_are_validated_and_sequential_offload_needs_an_accelerator():
    with pytest.raises(ConfigError, match="offload must be one of"):
        LowMemory(offload="disk")
    with pytest.raises(ConfigError, match="vae_tiling"):
        LowMemory(vae_tiling="yes")
    with pytest.raises(ConfigError, match="accelerator"):
        apply_low_memory(tiny_sd_pipeline(), LowMemory(offload="sequential"), device="cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="sequential offload executes on an accelerator")
def test_sequential_offload_gives_the_same_images_on_cuda(inputs):
    pipe = apply_low_memory(tiny_sd_pipeline(), LowMemory(offload="sequential"), device="cuda")
    reference = tiny_sd_pipeline().to("cuda")
    for name in METHODS:
        np.testing.assert_allclose(images(pipe, methods_for(name, inputs)),
                                   images(reference, methods_for(name, inputs)), atol=1e-5, err_msg=name)
        assert offload_mode(pipe) == "sequential"


def test_cli_options_build_the_switches():
    from consistent_diffusion.cli.options.memory import add_memory_arguments, low_memory_from_args

    parser = argparse.ArgumentParser()
    add_memory_arguments(parser)
    assert low_memory_from_args(parser.parse_args([])) == LowMemory()
    args = parser.parse_args(["--offload", "model", "--vae-slicing", "--vae-tiling", "--attention-slicing"])
    assert low_memory_from_args(args) == LowMemory(offload="model", vae_slicing=True, vae_tiling=True,
                                                   attention_slicing=True)
    with pytest.raises(SystemExit):
        parser.parse_args(["--offload", "disk"])


def test_generate_command_with_the_switches_writes_the_same_images(tiny_sd_folder, tmp_path, capsys):
    from PIL import Image

    from consistent_diffusion.cli.main import main

    common = ["generate", "--model", str(tiny_sd_folder), "--prompt", "a cat", "--seeds", "0", "1", "--steps", "2",
              "--quiet"]
    assert main([*common, "--out", str(tmp_path / "plain")]) == 0
    assert main([*common, "--out", str(tmp_path / "low"), "--offload", "model", "--vae-slicing", "--vae-tiling",
                 "--attention-slicing"]) == 0
    assert "nothing to offload to" in capsys.readouterr().err
    for name in ("p00_s0000.png", "p00_s0001.png"):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "plain" / name)),
                              np.asarray(Image.open(tmp_path / "low" / name)))
    assert main([*common, "--out", str(tmp_path / "seq"), "--offload", "sequential"]) != 0
    assert "accelerator" in capsys.readouterr().err
