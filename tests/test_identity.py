"""Weights-identity keys (models.identity) and the method caches that key on them."""

from __future__ import annotations

import gc

import pytest
import torch
from PIL import Image

from consistent_diffusion.methods.base import GenerationContext
from consistent_diffusion.models.identity import (
    components_key,
    files_key,
    object_key,
    pipeline_weights_key,
    weights_key,
)


class _Thing:
    """A plain weak-referenceable object: CPython hands a freed one's id to the next one made."""


def test_object_key_is_stable_and_not_reused_after_gc():
    thing = _Thing()
    first = object_key(thing)
    assert object_key(thing) == first
    ident = id(thing)
    del thing
    gc.collect()
    others = [_Thing() for _ in range(1000)]  # kept alive: distinct objects, one of them at the freed slot
    reused = [other for other in others if id(other) == ident]
    if not reused:
        pytest.skip("the allocator did not reuse the id")
    assert object_key(reused[0]) != first, "a new object at a reused id must not share the old key"


def test_weights_key_sees_in_place_changes_replacement_and_buffers():
    module = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    key = weights_key(module)
    assert weights_key(module) == key, "no change, same key"
    with torch.no_grad():
        module[0].weight.copy_(module[0].weight)  # same values, but written: the key must move
    assert weights_key(module) != key
    key = weights_key(module)
    module.load_state_dict(module.state_dict())
    assert weights_key(module) != key
    key = weights_key(module)
    module[0].weight = torch.nn.Parameter(module[0].weight.detach().clone())
    assert weights_key(module) != key
    key = weights_key(module)
    module[1].running_mean.add_(1.0)
    assert weights_key(module) != key


def test_weights_key_sees_lora_scales_and_activation(tiny_sd):
    from peft import LoraConfig

    unet = tiny_sd.unet
    for name in ("a", "b"):
        unet.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "to_v"]), adapter_name=name)
    tiny_sd.set_adapters(["a", "b"], adapter_weights=[0.3, 0.7])
    key = weights_key(unet)
    tiny_sd.set_adapters(["a", "b"], adapter_weights=[0.3, 0.7])
    assert weights_key(unet) == key
    tiny_sd.set_adapters(["a", "b"], adapter_weights=[0.3, 0.8])
    assert weights_key(unet) != key
    key = weights_key(unet)
    tiny_sd.set_adapters(["a"], adapter_weights=[0.3])
    assert weights_key(unet) != key
    key = weights_key(unet)
    tiny_sd.disable_lora()
    assert weights_key(unet) != key


def test_pipeline_and_components_keys(tiny_sd):
    weights, objects = pipeline_weights_key(tiny_sd), components_key(tiny_sd)
    with torch.no_grad():
        next(tiny_sd.text_encoder.parameters()).mul_(1.0)
    assert pipeline_weights_key(tiny_sd) != weights, "the text encoder is part of the pipeline's weights"
    assert components_key(tiny_sd) == objects, "same objects"
    tiny_sd.scheduler = type(tiny_sd.scheduler).from_config(tiny_sd.scheduler.config)
    assert components_key(tiny_sd) == objects, "the scheduler slot is not a component of a sibling"
    tiny_sd.vae = type(tiny_sd.vae).from_config(tiny_sd.vae.config)
    assert components_key(tiny_sd) != objects


def test_files_key_sees_a_rewrite_in_place(tmp_path):
    path = tmp_path / "w.bin"
    path.write_bytes(b"1234")
    key = files_key([path])
    assert files_key([path]) == key
    path.write_bytes(b"5678")
    import os

    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # coarse clocks: force a new mtime
    assert files_key([path]) != key


# ----------------------------------------------------------------------------- caches of other methods


def _image(size: int = 32) -> Image.Image:
    image = Image.new("RGB", (size, size), (200, 40, 40))
    image.paste((30, 60, 220), (8, 8, 24, 24))
    return image


def _ctx(pipe, steps: int = 2) -> GenerationContext:
    return GenerationContext(pipe=pipe, prompts=["a"], negative_prompts=None,
                             generators=[torch.Generator().manual_seed(0)], call_kwargs={"num_inference_steps": steps})


def test_ddpm_edit_inversion_cache_misses_after_in_place_weight_change(tiny_sd):
    from consistent_diffusion.methods.inversion import DdpmEdit

    method = DdpmEdit(image=_image(), source_prompt="a square")
    first = method.inversion_for(_ctx(tiny_sd))
    assert method.inversion_for(_ctx(tiny_sd)) is first, "same weights, same options: cached"
    with torch.no_grad():  # what the dreambooth method does to the loaded UNet
        for param in tiny_sd.unet.parameters():
            param.mul_(1.01)
    second = method.inversion_for(_ctx(tiny_sd))
    assert second is not first and not torch.equal(second.zs, first.zs)


def test_style_aligned_reference_cache_misses_after_in_place_weight_change(tiny_sd, tmp_path):
    from consistent_diffusion.methods.style_aligned import StyleAligned

    path = tmp_path / "ref.png"
    _image().save(path)
    method = StyleAligned(reference_image=str(path), reference_image_prompt="a square")
    first = method._reference_inversion(_ctx(tiny_sd))
    assert method._reference_inversion(_ctx(tiny_sd)) is first
    with torch.no_grad():
        for param in tiny_sd.text_encoder.parameters():
            param.mul_(1.01)
    assert method._reference_inversion(_ctx(tiny_sd)) is not first, "the text encoder's weights count too"


def test_ddpm_edit_inversion_cache_misses_after_a_scheduler_change(tiny_sd):
    from diffusers import DDIMScheduler

    from consistent_diffusion.methods.inversion import DdpmEdit

    method = DdpmEdit(image=_image(), source_prompt="a square")
    first = method.inversion_for(_ctx(tiny_sd))
    assert method.inversion_for(_ctx(tiny_sd)) is first
    tiny_sd.scheduler = DDIMScheduler.from_config(tiny_sd.scheduler.config, timestep_spacing="trailing")
    second = method.inversion_for(_ctx(tiny_sd))
    assert second is not first, "the trajectory depends on the timestep spacing"
    assert not torch.equal(second.timesteps, first.timesteps)
