"""The checkpoint format: what a checkpoint holds, how it is read and checked (torch only, no Lightning).

``checkpoint["idql_cm"]`` (the *payload*, :func:`make_payload`) holds the format version, the kind (``iql`` for the
critic, else a behaviour backbone's kind, :mod:`idql_cm.backbones`), the class path of the module that wrote it, the
observation / action sizes, the observation normaliser, the dataset's name, environment and size, the architecture
hyper-parameters of the kind and the count of skipped non-finite steps; ``checkpoint["state_dict"]`` holds the
weights (actors are rebuilt from their EMA copy, ``ema_model.*``).

This module parses and validates: :func:`read_checkpoint`, :func:`check_fits_data` (the one rule for "was this
checkpoint trained on this data"), :func:`pick_member`. The runtime policies built from a checkpoint live in
:mod:`idql_cm.policies`; the training modules (:mod:`idql_cm.modules`) write the format.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from idql_cm.errors import CheckpointError

#: Bumped whenever the checkpoint payload changes incompatibly; older payloads are refused.
FORMAT_VERSION = 1

#: the payload key naming the class path of the LightningModule that wrote a checkpoint
MODULE_KEY = "module"

#: the critic's kind; every other kind is a behaviour backbone (:mod:`idql_cm.backbones`)
CRITIC_KIND = "iql"


# ------------------------------------------------------------------------------------------------- the payload
def make_payload(kind: str, obs_dim: int, act_dim: int, obs_mean: torch.Tensor, obs_std: torch.Tensor,
                 data_payload: Mapping[str, Any], model: Mapping[str, Any], skipped_steps: int) -> dict[str, Any]:
    """The ``idql_cm`` entry of a checkpoint: the data facts (``data_payload``: dataset, env_id, num_transitions) and
    the kind's hyper-parameters (``model``, e.g. ``net`` and ``method`` of a behaviour policy)."""
    return {
        "format": FORMAT_VERSION,
        "kind": kind,
        "obs_dim": obs_dim,
        "act_dim": act_dim,
        "normalizer": {"mean": obs_mean.tolist(), "std": obs_std.tolist()},
        **data_payload,
        **model,
        "skipped_steps": skipped_steps,
    }


def check_payload(payload: Any, expect_kind: str | tuple[str, ...] | None, what: str, path: str) -> dict[str, Any]:
    """``payload`` (a checkpoint's ``idql_cm`` entry) if it is a payload of this format and of an expected kind, else a
    :class:`CheckpointError` naming ``what`` (the flag or key the checkpoint came from) and ``path``."""
    if not isinstance(payload, Mapping):
        raise CheckpointError(f"{what}: {path} is not an idql-cm checkpoint (no 'idql_cm' payload)")
    if payload.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{what}: {path} has checkpoint format {payload.get('format')}, this idql-cm reads "
                              f"format {FORMAT_VERSION}; retrain or use the idql-cm version that wrote it")
    kinds = (expect_kind,) if isinstance(expect_kind, str) else expect_kind
    if kinds and payload.get("kind") not in kinds:
        raise CheckpointError(f"{what}: expected a checkpoint of kind {' or '.join(repr(k) for k in kinds)}, "
                              f"{path} is a '{payload.get('kind')}' checkpoint")
    return dict(payload)


def read_checkpoint(path: str, expect_kind: str | tuple[str, ...] | None = None, what: str = "checkpoint") -> dict[str, Any]:
    """Load a checkpoint on the CPU and check that it is an idql-cm checkpoint of the expected kind.

    ``what`` names the flag or key the path came from, so the error says where to look.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"{what}: no checkpoint file at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, ValueError, OSError) as e:
        raise CheckpointError(f"{what}: {path} is not a readable PyTorch checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:120]})") from e
    check_payload(ckpt.get("idql_cm") if isinstance(ckpt, dict) else None, expect_kind, what, path)
    return ckpt


# ------------------------------------------------------------------------------------- "does it fit this data"
@dataclass(frozen=True)
class DataFacts:
    """What ties weights to data: the sizes, the observation normaliser (``[obs_dim]`` each; None: sizes only) and
    the dataset's name (for messages)."""

    obs_dim: int
    act_dim: int
    obs_mean: Any = None
    obs_std: Any = None
    dataset: str | None = None

    @classmethod
    def of_payload(cls, payload: Mapping[str, Any]) -> DataFacts:
        norm = payload.get("normalizer") or {}
        return cls(payload.get("obs_dim"), payload.get("act_dim"), norm.get("mean", []), norm.get("std", []),
                   payload.get("dataset"))


