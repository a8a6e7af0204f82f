"""Conditional toy action distributions whose modes are known, for measuring generative-policy quality.

Each :class:`Toy` maps a condition to a mixture of isotropic Gaussians in the action box [-1, 1]^d: the policy must
put its samples on the modes of *its* condition, in the right proportions, and not between them. A discrete toy
gives the condition as a one-hot observation; :class:`MovingToy` draws a continuous observation whose value moves
the modes, and is measured at a few fixed values of it. :func:`toy` builds a design for a data seed (another seed,
another mode layout); :data:`TOYS` holds seed 0 of each:

* ``counts``: a different number of equal modes per condition (4 on a square, 3 on a triangle, 2 on a line);
* ``unequal``: modes of unequal width (std 0.02 to 0.05) and weight (0.6 / 0.3 / 0.1);
* ``far``: two tight modes per condition far apart relative to σ_data = 0.5 (centres 2.4 apart, std 0.03);
* ``wide6``: 6-D actions (HalfCheetah's width), 2 / 3 / 4 modes per condition (std 0.03) at random points;
* ``narrow``: narrow modes (std 0.025) close together: 3 at 0.5 apart, 4 on a line 0.4 apart, 2 at 0.35 apart;
* ``moving``: a continuous observation x ∈ [-1, 1] turns 3 modes (std 0.04) around a circle (a half turn over the
  range of x); measured at x = -0.9, -0.45, 0, 0.45, 0.9, values the data never holds exactly.

Another data seed of ``counts`` / ``unequal`` turns each condition's modes by a random angle and shuffles the widths
and weights among them; of ``far``, puts its two modes at opposite points of the box's edge (1.7 to 2.4 apart) at a
random angle; the random toys draw their points afresh. Every std is at most 0.05 in 2-D and 0.03 in 6-D, so a true sample lies within
:data:`RADIUS` = 0.15 of its mode's centre with probability ≥ 0.989: precision near 1 is achievable, and a sampler
that averages modes cannot reach it (modes are at least 0.35 apart). :func:`write_toy_dataset` writes a toy as a
D4RL-layout HDF5 file, so the real data module and training stages (``idql-cm fit``) train on it.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from idql_cm.fileio import atomic_path

__all__ = ["BC_TOYS", "QUALITY_TOYS", "RADIUS", "TOYS", "Mode", "MovingToy", "Toy", "toy", "write_toy_dataset"]

#: "near a mode" = within this distance of its centre (the precision radius of ``make quality``)
RADIUS = 0.15


@dataclass(frozen=True)
class Mode:
    centre: tuple[float, ...]
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
    def num_conditions(self) -> int:
        """The conditions the toy is measured at."""
        return len(self.conditions)

    @property
    def obs_dim(self) -> int:
        return len(self.conditions)

    @property
    def act_dim(self) -> int:
        return len(self.conditions[0][0].centre)

    def centres(self, c: int) -> np.ndarray:  # [M, act_dim]
        return np.array([m.centre for m in self.conditions[c]], dtype=np.float64)

    def weights(self, c: int) -> np.ndarray:  # [M], sums to 1
        w = np.array([m.weight for m in self.conditions[c]], dtype=np.float64)
        return w / w.sum()

    def obs(self, c: int, n: int) -> np.ndarray:  # [n, obs_dim] one-hot
        o = np.zeros((n, self.obs_dim), dtype=np.float32)
        o[:, c] = 1.0
        return o

    def sample(self, c: int, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` actions ``[n, act_dim]`` of condition ``c`` (clipped to the action box, which no mode leaves by 3σ)."""
        return _mixture(self.conditions[c], self.weights(c), n, rng)

    def draw(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``n`` rows of the data: observations, actions and each row's condition (conditions in equal numbers,
        shuffled)."""
        cond = rng.permutation(np.arange(n) % self.num_conditions)
        obs = np.zeros((n, self.obs_dim), dtype=np.float32)
        act = np.zeros((n, self.act_dim), dtype=np.float32)
        for c in range(self.num_conditions):
            rows = np.flatnonzero(cond == c)
            obs[rows] = self.obs(c, len(rows))
            act[rows] = self.sample(c, len(rows), rng)
        return obs, act, cond

    def reward(self, c: int, act: np.ndarray) -> np.ndarray:
        """``[n]`` rewards of actions ``[n, act_dim]`` under condition ``c``: ``exp(−‖a − paid centre‖² / (2·0.3²))``,
        1 on the paid mode and ≈ 0 on the others (a toy without a paid mode: 0)."""
        if self.paid is None:
            return np.zeros(len(act), dtype=np.float32)
        d2 = ((act - self.centres(c)[self.paid[c]]) ** 2).sum(-1)
        return np.exp(-d2 / (2 * 0.3**2)).astype(np.float32)


def _mixture(modes: tuple[Mode, ...], weights: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    k = rng.choice(len(modes), size=n, p=weights)
    centre = np.array([m.centre for m in modes], dtype=np.float64)[k]
    std = np.array([m.std for m in modes])[k][:, None]
    return np.clip(centre + std * rng.standard_normal(centre.shape), -1.0, 1.0).astype(np.float32)


@dataclass(frozen=True)
class MovingToy(Toy):
    """Modes that turn with a continuous observation x ∈ [-1, 1]: mode k of ``base`` (a layout at x = 0) sits at its
    centre turned by ``turn · x`` radians about the origin. The data draws x uniformly; ``conditions`` are the
    layouts at the measuring points ``xs``."""

    base: tuple[Mode, ...] = ()
    turn: float = 0.0
    xs: tuple[float, ...] = ()

    @property
    def obs_dim(self) -> int:
        return 1

    def at(self, x: float) -> tuple[Mode, ...]:
        return tuple(Mode(_turned(m.centre, self.turn * x), m.std, m.weight) for m in self.base)

    def obs(self, c: int, n: int) -> np.ndarray:
        return np.full((n, 1), self.xs[c], dtype=np.float32)

    def draw(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x = rng.uniform(-1.0, 1.0, n)
        angle = self.turn * x
        centres = np.array([m.centre for m in self.base])  # [M, 2]
        w = np.array([m.weight for m in self.base], dtype=np.float64)
        k = rng.choice(len(self.base), size=n, p=w / w.sum())
        cos, sin = np.cos(angle), np.sin(angle)
        cx, cy = centres[k, 0], centres[k, 1]
        act = np.stack([cos * cx - sin * cy, sin * cx + cos * cy], axis=1)
        act += np.array([m.std for m in self.base])[k][:, None] * rng.standard_normal((n, 2))
        cond = np.full(n, -1)  # no row is at a measuring point
        return x[:, None].astype(np.float32), np.clip(act, -1.0, 1.0).astype(np.float32), cond


def _turned(centre: tuple[float, ...], angle: float) -> tuple[float, float]:
    x, y = centre
    return (x * math.cos(angle) - y * math.sin(angle), x * math.sin(angle) + y * math.cos(angle))


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

# ----------------------------------------------------------------------------------------------- layouts by seed
def _rng(name: str, seed: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), sum(map(ord, name)), 0x70E5])


def _turn_condition(modes: tuple[Mode, ...], rng: np.random.Generator) -> tuple[Mode, ...]:
    """The same modes turned by a random angle, their (std, weight) pairs shuffled among the centres."""
    angle = rng.uniform(0.0, 2 * math.pi)
    order = rng.permutation(len(modes))
    return tuple(Mode(_turned(m.centre, angle), modes[j].std, modes[j].weight) for m, j in zip(modes, order, strict=True))


def _far(seed: int) -> Toy:
    """Two modes at opposite points of the box's edge (1.7 to 2.4 apart), the second condition a quarter turn on."""
    if seed == 0:
        return TOYS["far"]
    theta = _rng("far", seed).uniform(0.0, 2 * math.pi)
    conds = []
    for t in (theta, theta + math.pi / 2):
        u = np.array([math.cos(t), math.sin(t)])
        u = 0.85 * u / np.abs(u).max()
        conds.append((Mode(tuple(u), 0.03, 1.0), Mode(tuple(-u), 0.03, 1.0)))
    return Toy("far", TOYS["far"].description, tuple(conds))


