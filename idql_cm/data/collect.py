"""``idql-cm collect``: a D4RL-layout dataset from a gymnasium MuJoCo environment, with no download.

Behaviours:

* ``random``: uniform random actions (the D4RL "random" level, about -300 per episode on HalfCheetah).
* ``scripted``: an open-loop, phase-shifted sine gait ``a_j(t) = clip(r(t)·A_j·sin(ω t + φ_j) + b_j, -1, 1)``
  (``r(t)`` ramps the amplitude up over the first 20 steps), whose 3·act_dim + 1 parameters a short seeded
  search finds first (:func:`search_gait`: restarted cross-entropy search over a few hundred short rollouts,
  keeping the candidate with the best worst-case return over three full 1000-step episodes; it stops early once a
  HalfCheetah gait reaches 2800). On HalfCheetah-v5, seeds 0-7 gave gaits of 2270-3450 (worst of three
  episodes) in 7-16 s.
  On Hopper / Walker2d an open-loop gait is weak and falls early; it still runs (any honest controller).
* ``medium-expert``: D4RL's construction of its medium-expert datasets, a weak behaviour's episodes followed by a
  strong one's, half the transitions each. The strong behaviour ("expert") is the gait under action noise of std
  0.02; the weak one ("medium") is the same gait with lapses (:data:`LAPSES`): from step 100 on, each 50-step block
  is, with probability 1/2, played at a third of the swing. On HalfCheetah-v5 that is about 2700 against 1000 per
  episode, and the states are shared: about 40% of the strong behaviour's states have a weak-behaviour state as near
  as the nearest state of another strong episode, while at such a state the weak behaviour may lapse. So for many
  states the data's actions are bimodal, as in D4RL's medium-expert. (A weaker gait alone, amplitude 0.6, shares
  under 1% of the states: it runs at another speed.) ``metadata/episode_level`` names each episode's behaviour.
* ``two-gait``: the same construction with two *different* policies, as D4RL concatenates two agents' data: the weak
  half is another gait (searched with seed + 1, its own frequency, phases and offsets) at half its swing, about 1,050
  per episode on HalfCheetah-v5; the strong half is the seed's gait (about 2,600); both under action noise 0.02
  (:data:`WEAK_GAIT`). The two visit different states, so the data is bimodal across states rather than within them.
* ``mixed`` (the demo dataset): episodes of the gait at amplitude scales 1.0 / 0.8 / 0.6 / 0.4 and under Gaussian
  action noise of std 0 to 0.2, plus fully random episodes, in turn (:data:`MIXED_SCHEDULE`), so episode returns
  spread from the random level to the gait's (on HalfCheetah-v5 roughly -300, 450, 900, 1800, 2000-3000).
  An open-loop gait is fragile: white noise of std 0.1 already makes most HalfCheetah episodes stumble (returns
  ~500), so amplitude scaling, not large noise, fills the middle of the range.

Output (the D4RL v2 layout, float32; see docs/design.md): ``observations``, ``actions``, ``rewards``,
``terminals`` (the env's ``terminated``), ``timeouts`` (a time-limit or budget truncation, on the last row of such an
episode), ``next_observations``, ``infos/qpos``, ``infos/qvel``, and ``metadata/*`` (``env_id``, ``behaviour``,
``seed``, ``episode_returns``, ``episode_lengths``, ``episode_amplitude`` / ``episode_noise`` (NaN = random
episode), ``gait``, ...).
The file is written to a temporary name in the same folder and renamed at the end, so an error or an interrupt
never leaves a half-written file. Nothing is cached outside the output.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from idql_cm.errors import ConfigError
from idql_cm.fileio import atomic_path

__all__ = [
    "BEHAVIOURS",
    "MIXED_SCHEDULE",
    "SineGait",
    "add_collect_parser",
    "collect",
    "run_collect",
    "search_gait",
]

BEHAVIOURS = ("random", "scripted", "mixed", "medium-expert", "two-gait")
#: the weak level of ``two-gait``: (gait-search seed offset, amplitude scale): the gait searched with seed + 1 at half
#: its swing (on HalfCheetah-v5 about 1,050 per episode against the strong gait's ~2,600; another ω, other phases)
WEAK_GAIT = (1, 0.5)
#: the weak level of ``medium-expert``: (first step that may lapse, block length, lapse probability, swing scale)
LAPSES = (100, 50, 0.5, 0.3)
MEDIUM_EXPERT_NOISE = 0.02  # action-noise std of both levels
# (gait amplitude scale, Gaussian action-noise std) per episode of the mixed behaviour, in turn; None = uniform
# random actions
MIXED_SCHEDULE: tuple[tuple[float, float] | None, ...] = (
    (1.0, 0.0), (1.0, 0.03), (1.0, 0.06), (0.8, 0.03), (0.6, 0.03), (0.4, 0.03), (1.0, 0.2), None,
)
EPISODE_STEPS = 1000
# per-environment search settings: (budget in simulated env steps, stop early at this worst-case return)
_SEARCH_DEFAULTS = {"halfcheetah": (450_000, 2800.0)}
_SEARCH_FALLBACK = (100_000, None)


# ----------------------------------------------------------------------------------------------- the gait
@dataclass(frozen=True)
class SineGait:
    """``a_j(t) = clip(r(t) · A_j · sin(ω t + φ_j) + b_j, -1, 1)``, ``r(t) = min(1, (t + 1) / ramp)``."""

    amplitude: np.ndarray
    phase: np.ndarray
    offset: np.ndarray
    omega: float
    ramp: int = 20

    @property
    def act_dim(self) -> int:
        return int(self.amplitude.shape[0])

    def actions(self, steps: int) -> np.ndarray:
        """The gait's actions for t = 0 .. steps-1, ``[steps, act_dim]`` float64 in [-1, 1]."""
        t = np.arange(steps, dtype=np.float64)[:, None]
        ramp = np.minimum(1.0, (t + 1.0) / max(self.ramp, 1))
        return np.clip(ramp * self.amplitude * np.sin(self.omega * t + self.phase) + self.offset, -1.0, 1.0)

    def to_vector(self) -> np.ndarray:
        return np.concatenate([self.amplitude, self.phase, self.offset, [self.omega]])

    @classmethod
    def from_vector(cls, v: np.ndarray, ramp: int = 20) -> SineGait:
        v = np.asarray(v, dtype=np.float64)
        a = (len(v) - 1) // 3
        return cls(np.abs(v[:a]), v[a : 2 * a], v[2 * a : 3 * a], float(v[-1]), ramp)


