"""The checkpoint format: a checkpoint alone rebuilds its policy or critic (torch only, no Lightning).

``checkpoint["idql_cm"]`` (the *payload*, :func:`make_payload`) holds the format version, the kind (``iql``,
``edm``, ``cd``, ``ct``), the observation / action sizes, the observation normaliser, the dataset's name,
environment and size, the architecture hyper-parameters of the kind and the count of skipped non-finite steps;
``checkpoint["state_dict"]`` holds the weights (actors are rebuilt from their EMA copy, ``ema_model.*``).

This module reads and checks that format: :func:`read_checkpoint`, :func:`check_fits_data` (the one rule for "was
this checkpoint trained on this data"), :func:`load_policy` / :func:`load_critic` and :func:`edm_from_payload`.
The training modules (:mod:`idql_cm.modules`) write it.
"""

from __future__ import annotations

import functools
import os
import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from idql_cm.diffusion.consistency import ConsistencyModel, cm_sample
from idql_cm.diffusion.edm import EDMDenoiser, edm_sample
from idql_cm.diffusion.schedules import karras_sigmas
from idql_cm.errors import CheckpointError
from idql_cm.nets.critics import TwinQ, ValueNet
from idql_cm.nets.ensemble import StackedIDQLMlp
from idql_cm.nets.mlp import IDQLMlp

#: Bumped whenever the checkpoint payload changes incompatibly; older payloads are refused.
FORMAT_VERSION = 1

ACTOR_KINDS = ("edm", "cd", "ct")

# the constructor arguments of a consistency model among a behaviour payload's "method" (EDM adds P_mean, P_std)
_CM_METHOD_KEYS = ("sigma_data", "sigma_min", "sigma_max", "rho", "x_min", "x_max")


# ------------------------------------------------------------------------------------------------- the payload
def make_payload(kind: str, obs_dim: int, act_dim: int, obs_mean: torch.Tensor, obs_std: torch.Tensor,
                 data_info: Mapping[str, Any], model: Mapping[str, Any], skipped_steps: int) -> dict[str, Any]:
    """The ``idql_cm`` entry of a checkpoint: the data facts (``data_info``: dataset, env_id, num_transitions) and
    the kind's hyper-parameters (``model``, e.g. ``net`` and ``method`` of a behaviour policy)."""
    return {
        "format": FORMAT_VERSION,
        "kind": kind,
        "obs_dim": obs_dim,
        "act_dim": act_dim,
        "normalizer": {"mean": obs_mean.tolist(), "std": obs_std.tolist()},
        **data_info,
        **model,
        "skipped_steps": skipped_steps,
    }


def check_payload(meta: Any, expect_kind: str | tuple[str, ...] | None, what: str, path: str) -> dict[str, Any]:
    """``meta`` (a checkpoint's ``idql_cm`` entry) if it is a payload of this format and of an expected kind, else a
    :class:`CheckpointError` naming ``what`` (the flag or key the checkpoint came from) and ``path``."""
    if not isinstance(meta, Mapping):
        raise CheckpointError(f"{what}: {path} is not an idql-cm checkpoint (no 'idql_cm' payload)")
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{what}: {path} has checkpoint format {meta.get('format')}, this idql-cm reads "
                              f"format {FORMAT_VERSION}; retrain or use the idql-cm version that wrote it")
    kinds = (expect_kind,) if isinstance(expect_kind, str) else expect_kind
    if kinds and meta.get("kind") not in kinds:
        raise CheckpointError(f"{what}: expected a checkpoint of kind {' or '.join(repr(k) for k in kinds)}, "
                              f"{path} is a '{meta.get('kind')}' checkpoint")
    return dict(meta)


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
    def of_payload(cls, meta: Mapping[str, Any]) -> DataFacts:
        norm = meta.get("normalizer") or {}
        return cls(meta.get("obs_dim"), meta.get("act_dim"), norm.get("mean", []), norm.get("std", []),
                   meta.get("dataset"))


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


def num_members(meta: Mapping[str, Any]) -> int:
    """How many members (seeds trained side by side, ``num_seeds``) a checkpoint's payload holds."""
    return int(meta.get("num_seeds", 1))


def member_state(state: Mapping[str, torch.Tensor], member: int) -> dict[str, torch.Tensor]:
    """Member ``member``'s solo state dict from an S-member state dict (the other entries as they are)."""
    return {k: v[member] if k.startswith(MEMBER_PREFIXES) else v for k, v in state.items()}