def _placed(rng: np.random.Generator, n: int, dim: int, box: float, min_gap: float) -> np.ndarray:
    """``n`` points uniform in [-box, box]^dim, redrawn until every pair is at least ``min_gap`` apart."""
    while True:
        p = rng.uniform(-box, box, size=(n, dim))
        gaps = np.linalg.norm(p[:, None] - p[None], axis=-1) + np.eye(n) * 1e9
        if gaps.min() >= min_gap:
            return p


def _wide6(seed: int) -> Toy:
    rng = _rng("wide6", seed)
    conds = tuple(tuple(Mode(tuple(p), 0.03, 1.0) for p in _placed(rng, m, 6, 0.7, 0.6)) for m in (2, 3, 4))
    return Toy("wide6", "6-D actions: 2 / 3 / 4 equal modes (std 0.03) at random points of [-0.7, 0.7]^6", conds)


def _narrow(seed: int) -> Toy:
    rng = _rng("narrow", seed)
    shapes = ([(0.0, 0.289), (-0.25, -0.144), (0.25, -0.144)],  # a triangle of side 0.5
              [(-0.6, 0.0), (-0.2, 0.0), (0.2, 0.0), (0.6, 0.0)],  # a line, 0.4 apart
              [(-0.175, 0.0), (0.175, 0.0)])  # 0.35 apart
    conds = []
    for shape in shapes:
        angle = rng.uniform(0.0, 2 * math.pi)
        pts = np.array([_turned(p, angle) for p in shape])
        room = 0.8 - np.abs(pts).max(0)
        pts = pts + rng.uniform(-room, room)
        conds.append(tuple(Mode(tuple(p), 0.025, 1.0) for p in pts))
    return Toy("narrow", "narrow modes (std 0.025) close together: 3 at 0.5 apart, 4 on a line 0.4 apart, 2 at 0.35 "
                         "apart", tuple(conds))


