"""Runtime policies: a behaviour policy that samples and a critic that scores, rebuilt from checkpoints.

The checkpoint format (:mod:`idql_cm.checkpoint`) parses and validates; the objects here act. An :class:`Actor`
holds its backbone's sampler (:mod:`idql_cm.backbones`) and the sampler options its checkpoint recorded, so acting
never branches on a kind. The training modules build the same objects for their rollouts (``eval_actor``), so a
policy samples identically during training and after loading.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from idql_cm.backbones import BackboneSpec, spec_of_payload
from idql_cm.checkpoint import (
    CRITIC_KIND,
    DataFacts,
    load_weights,
    pick_member,
    read_actor_checkpoint,
    read_checkpoint,
)
from idql_cm.diffusion.edm import standard_normal
from idql_cm.nets.critics import TwinQ, ValueNet


@dataclass
class Actor:
    """A behaviour policy ready to sample: raw observations in, clipped actions out.

    ``spec`` is its backbone (the sampler), ``options`` the sampler's keyword options from the checkpoint."""

    spec: BackboneSpec
    model: torch.nn.Module
    obs_mean: torch.Tensor
    obs_std: torch.Tensor
    act_dim: int
    env_id: str | None = None
    task: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    description: str = ""  # how it samples, in a word (an export's "solver" field)
    q_weight: float = 0.0  # η of the critic guidance it was trained with (0: a plain behaviour policy)
    noise_scale: float = 1.0  # λ: the initial draw is λ·ε (a sampling temperature; 1: the trained distribution)
    advantage_beta: float = 0.0  # β of the advantage weighting it was trained with (0: the data as it is)

    @property
    def kind(self) -> str:
        return self.spec.kind

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
        if self.noise_scale != 1.0:  # every sampler starts from noise[0]: scale that draw, given or drawn here
            if noise is None:
                noise = standard_normal((nfe, obs_n.shape[0], int(self.act_dim)), obs_n, generator)
            noise = torch.cat([noise[:1] * self.noise_scale, noise[1:]])
        return self.spec.sample(self.model, obs_n, nfe, generator=generator, noise=noise, **self.options)

    @classmethod
    def of_payload(cls, spec: BackboneSpec, payload: Mapping[str, Any], model: torch.nn.Module,
                   obs_mean: torch.Tensor, obs_std: torch.Tensor, device: Any = None) -> Actor:
        """The actor of ``model`` sampling as ``payload`` says (one rule for a loaded checkpoint and a training
        module's rollouts)."""
        return cls(spec=spec, model=model, obs_mean=obs_mean, obs_std=obs_std, act_dim=int(payload["act_dim"]),
                   env_id=payload.get("env_id"), task=payload.get("dataset"),
                   options=spec.options(payload, device), description=spec.describe(payload),
                   q_weight=float(payload.get("q_weight") or 0.0),
                   noise_scale=float(payload.get("sample_noise_scale", 1.0)),
                   advantage_beta=float(payload.get("advantage_beta") or 0.0))


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
        """``[B]`` float32, computed in fp32 even inside an autocast region: selection ranks advantage differences
        that bf16 cannot represent at Q ≈ 90 (docs/design.md)."""
        with torch.autocast(self.obs_mean.device.type, enabled=False):
            obs_n = (obs.to(self.obs_mean.device, torch.float32) - self.obs_mean) / self.obs_std
            act = act.to(obs_n.device, torch.float32)
            return (self.q_target(obs_n, act) - self.v(obs_n)).squeeze(-1)


def _device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _rng_neutral(load):
    """Run a loader under ``torch.random.fork_rng``: rebuilding nets draws initial weights (then overwritten) from
    torch's global generator, and a load must not move it. The CLI's preflight loads the critic after
    ``seed_everything`` and before the module builds its nets; without this a solo run's initial weights would
    depend on whether (and which) critic the evaluation names, and member k of an ensemble would stop matching the
    solo run of its seed."""
    @functools.wraps(load)
    def wrapped(*args, **kwargs):
        with torch.random.fork_rng(devices=[]):  # the nets are built on the CPU, then moved
            return load(*args, **kwargs)
    return wrapped


def _normaliser(payload: Mapping[str, Any], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    norm = payload["normalizer"]
    return torch.tensor(norm["mean"], device=device), torch.tensor(norm["std"], device=device)


@_rng_neutral
def actor_from_checkpoint(path: str, device=None, member: int | None = None,
                          what: str = "actor checkpoint") -> Actor:
    """Rebuild the EMA behaviour policy of a backbone checkpoint (``member`` k of an S-member one)."""
    ckpt = read_actor_checkpoint(path, what)
    payload = ckpt["idql_cm"]
    spec = spec_of_payload(payload, f"{what} {path}")
    state = pick_member(payload, ckpt["state_dict"], member, what, path)
    dev = _device(device)
    model = spec.rebuild(payload, state, f"{what} {path}").to(dev).eval().requires_grad_(False)
    return Actor.of_payload(spec, payload, model, *_normaliser(payload, dev), device=dev)


@_rng_neutral
def critic_from_checkpoint(path: str, device=None, what: str = "critic checkpoint",
                           member: int | None = None) -> Critic:
    """Rebuild the target twin-Q and V of an IQL checkpoint (``what`` names where the path came from; ``member`` k of
    an S-member one)."""
    ckpt = read_checkpoint(path, expect_kind=CRITIC_KIND, what=what)
    payload = ckpt["idql_cm"]
    state = pick_member(payload, ckpt["state_dict"], member, what, path)
    q = TwinQ(payload["obs_dim"], payload["act_dim"], payload["hidden_dim"])
    v = ValueNet(payload["obs_dim"], payload["hidden_dim"])
    load_weights(q, state, "q_target.", f"{what} {path}")
    load_weights(v, state, "v.", f"{what} {path}")
    dev = _device(device)
    mean, std = _normaliser(payload, dev)
    return Critic(q_target=q.to(dev).eval().requires_grad_(False), v=v.to(dev).eval().requires_grad_(False),
                  obs_mean=mean, obs_std=std, act_dim=int(payload["act_dim"]), env_id=payload.get("env_id"),
                  task=payload.get("dataset"))
