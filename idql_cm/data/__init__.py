"""Data layer: D4RL / Minari readers, reference scores, the observation normaliser, the data module, collection.

Names are imported lazily so that ``from idql_cm.data import load_d4rl`` does not import torch or Lightning.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "load_d4rl": "d4rl",
    "read_env_id": "d4rl",
    "resolve_source": "sources",
    "iql_reward_scale": "d4rl",
    "iql_episode_returns": "d4rl",
    "qlearning_arrays": "d4rl",
    "parse_d4rl_id": "sources",
    "d4rl_task_of": "sources",
    "load_minari": "minari_source",
    "REF_SCORES": "scores",
    "task_family": "scores",
    "normalized_score": "scores",
    "gym_env_id": "scores",
    "ObsNormalizer": "normalizer",
    "TDDataModule": "datamodule",
    "collect": "collect",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'idql_cm.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"idql_cm.data.{module}"), name)


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
