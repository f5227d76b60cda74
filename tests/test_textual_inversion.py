"""Textual inversion: training changes only the new embeddings, the files load in stock diffusers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _finetune_data import instance_folder
from consistent_diffusion.core.errors import ConfigError
from consistent_diffusion.methods.base import GenerationContext, run
from consistent_diffusion.methods.textual_inversion import TextualInversion, read_embeddings
from consistent_diffusion.testing import tiny_sd_pipeline, tiny_sdxl_pipeline
from consistent_diffusion.training.loop import run_training, step_generator
from consistent_diffusion.training.textual_inversion import (
    TextualInversionConfig,
    TextualInversionTask,
    train_textual_inversion,
)

TOKEN = "<my-shape>"


def _config(tmp_path, **overrides) -> TextualInversionConfig:
    options = {"out": tmp_path / "run", "instance_dir": instance_folder(tmp_path), "placeholder_token": TOKEN,
               "initializer_token": "circle", "steps": 2, "batch_size": 2, "learning_rate": 5e-2,
               "checkpoint_every": 100, "progress": False, "templates": ("a photo of a {}",)}
    options.update(overrides)
    return TextualInversionConfig(**options)


def _images(pipe, methods, prompt=f"a photo of a {TOKEN}"):
    ctx = GenerationContext(pipe=pipe, prompts=[prompt, prompt], negative_prompts=None,
                            generators=[torch.Generator().manual_seed(s) for s in (0, 1)],
                            call_kwargs={"num_inference_steps": 3, "guidance_scale": 4.0, "height": 32, "width": 32})
    return run(ctx, methods, output_type="np")


def _embedded_like_pipeline():
    """A tiny SD-shaped pipeline with the embedded model's MiniLM (BERT) text encoder."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from consistent_diffusion.models.embedded import load_text_encoder
    from consistent_diffusion.testing import tiny_sd_pipeline as base

    torch.manual_seed(0)
    tokenizer, encoder = load_text_encoder(max_length=16)
    sd = base()
    unet = UNet2DConditionModel(block_out_channels=(16, 32), layers_per_block=1, sample_size=16, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=384,
                                attention_head_dim=8, norm_num_groups=4)
    pipe = StableDiffusionPipeline(vae=sd.vae, unet=unet, text_encoder=encoder, tokenizer=tokenizer,
                                   scheduler=DDIMScheduler.from_config(sd.scheduler.config), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("make", [tiny_sd_pipeline, tiny_sdxl_pipeline, _embedded_like_pipeline])
def test_steps_lower_the_loss_on_a_fixed_batch_and_change_only_the_new_embeddings(make, tmp_path):
    pipe = make()
    config = _config(tmp_path, steps=15)
    frozen = {name: p.detach().clone() for name, p in pipe.unet.named_parameters()}
    old_rows = [enc.get_input_embeddings().weight.detach().clone()
                for enc in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if enc is not None]
    task = TextualInversionTask(pipe, config)
    with torch.no_grad():
        before = float(task.loss(0, step_generator(123, 0), torch.device("cpu"))[0])
    run_training(task, config, "textual_inversion")
    with torch.no_grad():
        after = float(task.loss(0, step_generator(123, 0), torch.device("cpu"))[0])
    task.remove_hooks()
    assert after < before, (before, after)
    assert all(torch.equal(p, frozen[n]) for n, p in pipe.unet.named_parameters()), "the UNet is frozen"
    encoders = (pipe.text_encoder, getattr(pipe, "text_encoder_2", None))
    for old, enc, first in zip(old_rows, encoders, task.modules["embeddings"].first_ids, strict=False):
        weight = enc.get_input_embeddings().weight
        assert torch.equal(weight[:first], old[:first]), "no row the tokenizer can reach moved"
    start = task.modules["embeddings"].vectors[0]
    assert not torch.allclose(start, old_rows[0][pipe.tokenizer(config.initializer_token,
                                                               add_special_tokens=False).input_ids].mean(0))


def test_sd_embeddings_load_in_stock_diffusers_and_reproduce_our_output(tmp_path):
    result = train_textual_inversion(_config(tmp_path, num_vectors=2), tiny_sd_pipeline()).result
    token, vectors = read_embeddings(result)
    assert token == TOKEN and len(vectors) == 1 and vectors[0].shape == (2, 32)
    stock = tiny_sd_pipeline()
    stock.load_textual_inversion(str(result))
    ours = _images(tiny_sd_pipeline(), [TextualInversion(embeddings=str(result))])
    assert all(np.array_equal(a, b) for a, b in zip(_images(stock, []), ours, strict=True))
    plain = _images(tiny_sd_pipeline(), [], prompt="a photo of a circle")
    assert max(np.abs(a - b).max() for a, b in zip(plain, ours, strict=True)) > 1e-4


def test_sdxl_embeddings_load_in_stock_diffusers_twice_and_reproduce_our_output(tmp_path):
    result = train_textual_inversion(_config(tmp_path), tiny_sdxl_pipeline()).result
    assert (result / "learned_embeds.safetensors").is_file() and (result / "learned_embeds_2.safetensors").is_file()
    stock = tiny_sdxl_pipeline()
    stock.load_textual_inversion(str(result / "learned_embeds.safetensors"), token=TOKEN,
                                 text_encoder=stock.text_encoder, tokenizer=stock.tokenizer)
    stock.load_textual_inversion(str(result / "learned_embeds_2.safetensors"), token=TOKEN,
                                 text_encoder=stock.text_encoder_2, tokenizer=stock.tokenizer_2)
    ours = _images(tiny_sdxl_pipeline(), [TextualInversion(embeddings=str(result))])
    assert all(np.array_equal(a, b) for a, b in zip(_images(stock, []), ours, strict=True))


def test_the_method_is_reversible_also_after_an_error(tmp_path):
    result = train_textual_inversion(_config(tmp_path), _embedded_like_pipeline()).result
    pipe = _embedded_like_pipeline()
    tokenizer, embedding = pipe.tokenizer, pipe.text_encoder.get_input_embeddings()
    size = len(tokenizer)
    first = _images(pipe, [TextualInversion(embeddings=str(result))])
    assert pipe.tokenizer is tokenizer and len(tokenizer) == size and TOKEN not in tokenizer.get_vocab()
    assert pipe.text_encoder.get_input_embeddings() is embedding
    method = TextualInversion(embeddings=str(result))
    ctx = GenerationContext(pipe=pipe, prompts=[f"a {TOKEN}"], negative_prompts=None,
                            generators=[torch.Generator().manual_seed(0)], call_kwargs={})
    with pytest.raises(RuntimeError, match="boom"), method.applied(ctx):
        assert pipe.tokenizer is not tokenizer and TOKEN in pipe.tokenizer.get_vocab()
        raise RuntimeError("boom")
    assert pipe.tokenizer is tokenizer and pipe.text_encoder.get_input_embeddings() is embedding
    assert all(np.array_equal(a, b) for a, b in zip(first, _images(pipe, [method]), strict=True)), "deterministic"


def test_an_interrupted_run_resumes_to_the_same_embeddings(tmp_path):
    whole = train_textual_inversion(_config(tmp_path / "a", steps=4, checkpoint_every=2), tiny_sd_pipeline())
    paused = train_textual_inversion(_config(tmp_path / "b", steps=4, checkpoint_every=2, stop_after_steps=2),
                                     tiny_sd_pipeline())
    assert paused.stopped and paused.result is None
    resumed = train_textual_inversion(_config(tmp_path / "b", steps=4, checkpoint_every=2, resume=True),
                                      tiny_sd_pipeline())
    assert torch.equal(read_embeddings(whole.result)[1][0], read_embeddings(resumed.result)[1][0])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"placeholder_token": "<My-Shape>"}, "lower case"),
        ({"placeholder_token": "two words"}, "one new word"),
        ({"num_vectors": 0}, "num_vectors"),
        ({"templates": ("no placeholder",)}, "templates"),
        ({"initializer_token": " "}, "initializer_token"),
    ],
)
def test_bad_options_are_clear_errors(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        _config(tmp_path, **overrides)


def test_a_known_word_as_placeholder_and_mismatched_files_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="already knows"):
        TextualInversionTask(tiny_sd_pipeline(), _config(tmp_path, placeholder_token="a"))
    with pytest.raises(ConfigError, match="16-token"):  # the tiny tokenizer spells words letter by letter
        TextualInversionTask(tiny_sd_pipeline(), _config(tmp_path, templates=("object",)))
    result = train_textual_inversion(_config(tmp_path), tiny_sd_pipeline()).result
    with pytest.raises(ConfigError, match="dimensions"):
        _images(_embedded_like_pipeline(), [TextualInversion(embeddings=str(result))])
    with pytest.raises(ConfigError, match="this pipeline has 2"):
        _images(tiny_sdxl_pipeline(), [TextualInversion(embeddings=str(result))])
    with pytest.raises(ConfigError, match="not found"):
        TextualInversion(embeddings=str(tmp_path / "missing"))


