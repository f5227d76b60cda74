"""Edit-friendly DDPM inversion and editing (Huberman-Spiegelglas, Kulikov, Michaeli, CVPR 2024).

The DDPM sampler is ``x_{t-1} = mu_t(x_t) + sigma_t z_t``. Edit-friendly inversion
draws every ``x_t`` *independently* from the clean latent ``x_0`` (eq. 6,
``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps_t``) and extracts the noise maps that make the
sampler pass through exactly those points (eq. 5, ``z_t = (x_{t-1} - mu_t(x_t)) / sigma_t``).
Re-running the sampler from ``x_T`` with the same prompt, guidance and those ``z_t`` therefore
gives back ``x_0`` (to float rounding), for any number of steps; re-running it with another
prompt, from step ``skip``, edits the image while keeping its structure (section 5).

The package:

- ``math``: the sampler formulas (``ddim_step``, the one helper with the scheduler arithmetic,
  well-defined at zero terminal SNR too (``direction_coefficient``);
  ``ddpm_mean``/``ddpm_std``/``ddpm_step``, ``noise_map`` (eq. 5), ``sample_trajectory`` (eq. 6)).
- ``scheduler``: ``NoiseMapScheduler``, a DDIMScheduler swapped into the pipeline's own loop for
  one call that records or replays the noise maps, with a public pin API
  (``pin``/``unpin``/``shift_pins``) for rows that follow a fixed trajectory.
- ``record``: the saved ``Inversion`` (``save``/``load``) and its folder format.
- ``method``: ``invert``, ``edit``, ``reconstruct`` and the ``ddpm_edit`` method (``DdpmEdit``).
- ``folders``: ``invert_to_folder`` / ``edit_to_folder`` (the CLI's output folders).

Spaces: ``x0``/``xs`` are VAE latents scaled by ``vae.config.scaling_factor`` (what the UNet
sees), shape (1, C, H/f, W/f); images are pixels in [-1, 1] (see ``models.vae``).
"""

from consistent_diffusion.methods.inversion.folders import InvertedFolder, edit_to_folder, invert_to_folder
from consistent_diffusion.methods.inversion.math import (
    ddim_step,
    ddpm_mean,
    ddpm_std,
    ddpm_step,
    direction_coefficient,
    next_timestep,
    noise_map,
    sample_trajectory,
)
from consistent_diffusion.methods.inversion.method import (
    DdpmEdit,
    edit,
    invert,
    match_inversion_size,
    reconstruct,
)
from consistent_diffusion.methods.inversion.record import (
    FORMAT_VERSION,
    INVERSION_META,
    INVERSION_TENSORS,
    Inversion,
    inversion_reference,
)
from consistent_diffusion.methods.inversion.scheduler import NoiseMapScheduler, noise_map_scheduler

__all__ = [
    "FORMAT_VERSION",
    "INVERSION_META",
    "INVERSION_TENSORS",
    "DdpmEdit",
    "Inversion",
    "InvertedFolder",
    "NoiseMapScheduler",
    "ddim_step",
    "ddpm_mean",
    "ddpm_std",
    "ddpm_step",
    "direction_coefficient",
    "edit",
    "edit_to_folder",
    "invert",
    "invert_to_folder",
    "inversion_reference",
    "match_inversion_size",
    "next_timestep",
    "noise_map",
    "noise_map_scheduler",
    "reconstruct",
    "sample_trajectory",
]
