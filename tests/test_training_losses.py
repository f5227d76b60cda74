"""Every training loss term against a small hand computation, and the loop's budget, EMA, pause and
validation hooks on a toy task (seconds on CPU)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from _finetune_data import instance_folder, one_thread
from consistent_diffusion.core.errors import ConsistentDiffusionError
from consistent_diffusion.training.checkpoints import EMA, list_checkpoints, load_checkpoint
from consistent_diffusion.training.diffusion import (
    encode_text,
    min_snr_mse,
    min_snr_weights,
    noise_and_target,
    per_example_mse,
)
from consistent_diffusion.training.loop import Task, run_training
from consistent_diffusion.training.loop_config import LoopConfig

pytestmark = pytest.mark.usefixtures("one_thread")
_ = one_thread  # the fixture, imported
CPU = torch.device("cpu")
T = 1000


def sd_alphas_cumprod() -> torch.Tensor:
    """abar_t of SD's scaled_linear schedule, by hand: betas = linspace(sqrt(b0), sqrt(b1), T)^2."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, T, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def ddpm(prediction_type: str):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=T, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         prediction_type=prediction_type)


# ----------------------------------------------------------------------------- diffusion MSE and its targets


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_noise_and_target_by_hand(kind):
    z0 = torch.arange(2 * 4 * 2 * 2, dtype=torch.float32).reshape(2, 4, 2, 2) / 10 - 0.8
    noisy, timesteps, target = noise_and_target(ddpm(kind), z0, torch.Generator().manual_seed(3))
    draws = torch.Generator().manual_seed(3)
    noise = torch.randn(z0.shape, generator=draws)  # drawn first, then the timesteps
    t = torch.randint(0, T, (2,), generator=draws)
    assert torch.equal(timesteps, t)
    abar = sd_alphas_cumprod()[t].view(2, 1, 1, 1)
    torch.testing.assert_close(noisy, abar.sqrt() * z0 + (1 - abar).sqrt() * noise)  # DDPM eq. 4
    expected = {"epsilon": noise, "v_prediction": abar.sqrt() * noise - (1 - abar).sqrt() * z0, "sample": z0}[kind]
    torch.testing.assert_close(target, expected)


def test_per_example_mse_by_hand():
    prediction = torch.tensor([[[[1.0, 2.0]]], [[[0.0, 0.0]]]])  # (2, 1, 1, 2)
    target = torch.tensor([[[[0.0, 0.0]]], [[[3.0, -1.0]]]])
    torch.testing.assert_close(per_example_mse(prediction, target), torch.tensor([(1 + 4) / 2, (9 + 1) / 2]))


def test_min_snr_weights_by_hand():
    scheduler = ddpm("epsilon")
    t = torch.tensor([0, 100, 500, 999])
    abar = sd_alphas_cumprod()[t]
    snr = abar / (1 - abar)
    expected = torch.tensor([min(float(s), 5.0) / float(s) for s in snr])
    torch.testing.assert_close(min_snr_weights(scheduler, t, 5.0), expected)
    assert expected[0] < 0.01 and expected[-1] == 1.0  # clean steps are down-weighted, noisy ones kept
    torch.testing.assert_close(min_snr_weights(scheduler, t, 0.0), torch.ones(4))
    prediction, target = torch.zeros(4, 1, 1, 1), torch.tensor([1.0, 2.0, 3.0, 4.0]).view(4, 1, 1, 1)
    weighted = min_snr_mse(prediction, target, scheduler, t, 5.0)
    assert float(weighted) == pytest.approx(float((expected * torch.tensor([1.0, 4.0, 9.0, 16.0])).mean()), rel=1e-6)


# ----------------------------------------------------------------------------- DreamBooth with prior preservation


