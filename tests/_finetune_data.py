"""Small synthetic image sets for the fine-tuning tests (shapes on white, with captions)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 160, 60)}


def shape_image(shape: str, colour: tuple[int, int, int], size: int = 48, offset: int = 0) -> Image.Image:
    """A filled shape on white, ``size`` x ``size``."""
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    lo, hi = size // 5 + offset, size - size // 5 + offset
    if shape == "circle":
        draw.ellipse((lo, lo, hi, hi), fill=colour)
    elif shape == "square":
        draw.rectangle((lo, lo, hi, hi), fill=colour)
    else:
        draw.polygon([(size // 2 + offset, lo), (hi, hi), (lo, hi)], fill=colour)
    return image


def instance_folder(root: Path, count: int = 3, corrupt: bool = False) -> Path:
    """A folder of ``count`` instance images of different sizes and modes (+ a corrupt file)."""
    folder = Path(root) / "instance"
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        image = shape_image("circle", COLOURS["red"], size=40 + 8 * index, offset=index)
        if index == 1:
            image = image.convert("RGBA").resize((60, 40))
        if index == 2:
            image = image.convert("L")
        image.save(folder / f"subject_{index}.png")
    if corrupt:
        (folder / "broken.png").write_bytes(b"\x89PNG not really")
    return folder


def captioned_folder(root: Path) -> Path:
    """Nine captioned shape images (metadata.jsonl), for ControlNet training."""
    import json

    folder = Path(root) / "shapes"
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for shape in SHAPES:
        for name, colour in COLOURS.items():
            file = f"{shape}_{name}.png"
            shape_image(shape, colour).save(folder / file)
            lines.append(json.dumps({"file_name": file, "text": f"a {name} {shape}"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def noise_image(seed: int, size: int = 32) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


@pytest.fixture(autouse=False)
def one_thread():
    """Run a test on one torch thread: on a shared 2-core machine, 2 threads are ~10x slower for
    tiny models (oversubscription); restored afterwards."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_embedded_like_pipeline(seed: int = 0):
    """A random-init pipeline shaped like the embedded model: VAE factor 4, a BERT text encoder
    (MiniLM's real tokenizer, tiny random weights), cross-attention width of the text states.
    32x32 images on 8x8x4 latents."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import AutoTokenizer, BertConfig, BertModel

    from consistent_diffusion.models.embedded import default_text_encoder_path

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(default_text_encoder_path(), model_max_length=16)
    tokenizer.model_max_length = 16
    text_encoder = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=24, num_hidden_layers=1,
                                        num_attention_heads=2, intermediate_size=32, max_position_embeddings=16))
    text_encoder.eval()  # built, not loaded: without this its dropout would be on, as in training
    vae = AutoencoderKL(block_out_channels=(8, 8, 16), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        norm_num_groups=4, sample_size=32)
    unet = UNet2DConditionModel(block_out_channels=(16, 32), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=24,
                                attention_head_dim=4, norm_num_groups=4)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_controlnet(pipe, seed: int = 0):
    """A ControlNet for ``pipe`` whose zero convolutions are perturbed (so it does something)."""
    import torch

    from consistent_diffusion.training.controlnet import controlnet_from_unet

    model = controlnet_from_unet(pipe)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "zero_conv" in name or "controlnet_mid_block" in name or "controlnet_down_blocks" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return model


def step_spy(callback):
    """A method (stacked last) that calls ``callback(pipeline, step, timestep, callback_kwargs)``
    at every step of the call, to see what the other methods installed while they are active."""
    import contextlib

    from consistent_diffusion.methods.base import Method

    class Spy(Method):
        name = "spy"

        @contextlib.contextmanager
        def applied(self, ctx):
            ctx.call_kwargs["callback_on_step_end"] = callback
            try:
                yield ctx
            finally:
                ctx.call_kwargs.pop("callback_on_step_end", None)

        def describe(self):
            return {"name": "spy", "options": {}}

    return Spy()
