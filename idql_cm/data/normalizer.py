"""Observation normaliser (docs/design.md: CleanDiffuser's ``GaussianNormalizer``).

Per-dimension mean and *population* standard deviation (``np.std``, ddof 0) of the dataset observations; a
dimension whose std is 0 (a constant column) gets std 1; no epsilon. The same statistics normalise
``next_observations`` and, at evaluation, the environment's observations. The statistics travel in every checkpoint
as plain lists (``state_dict``).
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

__all__ = ["ObsNormalizer"]


class ObsNormalizer:
    """``normalize(x) = (x - mean) / std``, on NumPy arrays or torch tensors (result keeps the input's type,
    device and floating dtype).

    Args:
        mean: per-dimension mean, shape ``[obs_dim]``.
        std: per-dimension standard deviation, shape ``[obs_dim]``; must be positive (``from_data`` maps 0 → 1).
    """

    def __init__(self, mean, std):
        self.mean = np.asarray(mean, dtype=np.float64).reshape(-1)
        self.std = np.asarray(std, dtype=np.float64).reshape(-1)
        if self.mean.shape != self.std.shape:
            raise ValueError(f"ObsNormalizer: mean has shape {self.mean.shape}, std {self.std.shape}")
        if not (np.all(np.isfinite(self.mean)) and np.all(self.std > 0)):
            raise ValueError("ObsNormalizer: expected finite mean and positive std")
        self._torch_cache: dict[tuple, tuple] = {}

    @classmethod
    def from_data(cls, observations) -> ObsNormalizer:
        """Statistics of ``observations [N, obs_dim]`` (computed in float64)."""
        obs = np.asarray(observations)
        obs = obs.reshape(len(obs), -1)
        mean = obs.mean(axis=0, dtype=np.float64)
        std = obs.std(axis=0, dtype=np.float64)
        # std == 0 → 1 as the reference; a constant column can also leave a rounding-level std, hence the ptp test
        constant = (std == 0) | (obs.max(axis=0) == obs.min(axis=0))
        std[constant] = 1.0
        return cls(mean, std)

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    def _stats_like(self, x):
        key = (x.device, x.dtype)
        stats = self._torch_cache.get(key)
        if stats is None:
            import torch

            stats = (
                torch.as_tensor(self.mean, dtype=x.dtype, device=x.device),
                torch.as_tensor(self.std, dtype=x.dtype, device=x.device),
            )
            self._torch_cache[key] = stats
        return stats

    def normalize(self, x):
        """``(x - mean) / std`` along the last dimension."""
        if _is_tensor(x):
            mean, std = self._stats_like(x)
            return (x - mean) / std
        x = np.asarray(x)
        dtype = x.dtype if x.dtype.kind == "f" else np.float64
        return ((x - self.mean) / self.std).astype(dtype, copy=False)

    def unnormalize(self, x):
        """``x * std + mean`` along the last dimension."""
        if _is_tensor(x):
            mean, std = self._stats_like(x)
            return x * std + mean
        x = np.asarray(x)
        dtype = x.dtype if x.dtype.kind == "f" else np.float64
        return (x * self.std + self.mean).astype(dtype, copy=False)

    __call__ = normalize

    def state_dict(self) -> dict[str, list[float]]:
        """``{"mean": [...], "std": [...]}`` as plain Python floats (exact float64 round trip)."""
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> ObsNormalizer:
        return cls(state["mean"], state["std"])

    def __repr__(self) -> str:
        return f"ObsNormalizer(dim={self.dim})"


def _is_tensor(x) -> bool:
    torch = sys.modules.get("torch")  # no torch import for NumPy-only users
    return torch is not None and isinstance(x, torch.Tensor)