@pytest.mark.parametrize("weight", [1.0, 2.5])
def test_dreambooth_loss_is_instance_plus_weighted_prior_by_hand(tiny_sd, tmp_path, weight):
    from consistent_diffusion.training.dreambooth import DreamBoothConfig, DreamBoothTask
    from consistent_diffusion.training.loop import step_generator

    config = DreamBoothConfig(out=tmp_path / "run", instance_dir=instance_folder(tmp_path), batch_size=2,
                              instance_prompt="a photo of sks emoji", class_prompt="an emoji", prior_preservation=True,
                              prior_loss_weight=weight, num_class_images=2, class_steps=2, progress=False)
    task = DreamBoothTask(tiny_sd, config)
    with torch.no_grad():
        loss, logs = task.loss(0, step_generator(7, 0), CPU)
        draws = step_generator(7, 0)
        latents = []
        for cache in (task.instance_latents, task.class_latents):
            rows = torch.randint(0, cache.mean.shape[0], (2,), generator=draws)
            noise = torch.randn(cache.mean[rows].shape, generator=draws)
            latents.append((cache.mean[rows] + cache.std[rows] * noise) * cache.scaling_factor)  # z ~ q(z|x), scaled
        z0 = torch.cat(latents)
        eps = torch.randn(z0.shape, generator=draws)
        t = torch.randint(0, T, (4,), generator=draws)
        abar = sd_alphas_cumprod()[t].view(4, 1, 1, 1)
        embeds, _ = encode_text(tiny_sd, ["a photo of sks emoji"] * 2 + ["an emoji"] * 2)
        pred = tiny_sd.unet(abar.sqrt() * z0 + (1 - abar).sqrt() * eps, t, encoder_hidden_states=embeds).sample
        mse = ((pred - eps) ** 2).mean(dim=(1, 2, 3))
    instance, prior = mse[:2].mean(), mse[2:].mean()
    assert float(loss) == pytest.approx(float(instance + weight * prior), rel=1e-5)  # Ruiz et al. eq. 2
    assert logs["prior_loss"] == pytest.approx(float(prior), rel=1e-5) and float(prior) > 0


# ----------------------------------------------------------------------------- the embedded recipe's terms


def test_vae_loss_l1_mse_kl_by_hand():
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    from consistent_diffusion.training.recipes.embedded import vae_loss

    pixels = torch.tensor([0.5, -0.5, 1.0, 0.0]).view(1, 1, 2, 2).repeat(1, 3, 1, 1)  # D = 12
    reconstruction = pixels + torch.tensor([0.1, -0.2, 0.0, 0.3]).view(1, 1, 2, 2)
    mean, logvar = torch.tensor([0.5, -1.0]).view(1, 2, 1, 1), torch.tensor([0.0, math.log(4.0)]).view(1, 2, 1, 1)
    posterior = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))
    loss, parts = vae_loss(reconstruction, pixels, posterior, mse_weight=2.0, kl_weight=0.5)
    l1, mse = (0.1 + 0.2 + 0.0 + 0.3) / 4, (0.01 + 0.04 + 0.0 + 0.09) / 4
    kl = 0.5 * ((0.25 + 1 - 1 - 0) + (1.0 + 4 - 1 - math.log(4.0)))  # 0.5 sum(mu^2 + var - 1 - log var)
    assert parts["l1"] == pytest.approx(l1) and parts["mse"] == pytest.approx(mse)
    assert parts["kl"] == pytest.approx(kl / 12, rel=1e-5)
    assert float(loss) == pytest.approx(l1 + 2.0 * mse + 0.5 * kl / 12, rel=1e-5)
    decoder_loss, decoder_parts = vae_loss(reconstruction, pixels, None, mse_weight=2.0)  # decoder fine-tune
    assert float(decoder_loss) == pytest.approx(l1 + 2.0 * mse) and "kl" not in decoder_parts


def test_caption_dropout_by_hand():
    from consistent_diffusion.training.recipes.embedded import drop_captions

    ids = torch.arange(1, 201)
    dropped = drop_captions(ids, torch.Generator().manual_seed(5), 0.3, empty_id=0)
    u = torch.rand(200, generator=torch.Generator().manual_seed(5))
    assert torch.equal(dropped, torch.where(u < 0.3, torch.zeros_like(ids), ids))
    assert 30 < int((dropped == 0).sum()) < 90 and torch.equal(ids, torch.arange(1, 201))  # input untouched


def zero_snr_alphas_cumprod() -> torch.Tensor:
    """abar_t of that schedule rescaled to zero terminal SNR, by hand (Lin et al. 2024, Algorithm 1):
    shift sqrt(abar) so its last value is 0, scale it so its first value is unchanged."""
    root = sd_alphas_cumprod().sqrt().double()
    first, last = root[0].clone(), root[-1].clone()
    return (((root - last) * first / (first - last)) ** 2).float()


def test_min_snr_weights_at_zero_terminal_snr():
    from diffusers import DDPMScheduler

    t = torch.tensor([0, 500, 990, 999])
    for kind in ("epsilon", "v_prediction", "sample"):
        scheduler = DDPMScheduler(num_train_timesteps=T, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  prediction_type=kind, rescale_betas_zero_snr=True)
        torch.testing.assert_close(scheduler.alphas_cumprod, zero_snr_alphas_cumprod(), atol=1e-6, rtol=1e-4)
        weights = min_snr_weights(scheduler, t, 5.0)
        assert torch.isfinite(weights).all(), kind
        abar = scheduler.alphas_cumprod[t]
        snr = abar / (1 - abar)
        expected = {"epsilon": torch.clamp(snr, max=5.0) / snr.clamp(min=1e-30),
                    "v_prediction": torch.clamp(snr + 1, max=6.0) / (snr + 1),
                    "sample": torch.clamp(snr, max=5.0)}[kind]
        expected[snr == 0] = {"epsilon": 1.0, "v_prediction": 1.0, "sample": 0.0}[kind]
        torch.testing.assert_close(weights, expected)
        if kind == "v_prediction":  # the terminal step, where the text alone sets layout and colour, is trained
            assert float(weights[-1]) == 1.0