def _moving(seed: int) -> MovingToy:
    rng = _rng("moving", seed)
    phase = rng.uniform(0.0, 2 * math.pi)
    base = tuple(Mode((0.55 * math.cos(phase + 2 * math.pi * k / 3), 0.55 * math.sin(phase + 2 * math.pi * k / 3)),
                      0.04, 1.0) for k in range(3))
    turn = float(rng.choice([-1.0, 1.0])) * math.pi / 2
    xs = (-0.9, -0.45, 0.0, 0.45, 0.9)
    moving = MovingToy("moving", "3 equal modes (std 0.04) on a circle of radius 0.55, turned by a continuous "
                                 "observation x ∈ [-1, 1] (half a turn over its range); measured at x = ±0.9, ±0.45, 0",
                       (), base=base, turn=turn, xs=xs)
    return dataclasses.replace(moving, conditions=tuple(moving.at(x) for x in xs))


def toy(name: str, seed: int = 0) -> Toy:
    """The design ``name`` with the mode layout of data seed ``seed`` (seed 0 of ``counts`` / ``unequal`` / ``far``
    / ``paid``: the fixed layouts of :data:`TOYS`)."""
    if name in ("counts", "unequal"):
        base = TOYS[name]
        if seed == 0:
            return base
        rng = _rng(name, seed)
        return Toy(name, base.description, tuple(_turn_condition(c, rng) for c in base.conditions))
    builders = {"far": _far, "wide6": _wide6, "narrow": _narrow, "moving": _moving}
    if name in builders:
        return builders[name](seed)
    if name in TOYS:
        return TOYS[name]
    raise KeyError(f"toy {name!r}: expected one of {', '.join(QUALITY_TOYS + ('paid',))}")


#: the toys of the quality benchmark's behaviour-cloning part (``paid`` is for critic guidance)
BC_TOYS = ("counts", "unequal", "far")
#: every toy of ``make quality`` (each run over its data seeds)
QUALITY_TOYS = ("counts", "unequal", "far", "wide6", "narrow", "moving")
TOYS.update({"wide6": _wide6(0), "narrow": _narrow(0), "moving": _moving(0)})


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
    obs, act, cond = toy.draw(transitions, rng)
    rew = np.zeros(transitions, dtype=np.float32)
    for c in range(toy.num_conditions):
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
