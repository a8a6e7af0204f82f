"""The IDQL residual MLP used as the behaviour network F of EDM and consistency models.

Architecture of IDQL (Hansen-Estruch et al. 2023, "IDQL: Implicit Q-Learning as an Actor-Critic Method with
Diffusion Policies", its LN-ResNet) as re-implemented by CleanDiffuser's ``IDQLMlp``, with the untrainable
Fourier time embedding of EDM / iCT (Song & Dhariwal 2023 recommend scale 0.02 instead of 16 for CT).
"""

from __future__ import annotations

import math

import torch
from torch import nn


class FourierEmbedding(nn.Module):
    """Fixed random Fourier features ``[cos(2π f c), sin(2π f c)]`` of the noise level ``c_noise``.

    The frequencies ``f ~ N(0, scale²)`` are drawn once (so they depend on the torch seed) and kept in the
    persistent buffer ``freqs``: they travel with checkpoints and are copied, not averaged, by the EMA.
    """

    def __init__(self, emb_dim: int, scale: float = 16.0):
        super().__init__()
        self.register_buffer("freqs", torch.randn(emb_dim // 2) * scale)

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:  # [B] -> [B, emb_dim]
        phase = 2 * math.pi * c_noise[:, None] * self.freqs
        return torch.cat([phase.cos(), phase.sin()], dim=-1)


class ResidualBlock(nn.Module):
    """``x + Linear(Mish(Linear(LayerNorm(Dropout(x)))))`` with inner width ``dim·expand``."""

    def __init__(self, dim: int, expand: int = 4, dropout: float = 0.1):
        super().__init__()
        self.body = nn.Sequential(
            nn.Dropout(dropout),
            nn.LayerNorm(dim),
            nn.Linear(dim, dim * expand),
            nn.Mish(),
            nn.Linear(dim * expand, dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class IDQLMlp(nn.Module):
    """Residual MLP ``F(x, c_noise, obs) -> [B, act_dim]`` (obs = the condition, x = the noisy action).

    ``config`` holds the constructor arguments (for checkpoints and the CD teacher compatibility check).
    With the defaults and obs_dim 17 / act_dim 6 it has 1 618 886 trainable parameters (+32 fixed freqs).
    """

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        emb_dim: int = 64,
        hidden_dim: int = 256,
        n_blocks: int = 3,
        expand: int = 4,
        dropout: float = 0.1,
        fourier_scale: float = 16.0,
        final_activation: bool = True,
    ):
        super().__init__()
        self.obs_dim, self.act_dim = obs_dim, act_dim
        self.config = dict(
            obs_dim=obs_dim,
            act_dim=act_dim,
            emb_dim=emb_dim,
            hidden_dim=hidden_dim,
            n_blocks=n_blocks,
            expand=expand,
            dropout=dropout,
            fourier_scale=fourier_scale,
            final_activation=final_activation,
        )
        self.time_emb = nn.Sequential(
            FourierEmbedding(emb_dim, fourier_scale),
            nn.Linear(emb_dim, 2 * emb_dim),
            nn.Mish(),
            nn.Linear(2 * emb_dim, emb_dim),
        )
        self.inp = nn.Linear(act_dim + emb_dim + obs_dim, hidden_dim)
        self.blocks = nn.Sequential(*(ResidualBlock(hidden_dim, expand, dropout) for _ in range(n_blocks)))
        # The reference's IDQLMlp has no activation here (CleanDiffuser issue #26); IDQL has one, so do we.
        self.out = nn.Sequential(
            nn.Mish() if final_activation else nn.Identity(), nn.Linear(hidden_dim, act_dim)
        )

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
        h = self.inp(torch.cat([x, self.time_emb(c_noise), obs], dim=-1))
        return self.out(self.blocks(h))
