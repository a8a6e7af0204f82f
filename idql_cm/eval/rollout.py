"""Whole-episode rollouts in a gymnasium vector env, with exact return bookkeeping.

:func:`evaluate` runs ``episodes`` episodes on ``num_envs`` parallel copies of one environment. Episode ``i`` is
always reset with seed ``seed + i``, whichever env slot runs it, so results are reproducible and comparable across
NFEs and backbones (common random numbers). Slots are refilled as soon as their episode ends (a work queue); with
HalfCheetah, whose episodes all last ``max_episode_steps``, this is exactly "rounds of ``num_envs``", the last
round using fewer envs; with Hopper/Walker2d a slot whose robot fell starts the next episode at once. No extra
episodes are run or counted.

Bookkeeping: an episode's return is the sum of every step's reward up to and **including** the step on which it
terminates or is truncated, and nothing after. The vector env runs with ``autoreset_mode=DISABLED``: finished slots
are reset explicitly (``reset_mask``), so no auto-reset reward can leak into a return, and slots with nothing left
to do are stepped with zero actions but ignored (the policy is only called on the active observations).

A non-finite observation or reward (an unstable MuJoCo simulation) ends that episode; it is flagged in
``unstable``, counted in ``unstable_episodes`` and left out of the means by :mod:`idql_cm.eval.report`.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch

from idql_cm.errors import ConfigError

VECTOR_MODES = ("sync", "async")
_RENDER_WARNED = False


# --------------------------------------------------------------------------------------------------- policies
def as_policy_fn(policy, nfe: int, generator: torch.Generator | None = None) -> tuple[Callable, torch.device | None]:
    """Normalise what :func:`evaluate` accepts into ``fn(obs: np.ndarray [B, O]) -> np.ndarray [B, A]``.

    Accepted: an :class:`~idql_cm.eval.agent.IDQLAgent` (``act``), an ``Actor`` or ``ActorPolicy`` (``sample``) —
    both called with a float32 tensor on their ``device``, ``nfe`` and ``generator`` — or a plain callable
    ``fn(obs_numpy) -> actions`` (``nfe`` is then only recorded). Returns ``(fn, device or None)``.
    """
    method = getattr(policy, "act_tensor", None) or getattr(policy, "act", None) or getattr(policy, "sample", None)
    if method is None:
        if not callable(policy):
            raise ConfigError(f"evaluate: expected an IDQLAgent, an Actor or a callable obs -> actions, "
                              f"found {type(policy).__name__}")

        def plain(obs: np.ndarray) -> np.ndarray:
            return np.asarray(policy(obs), dtype=np.float32)

        return plain, None
    device = torch.device(getattr(policy, "device", "cpu"))

    def torch_fn(obs: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            t = torch.from_numpy(np.ascontiguousarray(obs, dtype=np.float32)).to(device)
            out = method(t, nfe, generator=generator)
            if isinstance(out, torch.Tensor):
                out = out.to("cpu", torch.float32).numpy()
        return np.asarray(out, dtype=np.float32)

    return torch_fn, device


# ------------------------------------------------------------------------------------------------ environments
def _check_env_id(env_id) -> None:
    if callable(env_id):
        return
    import gymnasium

    if not isinstance(env_id, str) or env_id not in gymnasium.registry:
        raise ConfigError(f"env_id: expected a gymnasium environment id such as 'HalfCheetah-v5', found "
                          f"{env_id!r} (not registered in gymnasium)")


def _make_one(env_id, max_episode_steps: int, render: bool, render_size: tuple[int, int]):
    from idql_cm.data.envs import make_env

    if callable(env_id):
        return env_id()
    kwargs: dict[str, Any] = {"max_episode_steps": max_episode_steps}
    if render:
        kwargs.update(render_mode="rgb_array", width=int(render_size[0]), height=int(render_size[1]))
    return make_env(env_id, **kwargs)


def make_vector_env(env_id: str | Callable, num_envs: int, vector_mode: str = "sync", max_episode_steps: int = 1000,
                    render: bool = False, render_size: tuple[int, int] = (256, 256)):
    """A Sync/AsyncVectorEnv of ``num_envs`` copies of ``env_id`` (a gymnasium id or a zero-argument env factory)
    wrapped in a ``TimeLimit(max_episode_steps)``, with ``autoreset_mode=DISABLED`` (we reset finished slots)."""
    from gymnasium.vector import AsyncVectorEnv, AutoresetMode, SyncVectorEnv

    if vector_mode not in VECTOR_MODES:
        raise ConfigError(f"vector_mode: expected one of {VECTOR_MODES}, found {vector_mode!r}")
    _check_env_id(env_id)
    fns = [partial(_make_one, env_id, max_episode_steps, render, render_size) for _ in range(num_envs)]
    cls = SyncVectorEnv if vector_mode == "sync" else AsyncVectorEnv
    return cls(fns, autoreset_mode=AutoresetMode.DISABLED)


# ----------------------------------------------------------------------------------------------------- video
class _Recorder:
    """Writes the frames of the first ``k`` episodes as MP4 files; on any rendering failure warns once and stops."""

    def __init__(self, vec, k: int, video_dir: str | None, prefix: str, vector_mode: str):
        self.vec, self.k, self.prefix, self.vector_mode = vec, int(k), prefix, vector_mode
        self.dir = video_dir
        self.writers: dict[int, Any] = {}  # slot -> writer
        self.paths: list[str] = []
        self.enabled = self.k > 0 and video_dir is not None
        self.fps = 30
        if self.enabled:
            try:
                env_metadata = vec.get_attr("metadata")[0]
                self.fps = int(env_metadata.get("render_fps", 30))
            except Exception:  # noqa: BLE001 - cosmetic only
                pass

    def _disable(self, err: Exception) -> None:
        global _RENDER_WARNED
        self.enabled = False
        self.close()
        if not _RENDER_WARNED:
            _RENDER_WARNED = True
            warnings.warn(f"video recording disabled: rendering failed ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''}); set MUJOCO_GL=egl or osmesa before "
                          f"mujoco is imported", RuntimeWarning, stacklevel=3)

    def start(self, slot: int, episode: int) -> None:
        if not self.enabled or episode >= self.k:
            return
        try:
            import imageio.v2 as imageio

            os.makedirs(self.dir, exist_ok=True)
            path = os.path.join(self.dir, f"{self.prefix}_ep{episode}.mp4")
            self.writers[slot] = imageio.get_writer(path, fps=self.fps, macro_block_size=1)
            self.paths.append(path)
        except Exception as e:  # noqa: BLE001 - optional feature: never break the evaluation
            self._disable(e)

    def frame(self, slots: list[int]) -> None:
        slots = [s for s in slots if s in self.writers]
        if not self.enabled or not slots:
            return
        try:
            if self.vector_mode == "sync":
                frames = {s: self.vec.envs[s].render() for s in slots}
            else:
                all_frames = self.vec.call("render")
                frames = {s: all_frames[s] for s in slots}
            for s, f in frames.items():
                self.writers[s].append_data(np.asarray(f))
        except Exception as e:  # noqa: BLE001
            self._disable(e)

    def finish(self, slot: int) -> None:
        w = self.writers.pop(slot, None)
        if w is not None:
            try:
                w.close()
            except Exception as e:  # noqa: BLE001
                self._disable(e)

    def close(self) -> None:
        for slot in list(self.writers):
            w = self.writers.pop(slot)
            try:
                w.close()
            except Exception:  # noqa: BLE001
                pass


# ---------------------------------------------------------------------------------------------------- rollout
@dataclass(frozen=True)
class Rollout:
    """What :func:`evaluate` measured: per-episode ``returns`` / ``lengths`` / ``unstable`` flags (episode order)
    and timings. ``action_latency_ms`` is the mean wall time of one batched action selection (host arrays in and
    out); ``env_steps`` counts the steps of active episodes."""

    env_id: str
    nfe: int
    episodes: int = 0
    num_envs: int = 0
    seed: int | None = None
    returns: list[float] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    unstable: list[bool] = field(default_factory=list)
    unstable_episodes: int = 0
    seconds: float = 0.0
    action_latency_ms: float = float("nan")
    policy_calls: int = 0
    env_steps: int = 0
    env_steps_per_second: float = float("nan")
    videos: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate(agent_or_policy_fn, env_id: str | Callable, episodes: int = 10, num_envs: int = 10, nfe: int = 1,
             seed: int = 0, vector_mode: str = "sync", max_episode_steps: int = 1000, progress: bool = False, *,
             generator: torch.Generator | None = None, record_episodes: int = 0, video_dir: str | None = None,
             video_prefix: str = "episode", render_size: tuple[int, int] = (256, 256),
             desc: str | None = None) -> Rollout:
    """Run ``episodes`` whole episodes of ``env_id`` and return their returns, lengths and timings.

    Args:
        agent_or_policy_fn: an ``IDQLAgent``, an ``Actor``/``ActorPolicy``, or ``fn(obs [B,O] numpy) -> [B,A]``.
        env_id: a gymnasium id (``"HalfCheetah-v5"``) or a zero-argument factory returning an env.
        episodes: episodes to run and count; ``num_envs`` parallel env slots (at most ``episodes`` are made).
        nfe: network evaluations per action, passed to the agent.
        seed: episode ``i`` resets with ``seed + i``; the policy's sampling generator (when not given) is a
            ``torch.Generator`` on the policy's device seeded with ``seed``.
        vector_mode: ``"sync"`` (one process; fastest on 2 cores) or ``"async"`` (one process per env).
        max_episode_steps: the ``TimeLimit`` (1000 for D4RL locomotion).
        progress: a tqdm bar over finished episodes.
        record_episodes, video_dir, video_prefix, render_size: write the first ``record_episodes`` episodes as
            ``{video_dir}/{video_prefix}_ep{i}.mp4`` (needs imageio-ffmpeg and a headless GL, ``MUJOCO_GL=egl``: set at process start by
            :func:`idql_cm.eval.rendering.configure_rendering`, which ``idql-cm`` calls).

    Returns:
        a :class:`Rollout` (``.to_dict()`` for JSON).
    """
    if int(episodes) < 1 or int(num_envs) < 1:
        raise ConfigError(f"evaluate: expected episodes >= 1 and num_envs >= 1, found episodes={episodes}, "
                          f"num_envs={num_envs}")
    episodes, seed, max_episode_steps = int(episodes), int(seed), int(max_episode_steps)
    n_envs = min(int(num_envs), episodes)
    policy_device = getattr(agent_or_policy_fn, "device", None)
    if generator is None and policy_device is not None and not callable_only(agent_or_policy_fn):
        generator = torch.Generator(device=torch.device(policy_device)).manual_seed(seed)
    policy, device = as_policy_fn(agent_or_policy_fn, int(nfe), generator)
    sync_cuda = device is not None and device.type == "cuda"

    t_start = time.perf_counter()
    vec = make_vector_env(env_id, n_envs, vector_mode, max_episode_steps, render=record_episodes > 0,
                          render_size=render_size)
    obs_dim, env_obs = getattr(agent_or_policy_fn, "obs_dim", None), vec.single_observation_space.shape
    if obs_dim is not None and tuple(env_obs) != (int(obs_dim),):
        vec.close()
        raise ConfigError(f"evaluate: the policy expects observations of size {obs_dim} but {env_id} gives "
                          f"shape {tuple(env_obs)}: wrong env_id for this checkpoint?")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=episodes, desc=desc or f"eval nfe={nfe}", leave=False, dynamic_ncols=True)
    rec = _Recorder(vec, record_episodes, video_dir, video_prefix, vector_mode)

    returns = np.zeros(episodes, dtype=np.float64)
    lengths = np.zeros(episodes, dtype=np.int64)
    unstable = np.zeros(episodes, dtype=bool)
    slot_ep = np.full(n_envs, -1, dtype=np.int64)   # episode index run by each slot, -1 = parked
    ep_ret = np.zeros(n_envs, dtype=np.float64)
    ep_len = np.zeros(n_envs, dtype=np.int64)
    state = {"next": 0, "finished": 0}

    def finite_rows(x: np.ndarray) -> np.ndarray:
        return np.isfinite(x).reshape(n_envs, -1).all(axis=1)

    def close_episode(s: int, is_unstable: bool) -> None:
        e = int(slot_ep[s])
        returns[e], lengths[e], unstable[e] = ep_ret[s], ep_len[s], is_unstable
        rec.finish(s)
        state["finished"] += 1
        if bar is not None:
            bar.update(1)

    def reset_slots(mask: np.ndarray, first: bool = False) -> np.ndarray:
        """Reset the slots in ``mask``, giving each the next episode (seed + i) or parking it; a non-finite first
        observation ends that episode at once (unstable, length 0) and the slot is reset again."""
        new_obs = None
        while mask.any():
            seeds: list[int | None] = [None] * n_envs
            for s in np.flatnonzero(mask):
                if state["next"] < episodes:
                    slot_ep[s], seeds[s] = state["next"], seed + state["next"]
                    state["next"] += 1
                else:  # nothing left for this slot: park it (fixed seed, ignored from now on)
                    slot_ep[s], seeds[s] = -1, seed + episodes + int(s)
                ep_ret[s], ep_len[s] = 0.0, 0
            if first:
                new_obs, _ = vec.reset(seed=seeds)
                first = False
            else:
                new_obs, _ = vec.reset(seed=seeds, options={"reset_mask": mask.copy()})
            started = mask & (slot_ep >= 0)
            for s in np.flatnonzero(started):
                rec.start(int(s), int(slot_ep[s]))
            rec.frame([int(s) for s in np.flatnonzero(started)])
            mask = started & ~finite_rows(new_obs)
            for s in np.flatnonzero(mask):
                close_episode(int(s), True)
        return new_obs

    policy_calls, env_steps, latency_s = 0, 0, 0.0
    try:
        act_shape = vec.single_action_space.shape
        obs = reset_slots(np.ones(n_envs, dtype=bool), first=True)
        while state["finished"] < episodes:
            active = slot_ep >= 0                      # never empty here: free slots always get waiting episodes
            # ---- act on the active slots only; parked slots get zero actions ---------------------------------
            t0 = time.perf_counter()
            a = policy(obs[active])
            if sync_cuda:
                torch.cuda.synchronize(device)
            latency_s += time.perf_counter() - t0
            policy_calls += 1
            actions = np.zeros((n_envs, *act_shape), dtype=np.float32)
            a = np.asarray(a, dtype=np.float32)
            if a.size != int(active.sum()) * int(np.prod(act_shape)):
                raise ConfigError(f"evaluate: the policy returned actions of shape {list(a.shape)} for "
                                  f"{int(active.sum())} observations; {env_id} expects actions of shape "
                                  f"{list(act_shape)} each")
            actions[active] = a.reshape(int(active.sum()), *act_shape)
            # ---- step every slot (a vector env cannot step a subset) -----------------------------------------
            obs, rew, term, trunc, _ = vec.step(actions)
            rew = np.asarray(rew, dtype=np.float64)
            env_steps += int(active.sum())
            finite_rew = np.isfinite(rew)
            # Every step's reward counts, the terminating step's included, and nothing after it (the slot is
            # reset below before it is stepped again). The reference deliberately differs: it masks the terminal
            # step's reward with the already-updated done flag and, at t = 1000, adds one reward from the
            # auto-reset episode of envs that ended early (docs/design.md); we count what the
            # environment actually paid for the episode.
            ep_ret[active] += np.where(finite_rew, rew, 0.0)[active]
            ep_len[active] += 1
            rec.frame([int(s) for s in np.flatnonzero(active)])
            bad = ~(finite_rows(obs) & finite_rew)     # unstable simulation: ends the episode
            done = term | trunc | bad
            end = active & (done | (ep_len >= max_episode_steps))
            for s in np.flatnonzero(end):
                close_episode(int(s), bool(bad[s]))
            # ---- reset finished slots (autoreset is DISABLED), parked ones included ----------------------------
            need = end | done
            if state["finished"] < episodes and need.any():
                obs = reset_slots(need)
    finally:
        rec.close()
        if bar is not None:
            bar.close()
        vec.close()
    seconds = time.perf_counter() - t_start
    return Rollout(
        env_id=env_id if isinstance(env_id, str) else getattr(env_id, "__name__", repr(env_id)),
        nfe=int(nfe),
        episodes=episodes,
        num_envs=n_envs,
        seed=seed,
        returns=[float(r) for r in returns],
        lengths=[int(n) for n in lengths],
        unstable=[bool(u) for u in unstable],
        unstable_episodes=int(unstable.sum()),
        seconds=seconds,
        action_latency_ms=1000.0 * latency_s / max(policy_calls, 1),
        policy_calls=policy_calls,
        env_steps=env_steps,
        env_steps_per_second=env_steps / seconds if seconds > 0 else float("nan"),
        videos=list(rec.paths),
    )


def callable_only(obj) -> bool:
    """True when ``obj`` is a plain ``fn(obs) -> actions`` rather than an agent or actor."""
    return not any(hasattr(obj, m) for m in ("act_tensor", "act", "sample"))
