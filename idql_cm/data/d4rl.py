"""Readers for D4RL-layout HDF5 files (and, via :mod:`idql_cm.data.minari_source`, Minari datasets).

:func:`load_d4rl` returns the transition dict of ``d4rl.qlearning_dataset`` (docs/design.md), computed with
vectorised NumPy instead of D4RL's per-row Python loop:

* rows ``i = 0 .. N-2`` (the last row of the file is always dropped);
* ``next_observations[i] = observations[i + 1]`` (a ``next_observations`` key in the file is ignored);
* rows whose ``timeouts`` flag is set are skipped; a file without ``timeouts`` uses D4RL's backwards-compatible
  counter instead (a row is skipped when the episode step counter reaches ``max_episode_steps - 1``);
* ``terminals`` is a bool array, everything else float32 (``rewards`` 1-D).

Sources (:func:`resolve_source`):

* a D4RL id such as ``halfcheetah-medium-v2`` → ``$D4RL_DATASET_DIR/halfcheetah_medium-v2.hdf5``
  (default folder ``~/.d4rl/datasets``; ``medium-replay`` → ``halfcheetah_medium_replay-v2.hdf5``);
* a path to any HDF5 file in the D4RL layout (float32 or float64, with or without ``infos/*`` / ``metadata/*``,
  any observation / action size), e.g. one written by ``idql-cm collect``;
* ``minari:<dataset id>``: a dataset in the local Minari root (``MINARI_DATASETS_PATH`` or ``~/.minari/datasets``).

Every problem with the input is raised as a one-line :class:`~idql_cm.errors.DataError` naming the file, the key,
what was expected and what was found.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from idql_cm.data.sources import (
    D4RL_URL_PREFIX,
    MINARI_PREFIX,
    d4rl_task_of,
    minari_dataset_dir,
    minari_env_id,
    parse_d4rl_id,
    resolve_source,
)
from idql_cm.data.validation import check_arrays
from idql_cm.errors import DataError

__all__ = ["DataWarning", "iql_episode_returns", "iql_reward_scale", "load_d4rl", "qlearning_arrays", "read_env_id"]

REQUIRED_KEYS = ("observations", "actions", "rewards", "terminals")


class DataWarning(UserWarning):
    """Data that is used after a repair (clipped actions, unscaled rewards); ``idql-cm`` prints it as one line."""


def _missing_file_error(source, path: Path) -> DataError:
    if not isinstance(source, os.PathLike) and parse_d4rl_id(str(source).strip()) is not None:
        name = path.name
        where = "D4RL_DATASET_DIR" if os.environ.get("D4RL_DATASET_DIR") else "default folder, D4RL_DATASET_DIR unset"
        return DataError(
            f"{path}: D4RL dataset {str(source).strip()!r} not found (looked for {name} in {path.parent}, the {where}); "
            f"download {D4RL_URL_PREFIX}{name} into that folder, set D4RL_DATASET_DIR to the folder that holds it, "
            f"or pass the file's path"
        )
    return DataError(
        f"{path}: dataset file not found (expected a D4RL-layout HDF5 file, a D4RL id like 'halfcheetah-medium-v2', "
        f"or 'minari:<dataset id>'; `idql-cm collect --out {path}` writes a demo file)"
    )


# ------------------------------------------------------------------------------------------------ HDF5 reading
def _open_h5(source, path: Path):
    import h5py

    if not path.exists():
        raise _missing_file_error(source, path)
    if path.is_dir():
        raise DataError(f"{path}: expected an HDF5 file in the D4RL layout, found a directory")
    try:
        size = path.stat().st_size
        if size == 0:
            raise DataError(f"{path}: expected an HDF5 file in the D4RL layout, found an empty file (0 bytes)")
        if not h5py.is_hdf5(path):
            raise DataError(f"{path}: expected an HDF5 file in the D4RL layout, found no HDF5 signature ({size} bytes)")
        return h5py.File(path, "r")
    except DataError:
        raise
    except (OSError, ValueError, RuntimeError) as exc:
        raise DataError(
            f"{path}: expected a readable HDF5 file, the file is truncated or corrupt ({_one_line(exc)})"
        ) from exc


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (text[:200] + "...") if len(text) > 200 else (text or type(exc).__name__)


def _top_keys(f) -> str:
    try:
        keys = sorted(f.keys())
    except Exception:  # noqa: BLE001 - only used in a message
        return "?"
    return ", ".join(keys) if keys else "none"


def _read_array(f, path: Path, key: str, kind: str) -> np.ndarray:
    """Read one dataset. kind "float" (floating point only) or "flag" (bool / integer / float 0-1 flags)."""
    import h5py

    try:
        present = key in f
    except (OSError, RuntimeError, ValueError) as exc:
        raise DataError(f"{path}: key '{key}': could not look the key up, the file is truncated or corrupt ({_one_line(exc)})") from exc
    if not present:
        raise DataError(
            f"{path}: key '{key}' missing (expected a D4RL-layout file with keys {', '.join(REQUIRED_KEYS)}"
            f"[, timeouts]; found keys: {_top_keys(f)})"
        )
    try:
        obj = f[key]
    except (OSError, RuntimeError, ValueError, KeyError) as exc:
        raise DataError(f"{path}: key '{key}': could not open it, the file is truncated or corrupt ({_one_line(exc)})") from exc
    if not isinstance(obj, h5py.Dataset):
        raise DataError(f"{path}: key '{key}': expected an array, found a group with keys {', '.join(sorted(obj.keys())) or 'none'}")
    dt = obj.dtype
    ok = dt.kind == "f" if kind == "float" else dt.kind in "biuf"
    if not ok:
        want = "a floating-point array" if kind == "float" else "a bool or numeric 0/1 array"
        raise DataError(f"{path}: key '{key}': expected {want}, found dtype {dt} (shape {obj.shape})")
    try:
        arr = obj[()]
    except (OSError, RuntimeError, ValueError, TypeError) as exc:
        raise DataError(f"{path}: key '{key}': could not read the data, the file is truncated or corrupt ({_one_line(exc)})") from exc
    return np.asarray(arr)


# ------------------------------------------------------------------------------------------------- qlearning
def _counter_skips(terminals: np.ndarray, n: int, max_episode_steps: int) -> np.ndarray:
    """Rows qlearning_dataset skips in a file without ``timeouts``: those where its episode-step counter equals
    ``max_episode_steps - 1``. The counter starts at 0, is reset to 0 by a skip and to 0 (then +1 for the kept row,
    i.e. 1 on the next row) by a terminal. One Python iteration per episode boundary."""
    skip = np.zeros(n, dtype=bool)
    term_idx = np.flatnonzero(terminals[:n])
    last = max_episode_steps - 1
    row, step = 0, 0
    while row < n:
        cand = row + (last - step)  # the row at which the counter reaches max_episode_steps - 1
        k = int(np.searchsorted(term_idx, row, side="left"))
        t = int(term_idx[k]) if k < len(term_idx) else n
        if t < cand:  # an earlier terminal resets the counter: the following row has step 1
            row, step = t + 1, 1
        else:
            if cand < n:
                skip[cand] = True
            row, step = cand + 1, 0
    return skip


def qlearning_arrays(
    observations: np.ndarray,
    actions: np.ndarray,
    rewards: np.ndarray,
    terminals: np.ndarray,
    timeouts: np.ndarray | None = None,
    max_episode_steps: int = 1000,
) -> dict[str, np.ndarray]:
    """``d4rl.qlearning_dataset`` on already validated arrays (see :func:`check_arrays`), vectorised."""
    n = len(observations) - 1
    if timeouts is not None:
        keep = ~timeouts[:n]
    else:
        keep = ~_counter_skips(terminals, n, max_episode_steps)
    idx = np.flatnonzero(keep)
    return {
        "observations": observations[idx].astype(np.float32, copy=False),
        "actions": actions[idx].astype(np.float32, copy=False),
        "next_observations": observations[idx + 1].astype(np.float32, copy=False),
        "rewards": rewards[idx].astype(np.float32, copy=False),
        "terminals": terminals[idx].astype(bool, copy=False),
    }


# --------------------------------------------------------------------------------------------------- public API
def load_d4rl(source: str | os.PathLike, max_episode_steps: int = 1000) -> dict[str, np.ndarray]:
    """Load a dataset as ``d4rl.qlearning_dataset`` would return it.

    Args:
        source: a D4RL id (``halfcheetah-medium-v2``), a path to a D4RL-layout HDF5 file, or ``minari:<id>``.
        max_episode_steps: only for files without a ``timeouts`` key: D4RL's fallback counter skips the row at which
            an episode reaches this many steps (the gym MuJoCo time limit, 1000).

    Returns:
        ``observations [M, O]``, ``actions [M, A]``, ``next_observations [M, O]``, ``rewards [M]`` (float32) and
        ``terminals [M]`` (bool).

    Raises:
        DataError: a missing / unreadable / malformed file, naming the file and the key.
    """
    resolved = resolve_source(source)
    if isinstance(resolved, str):  # minari:<id>
        from idql_cm.data.minari_source import load_minari

        check_minari_layout(resolved[len(MINARI_PREFIX):])
        return load_minari(resolved[len(MINARI_PREFIX):])
    path = resolved
    with _open_h5(source, path) as f:
        raw = {key: _read_array(f, path, key, "float") for key in ("observations", "actions", "rewards")}
        raw["terminals"] = _read_array(f, path, "terminals", "flag")
        raw["timeouts"] = _read_array(f, path, "timeouts", "flag") if "timeouts" in f else None
    arrays = check_arrays(str(path), raw)
    out = qlearning_arrays(max_episode_steps=max_episode_steps, **arrays)
    if len(out["rewards"]) == 0:
        raise DataError(
            f"{path}: key 'timeouts': expected some rows that are not timeouts, found all {len(arrays['rewards']) - 1} "
            f"candidate rows flagged (no transitions left)"
        )
    return out


def check_minari_layout(dataset_id: str) -> None:
    """Refuse a local Minari dataset whose files are ambiguous before reading it: a key given twice in
    ``metadata.json`` (JSON keeps the last silently), or two episodes of one id in ``main_data.hdf5`` (``episode_3``
    and ``episode_03``, or two groups whose ``id`` attribute is equal, e.g. after a faulty merge: the episode would
    be trained on twice, or one would shadow the other)."""
    import json


    data_dir = minari_dataset_dir(dataset_id)
    meta_path = data_dir / "metadata.json"

    def unique(pairs):
        seen: dict = {}
        for key, value in pairs:
            if key in seen:
                raise DataError(f"{meta_path}: key '{key}': expected each key once in the Minari metadata, found it twice "
                                f"(values {seen[key]!r} and {value!r})")
            seen[key] = value
        return seen

    try:
        json.loads(meta_path.read_text(), object_pairs_hook=unique)
    except DataError:
        raise
    except (OSError, ValueError) as exc:
        raise DataError(f"{meta_path}: expected a JSON object of Minari metadata, could not parse it ({_one_line(exc)})") from exc
    h5_path = data_dir / "main_data.hdf5"
    if not h5_path.is_file():
        return  # an Arrow-format dataset: the minari package checks its own layout
    import h5py

    try:
        with h5py.File(h5_path, "r") as f:
            owners: dict[int, str] = {}
            for name in f.keys():
                if not name.startswith("episode_"):
                    continue
                suffix = name[len("episode_"):]
                if not suffix.isdigit():
                    raise DataError(f"{h5_path}: key '{name}': expected episode groups named episode_<number>")
                ids = {int(suffix)}
                attr = f[name].attrs.get("id")
                if attr is not None and np.ndim(attr) == 0:
                    ids.add(int(attr))
                for ep_id in ids:
                    if ep_id in owners and owners[ep_id] != name:
                        raise DataError(f"{h5_path}: key '{name}': expected one episode per id, found episode id "
                                        f"{ep_id} twice ('{owners[ep_id]}' and '{name}')")
                    owners[ep_id] = name
    except DataError:
        raise
    except (OSError, RuntimeError, ValueError, TypeError) as exc:
        raise DataError(f"{h5_path}: expected a readable HDF5 file, the file is truncated or corrupt ({_one_line(exc)})") from exc


def _decode(value) -> str | None:
    if isinstance(value, np.ndarray):
        if value.size != 1:
            return None
        value = value.reshape(()).item()
    if isinstance(value, (bytes, np.bytes_)):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str):
        return value.strip() or None
    return None


def read_env_id(source: str | os.PathLike) -> str | None:
    """The environment a dataset came from.

    * a D4RL id → its family (``"halfcheetah"``, ``"hopper"``, ``"walker2d"``; map it with
      :func:`idql_cm.data.scores.gym_env_id`);
    * a file with ``metadata/env_id`` (a string dataset, or an ``env_id`` attribute of the ``metadata`` group or of
      the file; ``idql-cm collect`` writes it) → that id, e.g. ``"HalfCheetah-v5"``;
    * a file named like a D4RL download (``hopper_medium-v2.hdf5``) → its family;
    * ``minari:<id>`` → the dataset's ``env_spec`` id;
    * otherwise None.
    """
    if not isinstance(source, os.PathLike):
        text = str(source).strip()
        parsed = parse_d4rl_id(text)
        if parsed is not None:
            return parsed[0]
        if text.startswith(MINARI_PREFIX):
            return minari_env_id(text[len(MINARI_PREFIX):])
    path = resolve_source(source)
    assert isinstance(path, Path)
    with _open_h5(source, path) as f:
        found = None
        try:
            if "metadata/env_id" in f:
                obj = f["metadata/env_id"]
                found = _decode(obj[()]) if hasattr(obj, "dtype") else None
            if found is None and "metadata" in f:
                found = _decode(f["metadata"].attrs.get("env_id"))
            if found is None:
                found = _decode(f.attrs.get("env_id"))
        except (OSError, RuntimeError, ValueError, TypeError) as exc:
            raise DataError(f"{path}: key 'metadata/env_id': could not read it, the file is truncated or corrupt ({_one_line(exc)})") from exc
    if found is not None:
        return found
    task = d4rl_task_of(path)
    return parse_d4rl_id(task)[0] if task else None


# ------------------------------------------------------------------------------------------------ reward scaling
def iql_episode_returns(rewards: np.ndarray, terminals: np.ndarray, max_len: int = 1000) -> np.ndarray:
    """Returns of the "episodes" of the IQL/CORL locomotion rule (docs/design.md, ``return_reward_range``):
    walking the rows in order, an episode ends at a terminal row or when its length reaches ``max_len``; a trailing
    unfinished episode is not counted. Vectorised; sums in float64 like the reference's Python floats."""
    rewards = np.asarray(rewards, dtype=np.float64).reshape(-1)
    terminals = np.asarray(terminals).reshape(-1).astype(bool)
    n = len(rewards)
    if n == 0:
        return np.zeros(0)
    idx = np.arange(n)
    # position of each row inside its terminal-delimited segment (the counter resets after a terminal)
    starts = np.zeros(n, dtype=np.int64)
    after_term = np.flatnonzero(terminals[:-1]) + 1
    starts[after_term] = after_term
    pos = idx - np.maximum.accumulate(starts)
    ends = terminals | ((pos + 1) % max_len == 0)
    ep_id = np.concatenate(([0], np.cumsum(ends)[:-1]))
    sums = np.bincount(ep_id, weights=rewards)
    return sums[: int(ends.sum())]


