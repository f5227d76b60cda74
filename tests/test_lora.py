"""LoRA DreamBooth and the lora method on tiny pipelines: learning, stock loading, interop, stacking."""

from __future__ import annotations

import argparse
import importlib.util

import numpy as np
import pytest
import torch

from _finetune_data import instance_folder, one_thread
from consistent_diffusion.core.errors import ConfigError
from consistent_diffusion.methods.base import GenerationContext, get_method
from consistent_diffusion.methods.lora import LoRA
from consistent_diffusion.testing import tiny_sd_pipeline, tiny_sdxl_pipeline
from consistent_diffusion.training.loop import run_training, step_generator
from consistent_diffusion.training.lora import (
    LoraDreamBoothConfig,
    LoraDreamBoothTask,
    export_kohya,
    train_lora,
)

pytestmark = pytest.mark.usefixtures("one_thread")
_ = one_thread
PROMPT = "a photo of sks emoji"


def config(tmp_path, **overrides) -> LoraDreamBoothConfig:
    options = dict(out=tmp_path / "run", instance_dir=instance_folder(tmp_path), instance_prompt=PROMPT, steps=4,
                   checkpoint_every=4, learning_rate=1e-2, rank=4, alpha=8, progress=False)
    options.update(overrides)
    return LoraDreamBoothConfig(**options)


def generate(pipe, seed: int = 0) -> np.ndarray:
    return pipe(prompt=[PROMPT], generator=[torch.Generator().manual_seed(seed)], num_inference_steps=2,
                output_type="np").images


def ctx_for(pipe) -> GenerationContext:
    return GenerationContext(pipe=pipe, prompts=[PROMPT], negative_prompts=None, generators=[])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A LoRA trained for 4 steps on the tiny SD pipeline: (pipe with adapter, result, its output)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    tmp_path = tmp_path_factory.mktemp("lora")
    pipe = tiny_sd_pipeline()
    result = train_lora(config(tmp_path), pipe)
    yield pipe, result, generate(pipe)
    torch.set_num_threads(previous)


def test_config_is_validated(tmp_path):
    with pytest.raises(ConfigError, match="rank"):
        config(tmp_path, rank=0)
    with pytest.raises(ConfigError, match="text encoder"):
        config(tmp_path, train_text_encoder=True)
    with pytest.raises(ConfigError, match="target_modules"):
        config(tmp_path, target_modules=())


def test_unknown_target_module_is_named(tmp_path):
    with pytest.raises(ConfigError, match="to_nowhere"):
        LoraDreamBoothTask(tiny_sd_pipeline(), config(tmp_path, target_modules=("to_q", "to_nowhere")))


def test_few_steps_train_only_the_adapter_and_lower_loss(tmp_path):
    pipe = tiny_sd_pipeline()
    base = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    cfg = config(tmp_path)
    task = LoraDreamBoothTask(pipe, cfg)
    trainable = sum(p.numel() for p in task.trainable_parameters())
    assert 0 < trainable < 0.2 * sum(v.numel() for v in base.values())
    with torch.no_grad():
        before = float(task.loss(0, step_generator(7, 0), torch.device("cpu"))[0])
    run_training(task, cfg, "lora")
    with torch.no_grad():
        after = float(task.loss(0, step_generator(7, 0), torch.device("cpu"))[0])
    assert after < before
    state = pipe.unet.state_dict()
    lora_keys = [k for k in state if "lora_B" in k]
    assert lora_keys and all(state[k].abs().max() > 0 for k in lora_keys), "B starts at zero and must move"
    for key, value in base.items():  # base weights (renamed to base_layer by PEFT) are untouched
        renamed = key.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(state.get(key, state.get(renamed)), value), key


def test_same_seed_same_adapter_in_fresh_runs(tmp_path):
    from consistent_diffusion.training.lora import lora_state_dict

    def adapter(folder, seed):
        pipe = tiny_sd_pipeline()
        torch.manual_seed(len(folder))  # the global RNG state must not matter
        train_lora(config(tmp_path / folder, steps=2, checkpoint_every=2, seed=seed), pipe)
        return lora_state_dict(pipe.unet)

    first, second, other = adapter("a", 0), adapter("bb", 0), adapter("c", 1)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_stock_load_lora_weights_reproduces_our_output(trained):
    _, result, ours = trained
    assert (result.result / "pytorch_lora_weights.safetensors").is_file()
    stock = tiny_sd_pipeline()
    plain = generate(stock)
    stock.load_lora_weights(str(result.result))
    assert np.abs(ours - plain).max() > 1e-3, "the adapter changes the output"
    np.testing.assert_allclose(generate(stock), ours, atol=1e-5)