def test_unet_stage_loss_is_min_snr_v_mse_at_zero_terminal_snr_by_hand(tmp_path):
    from consistent_diffusion.training.recipes.embedded import UNetConfig, UNetTask, preset

    cache = tmp_path / "cache"
    cache.mkdir()
    torch.save({"latents": torch.randn(6, 4, 4, 4, generator=torch.Generator().manual_seed(0)),
                "rows": torch.arange(6), "caption_ids": torch.tensor([0, 1, 2, 0, 1, 2]),
                "val_mask": torch.tensor([False] * 4 + [True] * 2), "scaling_factor": 0.5}, cache / "latents.pt")
    torch.save({"captions": ["a", "b", ""], "states": torch.randn(3, 8, 384, generator=torch.Generator().manual_seed(1)),
                "empty_id": 2, "max_length": 8}, cache / "text.pt")
    config = preset("tiny", tmp_path, tmp_path / "run")
    config.unet = UNetConfig(channels=(32, 64), heads=2, steps=4, batch=3, caption_dropout=0.5)
    task = UNetTask(config, cache)
    unet = task.modules["unet"]
    with torch.no_grad():
        loss, _ = task.loss(0, torch.Generator().manual_seed(9), CPU)
        draws = torch.Generator().manual_seed(9)
        rows = task.train_rows[torch.randint(0, 4, (3,), generator=draws)]
        z0 = task.latents[rows]
        eps, t = torch.randn(z0.shape, generator=draws), torch.randint(0, T, (3,), generator=draws)
        ids = task.caption_ids[rows].clone()
        ids[torch.rand(3, generator=draws) < 0.5] = 2
        abar = zero_snr_alphas_cumprod()[t].view(3, 1, 1, 1)
        pred = unet(abar.sqrt() * z0 + (1 - abar).sqrt() * eps, t, encoder_hidden_states=task.states[ids]).sample
        v = abar.sqrt() * eps - (1 - abar).sqrt() * z0  # Salimans & Ho 2022, sec. 4
        snr = (abar / (1 - abar)).flatten()
        expected = (((pred - v) ** 2).mean(dim=(1, 2, 3)) * torch.clamp(snr + 1, max=6.0) / (snr + 1)).mean()
    torch.testing.assert_close(task.latents, torch.load(cache / "latents.pt")["latents"] * 0.5)  # scaled latents
    assert float(loss) == pytest.approx(float(expected), rel=1e-4)


# ----------------------------------------------------------------------------- the loop's options on a toy task


class LineTask(Task):
    """Fit y = 3 x - 1 with one linear unit; validation reports the weight."""

    result_name = "line"

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.modules["line"] = torch.nn.Linear(1, 1)
        self.seen_progress: list[float] = []

    def loss(self, step, generator, device):
        self.seen_progress.append(self.progress)
        x = torch.randn(8, 1, generator=generator)
        return ((self.forward_module("line")(x) - (3 * x - 1)) ** 2).mean(), {"x0": float(x[0, 0])}

    def validate(self, step, folder):
        return {"weight": round(float(self.modules["line"].weight), 6)}

    def export(self, folder):
        torch.save(self.modules["line"].state_dict(), folder / "line.pt")


def line_config(tmp_path, name: str, **overrides) -> LoopConfig:
    options = dict(out=tmp_path / name, steps=6, learning_rate=0.1, checkpoint_every=3, progress=False,
                   lr_schedule="cosine", lr_warmup_steps=2)
    return LoopConfig(**(options | overrides))


