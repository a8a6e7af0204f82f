"""Conditional toy action distributions whose modes are known, for measuring generative-policy quality.

Each :class:`Toy` maps a discrete condition (given to the policy as a one-hot observation) to a mixture of isotropic
2-D Gaussians in the action box [-1, 1]²: the policy must put its samples on the modes of *its* condition, in the
right proportions, and not between them. :data:`TOYS` holds the three designs of ``make quality``:

* ``counts``: a different number of equal modes per condition (4 on a square, 3 on a triangle, 2 on a line);
* ``unequal``: modes of unequal width (std 0.02 to 0.05) and weight (0.6 / 0.3 / 0.1);
* ``far``: two tight modes per condition far apart relative to σ_data = 0.5 (centres 2.4 apart, std 0.03).

Every std is at most 0.05, so a true sample lies within :data:`RADIUS` = 0.15 of its mode's centre with probability
≥ 0.989 (3σ in 2-D): precision near 1 is achievable, and a sampler that averages modes cannot reach it.
:func:`write_toy_dataset` writes a toy as a D4RL-layout HDF5 file, so the real data module and training stages
(``idql-cm fit``) train on it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from idql_cm.fileio import atomic_path

__all__ = ["BC_TOYS", "RADIUS", "TOYS", "Mode", "Toy", "write_toy_dataset"]

#: "near a mode" = within this distance of its centre (the precision radius of ``make quality``)
RADIUS = 0.15


@dataclass(frozen=True)
class Mode:
    centre: tuple[float, float]
    std: float
    weight: float  # relative; normalised per condition


@dataclass(frozen=True)
class Toy:
    """A conditional mixture: ``conditions[c]`` lists the modes of condition c (observation = one-hot of c)."""

    name: str
    description: str
    conditions: tuple[tuple[Mode, ...], ...]
    paid: tuple[int, ...] | None = None  # per condition, the mode the reward pays (None: rewards are 0)

    @property
    def obs_dim(self) -> int:
        return len(self.conditions)

    def centres(self, c: int) -> np.ndarray:  # [M, 2]
        return np.array([m.centre for m in self.conditions[c]], dtype=np.float64)

    def weights(self, c: int) -> np.ndarray:  # [M], sums to 1
        w = np.array([m.weight for m in self.conditions[c]], dtype=np.float64)
        return w / w.sum()

    def obs(self, c: int, n: int) -> np.ndarray:  # [n, obs_dim] one-hot
        o = np.zeros((n, self.obs_dim), dtype=np.float32)
        o[:, c] = 1.0
        return o

    def sample(self, c: int, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` actions ``[n, 2]`` of condition ``c`` (clipped to the action box, which no mode leaves by 3σ)."""
        modes = self.conditions[c]
        k = rng.choice(len(modes), size=n, p=self.weights(c))
        centre = self.centres(c)[k]
        std = np.array([m.std for m in modes])[k][:, None]
        return np.clip(centre + std * rng.standard_normal((n, 2)), -1.0, 1.0).astype(np.float32)


    def reward(self, c: int, act: np.ndarray) -> np.ndarray:
        """``[n]`` rewards of actions ``[n, 2]`` under condition ``c``: ``exp(−‖a − paid centre‖² / (2·0.3²))``, 1 on
        the paid mode and ≈ 0 on the others (a toy without a paid mode: 0)."""
        if self.paid is None:
            return np.zeros(len(act), dtype=np.float32)
        d2 = ((act - self.centres(c)[self.paid[c]]) ** 2).sum(-1)
        return np.exp(-d2 / (2 * 0.3**2)).astype(np.float32)


def _ring(n: int, radius: float, start_deg: float, std: float) -> tuple[Mode, ...]:
    return tuple(Mode((radius * math.cos(math.radians(start_deg + 360 * i / n)),
                       radius * math.sin(math.radians(start_deg + 360 * i / n))), std, 1.0) for i in range(n))