def test_cli_trains_and_generates_with_the_token(tiny_sd_folder, tmp_path, capsys):
    import json

    from consistent_diffusion.cli.main import main

    assert main(["train", "textual-inversion", "--model", str(tiny_sd_folder), "--instance-dir",
                 str(instance_folder(tmp_path)), "--token", TOKEN, "--initializer", "circle", "--steps", "2",
                 "--batch-size", "1", "--template", "a photo of a {}", "--no-progress", "--out", str(tmp_path / "ti")]) == 0
    embeddings = tmp_path / "ti" / "embeddings"
    assert (embeddings / "learned_embeds.safetensors").is_file() and (embeddings / "training.json").is_file()
    out = tmp_path / "series"
    assert main(["generate", "--model", str(tiny_sd_folder), "--prompt", f"a photo of a {TOKEN}", "--seeds", "0",
                 "--steps", "2", "--quiet", "--textual-inversion", str(embeddings), "--out", str(out)]) == 0
    methods = json.loads((out / "manifest.json").read_text())["methods"]
    assert methods == [{"name": "textual_inversion", "options": {"embeddings": str(embeddings.resolve()), "token": None}}]


def test_a_learned_word_can_be_the_consistent_subject(tmp_path):
    """Textual inversion first, then consistent_subject finds the new word as one token (the CLI
    stacks them so)."""
    import argparse

    from consistent_diffusion.cli.options import methods as method_options
    from consistent_diffusion.methods.consistent_subject import ConsistentSubject

    result = train_textual_inversion(_config(tmp_path), tiny_sd_pipeline()).result
    parser = argparse.ArgumentParser()
    method_options.add_method_arguments(parser)
    args = parser.parse_args(["--subject", TOKEN, "--textual-inversion", str(result)])
    stack = method_options.methods_from_args(args)
    assert [m.name for m in stack] == ["textual_inversion", "consistent_subject"]
    both = _images(tiny_sd_pipeline(), stack)
    only = _images(tiny_sd_pipeline(), [TextualInversion(embeddings=str(result))])
    assert max(np.abs(a - b).max() for a, b in zip(both, only, strict=True)) > 1e-4
    pipe = tiny_sd_pipeline()
    with stack[0].applied(GenerationContext(pipe=pipe, prompts=[f"a {TOKEN}"], negative_prompts=None,
                                            generators=[torch.Generator()], call_kwargs={})):
        from consistent_diffusion.methods.consistent_subject import subject_token_positions

        found = subject_token_positions(pipe.tokenizer, [f"a photo of a {TOKEN}"], TOKEN)
        assert len(found[0]) == 1, "the learned word is one token for the call's tokenizer"
    with pytest.raises(ConfigError, match="no anchor prompt names the subject"):
        _images(tiny_sd_pipeline(), [ConsistentSubject(subject="dog")])