def test_lora_method_applies_and_unloads(trained):
    _, result, ours = trained
    pipe = tiny_sd_pipeline()
    plain = generate(pipe)
    method = get_method("lora", weights=str(result.result))
    with method.applied(ctx_for(pipe)):
        np.testing.assert_allclose(generate(pipe), ours, atol=1e-5)
    np.testing.assert_array_equal(generate(pipe), plain)
    with LoRA(weights=(str(result.result),), scales=(0.0,)).applied(ctx_for(pipe)):
        np.testing.assert_allclose(generate(pipe), plain, atol=1e-6)
    assert method.describe()["options"]["weights"] == [str(result.result)]


def test_kohya_format_and_several_loras_with_weights(trained, tmp_path):
    _, result, ours = trained
    kohya = export_kohya(result.result, tmp_path / "sks_kohya.safetensors")
    from safetensors import safe_open

    with safe_open(str(kohya), framework="pt") as handle:
        keys = list(handle.keys())
        alpha = handle.get_tensor(next(k for k in keys if k.endswith(".alpha")))
    assert all(k.startswith("lora_unet_") for k in keys) and float(alpha) == 8.0
    pipe = tiny_sd_pipeline()
    with LoRA(weights=str(kohya)).applied(ctx_for(pipe)):
        np.testing.assert_allclose(generate(pipe), ours, atol=1e-5)
    with LoRA(weights=(str(result.result), str(kohya)), scales=(0.5, 0.5)).applied(ctx_for(pipe)):
        np.testing.assert_allclose(generate(pipe), ours, atol=1e-4)


def test_bad_lora_arguments(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        LoRA(weights=str(tmp_path / "missing.safetensors"))
    with pytest.raises(ConfigError, match="one scale per LoRA"):
        LoRA(weights=(str(tmp_path), str(tmp_path)), scales=(1.0,))


@pytest.mark.skipif(importlib.util.find_spec("consistent_diffusion.methods.style_aligned") is None,
                    reason="StyleAligned not present")
def test_lora_keeps_style_aligned_processors(trained):
    from consistent_diffusion.methods.style_aligned import SharedAttentionProcessor, StyleAligned

    _, result, _ = trained
    pipe = tiny_sd_pipeline()
    original = dict(pipe.unet.attn_processors)
    ctx = GenerationContext(pipe=pipe, prompts=[PROMPT, PROMPT], negative_prompts=None,
                            generators=[torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)],
                            call_kwargs={"num_inference_steps": 2})
    with StyleAligned().applied(ctx) as c:
        shared = dict(pipe.unet.attn_processors)
        assert any(isinstance(p, SharedAttentionProcessor) for p in shared.values())
        with LoRA(weights=str(result.result)).applied(c):
            assert all(pipe.unet.attn_processors[k] is v for k, v in shared.items())
            c.pipe(prompt=c.prompts, generator=c.generators, output_type="np", **c.call_kwargs)
        assert all(pipe.unet.attn_processors[k] is v for k, v in shared.items())
    assert all(pipe.unet.attn_processors[k] is v for k, v in original.items())


def test_sdxl_lora_trains_and_loads_with_stock_diffusers(tmp_path):
    pipe = tiny_sdxl_pipeline()
    result = train_lora(config(tmp_path, steps=2, checkpoint_every=2), pipe)
    ours = generate(pipe)
    stock = tiny_sdxl_pipeline()
    stock.load_lora_weights(str(result.result))
    np.testing.assert_allclose(generate(stock), ours, atol=1e-5)


def test_cli_lora_with_kohya_export(tiny_sd_folder, tmp_path):
    from consistent_diffusion.cli.commands.train_finetune import register_train_subcommands

    parser = argparse.ArgumentParser()
    register_train_subcommands(parser.add_subparsers())
    args = parser.parse_args([
        "lora", "--model", str(tiny_sd_folder), "--instance-dir", str(instance_folder(tmp_path)),
        "--instance-prompt", PROMPT, "--out", str(tmp_path / "cli"), "--steps", "2", "--rank", "2",
        "--target-modules", "to_q,to_v", "--export-kohya", str(tmp_path / "k.safetensors"), "--no-progress",
        "--validation-steps", "2", "--threads", "1",
    ])
    assert args.func(args) == 0
    assert (tmp_path / "cli" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (tmp_path / "k.safetensors").is_file()


def _user_adapters(pipe) -> None:
    """Two adapters of the user's own, ``a`` and ``b``, active with weights 0.3 and 0.7 (B perturbed so they act)."""
    from peft import LoraConfig

    for index, name in enumerate(("a", "b")):
        pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "to_v"]), adapter_name=name)
        generator = torch.Generator().manual_seed(index)
        with torch.no_grad():
            for key, param in pipe.unet.named_parameters():
                if f"lora_B.{name}." in key:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    pipe.set_adapters(["a", "b"], adapter_weights=[0.3, 0.7])