def iql_reward_scale(rewards: np.ndarray, terminals: np.ndarray, max_len: int = 1000, where: str = "dataset") -> np.ndarray:
    """The IQL locomotion reward scaling: ``rewards * 1000 / (max episode return - min episode return)`` with the
    episodes of :func:`iql_episode_returns` (as CleanDiffuser's ``modify_reward(dataset, 1000)``; applied to
    qlearning rows, whose timeouts are already gone, the 1000-step counter drifts exactly as in the reference).

    Returns a new float32 array (the input is not modified). Raises DataError when fewer than two episodes
    complete or all complete episodes have the same return (the scale would be undefined).
    """
    rewards = np.asarray(rewards)
    returns = iql_episode_returns(rewards, terminals, max_len)
    if len(returns) < 2 or float(returns.max() - returns.min()) <= 0.0:
        found = f"{len(returns)} complete episode(s)" + (
            f" with return range {float(returns.max() - returns.min()):.6g}" if len(returns) else ""
        )
        raise DataError(
            f"{where}: key 'rewards': expected at least two complete episodes (ending at a terminal or after "
            f"{max_len} steps) with different returns for reward_scale='iql_locomotion', found {found}"
        )
    scale = 1000.0 / float(returns.max() - returns.min())
    return (rewards.astype(np.float64) * scale).astype(np.float32)
