"""Edit-friendly DDPM inversion: exact reconstruction, editing, the paper's formulas, files, CLI."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from consistent_diffusion.core.errors import ConfigError, ImageInputError
from consistent_diffusion.methods.inversion import (
    DdpmEdit,
    Inversion,
    ddpm_std,
    edit,
    invert,
    noise_map_scheduler,
    reconstruct,
)


@pytest.fixture(scope="module")
def image():
    rng = np.random.RandomState(0)
    return Image.fromarray((rng.rand(32, 32, 3) * 255).astype("uint8"))


def _invert(pipe, image, steps=3, cfg=3.5, seed=0, prompt="a cat"):
    return invert(pipe, image, prompt, steps=steps, cfg=cfg, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fixture", ["tiny_sd", "tiny_sdxl"])
@pytest.mark.parametrize("steps", [2, 5])
def test_reconstruction_is_exact(request, fixture, steps, image):
    pipe = request.getfixturevalue(fixture)
    inversion = _invert(pipe, image, steps=steps)
    latent = reconstruct(pipe, inversion).float().cpu()
    assert latent.shape == inversion.x0.shape == (1, 4, 16, 16)
    error = (latent - inversion.x0).abs().max().item()
    assert error < 1e-6, error  # float32 rounding; measured ~1e-8
    # ...while the pipeline with its ordinary noise would land far away
    assert inversion.zs.abs().max() > 0.1


def test_one_batched_unet_call_per_step(tiny_sd, image):
    batches = []
    handle = tiny_sd.unet.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    try:
        _invert(tiny_sd, image, steps=4)
    finally:
        handle.remove()
    assert batches == [2, 2, 2, 2]  # conditional + unconditional together, once per step


def test_edit_with_source_prompt_and_skip_zero_reconstructs_and_other_prompt_edits(tiny_sd, image):
    inversion = _invert(tiny_sd, image, steps=4)
    same = edit(tiny_sd, inversion, "a cat", cfg_tar=3.5, skip=0, output_type="latent").float().cpu()
    assert (same - inversion.x0).abs().max() < 1e-6
    other = edit(tiny_sd, inversion, "zzz qqq", cfg_tar=3.5, skip=0, output_type="latent").float().cpu()
    far = (other - inversion.x0).abs().max().item()
    assert far > 1e-3
    # skipping steps keeps more of the input
    near = edit(tiny_sd, inversion, "zzz qqq", cfg_tar=3.5, skip=3, output_type="latent").float().cpu()
    assert (near - inversion.x0).abs().max().item() < far
    # several prompts in one call, one image each
    images = edit(tiny_sd, inversion, ["a dog", "a cow"], skip=1)
    assert len(images) == 2 and images[0].size == (32, 32)


def test_noise_maps_follow_the_ddpm_posterior_std(tiny_sd):
    scheduler = noise_map_scheduler(tiny_sd.scheduler)
    scheduler.set_timesteps(10)
    abar = scheduler.alphas_cumprod
    ratio = scheduler.config.num_train_timesteps // 10
    for t in scheduler.timesteps.tolist():
        prev = abar[t - ratio] if t - ratio >= 0 else abar[0]  # set_alpha_to_one=False
        expected = math.sqrt((1 - prev) / (1 - abar[t]) * (1 - abar[t] / prev))
        assert abs(float(ddpm_std(scheduler, torch.tensor(t), 1.0, torch.zeros(1, 4, 2, 2))) - expected) < 1e-6
    # the last step has sigma > 0, so its noise map can correct it (unlike set_alpha_to_one=True)
    assert float(ddpm_std(scheduler, scheduler.timesteps[-1], 1.0, torch.zeros(1, 4, 2, 2))) > 0


def test_trajectory_is_drawn_independently_from_x0(tiny_sd, image):
    """eq. 6: x_t ~ N(sqrt(abar_t) x0, (1 - abar_t) I); the implied noises are nearly uncorrelated across t."""
    inversion = _invert(tiny_sd, image, steps=5)
    abar = noise_map_scheduler(tiny_sd.scheduler).alphas_cumprod
    noises = []
    for i, t in enumerate(inversion.timesteps.tolist()):
        a = abar[t]
        noises.append(((inversion.xs[i] - a.sqrt() * inversion.x0[0]) / (1 - a).sqrt()).flatten())
    noises = torch.stack(noises)
    assert noises.std(dim=1).sub(1).abs().max() < 0.15  # unit-variance noise at every level
    corr = torch.corrcoef(noises)
    assert (corr - torch.eye(len(noises))).abs().max() < 0.25  # not a DDIM chain (which is ~1 correlated)


def test_save_load_roundtrip(tiny_sd, image, tmp_path):
    inversion = _invert(tiny_sd, image, steps=3)
    inversion.save(tmp_path / "inv")
    loaded = Inversion.load(tmp_path / "inv")
    for name in ("x0", "xs", "zs", "timesteps"):
        assert torch.equal(getattr(loaded, name), getattr(inversion, name))
    assert (loaded.prompt, loaded.cfg, loaded.steps) == ("a cat", 3.5, 3)
    assert (reconstruct(tiny_sd, loaded).float() - inversion.x0).abs().max() < 1e-6
    assert not list((tmp_path / "inv").glob("*.tmp"))
    # method built from the folder, and described by it
    method = DdpmEdit(inversion=str(tmp_path / "inv"), skip=1)
    assert method.describe()["options"] == {"inversion": str((tmp_path / "inv").resolve()), "skip": 1}


def test_bad_inputs_are_reported(tiny_sd, image, tmp_path):
    with pytest.raises(ConfigError, match="steps must be an integer >= 1, got 0"):
        invert(tiny_sd, image, steps=0)
    with pytest.raises(ConfigError, match="eta must be in"):
        invert(tiny_sd, image, steps=2, eta=0.0)
    with pytest.raises(ImageInputError, match="not found"):
        invert(tiny_sd, tmp_path / "missing.png", steps=2)
    inversion = _invert(tiny_sd, image, steps=3)
    with pytest.raises(ConfigError, match=r"skip must be an integer in \[0, 2\]"):
        DdpmEdit(inversion=inversion, skip=3)
    with pytest.raises(ConfigError, match="not an inversion folder"):
        Inversion.load(tmp_path)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "inversion.json").write_text("{not json")
    (tmp_path / "bad" / "inversion.safetensors").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="cannot read inversion"):
        Inversion.load(tmp_path / "bad")


def test_ddpm_edit_restores_the_scheduler_even_on_error(tiny_sd, image):
    from consistent_diffusion.methods import GenerationContext

    inversion = _invert(tiny_sd, image, steps=2)
    scheduler = tiny_sd.scheduler
    ctx = GenerationContext(tiny_sd, ["a"], None, [torch.Generator()], {"num_inference_steps": 2})
    with pytest.raises(RuntimeError, match="boom"), DdpmEdit(inversion=inversion).applied(ctx):
        assert tiny_sd.scheduler is not scheduler and "latents" in ctx.call_kwargs
        raise RuntimeError("boom")
    assert tiny_sd.scheduler is scheduler and ctx.call_kwargs == {"num_inference_steps": 2}


def test_cli_invert_then_edit(tiny_sd_folder, tmp_path, image):
    from consistent_diffusion.cli.main import main

    image.save(tmp_path / "in.png")
    inv_dir, edit_dir = tmp_path / "inv", tmp_path / "edit"
    common = ["--model", str(tiny_sd_folder), "--device", "cpu"]
    assert main(["invert", str(tmp_path / "in.png"), "--prompt", "a cat", "--steps", "3", "--cfg", "2",
                 "--seed", "1", "--out", str(inv_dir), *common]) == 0
    manifest = json.loads((inv_dir / "manifest.json").read_text())
    assert manifest["reconstruction_max_abs_error_latent"] < 1e-6
    assert {"inversion.safetensors", "inversion.json", "reconstruction.png", "input.png"} <= {
        p.name for p in inv_dir.iterdir()
    }
    assert main(["edit", str(inv_dir), "--prompt", "a dog", "--prompt", "a cow", "--skip", "1", "--cfg", "4",
                 "--out", str(edit_dir), *common]) == 0
    edit_manifest = json.loads((edit_dir / "manifest.json").read_text())
    assert [entry["file"] for entry in edit_manifest["images"]] == ["edit_p00.png", "edit_p01.png"]
    assert edit_manifest["skip"] == 1 and edit_manifest["cfg"] == 4.0
    # existing output folder and bad skip: clear errors, exit code 2, nothing written
    assert main(["edit", str(inv_dir), "--out", str(edit_dir), *common]) == 2
    assert main(["edit", str(inv_dir), "--skip", "9", "--out", str(tmp_path / "x"), *common]) == 2
    assert not (tmp_path / "x").exists()


def test_ddpm_edit_from_an_image_inverts_it_once(tiny_sd, image, tmp_path):
    from consistent_diffusion.methods import get_method
    from consistent_diffusion.series import SeriesConfig, generate_series

    image.save(tmp_path / "src.png")
    method = get_method("ddpm_edit", image=str(tmp_path / "src.png"), source_prompt="a cat", source_cfg=3.5, skip=0)
    config = SeriesConfig(prompts=("a cat",), seeds=(0,), steps=3, guidance_scale=3.5)
    result = generate_series(tiny_sd, config, [method], progress=False)
    inversion = next(iter(method._cache.values()))
    expected = reconstruct(tiny_sd, inversion, output_type="pil")[0]
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(expected))  # same prompt + cfg: the input back
    assert get_method("ddpm_edit", **result.manifest["methods"][0]["options"]) == method
    with pytest.raises(ConfigError, match="exactly one of inversion"):
        DdpmEdit()


def _toy_scheduler(**overrides):
    """4 training steps with betas 0.1..0.4: abar = 0.9, 0.72, 0.504, 0.3024 (small enough to check by hand)."""
    config = {"num_train_timesteps": 4, "trained_betas": [0.1, 0.2, 0.3, 0.4], "set_alpha_to_one": False,
              "steps_offset": 1, "clip_sample": False, **overrides}
    return noise_map_scheduler(config)


def test_noise_map_against_a_hand_computation():
    """Paper eq. 5, z_t = (x_{t-1} - mu_t(x_t)) / sigma_t, on one-number latents.

    Steps [3, 1] (leading, offset 1). Step t=3 -> t'=1: abar_t = 0.3024, abar_t' = 0.72;
    sigma^2 = (1 - 0.72) / (1 - 0.3024) * (1 - 0.3024 / 0.72) = 0.401376 * 0.58 = 0.232798;
    with x_t = 1, eps = 0.5: x0_hat = (1 - sqrt(0.6976) 0.5) / sqrt(0.3024) = 1.0578,
    mu = sqrt(0.72) 1.0578 + sqrt(1 - 0.72 - 0.232798) 0.5 = 1.00727; x_t' = 0.8 gives z = -0.42959.
    Last step t=1 -> final abar = abar_0 = 0.9: sigma = sqrt(0.28 / 0.1 ... ) = 0.26726, z = -0.39940.
    """
    from consistent_diffusion.methods.inversion import ddpm_mean, noise_map

    scheduler = _toy_scheduler()
    scheduler.set_timesteps(2)
    assert scheduler.timesteps.tolist() == [3, 1]
    x_t, eps, x_prev = (torch.full((1, 1, 1, 1), v) for v in (1.0, 0.5, 0.8))
    for t, sigma, mu, z in ((3, 0.482492, 1.007274, -0.429590), (1, 0.267261, 0.906745, -0.399405)):
        assert float(ddpm_std(scheduler, t, 1.0, x_t)) == pytest.approx(sigma, abs=1e-5)
        assert float(ddpm_mean(scheduler, eps, t, x_t, 1.0)) == pytest.approx(mu, abs=1e-5)
        assert float(noise_map(scheduler, eps, t, x_t, x_prev, 1.0)) == pytest.approx(z, abs=1e-5)
    # the formulas written out, for the first step
    a_t, a_prev = 0.3024, 0.72
    s = math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    m = math.sqrt(a_prev) * (1 - math.sqrt(1 - a_t) * 0.5) / math.sqrt(a_t) + math.sqrt(1 - a_prev - s * s) * 0.5
    assert (s, m, (0.8 - m) / s) == pytest.approx((0.482492, 1.007274, -0.429590), abs=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_the_step_helper_is_ddims_own_arithmetic_where_its_next_timestep_is_right(tiny_sd, prediction_type):
    """With leading spacing DDIMScheduler's t - T // N is the schedule's next timestep: same bits."""
    from diffusers import DDIMScheduler

    from consistent_diffusion.methods.inversion import ddim_step, next_timestep

    scheduler = noise_map_scheduler({**tiny_sd.scheduler.config, "prediction_type": prediction_type})
    scheduler.set_timesteps(7)
    generator = torch.Generator().manual_seed(0)
    x, eps, noise = (torch.randn(2, 4, 3, 3, generator=generator) for _ in range(3))
    for t in scheduler.timesteps:
        for eta in (0.0, 0.5, 1.0):
            ours = ddim_step(scheduler, eps, t, next_timestep(scheduler, t), x, eta, noise)
            theirs = DDIMScheduler.step(scheduler, eps, t, x, eta=eta, variance_noise=noise).prev_sample
            assert torch.equal(ours, theirs)


@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
def test_steps_land_on_the_schedules_next_timestep_for_any_spacing(tiny_sd, spacing):
    """Bug 4: with 30 steps (30 does not divide 1000) trailing/linspace timesteps are not t - 33 apart;
    every step's mean and sigma must aim at timesteps[i + 1] (the level the trajectory was drawn at)."""
    scheduler = noise_map_scheduler({**tiny_sd.scheduler.config, "timestep_spacing": spacing})
    scheduler.set_timesteps(30)
    timesteps = scheduler.timesteps.tolist()
    assert any(a - b != 1000 // 30 for a, b in zip(timesteps[:-1], timesteps[1:], strict=True))
    abar = scheduler.alphas_cumprod.double()
    x0, eps = torch.full((1, 1, 1, 1), 0.3, dtype=torch.float64), torch.full((1, 1, 1, 1), -0.7, dtype=torch.float64)
    scheduler.configure(eta=1.0, noise_maps=torch.zeros(30, 1, 1, 1, dtype=torch.float64))
    scheduler.set_timesteps(30)
    for i, t in enumerate(timesteps[:-1]):  # (linspace's last step, t = 0, has sigma 0)
        a_t, a_prev = abar[t], abar[timesteps[i + 1]]
        sigma = math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
        x_t = a_t.sqrt() * x0 + (1 - a_t).sqrt() * eps  # eq. 6 with the exact noise as the model output
        mean = a_prev.sqrt() * x0 + math.sqrt(1 - a_prev - sigma**2) * eps  # DDIM eq. 12 at timesteps[i + 1]
        assert float(ddpm_std(scheduler, t, 1.0, x_t)) == pytest.approx(sigma, rel=1e-5), (i, t)
        stepped = scheduler.step(eps, torch.tensor(t), x_t).prev_sample  # what the pipeline calls; z = 0
        assert float(stepped) == pytest.approx(float(mean), rel=1e-5, abs=1e-7), (i, t)


def test_trailing_spacing_still_reconstructs_exactly(tiny_sd, image):
    """Bug 4 end to end: with 30 trailing steps the inversion still reconstructs exactly."""
    from diffusers import DDIMScheduler

    tiny_sd.scheduler = DDIMScheduler.from_config(tiny_sd.scheduler.config, timestep_spacing="trailing")
    inversion = _invert(tiny_sd, image, steps=30)
    assert inversion.timesteps[:3].tolist() == [999, 966, 932]
    assert (reconstruct(tiny_sd, inversion).float() - inversion.x0).abs().max() < 1e-5


def test_edit_generates_through_methods_run(tiny_sd, image, monkeypatch):
    import consistent_diffusion.methods.inversion.method as method_module

    calls = []
    real = method_module.run

    def spy(ctx, methods=(), output_type="pil"):
        calls.append([m.name for m in methods])
        return real(ctx, methods, output_type=output_type)

    monkeypatch.setattr(method_module, "run", spy)
    inversion = _invert(tiny_sd, image, steps=2)
    edit(tiny_sd, inversion, ["a", "b"], skip=1)
    assert calls == [[], ["ddpm_edit"]]  # the inversion's recording call, then the edit


def test_invert_and_edit_to_folder_are_library_calls(tiny_sd, image, tmp_path):
    from consistent_diffusion.methods.inversion import edit_to_folder, invert_to_folder

    done = invert_to_folder(tiny_sd, image, tmp_path / "inv", "a cat", steps=2, seed=3)
    assert done.reconstruction_error < 1e-6 and done.inversion.path == str((tmp_path / "inv").absolute())
    loaded = Inversion.load(tmp_path / "inv")
    assert torch.equal(loaded.zs, done.inversion.zs) and loaded.config["seed"] == 3
    manifest = json.loads((tmp_path / "inv" / "manifest.json").read_text())
    assert manifest["image"] == "<in-memory image>" and manifest["runtime"]["device"] == "cpu"
    images = edit_to_folder(tiny_sd, loaded, tmp_path / "edit", ["a dog"], skip=1)
    assert len(images) == 1 and (tmp_path / "edit" / "edit_p00.png").is_file()
    with pytest.raises(ConfigError, match="multiples of 2 for this model"):
        invert_to_folder(tiny_sd, image, tmp_path / "bad", width=31)
