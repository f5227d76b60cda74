"""Frechet distance between two feature sets (the FID formula, Heusel et al. 2017, eq. 6).

d^2 = ||mu_a - mu_b||^2 + Tr(C_a) + Tr(C_b) - 2 Tr((C_a^1/2 C_b C_a^1/2)^1/2), with means mu and
covariances C of Gaussians fitted to each set. Tr((C_a C_b)^1/2) is computed as the sum of the
square roots of the eigenvalues of the symmetric C_a^1/2 C_b C_a^1/2 (same spectrum, no complex
matrix square root). The features are whatever an extractor gives (FID proper: Inception pool3).
"""

from __future__ import annotations

import torch

from consistent_diffusion.core.errors import ConfigError


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to features a (N, D) and b (M, D), N, M >= 2, in float64."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or len(a) < 2 or len(b) < 2:
        raise ConfigError(f"need two feature sets (N >= 2, D) of one width, got {tuple(a.shape)} and {tuple(b.shape)}")
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    width = a.shape[1]
    cov_a, cov_b = torch.cov(a.T).reshape(width, width), torch.cov(b.T).reshape(width, width)  # (D, D), D = 1 too
    vals, vecs = torch.linalg.eigh(cov_a)
    sqrt_a = vecs @ torch.diag(vals.clamp_min(0).sqrt()) @ vecs.T
    middle = torch.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * middle)
