"""NoiseMapScheduler: plugs the inversion math into any pipeline's own denoising loop.

A DDIMScheduler swapped into the pipeline for one call. Its ``step`` either *records* noise
maps (inversion), *replays* them (reconstruction, editing), or is the plain DDIM step; and it
can *pin* batch rows to fixed trajectories (a real StyleAligned reference follows its
inversion). So the UNet is called once per step with the conditional and unconditional halves
batched, and SD/SDXL conditioning comes from the pipeline itself.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DDIMScheduler

from consistent_diffusion.core.errors import ConfigError
from consistent_diffusion.methods.inversion.math import ddpm_step, next_timestep, noise_map


class NoiseMapScheduler(DDIMScheduler):
    """DDIMScheduler whose ``step`` records or replays edit-friendly noise maps.

    record mode (inversion): ``targets`` = xs drawn by eq. 6; each step stores z_t (eq. 5) and
    returns ``mu_t + sigma_t z_t``, which is the drawn x_{t-1} up to one float rounding, so the
    next UNet call sees the paper's x_{t-1} and a replay retraces the same operations exactly.
    replay mode (sampling): ``noise_maps`` = zs; each step is mu_t + sigma_t z_t with the stored
    z_t (eta from the inversion), broadcast over the batch. Without either: the plain DDIM step
    (diffusers' own, with the call's ``eta`` and generators).
    In both noise-map modes a step lands on the schedule's next timestep (``math.next_timestep``).
    ``skip``: the first ``skip`` timesteps are hidden from the pipeline (editing from a step);
    ``stop``: the pipeline runs only up to (not including) step ``stop`` of the full schedule.
    Pins (``pin``/``unpin``): after step ``i`` a pinned row is set to ``trajectory[i + 1]``.
    """

    def configure(
        self,
        *,
        eta: float = 1.0,
        targets: torch.Tensor | None = None,
        noise_maps: torch.Tensor | None = None,
        skip: int = 0,
        stop: int | None = None,
    ) -> NoiseMapScheduler:
        """Set the mode (see the class docstring); clears pins and recordings. Returns self."""
        self.nm_eta = eta
        self.nm_targets = targets
        self.nm_noise_maps = noise_maps
        self.nm_skip = skip
        self.nm_stop = stop
        self._pins: dict[int, torch.Tensor] = {}
        self.nm_recorded: list[torch.Tensor] = []
        self.nm_landed: list[torch.Tensor] = []
        self.full_timesteps: torch.Tensor | None = None
        return self

    # -- the public pin API -------------------------------------------------------------------

    @property
    def skip(self) -> int:
        """Leading steps of the full schedule the pipeline does not run."""
        return self.nm_skip

    @property
    def noise_maps(self) -> torch.Tensor | None:
        """The replayed noise maps zs (N, C, h, w), or None."""
        return self.nm_noise_maps

    @property
    def pins(self) -> dict[int, torch.Tensor]:
        """Pinned rows -> their trajectories (a copy)."""
        return dict(self._pins)

    def pin(self, row: int, trajectory: torch.Tensor) -> None:
        """Make batch row ``row`` follow ``trajectory`` (N + 1, C, h, w), indexed by the full
        schedule: after step ``i`` the row is set to ``trajectory[i + 1]``."""
        self._pins[int(row)] = trajectory

    def unpin(self, row: int | None = None) -> None:
        """Release ``row`` (all rows when None)."""
        if row is None:
            self._pins.clear()
        else:
            self._pins.pop(int(row), None)

    def shift_pins(self, offset: int) -> None:
        """Rows were prepended (offset > 0) or removed (< 0) at the front of the batch: move the pins."""
        self._pins = {row + offset: trajectory for row, trajectory in self._pins.items()}

    def leading_part(self) -> NoiseMapScheduler:
        """A scheduler that runs only the steps this one skips (0 .. skip - 1), same mode and eta,
        no pins: what brings a row from x_T to where this one's batch starts."""
        part = NoiseMapScheduler.from_config(self.config)
        return part.configure(eta=self.nm_eta, targets=self.nm_targets, noise_maps=self.nm_noise_maps,
                              stop=self.nm_skip)

    def schedule(self, num_inference_steps: int) -> torch.Tensor:
        """The full timestep schedule for ``num_inference_steps`` (sets it, as the pipeline will)."""
        self.set_timesteps(num_inference_steps)
        return self.full_timesteps

    # -- diffusers interface ------------------------------------------------------------------

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        super().set_timesteps(num_inference_steps, device=device)
        if self.config.prediction_type == "epsilon" and bool((self.alphas_cumprod.cpu()[self.timesteps.cpu()] == 0).any()):
            raise ConfigError(
                "this schedule reaches alpha_bar_t = 0 (zero terminal SNR), where an epsilon-predicting model "
                "cannot give x0: use prediction_type='v_prediction' (Lin et al. 2024) or another timestep_spacing"
            )
        self.full_timesteps = self.timesteps.clone()
        self.timesteps = self.timesteps[self.nm_skip : self.nm_stop]

    def step_index_of(self, timestep: Any) -> int:
        """Position of ``timestep`` in the full (unskipped) schedule."""
        matches = (self.full_timesteps.to("cpu") == int(timestep)).nonzero()
        if len(matches) != 1:
            raise RuntimeError(f"timestep {int(timestep)} is not in the inversion schedule")
        return int(matches[0, 0])

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Any,
        sample: torch.Tensor,
        eta: float = 0.0,
        generator: Any = None,
        return_dict: bool = True,
        **_: Any,
    ) -> Any:
        """One step (see the class docstring); ``eta``/``generator`` only serve the plain DDIM step."""
        i = self.step_index_of(timestep)
        t_prev = next_timestep(self, timestep)
        if self.nm_targets is not None:
            x_prev = self.nm_targets[i + 1].unsqueeze(0).to(sample)
            z = noise_map(self, model_output, timestep, sample, x_prev, self.nm_eta, t_prev)
            self.nm_recorded.append(z)
            # Continue from the sampler's own landing point mu + sigma * z (x_{t-1} up to one
            # rounding): replaying z then retraces this trajectory operation for operation.
            prev = ddpm_step(self, model_output, timestep, sample, z, self.nm_eta, t_prev)
            self.nm_landed.append(prev)
        elif self.nm_noise_maps is not None:
            z = self.nm_noise_maps[i].unsqueeze(0).to(sample)
            prev = ddpm_step(self, model_output, timestep, sample, z, self.nm_eta, t_prev)
        else:
            prev = DDIMScheduler.step(self, model_output, timestep, sample, eta=eta, generator=generator).prev_sample
        for row, trajectory in self._pins.items():
            prev[row] = trajectory[i + 1].to(prev)
        return (prev, None) if not return_dict else _StepOutput(prev)


@dataclass
class _StepOutput:
    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


def noise_map_scheduler(scheduler: Any, *, exact: bool = True) -> NoiseMapScheduler:
    """A NoiseMapScheduler over a scheduler's (or config dict's) training schedule.

    Betas, timestep spacing and prediction type are kept. With ``exact`` (noise maps: inversion
    and editing) ``set_alpha_to_one`` is forced to False (with it, sigma of the last step is 0
    and no noise map could correct it; the reference implementation zeroes that map and loses
    exactness) and clipping/thresholding are off (latents are not in [-1, 1]). Without it (only
    pinning rows over plain DDIM steps) the given config is kept as is.
    """
    source = scheduler if isinstance(scheduler, dict) else dict(scheduler.config)
    config = {k: v for k, v in source.items() if not k.startswith("_")}
    if exact:
        config.update(set_alpha_to_one=False, thresholding=False, clip_sample=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return NoiseMapScheduler.from_config(config).configure()