TOYS: dict[str, Toy] = {
    "counts": Toy(
        "counts", "4 / 3 / 2 equal modes (std 0.05) for three conditions",
        (_ring(4, 0.6, 45.0, 0.05), _ring(3, 0.55, 90.0, 0.05),
         (Mode((-0.5, 0.0), 0.05, 1.0), Mode((0.5, 0.0), 0.05, 1.0))),
    ),
    "unequal": Toy(
        "unequal", "3 modes of weight 0.6 / 0.3 / 0.1 and std 0.02 / 0.035 / 0.05; 2 modes of weight 0.8 / 0.2",
        ((Mode((-0.5, -0.4), 0.02, 0.6), Mode((0.5, -0.4), 0.035, 0.3), Mode((0.0, 0.5), 0.05, 0.1)),
         (Mode((-0.45, 0.45), 0.05, 0.8), Mode((0.45, -0.45), 0.02, 0.2))),
    ),
    "far": Toy(
        "far", "2 modes (std 0.03) at opposite corners, 2.4 apart (4.8 σ_data), crossed between the conditions",
        ((Mode((-0.85, -0.85), 0.03, 1.0), Mode((0.85, 0.85), 0.03, 1.0)),
         (Mode((-0.85, 0.85), 0.03, 1.0), Mode((0.85, -0.85), 0.03, 1.0))),
    ),
    "paid": Toy(
        "paid", "2 equal modes (std 0.04) 1.2 apart per condition; the reward pays one of them (a one-step bandit)",
        ((Mode((-0.6, 0.0), 0.04, 1.0), Mode((0.6, 0.0), 0.04, 1.0)),
         (Mode((0.0, -0.6), 0.04, 1.0), Mode((0.0, 0.6), 0.04, 1.0))),
        paid=(1, 0),
    ),
}

#: the toys of the quality benchmark's behaviour-cloning part (``paid`` is for critic guidance)
BC_TOYS = ("counts", "unequal", "far")


def write_toy_dataset(path: str | os.PathLike, toy: Toy, transitions: int = 50_000, seed: int = 0,
                      episode_len: int = 1000) -> Path:
    """Write ``transitions`` rows of ``toy`` (conditions in equal numbers, shuffled) as a D4RL-layout HDF5 file.

    Rewards are 0 and every ``episode_len`` rows end in a timeout (as HalfCheetah's do), so the file reads like any
    D4RL file; ``metadata/toy`` names the toy. A toy with a paid mode is a one-step bandit instead: every row is
    terminal and its reward is :meth:`Toy.reward` (so Q(s, a) = r). Written to a temporary name and renamed: never
    half-written.
    """
    import h5py

    rng = np.random.default_rng(seed)
    cond = rng.permutation(np.arange(transitions) % toy.obs_dim)
    obs = np.zeros((transitions, toy.obs_dim), dtype=np.float32)
    act = np.zeros((transitions, 2), dtype=np.float32)
    for c in range(toy.obs_dim):
        rows = np.flatnonzero(cond == c)
        obs[rows] = toy.obs(c, len(rows))
        act[rows] = toy.sample(c, len(rows), rng)
    rew = np.zeros(transitions, dtype=np.float32)
    for c in range(toy.obs_dim):
        rows = np.flatnonzero(cond == c)
        rew[rows] = toy.reward(c, act[rows])
    timeouts = (np.arange(transitions) % episode_len) == episode_len - 1
    terminals = np.full(transitions, toy.paid is not None)
    if toy.paid is not None:
        timeouts[:] = False
    path = Path(path)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("observations", data=obs)
        f.create_dataset("next_observations", data=np.roll(obs, -1, axis=0))
        f.create_dataset("actions", data=act)
        f.create_dataset("rewards", data=rew)
        f.create_dataset("terminals", data=terminals)
        f.create_dataset("timeouts", data=timeouts)
        f.create_dataset("metadata/toy", data=toy.name)
        f.create_dataset("metadata/seed", data=np.int64(seed))
    return path