def pick_member(meta: Mapping[str, Any], state: Mapping[str, torch.Tensor], member: int | None, what: str,
                path: str) -> Mapping[str, torch.Tensor]:
    """The solo weights of ``member`` (None: the only one) of a checkpoint, or a one-line refusal."""
    held = num_members(meta)
    if member is None:
        if held > 1:
            raise CheckpointError(f"{what}: {path} holds {held} members (num_seeds: {held}); pass member=k with k in "
                                  f"0..{held - 1}")
        return state
    if isinstance(member, bool) or not isinstance(member, int) or not 0 <= member < held:
        raise CheckpointError(f"{what}: {path} holds {held} member(s); expected member in 0..{held - 1}, found "
                              f"{member!r}")
    return state if held == 1 else member_state(state, member)


def _load_weights(model: torch.nn.Module, state: Mapping[str, torch.Tensor], prefix: str, where: str) -> None:
    try:
        model.load_state_dict(state_prefix(state, prefix))
    except RuntimeError as e:
        raise CheckpointError(f"{where}: weights do not fit the recorded architecture "
                              f"({str(e).splitlines()[0][:160]})") from e


def edm_from_payload(payload: Mapping[str, Any], state: Mapping[str, torch.Tensor] | None = None,
                     prefix: str = "ema_model.", where: str = "EDM checkpoint", num_members: int = 1) -> EDMDenoiser:
    """The EDM denoiser an ``edm`` payload describes (network and method hyper-parameters), with the weights under
    ``prefix`` of ``state`` (the EMA copy by default; ``state=None``: fresh weights). ``where`` starts the error.
    ``num_members`` S > 1: the S-member denoiser of an S-member state (``[S, ...]`` weights)."""
    dims = (payload["obs_dim"], payload["act_dim"])
    net = IDQLMlp(*dims, **payload["net"]) if num_members == 1 else StackedIDQLMlp(num_members, *dims, **payload["net"])
    model = EDMDenoiser(net, **payload["method"])
    if state is not None:
        _load_weights(model, state, prefix, where)
    return model


def _consistency_from_payload(payload: Mapping[str, Any], state: Mapping[str, torch.Tensor],
                              where: str) -> ConsistencyModel:
    method = payload["method"]
    model = ConsistencyModel(IDQLMlp(payload["obs_dim"], payload["act_dim"], **payload["net"]),
                             **{k: method[k] for k in _CM_METHOD_KEYS})
    _load_weights(model, state, "ema_model.", where)
    return model


@dataclass
class Actor:
    """A behaviour policy ready to sample: raw observations in, clipped actions out."""

    kind: str
    model: torch.nn.Module
    obs_mean: torch.Tensor
    obs_std: torch.Tensor
    act_dim: int
    env_id: str | None = None
    task: str | None = None
    solver: str = "euler"
    sample_sigma_max: float | None = None
    sample_rho: float | None = None
    train_grid: torch.Tensor | None = None  # consistency models: re-noise on these σ (see cm_sample)

    @property
    def obs_dim(self) -> int:
        return int(self.obs_mean.numel())

    @property
    def device(self) -> torch.device:
        return self.obs_mean.device

    def data_facts(self) -> DataFacts:
        return DataFacts(self.obs_dim, int(self.act_dim), self.obs_mean, self.obs_std, self.task)

    @torch.inference_mode()
    def sample(self, obs: torch.Tensor, nfe: int, generator: torch.Generator | None = None,
               noise: torch.Tensor | None = None) -> torch.Tensor:
        """``obs: [B, obs_dim]`` raw → ``act: [B, act_dim]`` with ``nfe`` network evaluations each; ``noise``: the
        sampler's standard normals ``[nfe, B, act_dim]`` instead of draws from ``generator``."""
        obs_n = (obs.to(self.obs_mean.device, torch.float32) - self.obs_mean) / self.obs_std
        if self.kind == "edm":
            return edm_sample(self.model, obs_n, nfe, solver=self.solver, generator=generator,
                              sigma_max=self.sample_sigma_max, rho=self.sample_rho, noise=noise)
        return cm_sample(self.model, obs_n, nfe, generator=generator, noise=noise, train_grid=self.train_grid)


