"""D4RL reference scores and task names (docs/design.md).

``normalized_score`` is ``100 * (R - ref_min) / (ref_max - ref_min)``: D4RL's ``get_normalized_score`` returns the
fraction, papers and this project report it ×100. All v2 datasets of an environment share the same references.
"""

from __future__ import annotations

import re

import numpy as np

from idql_cm.errors import ConfigError

__all__ = ["D4RL_ENV_VERSION", "FAMILY_LABELS", "REF_SCORES", "gym_env_id", "normalized_score", "task_family"]

#: The gymnasium version a D4RL task is evaluated in: v4 has the dynamics of D4RL's -v2 data (Walker2d-v5 gives both
#: feet friction 1.9 where v2-v4 have 0.9 on the right one, and Hopper/Walker2d-v5 pay no healthy reward on a
#: terminating step); v5 is selectable (RolloutEvaluation.env_version).
D4RL_ENV_VERSION = "v4"

# (ref_min = random policy, ref_max = expert), from d4rl/infos.py
REF_SCORES: dict[str, tuple[float, float]] = {
    "halfcheetah": (-280.178953, 12135.0),
    "hopper": (-20.272305, 3234.3),
    "walker2d": (1.629008, 4592.3),
}

#: Each family's display name, which is also its gymnasium name (``HalfCheetah-v4``).
FAMILY_LABELS = {"halfcheetah": "HalfCheetah", "hopper": "Hopper", "walker2d": "Walker2d"}
_SPLIT = re.compile(r"[-_/:\s]")


def task_family(name: str | None) -> str | None:
    """``"hopper-medium-replay-v2"``, ``"Hopper-v5"``, ``"hopper"``, ``"hopper_medium-v2.hdf5"`` → ``"hopper"``;
    None when the name is not one of halfcheetah / hopper / walker2d."""
    if not name:
        return None
    for token in _SPLIT.split(str(name).strip().lower()):
        if token:
            return token if token in REF_SCORES else None
    return None


def _family_or_raise(task: str) -> str:
    family = task_family(task)
    if family is None:
        raise ConfigError(
            f"task {task!r}: expected a D4RL id, gym id or family of {', '.join(REF_SCORES)} (e.g. "
            f"'halfcheetah-medium-v2', 'HalfCheetah-v5'), found no known family"
        )
    return family


def normalized_score(task: str, episode_return):
    """D4RL normalised score ×100 of an episode return (a float, or an array of returns → an array)."""
    lo, hi = REF_SCORES[_family_or_raise(task)]
    ret = np.asarray(episode_return, dtype=np.float64)
    score = 100.0 * (ret - lo) / (hi - lo)
    return float(score) if score.ndim == 0 else score


def gym_env_id(task: str, version: str = D4RL_ENV_VERSION) -> str:
    """The gymnasium MuJoCo id of a task: ``halfcheetah`` → ``HalfCheetah-v4`` (``version="v5"`` → ``-v5``)."""
    if not re.fullmatch(r"v\d+", str(version)):
        raise ConfigError(f"gym version {version!r}: expected 'v4' or 'v5'")
    return f"{FAMILY_LABELS[_family_or_raise(task)]}-{version}"
