"""Critic guidance: a one-step behaviour policy trained against a frozen IQL critic as well as onto the data.

The behaviour loss gains ``−η · mean Q(s, a) / mean |Q(s, a)|`` on one-step samples ``a = f(ε, s)`` of the online
network, the gradient flowing through ``f`` into the policy (OFQL, BFQ, CPQL, DTQL train their one-step actors
this way). The denominator is taken under stop-gradient, per member, so η does not depend on the reward's scale.
Q is the minimum of the critic's twin target heads, the same Q the IDQL re-ranking uses; always in fp32.

Advantage weighting (``advantage_beta`` β) uses the same critic the other way round: it never asks Q about an
action off the data. Each batch is resampled, before the behaviour loss sees it, with probabilities
``∝ min(exp(β·A(s, a)), 100)``, ``A = Q(s, a) − V(s)`` at the data's own actions (IQL's policy-extraction weights,
AWR's clip at 100), so the backbone learns the data reweighted towards its better actions: the density
``μ(a|s)·exp(β·A)`` that IDQL's re-ranking approximates at decision time, learnt once at training time.

The critic is loaded once from an IQL checkpoint of the same data, frozen, and never optimised or saved in the
policy's checkpoint (its path and SHA-256 are recorded instead).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from idql_cm.checkpoint import CRITIC_KIND, DataFacts, check_fits_data, load_weights, read_checkpoint
from idql_cm.diffusion.edm import stacked
from idql_cm.errors import ConfigError
from idql_cm.fileio import file_sha256
from idql_cm.nets.critics import TwinQ, ValueNet
from idql_cm.nets.ensemble import StackedTwinQ, StackedValueNet, member_mean

#: the largest weight exp(β·A) a transition gets (IQL / AWR clip theirs at 100)
MAX_ADVANTAGE_WEIGHT = 100.0


def check_q_weight(q_weight: Any, name: str = "q_weight") -> float:
    """η (or β, ``name``) as a float, refused unless finite and ≥ 0."""
    try:
        value = float(q_weight)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise ConfigError(f"model.{name}: expected a finite number >= 0 (0 = plain IDQL), found {q_weight!r}")
    return value


def guidance_loss(q: torch.Tensor, q_weight: float, num_seeds: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``(−η · mean Q / sg(mean |Q|), mean Q)`` of ``q [..., B, 1]``: scalars, or ``[S]`` per member."""
    q_mean = member_mean(q, num_seeds)
    scale = member_mean(q.abs(), num_seeds).detach().clamp_min(1e-8)
    return -q_weight * q_mean / scale, q_mean.detach()


def advantage_resample(batch: dict[str, torch.Tensor], adv: torch.Tensor, beta: float, generator=None
                       ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``(batch resampled, effective share)``: B rows drawn with replacement, each with probability
    ``∝ min(exp(β·A), 100)``; ``adv [..., B, 1]`` (``[S, B, 1]`` with a ``MemberGenerators``: member k resamples its
    own rows with generator k). The effective share ``(Σw)² / (B·Σw²)`` (1: uniform) is a scalar or ``[S]``."""
    w = torch.exp(beta * adv.squeeze(-1).float()).clamp_max(MAX_ADVANTAGE_WEIGHT)  # [..., B]
    n = w.shape[-1]
    if stacked(generator):
        idx = generator.multinomial(w, n)                                          # [S, B]
    else:
        idx = torch.multinomial(w, n, replacement=True, generator=generator)        # [B]
    share = w.sum(-1).pow(2) / (n * w.pow(2).sum(-1))
    out = {}
    for key, value in batch.items():
        index = idx.reshape(*idx.shape, *([1] * (value.ndim - idx.ndim)))
        out[key] = torch.take_along_dim(value, index, dim=idx.ndim - 1)
    return out, share


def check_critic_members(ckpt_seeds: int, num_seeds: int, where: str, path: str) -> None:
    """An S-member critic pairs critic k with member k, so it must hold this run's member count (a solo one guides all)."""
    if ckpt_seeds > 1 and ckpt_seeds != num_seeds:
        raise ConfigError(f"{where}: {path} holds {ckpt_seeds} IQL members (num_seeds {ckpt_seeds}), this run has "
                          f"model.num_seeds: {num_seeds}; critic k guides member k, so train both with the same "
                          "num_seeds (or guide with a solo critic)")


class CriticGuidance:
    """The frozen twin target-Q of an IQL checkpoint, as the guidance term sees it.

    ``num_seeds`` S > 1: an S-member critic pairs critic k with member k (a solo critic guides every member)."""

    def __init__(self, path: str, data: DataFacts, num_seeds: int = 1, where: str = "model.critic_ckpt",
                 value: bool = False):
        ckpt = read_checkpoint(path, expect_kind=CRITIC_KIND, what=where)
        payload, state = ckpt["idql_cm"], ckpt["state_dict"]
        check_fits_data(DataFacts.of_payload(payload), data, where, path)
        ckpt_seeds = int(payload.get("num_seeds", 1))
        check_critic_members(ckpt_seeds, num_seeds, where, path)
        dims = (int(payload["obs_dim"]), int(payload["act_dim"]), int(payload["hidden_dim"]))
        with torch.random.fork_rng(devices=[]):  # building draws initial weights: leave the global generator be
            q: nn.Module = TwinQ(*dims) if ckpt_seeds == 1 else StackedTwinQ(ckpt_seeds, *dims)
            v: nn.Module | None = None
            if value:
                v = ValueNet(dims[0], dims[2]) if ckpt_seeds == 1 else StackedValueNet(ckpt_seeds, dims[0], dims[2])
        load_weights(q, state, "q_target.", f"{where} {path}")
        self.q = q.requires_grad_(False).eval()
        self.v = None
        if v is not None:
            load_weights(v, state, "v.", f"{where} {path}")
            self.v = v.requires_grad_(False).eval()
        self.path = path
        self.sha256 = file_sha256(path)
        self.num_seeds = int(num_seeds)

    def __call__(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        """``Q(obs, act)`` ``[..., B, 1]`` in fp32 (normalised observations; the gradient flows to ``act``)."""
        with torch.autocast(obs.device.type, enabled=False):
            return self.q(obs.float(), act.float())

    @torch.no_grad()
    def advantage(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        """``A = Q(obs, act) − V(obs)`` ``[..., B, 1]`` in fp32, without gradients (built with ``value=True``)."""
        with torch.autocast(obs.device.type, enabled=False):
            return self.q(obs.float(), act.float()) - self.v(obs.float())

    def nets(self) -> list[nn.Module]:
        return [self.q] if self.v is None else [self.q, self.v]