@dataclass
class Critic:
    """The IQL critic at inference: ``advantage(obs, act) = min(Q_target) − V`` on raw observations."""

    q_target: TwinQ
    v: ValueNet
    obs_mean: torch.Tensor
    obs_std: torch.Tensor
    act_dim: int
    env_id: str | None = None
    task: str | None = None

    @property
    def obs_dim(self) -> int:
        return int(self.obs_mean.numel())

    def data_facts(self) -> DataFacts:
        return DataFacts(self.obs_dim, int(self.act_dim), self.obs_mean, self.obs_std, self.task)

    @torch.inference_mode()
    def advantage(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        """``[B]`` float32, computed in fp32 even inside an autocast region (see IQLModule.loss_step: selection
        ranks advantage differences that bf16 cannot represent at Q ≈ 90)."""
        with torch.autocast(self.obs_mean.device.type, enabled=False):
            obs_n = (obs.to(self.obs_mean.device, torch.float32) - self.obs_mean) / self.obs_std
            act = act.to(obs_n.device, torch.float32)
            return (self.q_target(obs_n, act) - self.v(obs_n)).squeeze(-1)


def sampling_options(meta: Mapping[str, Any], device=None) -> dict[str, Any]:
    """How a checkpoint's policy samples, from its payload (one rule for ``load_policy`` and the training module's
    ``eval_actor``): the EDM solver and start, and a consistency model's training grid when it re-noises on it."""
    intervals = meta.get("train_intervals")
    grid = None
    if meta.get("renoise") == "train_grid" and intervals:
        m = meta["method"]
        grid = karras_sigmas(int(intervals), m["sigma_min"], m["sigma_max"], m["rho"], device=device)
    edm = meta.get("kind") == "edm"
    return {"solver": meta.get("solver", "euler") if edm else "euler",
            "sample_sigma_max": meta.get("sample_sigma_max") if edm else None,
            "sample_rho": meta.get("sample_rho") if edm else None, "train_grid": grid}


def _device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _rng_neutral(load):
    """Run a loader under ``torch.random.fork_rng``: rebuilding nets draws initial weights (then overwritten) from
    torch's global generator, and a load must not move it. The CLI's preflight loads the critic after
    ``seed_everything`` and before the module builds its nets; without this a solo run's initial weights depended on
    whether (and which) critic the evaluation callback names, and member k of an ensemble (which builds under its own
    ``manual_seed``) stopped matching the solo run of its seed."""
    @functools.wraps(load)
    def wrapped(*args, **kwargs):
        with torch.random.fork_rng(devices=[]):  # the nets are built on the CPU, then moved
            return load(*args, **kwargs)
    return wrapped


@_rng_neutral
def load_policy(path: str, device=None, member: int | None = None) -> Actor:
    """Rebuild the EMA behaviour policy of an EDM, CD or CT checkpoint (``member`` k of an S-member one)."""
    ckpt = read_checkpoint(path, expect_kind=ACTOR_KINDS, what="actor checkpoint")
    meta = ckpt["idql_cm"]
    state = pick_member(meta, ckpt["state_dict"], member, "actor checkpoint", path)
    where = f"actor checkpoint {path}"
    if meta["kind"] == "edm":
        model = edm_from_payload(meta, state, "ema_model.", where)
    else:
        model = _consistency_from_payload(meta, state, where)
    dev = _device(device)
    model = model.to(dev).eval().requires_grad_(False)
    norm = meta["normalizer"]
    return Actor(kind=meta["kind"], model=model, obs_mean=torch.tensor(norm["mean"], device=dev),
                 obs_std=torch.tensor(norm["std"], device=dev), act_dim=int(meta["act_dim"]),
                 env_id=meta.get("env_id"), task=meta.get("dataset"), **sampling_options(meta, dev))


@_rng_neutral
def load_critic(path: str, device=None, what: str = "critic checkpoint", member: int | None = None) -> Critic:
    """Rebuild the target twin-Q and V of an IQL checkpoint (``what`` names where the path came from; ``member`` k of
    an S-member one)."""
    ckpt = read_checkpoint(path, expect_kind="iql", what=what)
    meta = ckpt["idql_cm"]
    state = pick_member(meta, ckpt["state_dict"], member, what, path)
    q = TwinQ(meta["obs_dim"], meta["act_dim"], meta["hidden_dim"])
    v = ValueNet(meta["obs_dim"], meta["hidden_dim"])
    _load_weights(q, state, "q_target.", f"{what} {path}")
    _load_weights(v, state, "v.", f"{what} {path}")
    dev = _device(device)
    norm = meta["normalizer"]
    return Critic(q_target=q.to(dev).eval().requires_grad_(False), v=v.to(dev).eval().requires_grad_(False),
                  obs_mean=torch.tensor(norm["mean"], device=dev), obs_std=torch.tensor(norm["std"], device=dev),
                  act_dim=int(meta["act_dim"]), env_id=meta.get("env_id"), task=meta.get("dataset"))
