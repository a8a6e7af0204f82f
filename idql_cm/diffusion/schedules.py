"""Noise-level grids (σ = t, the EDM convention)."""

from __future__ import annotations

import torch


def karras_sigmas(
    n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0, device=None
) -> torch.Tensor:
    """Karras et al. 2022, eq. 5: ``σ_i = (σ_min^{1/ρ} + i/n·(σ_max^{1/ρ} − σ_min^{1/ρ}))^ρ``, i = 0..n.

    Ascending ``[n+1]`` float32 (computed in float64), ``σ_0 = σ_min`` and ``σ_n = σ_max``; unlike Karras et al.
    no σ = 0 is appended: samplers stop at σ_min.
    """
    ramp = torch.linspace(0.0, 1.0, n + 1, dtype=torch.float64, device=device)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return ((lo + ramp * (hi - lo)) ** rho).float()


def snap_to_grid(levels: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Each of ``levels`` replaced by the point of ``grid`` nearest to it in log σ (same order, same length).

    A consistency model trained on a fixed grid (CD: 18 intervals) has only seen those σ: its time embedding (Fourier
    scale 16) is not trained between them, so sampling must re-noise on grid points (docs/quality.md measures it).
    """
    dist = (levels.double().log()[:, None] - grid.double().log()[None, :]).abs()
    return grid[dist.argmin(dim=1)]
