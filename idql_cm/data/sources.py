"""Dataset sources: D4RL ids, D4RL file names and folders, ``minari:<id>`` sources and the local Minari root.

Names and paths only: nothing here opens an HDF5 file (the readers in :mod:`idql_cm.data.d4rl` and
:mod:`idql_cm.data.minari_source` do). Errors are one-line :class:`~idql_cm.errors.DataError`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from idql_cm.errors import DataError

__all__ = [
    "D4RL_FAMILIES",
    "D4RL_URL_PREFIX",
    "MINARI_PREFIX",
    "d4rl_dataset_dir",
    "d4rl_file_name",
    "d4rl_task_of",
    "minari_dataset_dir",
    "minari_env_id",
    "minari_metadata",
    "minari_root",
    "parse_d4rl_id",
    "resolve_source",
]

D4RL_FAMILIES = ("halfcheetah", "hopper", "walker2d")
D4RL_URL_PREFIX = "http://rail.eecs.berkeley.edu/datasets/offline_rl/gym_mujoco_v2/"
MINARI_PREFIX = "minari:"
_D4RL_DATASETS = ("random", "medium", "expert", "medium-replay", "medium-expert", "full-replay")
_D4RL_ID = re.compile(
    r"^(?P<family>halfcheetah|hopper|walker2d)-(?P<dataset>random|medium-replay|medium-expert|full-replay|medium|expert)"
    r"-v(?P<version>\d+)$"
)
# halfcheetah_medium_replay-v2.hdf5 and friends: the file names D4RL downloads
_D4RL_FILE = re.compile(
    r"^(?P<family>halfcheetah|hopper|walker2d)_(?P<dataset>random|medium_replay|medium_expert|full_replay|medium|expert)"
    r"-v(?P<version>\d+)\.hdf5$"
)


# --------------------------------------------------------------------------------------------- ids and paths
def parse_d4rl_id(name: str) -> tuple[str, str, int] | None:
    """``"hopper-medium-replay-v2"`` → ``("hopper", "medium-replay", 2)``; None for anything else."""
    m = _D4RL_ID.match(str(name).strip())
    if m is None:
        return None
    return m["family"], m["dataset"], int(m["version"])


def d4rl_file_name(d4rl_id: str) -> str:
    """The file name D4RL stores a dataset under: ``halfcheetah-medium-replay-v2`` → ``halfcheetah_medium_replay-v2.hdf5``."""
    parsed = parse_d4rl_id(d4rl_id)
    if parsed is None:
        raise DataError(
            f"{d4rl_id!r}: expected a D4RL MuJoCo id like 'halfcheetah-medium-v2' "
            f"(families {', '.join(D4RL_FAMILIES)}; datasets {', '.join(_D4RL_DATASETS)})"
        )
    family, dataset, version = parsed
    return f"{family}_{dataset.replace('-', '_')}-v{version}.hdf5"


def d4rl_dataset_dir() -> Path:
    """The D4RL download folder: ``$D4RL_DATASET_DIR``, else ``~/.d4rl/datasets`` (as ``d4rl.offline_env``)."""
    env = os.environ.get("D4RL_DATASET_DIR")
    return Path(env).expanduser() if env else Path("~/.d4rl/datasets").expanduser()


def resolve_source(source: str | os.PathLike) -> Path | str:
    """Where a dataset source lives: a :class:`Path` for files (D4RL ids resolved into the D4RL folder), or the
    ``"minari:<id>"`` string unchanged for Minari datasets. Does not check that the file exists."""
    if isinstance(source, os.PathLike):
        return Path(source).expanduser()
    text = str(source).strip()
    if text.startswith(MINARI_PREFIX):
        return text
    if parse_d4rl_id(text) is not None:
        return d4rl_dataset_dir() / d4rl_file_name(text)
    return Path(text).expanduser()


def d4rl_task_of(source: str | os.PathLike) -> str | None:
    """The D4RL task id of a source: the id itself, or one read back from a D4RL file name
    (``.../walker2d_medium_replay-v2.hdf5`` → ``walker2d-medium-replay-v2``); None otherwise."""
    if not isinstance(source, os.PathLike):
        text = str(source).strip()
        if parse_d4rl_id(text) is not None:
            return text
        if text.startswith(MINARI_PREFIX):
            return None
    m = _D4RL_FILE.match(Path(source).name)
    if m is None:
        return None
    return f"{m['family']}-{m['dataset'].replace('_', '-')}-v{m['version']}"


# ------------------------------------------------------------------------------------------------------ minari
def minari_root() -> Path:
    """The local Minari root: ``$MINARI_DATASETS_PATH``, else ``~/.minari/datasets`` (as Minari itself)."""
    env = os.environ.get("MINARI_DATASETS_PATH")
    return Path(env).expanduser() if env else Path("~/.minari/datasets").expanduser()


def minari_dataset_dir(dataset_id: str) -> Path:
    """``<root>/<dataset id>/data``; raises DataError naming the id and the root when it is not there."""
    dataset_id = dataset_id.strip().strip("/")
    root = minari_root()
    data_dir = root / dataset_id / "data"
    if not dataset_id or not (data_dir / "metadata.json").is_file():
        where = "MINARI_DATASETS_PATH" if os.environ.get("MINARI_DATASETS_PATH") else "default root, MINARI_DATASETS_PATH unset"
        raise DataError(
            f"{data_dir}: Minari dataset {dataset_id!r} not found in the local root {root} (the {where}; expected "
            f"data/metadata.json there); create it with minari.DataCollector, `minari download {dataset_id}` it on a "
            f"machine with internet, or set MINARI_DATASETS_PATH"
        )
    return data_dir


def minari_metadata(data_dir: Path) -> dict:
    path = data_dir / "metadata.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: expected a JSON object of Minari metadata, could not parse it ({exc})") from exc


def minari_env_id(dataset_id: str) -> str | None:
    """The ``env_spec`` id a Minari dataset was collected in (e.g. ``"HalfCheetah-v5"``), or None."""
    metadata = minari_metadata(minari_dataset_dir(dataset_id))
    spec = metadata.get("env_spec")
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except ValueError:
            return None
    if isinstance(spec, dict) and isinstance(spec.get("id"), str):
        return spec["id"]
    return None
