"""The IDQL agent: a critic re-ranks actions sampled from a generative behaviour policy.

For a batch of states ``obs: [B, obs_dim]`` the agent draws ``N`` candidates per state from the behaviour policy at
the requested NFE in **one** batched actor call (``obs`` repeated ``N`` times → ``[B·N, obs_dim]``), scores them
with **one** batched critic call (advantage = min target-Q − V, reshaped ``[B, N]``) and keeps one candidate per
state:

- ``selection="softmax"`` (CleanDiffuser's IDQL inference, reference-spec §4): sample one candidate from
  ``softmax(T · adv)`` over the ``N`` candidates. ``T → ∞`` tends to the argmax, ``T = 0`` is uniform over the
  candidates (i.e. the behaviour policy itself).
- ``selection="argmax"`` (original IDQL's ``eval_actions``): the candidate with the largest advantage.

Without a critic the agent is the behaviour policy alone (behaviour cloning): one sample per state.

Observations are raw (unnormalised); the actor normalises them itself. ``act`` accepts NumPy arrays or tensors and
answers in kind (NumPy float32 for NumPy input), for one state ``[obs_dim]`` or a batch ``[B, obs_dim]``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from idql_cm.errors import CheckpointError, ConfigError, DataError

SELECTIONS = ("softmax", "argmax")


def _as_obs_batch(obs: Any, obs_dim: int, device: torch.device | str | None, where: str
                  ) -> tuple[torch.Tensor, bool, bool]:
    """``obs`` (NumPy or tensor, ``[O]`` or ``[B, O]``) → float32 tensor ``[B, O]`` on ``device``.

    Returns ``(obs, was_numpy, was_single)`` so the answer can be given back in kind.
    """
    was_numpy = not isinstance(obs, torch.Tensor)
    if was_numpy:
        try:
            arr = np.asarray(obs, dtype=np.float32)
        except (TypeError, ValueError) as e:
            raise DataError(f"{where}: expected observations as a numeric array [B, {obs_dim}], "
                            f"found {type(obs).__name__} ({e})") from e
        t = torch.from_numpy(np.ascontiguousarray(arr))
    else:
        t = obs
    single = t.dim() == 1
    if single:
        t = t.unsqueeze(0)
    if t.dim() != 2 or t.shape[-1] != obs_dim:
        raise DataError(f"{where}: expected observations of shape [B, {obs_dim}] (the policy's obs_dim) "
                        f"or [{obs_dim}], found shape {list(obs.shape if hasattr(obs, 'shape') else t.shape)}")
    t = t.to(device=device, dtype=torch.float32)
    return t, was_numpy, single


def _in_kind(act: torch.Tensor, was_numpy: bool, single: bool):
    if single:
        act = act.squeeze(0)
    if was_numpy:
        return act.detach().to("cpu", torch.float32).numpy()
    return act


def select_candidates(adv: torch.Tensor, temperature: float = 100.0, selection: str = "softmax",
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Indices ``[B]`` of the chosen candidates given advantages ``adv: [B, N]``.

    ``softmax``: one draw from ``softmax(temperature · adv)`` per row (``temperature = inf`` → argmax);
    ``argmax``: the best candidate. Non-finite advantages never win: NaN/−inf get zero weight; a row without any
    finite advantage falls back to a uniform draw.
    """
    if selection == "argmax" or (selection == "softmax" and math.isinf(temperature)):
        return torch.nan_to_num(adv.float(), nan=-math.inf).argmax(dim=-1)
    if selection != "softmax":
        raise ConfigError(f"selection: expected one of {SELECTIONS}, found {selection!r}")
    logits = temperature * adv.float()
    logits = torch.nan_to_num(logits, nan=-math.inf, posinf=torch.finfo(torch.float32).max)
    dead = torch.isneginf(logits).all(dim=-1, keepdim=True)
    logits = torch.where(dead, torch.zeros_like(logits), logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class ActorPolicy:
    """The behaviour policy alone, NumPy-friendly: ``sample(obs, nfe)`` maps raw observations to actions in kind.

    Wraps an ``Actor`` (``idql_cm.modules.artifacts``): attributes ``kind``, ``obs_dim``, ``act_dim``, ``env_id``,
    ``task`` and ``device`` are forwarded; ``actor`` is the wrapped object.
    """

    def __init__(self, actor):
        self.actor = actor

    def __getattr__(self, name):  # forward kind, obs_dim, act_dim, env_id, task, device, ...
        if name == "actor":
            raise AttributeError(name)
        return getattr(self.actor, name)

    @torch.inference_mode()
    def sample(self, obs, nfe: int = 1, generator: torch.Generator | None = None):
        """``obs: [B, obs_dim]`` or ``[obs_dim]`` raw (NumPy or tensor) → actions ``[B, act_dim]`` in kind."""
        t, was_numpy, single = _as_obs_batch(obs, self.actor.obs_dim, getattr(self.actor, "device", None),
                                             "ActorPolicy.sample")
        return _in_kind(self.actor.sample(t, int(nfe), generator=generator), was_numpy, single)

    __call__ = sample

    def __repr__(self) -> str:
        return (f"ActorPolicy(kind={getattr(self.actor, 'kind', None)!r}, obs_dim={self.actor.obs_dim}, "
                f"act_dim={self.actor.act_dim})")


class IDQLAgent:
    """IDQL action selection: ``N`` behaviour-policy candidates per state, re-ranked by an IQL critic.

    Args:
        actor: the behaviour policy (``kind``, ``obs_dim``, ``act_dim``, ``device``,
            ``sample(obs [B,O] raw, nfe, generator) -> [B,A]``).
        critic: an IQL critic (``obs_dim``, ``act_dim``, ``advantage(obs [B,O] raw, act [B,A]) -> [B]``), or
            ``None`` for the behaviour policy alone (one sample per state, no re-ranking).
        num_candidates: ``N``, candidates per state (256 in CleanDiffuser and the tutorial).
        temperature: ``T`` of ``softmax(T · adv)``; task-specific in the reference (reference-spec §4).
        selection: ``"softmax"`` (sample from ``softmax(T · adv)``, the reference's) or ``"argmax"``
            (original IDQL's evaluation).
    """

    def __init__(self, actor, critic=None, num_candidates: int = 256, temperature: float = 100.0,
                 selection: str = "softmax"):
        if selection not in SELECTIONS:
            raise ConfigError(f"selection: expected one of {SELECTIONS}, found {selection!r}")
        if int(num_candidates) < 1:
            raise ConfigError(f"num_candidates: expected an integer >= 1, found {num_candidates}")
        temperature = float(temperature)
        if math.isnan(temperature) or temperature < 0:
            raise ConfigError(f"temperature: expected a number >= 0, found {temperature}")
        if critic is not None and (int(critic.obs_dim), int(critic.act_dim)) != (int(actor.obs_dim),
                                                                                 int(actor.act_dim)):
            raise CheckpointError(
                f"critic (obs_dim={critic.obs_dim}, act_dim={critic.act_dim}) does not fit the actor "
                f"(obs_dim={actor.obs_dim}, act_dim={actor.act_dim}): were they trained on the same task?")
        self.actor = actor
        self.critic = critic
        self.num_candidates = int(num_candidates)
        self.temperature = temperature
        self.selection = selection

    # -- attributes of the underlying policy ------------------------------------------------------------------
    @property
    def obs_dim(self) -> int:
        return int(self.actor.obs_dim)

    @property
    def act_dim(self) -> int:
        return int(self.actor.act_dim)

    @property
    def device(self) -> torch.device:
        return torch.device(getattr(self.actor, "device", "cpu"))

    @property
    def kind(self) -> str | None:
        return getattr(self.actor, "kind", None)

    @property
    def is_idql(self) -> bool:
        """True when a critic re-ranks candidates; False for the behaviour policy alone."""
        return self.critic is not None

    # -- acting ------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def act_tensor(self, obs: torch.Tensor, nfe: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``obs: [B, obs_dim]`` float32 tensor on the actor's device → actions ``[B, act_dim]`` (no checks)."""
        if self.critic is None:
            return self.actor.sample(obs, nfe, generator=generator)
        b, n = obs.shape[0], self.num_candidates
        obs_rep = obs.repeat_interleave(n, dim=0)                          # [B·N, O]
        cand = self.actor.sample(obs_rep, nfe, generator=generator)       # [B·N, A], one actor call
        adv = self.critic.advantage(obs_rep, cand).reshape(b, n)          # [B, N], one critic call
        idx = select_candidates(adv.to(cand.device), self.temperature, self.selection, generator)  # [B]
        return cand.reshape(b, n, -1)[torch.arange(b, device=cand.device), idx]  # [B, A]

    def act(self, obs, nfe: int = 1, generator: torch.Generator | None = None):
        """Actions for raw observations ``[B, obs_dim]`` (or one ``[obs_dim]``), NumPy or tensor, in kind.

        ``nfe`` network evaluations of the behaviour policy per candidate; ``generator`` (on the actor's
        device) makes the candidates and the softmax draw reproducible.
        """
        t, was_numpy, single = _as_obs_batch(obs, self.obs_dim, self.device, "IDQLAgent.act")
        return _in_kind(self.act_tensor(t, int(nfe), generator), was_numpy, single)

    sample = act
    __call__ = act

    def __repr__(self) -> str:
        crit = "none (behaviour policy alone)" if self.critic is None else type(self.critic).__name__
        return (f"IDQLAgent(kind={self.kind!r}, obs_dim={self.obs_dim}, act_dim={self.act_dim}, critic={crit}, "
                f"num_candidates={self.num_candidates}, temperature={self.temperature}, "
                f"selection={self.selection!r})")