def _family(env_id: str) -> str:
    from idql_cm.data.scores import task_family

    return task_family(env_id) or env_id


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(f"collect: {msg}", file=sys.stderr, flush=True)


def _make_env(env_id: str):
    from gymnasium.spaces import Box

    from idql_cm.data.envs import make_env

    try:
        env = make_env(env_id, max_episode_steps=EPISODE_STEPS)
    except Exception as exc:  # gymnasium raises NameNotFound, VersionNotFound, DependencyNotInstalled, ...
        raise ConfigError(
            f"--env {env_id!r}: expected a gymnasium MuJoCo id such as HalfCheetah-v5, Hopper-v5 or Walker2d-v5 "
            f"({type(exc).__name__}: {' '.join(str(exc).split())})"
        ) from exc
    if not isinstance(env.action_space, Box) or not isinstance(env.observation_space, Box):
        env.close()
        raise ConfigError(f"--env {env_id!r}: expected Box observation and action spaces, found "
                          f"{env.observation_space} and {env.action_space}")
    return env


class _ActionMap:
    """[-1, 1] → the env's action box (identity for the MuJoCo locomotion tasks)."""

    def __init__(self, space):
        self.low = np.asarray(space.low, dtype=np.float64)
        self.high = np.asarray(space.high, dtype=np.float64)
        self.identity = bool(np.all(self.low == -1.0) and np.all(self.high == 1.0))

    def __call__(self, a: np.ndarray) -> np.ndarray:
        if self.identity:
            return a.astype(np.float32)
        return (self.low + (np.clip(a, -1, 1) + 1.0) * 0.5 * (self.high - self.low)).astype(np.float32)


