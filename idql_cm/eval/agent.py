"""The IDQL agent: a critic re-ranks actions sampled from a generative behaviour policy.

For a batch of states ``obs: [B, obs_dim]`` the agent draws ``N`` candidates per state from the behaviour policy at
the requested NFE in **one** batched actor call (``obs`` repeated ``N`` times → ``[B·N, obs_dim]``), scores them
with **one** batched critic call (advantage = min target-Q − V, reshaped ``[B, N]``) and keeps one candidate per
state:

- ``selection="softmax"`` (CleanDiffuser's IDQL inference, docs/design.md): sample one candidate from
  ``softmax(T · adv)`` over the ``N`` candidates. ``T → ∞`` tends to the argmax, ``T = 0`` is uniform over the
  candidates (i.e. the behaviour policy itself).
- ``selection="argmax"`` (original IDQL's ``eval_actions``): the candidate with the largest advantage.

Without a critic the agent is the behaviour policy alone (behaviour cloning): one sample per state.

Observations are raw (unnormalised); the actor normalises them itself. ``act`` accepts NumPy arrays or tensors and
answers in kind (NumPy float32 for NumPy input), for one state ``[obs_dim]`` or a batch ``[B, obs_dim]``; it refuses
non-finite observations (a deployed policy must not turn a NaN state into a NaN action).

Randomness can be given instead of drawn (for replays, and for parity with an exported graph, ``idql_cm.export``):
``noise [nfe, B, N, act_dim]`` standard normals (the sampler's initial and re-noising draws, ``N = 1`` without a
critic) and ``u [B]`` uniforms in [0, 1) for the softmax draw, taken by inverse CDF.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from idql_cm.checkpoint import DataFacts, check_fits_data
from idql_cm.errors import ConfigError, DataError

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
    check_finite_rows(t, where)
    return t, was_numpy, single


def check_finite_rows(obs: torch.Tensor, where: str) -> None:
    """Refuse observations ``[B, O]`` with a NaN or Inf, naming the first rows that hold one."""
    bad = (~torch.isfinite(obs)).any(dim=-1)
    if bool(bad.any()):
        rows = bad.nonzero().flatten().tolist()
        shown = ", ".join(map(str, rows[:8])) + (f", ... ({len(rows)} rows)" if len(rows) > 8 else "")
        raise DataError(f"{where}: expected finite observations, found NaN/Inf in row(s) {shown} of {obs.shape[0]}")


def _given_noise(noise, shape: tuple[int, ...], device, where: str) -> torch.Tensor | None:
    """Given sampler noise → float32 tensor of ``shape`` on ``device``; None stays None."""
    if noise is None:
        return None
    noise = torch.as_tensor(noise, dtype=torch.float32, device=device)
    if tuple(noise.shape) != tuple(shape):
        dims = "[nfe, B, act_dim]" if len(shape) == 3 else "[nfe, B, candidates, act_dim]"
        raise ConfigError(f"{where}: expected noise of shape {list(shape)} ({dims}), found {list(noise.shape)}")
    return noise


def _given_u(u, b: int, device, where: str, draws: bool) -> torch.Tensor | None:
    """Given uniforms for the softmax draw → float32 ``[B]`` on ``device``, each in [0, 1); None stays None."""
    if u is None:
        return None
    if not draws:
        raise ConfigError(f"{where}: u (uniforms for the softmax draw) given, but this agent does not draw "
                          f"(selection argmax, an infinite temperature or no critic)")
    u = torch.as_tensor(u, dtype=torch.float32, device=device)
    if tuple(u.shape) != (b,):
        raise ConfigError(f"{where}: expected u of shape [{b}] (one uniform per state), found {list(u.shape)}")
    if not bool(((u >= 0) & (u < 1)).all()):
        raise ConfigError(f"{where}: expected u in [0, 1), found values from {float(u.min()):.4g} to "
                          f"{float(u.max()):.4g}")
    return u


def _in_kind(act: torch.Tensor, was_numpy: bool, single: bool):
    if single:
        act = act.squeeze(0)
    if was_numpy:
        return act.detach().to("cpu", torch.float32).numpy()
    return act


def select_candidates(adv: torch.Tensor, temperature: float = 100.0, selection: str = "softmax",
                      generator: torch.Generator | None = None, u: torch.Tensor | None = None) -> torch.Tensor:
    """Indices ``[B]`` of the chosen candidates given advantages ``adv: [B, N]``.

    ``softmax``: one draw from ``softmax(temperature · adv)`` per row (``temperature = inf`` → argmax);
    ``argmax``: the best candidate. Non-finite advantages never win: NaN/−inf get zero weight; a row without any
    finite advantage falls back to a uniform draw.

    ``u: [B]`` uniforms in [0, 1) make the softmax draw an inverse-CDF pick: the first candidate whose cumulative
    probability exceeds ``u``. Without ``u`` the draw is ``torch.multinomial`` with ``generator``. The same code
    runs in the exported graph (``idql_cm.export``), which is why it uses only cumsum / compare / sum.
    """
    if selection == "argmax" or (selection == "softmax" and math.isinf(temperature)):
        return torch.nan_to_num(adv.float(), nan=-math.inf).argmax(dim=-1)
    if selection != "softmax":
        raise ConfigError(f"selection: expected one of {SELECTIONS}, found {selection!r}")
    logits = temperature * adv.float()
    logits = torch.nan_to_num(logits, nan=-math.inf, posinf=torch.finfo(torch.float32).max)
    dead = (logits == -math.inf).all(dim=-1, keepdim=True)  # == -inf, not isneginf: ONNX has no IsNegInf
    logits = torch.where(dead, torch.zeros_like(logits), logits)
    probs = torch.softmax(logits, dim=-1)
    if u is None:
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    cdf = probs.cumsum(dim=-1)                                   # [B, N]
    target = u.to(cdf)[:, None] * cdf[:, -1:]                    # scaled by the total: rounding never overshoots
    return (cdf <= target).sum(dim=-1).clamp(max=adv.shape[-1] - 1)


def sample_actions(actor, obs: torch.Tensor, nfe: int, generator: torch.Generator | None = None,
                   noise: torch.Tensor | None = None) -> torch.Tensor:
    """``actor.sample(obs, nfe, generator)``, or with given sampler ``noise [nfe, B, act_dim]``
    ``actor.sample(obs, nfe, noise=noise)`` (a checkpoint's policy, ``idql_cm.policies.Actor``)."""
    if noise is None:
        return actor.sample(obs, nfe, generator=generator)
    if getattr(actor, "model", None) is None:
        raise ConfigError(f"sampler noise: {type(actor).__name__} samples with its own randomness; given noise "
                          f"needs a checkpoint's policy (idql_cm.load_actor / load_agent)")
    return actor.sample(obs, nfe, noise=noise)


class ActorPolicy:
    """The behaviour policy alone, NumPy-friendly: ``sample(obs, nfe)`` maps raw observations to actions in kind.

    Wraps an ``Actor`` (``idql_cm.policies``): attributes ``kind``, ``obs_dim``, ``act_dim``, ``env_id``,
    ``task`` and ``device`` are forwarded; ``actor`` is the wrapped object.
    """

    def __init__(self, actor):
        self.actor = actor

    def __getattr__(self, name):  # forward kind, obs_dim, act_dim, env_id, task, device, ...
        if name == "actor":
            raise AttributeError(name)
        return getattr(self.actor, name)

    @torch.inference_mode()
    def sample(self, obs, nfe: int = 1, generator: torch.Generator | None = None, noise=None):
        """``obs: [B, obs_dim]`` or ``[obs_dim]`` raw (NumPy or tensor) → actions ``[B, act_dim]`` in kind.

        ``noise``: the sampler's standard normals ``[nfe, B, act_dim]`` instead of draws from ``generator``."""
        t, was_numpy, single = _as_obs_batch(obs, self.actor.obs_dim, getattr(self.actor, "device", None),
                                             "ActorPolicy.sample")
        if single and noise is not None:
            noise = torch.as_tensor(noise).unsqueeze(1)
        noise = _given_noise(noise, (int(nfe), t.shape[0], int(self.actor.act_dim)), t.device, "ActorPolicy.sample")
        return _in_kind(sample_actions(self.actor, t, int(nfe), generator, noise), was_numpy, single)

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
        temperature: ``T`` of ``softmax(T · adv)``; task-specific in the reference (docs/design.md).
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
        if critic is not None:  # sizes only: these may be any policy and critic, without a normaliser
            check_fits_data(DataFacts(int(critic.obs_dim), int(critic.act_dim), dataset="its task"),
                            DataFacts(int(actor.obs_dim), int(actor.act_dim), dataset="of the actor"), "IDQLAgent",
                            "the critic")
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
    @property
    def draws_selection(self) -> bool:
        """True when the choice among candidates is random (softmax at a finite temperature), i.e. takes ``u``."""
        return self.critic is not None and self.selection == "softmax" and not math.isinf(self.temperature)

    @torch.inference_mode()
    def act_tensor(self, obs: torch.Tensor, nfe: int, generator: torch.Generator | None = None,
                   noise: torch.Tensor | None = None, u: torch.Tensor | None = None) -> torch.Tensor:
        """``obs: [B, obs_dim]`` float32 tensor on the actor's device → actions ``[B, act_dim]`` (no checks).

        ``noise [nfe, B, N, act_dim]`` / ``u [B]``: given randomness (see :meth:`act`). This is also the body of
        the exported graph (``idql_cm.export`` traces it), so it stays free of host-side checks."""
        b, a = obs.shape[0], self.act_dim
        if self.critic is None:
            return sample_actions(self.actor, obs, nfe, generator, None if noise is None else noise.reshape(nfe, b, a))
        n = self.num_candidates
        obs_rep = obs.repeat_interleave(n, dim=0)                          # [B·N, O]
        if noise is not None:
            noise = noise.reshape(nfe, b * n, a)                          # row b·N + j: state b, candidate j
        cand = sample_actions(self.actor, obs_rep, nfe, generator, noise)  # [B·N, A], one actor call
        adv = self.critic.advantage(obs_rep, cand).reshape(b, n)          # [B, N], one critic call
        idx = select_candidates(adv.to(cand.device), self.temperature, self.selection, generator, u)  # [B]
        return torch.gather(cand.reshape(b, n, a), 1, idx.reshape(b, 1, 1).expand(b, 1, a)).squeeze(1)  # [B, A]

    def act(self, obs, nfe: int = 1, generator: torch.Generator | None = None, noise=None, u=None):
        """Actions for raw observations ``[B, obs_dim]`` (or one ``[obs_dim]``), NumPy or tensor, in kind.

        ``nfe`` network evaluations of the behaviour policy per candidate; ``generator`` (on the actor's
        device) makes the candidates and the softmax draw reproducible. Instead of drawing, ``noise``
        (``[nfe, B, N, act_dim]`` standard normals, ``N`` = ``num_candidates``, 1 without a critic) and ``u``
        (``[B]`` uniforms in [0, 1), for the softmax draw by inverse CDF) can be given; for one state ``[obs_dim]``
        they may be ``[nfe, N, act_dim]`` and a scalar. Non-finite observations raise a ``DataError`` naming the
        rows.
        """
        t, was_numpy, single = _as_obs_batch(obs, self.obs_dim, self.device, "IDQLAgent.act")
        nfe = int(nfe)
        n = self.num_candidates if self.critic is not None else 1
        if single:
            noise = None if noise is None else torch.as_tensor(noise).unsqueeze(1)
            u = None if u is None else torch.as_tensor(u).reshape(1)
        noise = _given_noise(noise, (nfe, t.shape[0], n, self.act_dim), t.device, "IDQLAgent.act")
        u = _given_u(u, t.shape[0], t.device, "IDQLAgent.act", self.draws_selection)
        return _in_kind(self.act_tensor(t, nfe, generator, noise, u), was_numpy, single)

    sample = act
    __call__ = act

    def __repr__(self) -> str:
        crit = "none (behaviour policy alone)" if self.critic is None else type(self.critic).__name__
        return (f"IDQLAgent(kind={self.kind!r}, obs_dim={self.obs_dim}, act_dim={self.act_dim}, critic={crit}, "
                f"num_candidates={self.num_candidates}, temperature={self.temperature}, "
                f"selection={self.selection!r})")