def _adapter_state(pipe) -> dict:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {name: (list(m.active_adapters), dict(m.scaling), m.disable_adapters,
                   [(k, p.requires_grad) for k, p in m.named_parameters()])
            for name, m in pipe.unet.named_modules() if isinstance(m, BaseTunerLayer)}


def test_leaving_lora_restores_the_users_adapters_with_their_weights(trained):
    _, result, _ = trained
    pipe = tiny_sd_pipeline()
    _user_adapters(pipe)
    before, images = _adapter_state(pipe), generate(pipe)
    scalings = {s for _, scaling, _, _ in before.values() for s in scaling.values()}
    assert scalings == {0.3 * 4 / 2, 0.7 * 4 / 2}, "scaling = weight * alpha / r, the user's weights"
    with LoRA(weights=str(result.result), scales=(0.5,)).applied(ctx_for(pipe)):
        assert set(pipe.get_active_adapters()) - {"a", "b"}, "ours is active inside"
    assert pipe.get_active_adapters() == ["a", "b"]
    assert _adapter_state(pipe) == before, "names, per-layer scales, enabled flag and grads exactly as before"
    np.testing.assert_array_equal(generate(pipe), images)


def test_leaving_lora_leaves_a_plain_pipeline_plain(trained):
    _, result, _ = trained
    pipe = tiny_sd_pipeline()
    names = list(pipe.unet.state_dict())
    with LoRA(weights=str(result.result)).applied(ctx_for(pipe)):
        assert list(pipe.unet.state_dict()) != names
    assert list(pipe.unet.state_dict()) == names, "no PEFT wrapper left behind (a saved UNet keeps its key names)"
    assert not hasattr(pipe.unet, "peft_config") and not pipe.unet._hf_peft_config_loaded


def test_two_loras_mix_as_the_sum_of_scaled_low_rank_updates(trained, tmp_path):
    """A layer under LoRA(scales=(s1, s2)) computes W x + sum_i s_i * (alpha / r) * B_i A_i x, A and B
    as read from the files (alpha 8, rank 4 in the trained fixture: alpha / r = 2)."""
    from safetensors.torch import load_file

    _, result, _ = trained
    state = load_file(str(result.result / "pytorch_lora_weights.safetensors"))
    key = next(k for k in sorted(state) if k.endswith("to_q.lora.down.weight"))  # diffusers' names: down = A
    a, b = state[key], state[key.replace(".down.", ".up.")]
    prefix = key.removeprefix("unet.").removesuffix(".lora.down.weight")
    pipe = tiny_sd_pipeline()
    layer = pipe.unet.get_submodule(prefix)
    weight = layer.weight.detach().clone()
    x = torch.randn(2, 3, weight.shape[1], generator=torch.Generator().manual_seed(0))
    expected = x @ weight.T + (0.5 + (-0.25)) * (8 / 4) * (x @ a.T @ b.T)
    method = LoRA(weights=(str(result.result), str(result.result)), scales=(0.5, -0.25))
    with method.applied(ctx_for(pipe)), torch.no_grad():
        got = pipe.unet.get_submodule(prefix)(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_lora_acts_over_switched_off_user_adapters_and_leaves_them_off(trained):
    _, result, ours = trained
    pipe = tiny_sd_pipeline()
    _user_adapters(pipe)
    pipe.disable_lora()
    before, images = _adapter_state(pipe), generate(pipe)
    np.testing.assert_array_equal(images, generate(tiny_sd_pipeline()))  # off: the base model's output
    with LoRA(weights=str(result.result)).applied(ctx_for(pipe)):
        np.testing.assert_allclose(generate(pipe), ours, atol=1e-5)  # ours alone, at scale 1
    assert _adapter_state(pipe) == before
    np.testing.assert_array_equal(generate(pipe), images)