# ---------------------------------------------------------------------------------------------- gait search
def search_gait(
    env_id: str = "HalfCheetah-v5",
    seed: int = 0,
    budget_steps: int | None = None,
    target: float | None = None,
    progress: bool = False,
) -> tuple[SineGait, float]:
    """Find sine-gait parameters by a seeded, restarted cross-entropy search.

    Each batch runs three short CEM searches (8 iterations × 16 candidates × 150-step rollouts) from a broad prior,
    refines the best (8 × 16 × 400 steps), and scores every search's mean on three full episodes (worst case).
    Batches repeat until the best worst-case return reaches ``target`` or ``budget_steps`` simulated steps are
    spent (checked before every CEM iteration; the final scoring episodes may overrun it by a few thousand). Deterministic for a given seed (and MuJoCo build).

    Returns:
        ``(gait, worst-case 1000-step return of the chosen gait)``.
    """
    default_budget, default_target = _SEARCH_DEFAULTS.get(_family(env_id), _SEARCH_FALLBACK)
    budget = default_budget if budget_steps is None else int(budget_steps)
    target = default_target if target is None else target
    env = _make_env(env_id)
    amap = _ActionMap(env.action_space)
    adim = int(env.action_space.shape[0])
    rng = np.random.default_rng([int(seed), 0x6A17])
    used = [0]

    def rollout(vec: np.ndarray, steps: int, reset_seed: int) -> float:
        """Return over ``steps`` env steps (fewer if the episode terminates), scaled to 1000 steps."""
        gait = SineGait.from_vector(vec)
        acts = amap(gait.actions(steps))
        env.reset(seed=int(reset_seed))
        ret, k = 0.0, 0
        for k in range(steps):
            _, r, terminated, truncated, _ = env.step(acts[k])
            ret += float(r)
            if terminated or truncated:
                break
        used[0] += k + 1
        return ret * EPISODE_STEPS / steps

    def cem(mu: np.ndarray, sd: np.ndarray, iters: int, horizon: int, pop: int = 16, n_elite: int = 4):
        for _ in range(iters):
            if used[0] >= budget:
                break
            cand = mu + sd * rng.standard_normal((pop, mu.size))
            cand[0] = mu
            cand[:, :adim] = np.abs(cand[:, :adim])
            cand[:, -1] = np.clip(cand[:, -1], 0.2, 2.0)
            reset_seed = int(rng.integers(1 << 30))  # common random numbers within an iteration
            fit = np.array([rollout(c, horizon, reset_seed) for c in cand])
            elite = cand[np.argsort(fit)[-n_elite:]]
            mu, sd = elite.mean(axis=0), 0.7 * elite.std(axis=0) + 0.15 * sd + 0.01
        return mu, sd

    best = [-math.inf, None]

    def consider(vec: np.ndarray) -> float:
        worst = math.inf
        for _ in range(3):
            worst = min(worst, rollout(vec, EPISODE_STEPS, int(rng.integers(1 << 30))))
            if worst <= best[0]:
                break
        if worst > best[0]:
            best[0], best[1] = worst, vec.copy()
        return worst

    mu0 = np.concatenate([np.full(adim, 0.7), np.zeros(adim), np.zeros(adim), [1.0]])
    sd0 = np.concatenate([np.full(adim, 0.5), np.full(adim, np.pi), np.full(adim, 0.3), [0.25]])
    t0 = time.perf_counter()
    batch = 0
    try:
        while used[0] < budget and (target is None or best[0] < target):
            batch += 1
            runs = []
            for _ in range(3):
                runs.append(cem(mu0, sd0, 8, 150))
                if used[0] >= budget:
                    break
            scores = [consider(mu) for mu, _ in runs]
            if used[0] < budget:
                k = int(np.argmax(scores))
                mu, _ = cem(runs[k][0], 0.5 * runs[k][1], 8, 400)
                consider(mu)
            _log(progress, f"gait search batch {batch}: best worst-case 1000-step return {best[0]:.0f} "
                           f"({used[0]:,} env steps, {time.perf_counter() - t0:.1f} s)")
    finally:
        env.close()
    return SineGait.from_vector(best[1]), float(best[0])


