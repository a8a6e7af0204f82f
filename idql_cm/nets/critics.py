"""IQL critics as in IDQL / CleanDiffuser (``IDQLQNet`` = twin Q, ``IDQLVNet`` = V): 2×256 MLPs with LayerNorm and Mish."""

from __future__ import annotations

import torch
from torch import nn


def _head(in_dim: int, hidden_dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim),
        nn.LayerNorm(hidden_dim),
        nn.Mish(),
        nn.Linear(hidden_dim, hidden_dim),
        nn.LayerNorm(hidden_dim),
        nn.Mish(),
        nn.Linear(hidden_dim, 1),
    )


class TwinQ(nn.Module):
    """Two independent Q heads on ``[obs, act]``; ``forward`` is their minimum (clipped double Q)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dim: int = 256):
        super().__init__()
        self.q1 = _head(obs_dim + act_dim, hidden_dim)
        self.q2 = _head(obs_dim + act_dim, hidden_dim)

    def both(self, obs: torch.Tensor, act: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        oa = torch.cat([obs, act], dim=-1)
        return self.q1(oa), self.q2(oa)

    def forward(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:  # [B, 1]
        return torch.minimum(*self.both(obs, act))


class ValueNet(nn.Module):
    """State value V(obs) -> [B, 1]."""

    def __init__(self, obs_dim: int, hidden_dim: int = 256):
        super().__init__()
        self.v = _head(obs_dim, hidden_dim)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.v(obs)