def _flat(x: Any) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float32).detach().cpu().reshape(-1)


def check_fits_data(trained: DataFacts, data: DataFacts, what: str, path: str) -> None:
    """Refuse weights (read from ``path``, given as ``what``) that were ``trained`` on other ``data``.

    Other observation / action sizes, or (when ``data`` has a normaliser) another observation normaliser, i.e.
    another dataset, raise a :class:`CheckpointError` naming both sides. Normalisers match within 1e-4 (relative and
    absolute); a side without ``obs_std`` compares means only.
    """
    if (trained.obs_dim, trained.act_dim) != (data.obs_dim, data.act_dim):
        raise CheckpointError(f"{what}: {path} has obs/act size {trained.obs_dim}/{trained.act_dim} (trained on "
                              f"{trained.dataset}), the data {data.dataset} has {data.obs_dim}/{data.act_dim}")
    if data.obs_mean is None or trained.obs_mean is None:
        return
    pairs = [(_flat(trained.obs_mean), _flat(data.obs_mean))]
    if trained.obs_std is not None and data.obs_std is not None:
        pairs.append((_flat(trained.obs_std), _flat(data.obs_std)))
    if not all(a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-4) for a, b in pairs):
        a, b = pairs[0]
        gap = float((a - b).abs().max()) if a.shape == b.shape else float("nan")
        raise CheckpointError(f"{what}: {path} was trained on {trained.dataset}, this run's data is {data.dataset}: "
                              f"their observation normalisers differ (max |mean difference| {gap:.3g}); use a "
                              "checkpoint of this dataset")


# -------------------------------------------------------------------------------------------------- rebuilding
def state_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of ``state`` under ``prefix``, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


#: the state-dict prefixes of the networks that an S-member checkpoint stacks (``[S, ...]`` under the solo names)
MEMBER_PREFIXES = ("model.net.", "ema_model.net.", "target_model.net.", "q.", "q_target.", "v.")


def seeds_in(payload: Mapping[str, Any]) -> int:
    """How many members (seeds trained side by side, ``num_seeds``) a checkpoint's payload holds."""
    return int(payload.get("num_seeds", 1))


def member_state(state: Mapping[str, torch.Tensor], member: int) -> dict[str, torch.Tensor]:
    """Member ``member``'s solo state dict from an S-member state dict (the other entries as they are)."""
    return {k: v[member] if k.startswith(MEMBER_PREFIXES) else v for k, v in state.items()}


def pick_member(payload: Mapping[str, Any], state: Mapping[str, torch.Tensor], member: int | None, what: str,
                path: str) -> Mapping[str, torch.Tensor]:
    """The solo weights of ``member`` (None: the only one) of a checkpoint, or a one-line refusal."""
    ckpt_seeds = seeds_in(payload)
    if member is None:
        if ckpt_seeds > 1:
            raise CheckpointError(f"{what}: {path} holds {ckpt_seeds} members (num_seeds: {ckpt_seeds}); pass member=k with k in "
                                  f"0..{ckpt_seeds - 1}")
        return state
    if isinstance(member, bool) or not isinstance(member, int) or not 0 <= member < ckpt_seeds:
        raise CheckpointError(f"{what}: {path} holds {ckpt_seeds} member(s); expected member in 0..{ckpt_seeds - 1}, found "
                              f"{member!r}")
    return state if ckpt_seeds == 1 else member_state(state, member)


def load_weights(model: torch.nn.Module, state: Mapping[str, torch.Tensor], prefix: str, where: str) -> None:
    """Load the entries of ``state`` under ``prefix`` into ``model``, or a one-line refusal naming ``where``."""
    try:
        model.load_state_dict(state_prefix(state, prefix))
    except RuntimeError as e:
        raise CheckpointError(f"{where}: weights do not fit the recorded architecture "
                              f"({str(e).splitlines()[0][:160]})") from e


def read_actor_checkpoint(path: str, what: str = "actor checkpoint") -> dict[str, Any]:
    """:func:`read_checkpoint` for a behaviour policy: any kind but the critic's (the backbone's spec is looked up
    by whoever rebuilds it, :mod:`idql_cm.policies`)."""
    ckpt = read_checkpoint(path, what=what)
    if ckpt["idql_cm"].get("kind") == CRITIC_KIND:
        raise CheckpointError(f"{what}: expected a behaviour-policy checkpoint (EDM, CD, CT or another backbone), "
                              f"{path} is an '{CRITIC_KIND}' (critic) checkpoint")
    return ckpt