# ----------------------------------------------------------------------------------------------- collection
def _episode_plan(behaviour: str, episode: int, row: int, transitions: int) -> tuple[float, float] | None:
    """(amplitude scale, noise std) of the episode that starts at ``row`` (None = uniform random actions)."""
    if behaviour == "random":
        return None
    if behaviour == "scripted":
        return (1.0, 0.0)
    if behaviour in ("medium-expert", "two-gait"):
        return (1.0, MEDIUM_EXPERT_NOISE)  # the weak level (lapses / the other gait) is chosen in collect()
    return MIXED_SCHEDULE[episode % len(MIXED_SCHEDULE)]


def _level(row: int, transitions: int) -> str:
    """medium-expert / two-gait: the first half of the rows (to the end of the episode running there) is the weak behaviour."""
    return "medium" if row < transitions // 2 else "expert"


def collect(
    env_id: str = "HalfCheetah-v5",
    out: str | os.PathLike = "data/demo.hdf5",
    transitions: int = 100_000,
    seed: int = 0,
    behaviour: str = "mixed",
    progress: bool = True,
    search_budget: int | None = None,
) -> Path:
    """Run ``env_id`` for ``transitions`` steps with ``behaviour`` and write a D4RL-layout HDF5 file to ``out``.

    Args:
        env_id: a gymnasium MuJoCo id (``HalfCheetah-v5``, ``Hopper-v5``, ``Walker2d-v5``, ...).
        out: the output file (its folder is created; an existing file is replaced atomically at the end).
        transitions: number of rows (environment steps); episodes are 1000 steps unless the env terminates.
        seed: seeds the gait search, the environment resets and the action noise.
        behaviour: ``"random"``, ``"scripted"``, ``"mixed"`` or ``"medium-expert"`` (see the module docstring).
        progress: print progress lines to stderr.
        search_budget: env steps the gait search may spend (None: the per-environment default).

    Returns:
        The path written.
    """
    if behaviour not in BEHAVIOURS:
        raise ConfigError(f"--behaviour {behaviour!r}: expected one of {', '.join(BEHAVIOURS)}")
    transitions = int(transitions)
    if transitions < 2:
        raise ConfigError(f"--transitions {transitions}: expected at least 2")
    out = Path(out).expanduser()
    if out.is_dir():
        raise ConfigError(f"--out {out}: expected a file path, found a directory")
    t_start = time.perf_counter()
    _make_env(env_id).close()  # a wrong --env fails here, before any search

    gait, gait_score, weak_gait = None, float("nan"), None
    if behaviour != "random":
        _log(progress, f"searching a sine gait for {env_id} (seed {seed})")
        gait, gait_score = search_gait(env_id, seed=seed, budget_steps=search_budget, progress=progress)
        _log(progress, f"gait found: worst-case 1000-step return {gait_score:.0f} "
                       f"({time.perf_counter() - t_start:.1f} s)")
    if behaviour == "two-gait":
        offset, scale = WEAK_GAIT
        other, _ = search_gait(env_id, seed=seed + offset, budget_steps=search_budget, progress=progress)
        weak_gait = SineGait(other.amplitude * scale, other.phase, other.offset, other.omega, other.ramp)

    env = _make_env(env_id)
    amap = _ActionMap(env.action_space)
    unwrapped = env.unwrapped
    data = getattr(unwrapped, "data", None)
    has_qpos = data is not None and hasattr(data, "qpos")
    obs_dim = int(np.prod(env.observation_space.shape))
    act_dim = int(env.action_space.shape[0])
    rng = np.random.default_rng([int(seed), 0xC011])

    observations = np.empty((transitions, obs_dim), np.float32)
    next_observations = np.empty((transitions, obs_dim), np.float32)
    actions = np.empty((transitions, act_dim), np.float32)
    rewards = np.empty(transitions, np.float32)
    terminals = np.zeros(transitions, bool)
    timeouts = np.zeros(transitions, bool)
    qpos = np.empty((transitions, data.qpos.shape[0]), np.float32) if has_qpos else None
    qvel = np.empty((transitions, data.qvel.shape[0]), np.float32) if has_qpos else None

    ep_returns: list[float] = []
    ep_lengths: list[int] = []
    ep_noise: list[float] = []
    ep_amp: list[float] = []
    ep_level: list[str] = []
    ep_lapses: list[int] = []
    gait_actions = {}

    def plan_actions(episode: int, row: int) -> np.ndarray:
        plan = _episode_plan(behaviour, episode, row, transitions)
        paired = behaviour in ("medium-expert", "two-gait")
        ep_level.append(_level(row, transitions) if paired else behaviour)
        ep_amp.append(float("nan") if plan is None else plan[0])
        ep_noise.append(float("nan") if plan is None else plan[1])
        if plan is None:
            a = rng.uniform(-1.0, 1.0, size=(EPISODE_STEPS, act_dim))
        else:
            amp, noise = plan
            if weak_gait is not None and ep_level[-1] == "medium":
                if "weak" not in gait_actions:
                    gait_actions["weak"] = weak_gait.actions(EPISODE_STEPS)
                a = gait_actions["weak"]
            else:
                if amp not in gait_actions:
                    scaled = SineGait(gait.amplitude * amp, gait.phase, gait.offset, gait.omega, gait.ramp)
                    gait_actions[amp] = scaled.actions(EPISODE_STEPS)
                a = gait_actions[amp]
            if behaviour == "medium-expert":
                lapse = np.zeros(EPISODE_STEPS, bool)
                if ep_level[-1] == "medium":
                    start, block, p, scale = LAPSES
                    for b0 in range(start, EPISODE_STEPS, block):
                        lapse[b0:b0 + block] = rng.random() < p
                    # a lapse shrinks the gait's swing around its offset: the same posture, a weaker stride
                    a = np.where(lapse[:, None], gait.offset + scale * (a - gait.offset), a)
                ep_lapses.append(int(lapse.sum()))
            if noise > 0:
                a = np.clip(a + noise * rng.standard_normal(a.shape), -1.0, 1.0)
        return amap(a)

    try:
        obs, _ = env.reset(seed=int(seed))
        episode, t, ep_ret = 0, 0, 0.0
        ep_actions = plan_actions(episode, 0)
        report_every = max(transitions // 10, 1)
        for i in range(transitions):
            observations[i] = obs
            if has_qpos:
                qpos[i] = data.qpos
                qvel[i] = data.qvel
            a = ep_actions[t]
            actions[i] = a
            obs, r, terminated, truncated, _ = env.step(a)
            next_observations[i] = obs
            rewards[i] = r
            ep_ret += float(r)
            t += 1
            if terminated or truncated:
                terminals[i] = bool(terminated)
                timeouts[i] = not terminated
                ep_returns.append(ep_ret)
                ep_lengths.append(t)
                episode, t, ep_ret = episode + 1, 0, 0.0
                obs, _ = env.reset()
                ep_actions = plan_actions(episode, i + 1)
            if progress and (i + 1) % report_every == 0:
                last = f", last episode return {ep_returns[-1]:.0f}" if ep_returns else ""
                _log(True, f"{i + 1:,}/{transitions:,} transitions ({100 * (i + 1) // transitions}%), "
                           f"{len(ep_returns)} episodes{last}, {time.perf_counter() - t_start:.1f} s")
        if t > 0:  # the budget cut the last episode: a truncation like a time limit
            timeouts[transitions - 1] = True
            ep_returns.append(ep_ret)
            ep_lengths.append(t)
        else:
            ep_noise.pop()  # planned an episode that never started
            ep_amp.pop()
            ep_level.pop()
            if ep_lapses:
                ep_lapses.pop()
    finally:
        env.close()

    with atomic_path(out) as tmp:
        import h5py

        with h5py.File(tmp, "w") as f:
            f.create_dataset("observations", data=observations)
            f.create_dataset("actions", data=actions)
            f.create_dataset("rewards", data=rewards)
            f.create_dataset("terminals", data=terminals)
            f.create_dataset("timeouts", data=timeouts)
            f.create_dataset("next_observations", data=next_observations)
            if has_qpos:
                f.create_dataset("infos/qpos", data=qpos)
                f.create_dataset("infos/qvel", data=qvel)
            metadata = {
                "env_id": env_id,
                "behaviour": behaviour,
                "seed": np.int64(seed),
                "transitions": np.int64(transitions),
                "episode_returns": np.asarray(ep_returns, np.float64),
                "episode_lengths": np.asarray(ep_lengths, np.int64),
                "episode_amplitude": np.asarray(ep_amp, np.float64),
                "episode_noise": np.asarray(ep_noise, np.float64),
                "episode_level": np.asarray(ep_level, dtype=h5py.string_dtype()),
                "last_episode_complete": bool(t == 0),
                "generator": "idql-cm collect",
            }
            if gait is not None:
                metadata["gait"] = gait.to_vector()
                metadata["gait_search_return"] = np.float64(gait_score)
                if weak_gait is not None:
                    metadata["weak_gait"] = weak_gait.to_vector()
                if behaviour == "medium-expert":
                    metadata["lapses"] = np.asarray(LAPSES, np.float64)
                    metadata["episode_lapse_steps"] = np.asarray(ep_lapses, np.int64)
                if behaviour == "mixed":
                    metadata["mixed_schedule"] = np.asarray(
                        [(np.nan, np.nan) if x is None else x for x in MIXED_SCHEDULE], np.float64)
            for key, value in metadata.items():
                f.create_dataset(f"metadata/{key}", data=value)
    rets = np.asarray(ep_returns)
    _log(progress, f"wrote {out}: {transitions:,} transitions, {len(rets)} episodes, returns min {rets.min():.0f} / "
                   f"median {np.median(rets):.0f} / max {rets.max():.0f}, {time.perf_counter() - t_start:.1f} s")
    return out


# ------------------------------------------------------------------------------------------------------ CLI
def add_collect_parser(subparsers):
    """Add the ``collect`` sub-command to an ``argparse`` sub-parser set; returns the parser."""
    p = subparsers.add_parser(
        "collect",
        help="collect a D4RL-layout dataset from a gymnasium MuJoCo env (no download)",
        description="Run a gymnasium MuJoCo environment and write a D4RL-layout HDF5 dataset. "
                    "'mixed' (the demo data) = a searched sine gait at several amplitudes and noise levels plus random "
                    "episodes; 'medium-expert' = D4RL's construction: the gait with lapses (weak), then the gait "
                    "(strong), half the transitions each; 'two-gait' = the same with another, weaker gait as the "
                    "weak half; 'scripted' = the gait; 'random' = uniform random actions.",
    )
    p.add_argument("--env", default="HalfCheetah-v5", help="gymnasium id (default: HalfCheetah-v5)")
    p.add_argument("--out", required=True, help="output HDF5 file (written atomically)")
    p.add_argument("--transitions", type=int, default=100_000, help="environment steps to record (default: 100000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the gait search, resets and noise (default: 0)")
    p.add_argument("--behaviour", choices=BEHAVIOURS, default="mixed", help="default: mixed")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=run_collect)
    return p


def run_collect(args) -> int:
    """Run ``idql-cm collect`` from parsed arguments; returns the exit code."""
    collect(
        env_id=args.env,
        out=args.out,
        transitions=args.transitions,
        seed=args.seed,
        behaviour=args.behaviour,
        progress=not getattr(args, "quiet", False),
    )
    return 0
