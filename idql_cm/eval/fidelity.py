"""How well samples match a distribution whose modes are known (NumPy only).

* :func:`mode_stats`: precision (the share of samples within ``radius`` of a mode centre) and each mode's share of
  the samples (nearest centre, counted only when within ``radius``), to compare with the true weights.
* :func:`sliced_wasserstein`: the sliced 1-Wasserstein distance between two sample sets, the mean over random unit
  directions of the 1-D W1 between the projections (sorted samples, equal sizes): in action units, and blind to
  nothing the modes are (a sampler that averages modes, drops one or misweights them is far from the truth).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["ModeStats", "mode_stats", "sliced_wasserstein"]


@dataclass(frozen=True)
class ModeStats:
    precision: float  # share of samples within radius of some centre
    shares: tuple[float, ...]  # per mode: share of all samples that sit within radius of it (nearest centre)
    weights: tuple[float, ...]  # the true weights

    @property
    def min_share_ratio(self) -> float:
        """min over modes of share / true weight (1 = every mode at its true share; < 0.5 fails ``make quality``)."""
        return float(min(s / w for s, w in zip(self.shares, self.weights, strict=True)))


def mode_stats(samples: np.ndarray, centres: np.ndarray, weights: np.ndarray, radius: float) -> ModeStats:
    """``samples [n, d]`` against ``centres [M, d]`` with true ``weights [M]``."""
    samples = np.asarray(samples, dtype=np.float64)
    dist = np.linalg.norm(samples[:, None, :] - np.asarray(centres)[None], axis=-1)  # [n, M]
    near = dist.min(1) < radius
    counts = np.bincount(dist.argmin(1)[near], minlength=len(centres))
    n = max(len(samples), 1)
    return ModeStats(float(near.mean()) if len(samples) else 0.0, tuple(float(c / n) for c in counts),
                     tuple(float(w) for w in np.asarray(weights) / np.sum(weights)))


def sliced_wasserstein(a: np.ndarray, b: np.ndarray, n_proj: int = 256, seed: int = 0) -> float:
    """Sliced W1 between ``a [n, d]`` and ``b [n, d]`` (equal n) over ``n_proj`` random unit directions."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"sliced_wasserstein: expected equal shapes, found {a.shape} and {b.shape}")
    dirs = np.random.default_rng(seed).standard_normal((a.shape[1], n_proj))
    dirs /= np.linalg.norm(dirs, axis=0, keepdims=True)
    pa, pb = np.sort(a @ dirs, axis=0), np.sort(b @ dirs, axis=0)
    return float(np.abs(pa - pb).mean())
