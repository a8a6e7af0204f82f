"""Checkpoints as self-contained inference artefacts.

A checkpoint alone rebuilds its policy or critic: ``checkpoint["idql_cm"]`` holds the kind, sizes,
architecture hyper-parameters, action bounds and observation normaliser; ``checkpoint["state_dict"]``
holds the weights (actors are rebuilt from their EMA copy).
"""

from __future__ import annotations

import os
import pickle
import zipfile
from dataclasses import dataclass
from typing import Any

import torch

from idql_cm.diffusion.consistency import ConsistencyModel, cm_sample
from idql_cm.diffusion.edm import EDMDenoiser, edm_sample
from idql_cm.errors import CheckpointError
from idql_cm.modules.common import FORMAT_VERSION
from idql_cm.nets.critics import TwinQ, ValueNet
from idql_cm.nets.mlp import IDQLMlp

ACTOR_KINDS = ("edm", "cd", "ct")


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
    meta = ckpt.get("idql_cm") if isinstance(ckpt, dict) else None
    if meta is None:
        raise CheckpointError(f"{what}: {path} is not an idql-cm checkpoint (no 'idql_cm' payload)")
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{what}: {path} has checkpoint format {meta.get('format')}, this idql-cm reads "
                              f"format {FORMAT_VERSION}; retrain or use the idql-cm version that wrote it")
    kinds = (expect_kind,) if isinstance(expect_kind, str) else expect_kind
    if kinds and meta.get("kind") not in kinds:
        raise CheckpointError(f"{what}: expected a {' or '.join(kinds)} checkpoint, {path} is a "
                              f"'{meta.get('kind')}' checkpoint")
    return ckpt


def _sub(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


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

    @property
    def obs_dim(self) -> int:
        return int(self.obs_mean.numel())

    @property
    def device(self) -> torch.device:
        return self.obs_mean.device

    @torch.inference_mode()
    def sample(self, obs: torch.Tensor, nfe: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``obs: [B, obs_dim]`` raw → ``act: [B, act_dim]`` with ``nfe`` network evaluations each."""
        obs_n = (obs.to(self.obs_mean.device, torch.float32) - self.obs_mean) / self.obs_std
        if self.kind == "edm":
            return edm_sample(self.model, obs_n, nfe, solver=self.solver, generator=generator)
        return cm_sample(self.model, obs_n, nfe, generator=generator)


@dataclass
class Critic:
    """The IQL critic at inference: ``advantage(obs, act) = min(Q_target) − V`` on raw observations."""

    q_target: TwinQ
    v: ValueNet
    obs_mean: torch.Tensor
    obs_std: torch.Tensor
    act_dim: int
    env_id: str | None = None

    @property
    def obs_dim(self) -> int:
        return int(self.obs_mean.numel())

    @torch.inference_mode()
    def advantage(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        obs_n = (obs.to(self.obs_mean.device, torch.float32) - self.obs_mean) / self.obs_std
        return (self.q_target(obs_n, act) - self.v(obs_n)).squeeze(-1)


def _device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_policy(path: str, device=None) -> Actor:
    """Rebuild the EMA behaviour policy of an EDM, CD or CT checkpoint."""
    ckpt = read_checkpoint(path, expect_kind=ACTOR_KINDS, what="actor checkpoint")
    meta, state = ckpt["idql_cm"], ckpt["state_dict"]
    net = IDQLMlp(meta["obs_dim"], meta["act_dim"], **meta["net"])
    method = dict(meta["method"])
    if meta["kind"] == "edm":
        model = EDMDenoiser(net, **method)
    else:
        model = ConsistencyModel(net, **{k: method[k] for k in ("sigma_data", "sigma_min", "sigma_max", "rho",
                                                               "x_min", "x_max")})
    try:
        model.load_state_dict(_sub(state, "ema_model."))
    except RuntimeError as e:
        raise CheckpointError(f"actor checkpoint {path}: weights do not fit the recorded architecture "
                              f"({str(e).splitlines()[0][:160]})") from e
    dev = _device(device)
    model = model.to(dev).eval().requires_grad_(False)
    norm = meta["normalizer"]
    return Actor(kind=meta["kind"], model=model, obs_mean=torch.tensor(norm["mean"], device=dev),
                 obs_std=torch.tensor(norm["std"], device=dev), act_dim=int(meta["act_dim"]),
                 env_id=meta.get("env_id"), task=meta.get("dataset"), solver=meta.get("solver", "euler"))


def load_critic(path: str, device=None) -> Critic:
    """Rebuild the target twin-Q and V of an IQL checkpoint."""
    ckpt = read_checkpoint(path, expect_kind="iql", what="critic checkpoint")
    meta, state = ckpt["idql_cm"], ckpt["state_dict"]
    q = TwinQ(meta["obs_dim"], meta["act_dim"], meta["hidden_dim"])
    v = ValueNet(meta["obs_dim"], meta["hidden_dim"])
    try:
        q.load_state_dict(_sub(state, "q_target."))
        v.load_state_dict(_sub(state, "v."))
    except RuntimeError as e:
        raise CheckpointError(f"critic checkpoint {path}: weights do not fit the recorded architecture "
                              f"({str(e).splitlines()[0][:160]})") from e
    dev = _device(device)
    norm = meta["normalizer"]
    return Critic(q_target=q.to(dev).eval().requires_grad_(False), v=v.to(dev).eval().requires_grad_(False),
                  obs_mean=torch.tensor(norm["mean"], device=dev), obs_std=torch.tensor(norm["std"], device=dev),
                  act_dim=int(meta["act_dim"]), env_id=meta.get("env_id"))
