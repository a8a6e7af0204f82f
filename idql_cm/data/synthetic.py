"""Synthetic files of the real D4RL HDF5 layout, for tests and benchmarks (no simulator, no download).

``write_d4rl_file(path, ...)`` writes what a D4RL v2 file holds: ``observations [N, obs_dim]``, ``actions [N, act_dim]``
(in [-1, 1]), ``rewards [N]``, ``terminals [N]`` (bool), ``timeouts [N]`` (bool), ``next_observations [N, obs_dim]``,
optionally ``infos/qpos``, ``infos/qvel``, ``infos/action_log_probs`` and ``metadata/*`` (incl. nested
``metadata/policy/...`` groups), with ``N = n_episodes * episode_len``.

Episodes run ``episode_len`` rows. By default every episode is truncated by the time limit (``timeouts`` set on its
last row, like HalfCheetah); with ``terminal_every=k`` an episode terminates (``terminals`` set, ``timeouts`` not)
after ``k`` rows instead, like Hopper falling. Observations are a smooth random walk per episode so that
``next_observations[i] == observations[i + 1]`` inside an episode, and rewards are ``episode_index + small noise``
so episode returns differ.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

__all__ = ["make_d4rl_arrays", "write_arrays", "write_d4rl_file"]


def make_d4rl_arrays(
    n_episodes: int = 4,
    episode_len: int = 50,
    obs_dim: int = 17,
    act_dim: int = 6,
    dtype=np.float32,
    terminal_every: int | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """The arrays of :func:`write_d4rl_file` (without infos / metadata)."""
    rng = np.random.default_rng(seed)
    obs_l, next_l, act_l, rew_l, term_l, tout_l = [], [], [], [], [], []
    for ep in range(n_episodes):
        length = episode_len
        terminated = terminal_every is not None and terminal_every < episode_len
        if terminated:
            length = terminal_every
        states = np.cumsum(rng.normal(0.0, 0.1, size=(length + 1, obs_dim)), axis=0) + rng.normal(0.0, 1.0, size=obs_dim)
        obs_l.append(states[:-1])
        next_l.append(states[1:])
        act_l.append(rng.uniform(-1.0, 1.0, size=(length, act_dim)))
        rew_l.append(ep + rng.normal(0.0, 0.1, size=length))
        term = np.zeros(length, dtype=bool)
        tout = np.zeros(length, dtype=bool)
        if terminated:
            term[-1] = True
        else:
            tout[-1] = True
        term_l.append(term)
        tout_l.append(tout)
    return {
        "observations": np.concatenate(obs_l).astype(dtype),
        "actions": np.concatenate(act_l).astype(dtype),
        "rewards": np.concatenate(rew_l).astype(dtype),
        "terminals": np.concatenate(term_l),
        "timeouts": np.concatenate(tout_l),
        "next_observations": np.concatenate(next_l).astype(dtype),
    }


def write_arrays(path, arrays: dict[str, np.ndarray], attrs: dict | None = None) -> Path:
    """Write ``{key: array}`` to an HDF5 file, ``/`` in keys making nested groups; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        for key, value in arrays.items():
            f.create_dataset(key, data=value)
        for key, value in (attrs or {}).items():
            f.attrs[key] = value
    return path


def write_d4rl_file(
    path,
    n_episodes: int = 4,
    episode_len: int = 50,
    obs_dim: int = 17,
    act_dim: int = 6,
    dtype=np.float32,
    terminal_every: int | None = None,
    with_infos: bool = True,
    with_metadata: bool = True,
    with_timeouts: bool = True,
    with_next_observations: bool = True,
    env_id: str | None = None,
    env_id_as: str = "dataset",
    seed: int = 0,
) -> Path:
    """Write a synthetic D4RL-layout file and return its path.

    Args:
        path: the file to write (parent folders are created).
        n_episodes, episode_len: ``N = n_episodes * episode_len`` rows (fewer with ``terminal_every``).
        obs_dim, act_dim: any sizes.
        dtype: float dtype of observations / actions / rewards (D4RL medium-replay files are float64).
        terminal_every: end every episode with a terminal after this many rows instead of a timeout.
        with_infos: add ``infos/qpos``, ``infos/qvel``, ``infos/action_log_probs``.
        with_metadata: add ``metadata/algorithm``, ``metadata/iteration`` and nested ``metadata/policy/fc0/*``.
        with_timeouts: write the ``timeouts`` key (old D4RL files lack it).
        with_next_observations: write the (ignored) ``next_observations`` key.
        env_id: write it as ``metadata/env_id``: a string dataset (``env_id_as="dataset"``) or an attribute of the
            ``metadata`` group (``env_id_as="attr"``).
        seed: the NumPy seed of the random content.
    """
    arrays = make_d4rl_arrays(n_episodes, episode_len, obs_dim, act_dim, dtype, terminal_every, seed)
    n = len(arrays["rewards"])
    if not with_timeouts:
        del arrays["timeouts"]
    if not with_next_observations:
        del arrays["next_observations"]
    rng = np.random.default_rng(seed + 1)
    if with_infos:
        arrays["infos/qpos"] = rng.normal(size=(n, 9)).astype(dtype)
        arrays["infos/qvel"] = rng.normal(size=(n, 9)).astype(dtype)
        arrays["infos/action_log_probs"] = rng.normal(size=n).astype(dtype)
    if with_metadata:
        arrays["metadata/algorithm"] = np.bytes_("SAC")
        arrays["metadata/iteration"] = np.int64(100)
        arrays["metadata/policy/fc0/weight"] = rng.normal(size=(4, obs_dim)).astype(np.float32)
        arrays["metadata/policy/fc0/bias"] = np.zeros(4, dtype=np.float32)
    if env_id is not None and env_id_as == "dataset":
        arrays["metadata/env_id"] = env_id
    path = write_arrays(path, arrays)
    if env_id is not None and env_id_as == "attr":
        with h5py.File(path, "a") as f:
            f.require_group("metadata").attrs["env_id"] = env_id
    return path