def test_loop_ema_pause_resume_budget_and_validation(tmp_path):
    straight_task = LineTask()
    straight = run_training(straight_task, line_config(tmp_path, "straight", ema_decay=0.5), "line")
    log = [json.loads(line) for line in (tmp_path / "straight" / "log.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in log if "lr" in r]
    expected_lrs = [0.1 * min(1.0, (s + 1) / 2) * (0.1 + 0.45 * (1 + math.cos(math.pi * s / 6))) for s in range(6)]
    assert lrs == pytest.approx(expected_lrs) and straight_task.seen_progress == pytest.approx([s / 6 for s in range(6)])
    assert [r["step"] for r in log if "val" in r] == [3, 6]
    exported = torch.load(straight.result / "line.pt")
    ema = load_checkpoint(list_checkpoints(tmp_path / "straight")[-1][1])["ema"]["line"]
    torch.testing.assert_close(exported["weight"], ema["weight"])  # the result holds the EMA weights

    paused = run_training(LineTask(), line_config(tmp_path, "resumed", ema_decay=0.5, stop_after_steps=2), "line")
    assert paused.stopped and paused.step == 2 and paused.result is None
    resumed = run_training(LineTask(), line_config(tmp_path, "resumed", ema_decay=0.5, resume=True), "line")
    assert resumed.step == 6 and len(resumed.losses) == 4
    assert torch.equal(torch.load(resumed.result / "line.pt")["weight"], exported["weight"])  # bit-for-bit

    timed = run_training(LineTask(), line_config(tmp_path, "timed", max_minutes=1e-9), "line")
    assert timed.step == 1 and not timed.stopped and timed.result is not None  # the wall-time budget ended it


def test_a_handoff_carries_step_weights_and_ema_in_float16_and_restarts_the_warm_up(tmp_path):
    from consistent_diffusion.training.checkpoints import load_handoff, write_handoff

    first = run_training(LineTask(), line_config(tmp_path, "first", ema_decay=0.5, stop_after_steps=3), "line")
    assert first.stopped and first.step == 3
    checkpoint = load_checkpoint(list_checkpoints(tmp_path / "first")[-1][1])
    path = write_handoff(tmp_path / "first", tmp_path / "moved" / "line.handoff.pt")
    handoff = load_handoff(path, "line")
    assert handoff["step"] == 3 and "optimizer" not in handoff
    for part in ("trainable", "ema"):
        saved = handoff[part]["line"]["weight"]
        assert saved.dtype == torch.float16
        torch.testing.assert_close(saved.float(), checkpoint[part]["line"]["weight"], atol=1e-3, rtol=1e-3)
    with pytest.raises(ConsistentDiffusionError, match="not 'other'"):
        load_handoff(path, "other")
    (tmp_path / "junk.pt").write_bytes(b"not a file torch wrote")
    with pytest.raises(ConsistentDiffusionError, match="unreadable"):
        load_handoff(tmp_path / "junk.pt", "line")

    task = LineTask()
    second = run_training(task, line_config(tmp_path, "second", ema_decay=0.5, warm_start=path), "line")
    assert second.step == 6 and len(second.losses) == 3 and task.seen_progress == pytest.approx([3 / 6, 4 / 6, 5 / 6])
    log = [json.loads(line) for line in (tmp_path / "second" / "log.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in log if "lr" in r]  # warm-up restarts at the hand-off step; the cosine goes on
    expected = [0.1 * min(1.0, (s - 3 + 1) / 2) * (0.1 + 0.45 * (1 + math.cos(math.pi * s / 6))) for s in (3, 4, 5)]
    assert lrs == pytest.approx(expected)
    straight = run_training(LineTask(), line_config(tmp_path, "straight", ema_decay=0.5), "line")
    done, reference = torch.load(second.result / "line.pt")["weight"], torch.load(straight.result / "line.pt")["weight"]
    assert not torch.equal(done, reference)  # a warm restart, not a resume (fresh AdamW moments)...
    assert abs(float(done) - float(reference)) < 0.5  # ...that still ends near the uninterrupted run


def test_pause_after_minutes_pauses_the_session_and_resume_finishes(tmp_path):
    paused = run_training(LineTask(), line_config(tmp_path, "run", pause_after_minutes=1e-9), "line")
    assert paused.stopped and paused.step == 1 and paused.result is None
    resumed = run_training(LineTask(), line_config(tmp_path, "run", resume=True), "line")
    assert resumed.step == 6 and resumed.result is not None


def test_ema_update_by_hand():
    task = LineTask()
    ema = EMA(task, decay=0.999)
    start = ema.shadow["line"]["weight"].clone()
    with torch.no_grad():
        task.modules["line"].weight.fill_(2.0)
    ema.update(task, step=0)  # warm-up decay min(0.999, 1 / 10) = 0.1
    torch.testing.assert_close(ema.shadow["line"]["weight"], 0.1 * start + 0.9 * 2.0)
    ema.update(task, step=10_000)  # decay 0.999
    torch.testing.assert_close(ema.shadow["line"]["weight"], 0.999 * (0.1 * start + 0.9 * 2.0) + 0.001 * 2.0)
