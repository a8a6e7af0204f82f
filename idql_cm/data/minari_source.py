"""Minari datasets as qlearning transitions (``load_d4rl("minari:<dataset id>")``).

A Minari dataset lives in the local root (``$MINARI_DATASETS_PATH``, else ``~/.minari/datasets``) as
``<root>/<dataset id>/data/{main_data.hdf5, metadata.json}``; nothing is downloaded. Each episode holds
``observations`` with T+1 rows and ``actions``, ``rewards``, ``terminations``, ``truncations`` with T rows, so
every step has its true next observation: transition t is ``(obs[t], act[t], rew[t], obs[t+1], terminations[t])``
and episodes are concatenated.

Unlike a D4RL file, a truncated (time-limit) last step is *kept*: D4RL skips timeout rows only because its flat
layout has no next observation for them; here the next observation is real and ``terminals`` is False, so the step
bootstraps exactly as the evaluation does.

The ``minari`` package is used when importable (it also reads Arrow-format datasets); otherwise HDF5-format
datasets are read directly with h5py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from idql_cm.data.sources import minari_dataset_dir, minari_env_id, minari_metadata, minari_root  # noqa: F401
from idql_cm.data.validation import as_flags, check_finite
from idql_cm.errors import DataError

__all__ = ["load_minari", "minari_dataset_dir", "minari_env_id", "minari_root"]


def _episode_arrays(where: str, ep_name: str, obs, act, rew, term, trunc) -> tuple:
    key = f"{ep_name}/observations"
    if isinstance(obs, dict) or (isinstance(obs, np.ndarray) and obs.dtype.kind not in "f"):
        found = "a dict observation space" if isinstance(obs, dict) else f"dtype {np.asarray(obs).dtype}"
        raise DataError(f"{where}: key '{key}': expected a flat Box observation array of floats, found {found}")
    obs = np.asarray(obs)
    act = np.asarray(act)
    if act.dtype.kind != "f":
        raise DataError(f"{where}: key '{ep_name}/actions': expected a float Box action array, found dtype {act.dtype}")
    obs = obs.reshape(len(obs), -1)
    act = act.reshape(len(act), -1)
    rew = np.asarray(rew).reshape(-1)
    term = np.asarray(term).reshape(-1)
    trunc = np.asarray(trunc).reshape(-1)
    t = len(act)
    if len(obs) != t + 1:
        raise DataError(f"{where}: key '{key}': expected {t + 1} rows (actions rows + 1), found {len(obs)}")
    for name, arr in (("rewards", rew), ("terminations", term), ("truncations", trunc)):
        if len(arr) != t:
            raise DataError(f"{where}: key '{ep_name}/{name}': expected {t} rows (the actions rows), found {len(arr)}")
    return obs, act, rew, term, trunc


def _iter_with_package(dataset_id: str, data_dir: Path):
    import minari

    try:
        ds = minari.load_dataset(dataset_id, download=False)
    except Exception as exc:  # noqa: BLE001 - minari raises many kinds; report them all as one line
        raise DataError(f"{data_dir}: Minari dataset {dataset_id!r}: could not open it ({' '.join(str(exc).split())})") from exc
    for ep in ds.iterate_episodes():
        yield f"episode_{ep.id}", ep.observations, ep.actions, ep.rewards, ep.terminations, ep.truncations


def _iter_with_h5py(dataset_id: str, data_dir: Path):
    import h5py

    path = data_dir / "main_data.hdf5"
    if not path.is_file():
        raise DataError(
            f"{path}: Minari dataset {dataset_id!r}: expected the HDF5 data file (without the minari package only "
            f"HDF5-format datasets can be read; `pip install minari` for Arrow ones)"
        )
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise DataError(f"{path}: expected a readable HDF5 file, the file is truncated or corrupt ({exc})") from exc
    with f:
        names = sorted((k for k in f.keys() if k.startswith("episode_")), key=lambda k: int(k.split("_")[1]))
        for name in names:
            g = f[name]
            try:
                obs = g["observations"]
                obs = {k: obs[k][()] for k in obs} if isinstance(obs, h5py.Group) else obs[()]
                yield name, obs, g["actions"][()], g["rewards"][()], g["terminations"][()], g["truncations"][()]
            except KeyError as exc:
                raise DataError(f"{path}: key '{name}': expected observations, actions, rewards, terminations, "
                                f"truncations; found {', '.join(sorted(g.keys()))}") from exc
            except (OSError, RuntimeError, ValueError) as exc:
                raise DataError(f"{path}: key '{name}': could not read it, the file is truncated or corrupt ({exc})") from exc


def load_minari(dataset_id: str, use_package: bool | None = None) -> dict[str, np.ndarray]:
    """A local Minari dataset as the qlearning dict of :func:`idql_cm.data.d4rl.load_d4rl`.

    Args:
        dataset_id: e.g. ``"mujoco/halfcheetah/medium-v0"``.
        use_package: read with the ``minari`` package (True), with h5py (False), or the package when importable (None).
    """
    data_dir = minari_dataset_dir(dataset_id)
    where = str(data_dir)
    if use_package is None:
        try:
            import minari  # noqa: F401

            use_package = True
        except ImportError:
            use_package = False
    episodes = _iter_with_package(dataset_id, data_dir) if use_package else _iter_with_h5py(dataset_id, data_dir)
    obs_l, next_l, act_l, rew_l, term_l = [], [], [], [], []
    for name, *arrays in episodes:
        obs, act, rew, term, _trunc = _episode_arrays(where, name, *arrays)
        obs_l.append(obs[:-1])
        next_l.append(obs[1:])
        act_l.append(act)
        rew_l.append(rew)
        term_l.append(term)
    if not act_l or sum(len(a) for a in act_l) == 0:
        raise DataError(f"{where}: key 'observations': expected at least one episode step, found none (empty dataset)")
    obs_dims = {o.shape[1] for o in obs_l}
    act_dims = {a.shape[1] for a in act_l}
    if len(obs_dims) > 1 or len(act_dims) > 1:
        raise DataError(f"{where}: key 'observations': expected one observation/action size across episodes, found "
                        f"observation sizes {sorted(obs_dims)} and action sizes {sorted(act_dims)}")
    out = {
        "observations": np.concatenate(obs_l),
        "actions": np.concatenate(act_l),
        "next_observations": np.concatenate(next_l),
        "rewards": np.concatenate(rew_l),
    }
    if out["rewards"].dtype.kind not in "fiu":
        raise DataError(f"{where}: key 'rewards': expected numbers, found dtype {out['rewards'].dtype}")
    for key, arr in out.items():
        check_finite(where, key, arr.reshape(len(arr), -1))
    out = {k: v.astype(np.float32, copy=False) for k, v in out.items()}
    out["terminals"] = as_flags(where, "terminations", np.concatenate(term_l)).astype(bool, copy=False)
    return out
