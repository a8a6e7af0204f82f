"""Critic guidance: a one-step behaviour policy trained against a frozen IQL critic as well as onto the data.

The behaviour loss gains ``−η · mean Q(s, a) / mean |Q(s, a)|`` on one-step samples ``a = f(ε, s)`` of the online
network, the gradient flowing through ``f`` into the policy (OFQL, BFQ, CPQL, DTQL train their one-step actors
this way). The denominator is taken under stop-gradient, per member, so η does not depend on the reward's scale.
Q is the minimum of the critic's twin target heads, the same Q the IDQL re-ranking uses; always in fp32.

The critic is loaded once from an IQL checkpoint of the same data, frozen, and never optimised or saved in the
policy's checkpoint (its path and SHA-256 are recorded instead).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from idql_cm.checkpoint import CRITIC_KIND, DataFacts, check_fits_data, load_weights, read_checkpoint
from idql_cm.errors import ConfigError
from idql_cm.fileio import file_sha256
from idql_cm.nets.critics import TwinQ
from idql_cm.nets.ensemble import StackedTwinQ, member_mean


def check_q_weight(q_weight: Any) -> float:
    """η as a float, refused unless finite and ≥ 0."""
    try:
        value = float(q_weight)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise ConfigError(f"model.q_weight: expected a finite number >= 0 (0 = plain IDQL), found {q_weight!r}")
    return value


def guidance_loss(q: torch.Tensor, q_weight: float, num_members: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``(−η · mean Q / sg(mean |Q|), mean Q)`` of ``q [..., B, 1]``: scalars, or ``[S]`` per member."""
    q_mean = member_mean(q, num_members)
    scale = member_mean(q.abs(), num_members).detach().clamp_min(1e-8)
    return -q_weight * q_mean / scale, q_mean.detach()


def check_critic_members(held: int, num_members: int, where: str, path: str) -> None:
    """An S-member critic pairs critic k with member k, so it must hold this run's member count (a solo one guides all)."""
    if held > 1 and held != num_members:
        raise ConfigError(f"{where}: {path} holds {held} IQL members (num_seeds {held}), this run has "
                          f"model.num_seeds: {num_members}; critic k guides member k, so train both with the same "
                          "num_seeds (or guide with a solo critic)")


class CriticGuidance:
    """The frozen twin target-Q of an IQL checkpoint, as the guidance term sees it.

    ``num_members`` S > 1: an S-member critic pairs critic k with member k (a solo critic guides every member)."""

    def __init__(self, path: str, data: DataFacts, num_members: int = 1, where: str = "model.critic_ckpt"):
        ckpt = read_checkpoint(path, expect_kind=CRITIC_KIND, what=where)
        meta, state = ckpt["idql_cm"], ckpt["state_dict"]
        check_fits_data(DataFacts.of_payload(meta), data, where, path)
        held = int(meta.get("num_seeds", 1))
        check_critic_members(held, num_members, where, path)
        dims = (int(meta["obs_dim"]), int(meta["act_dim"]), int(meta["hidden_dim"]))
        with torch.random.fork_rng(devices=[]):  # building draws initial weights: leave the global generator be
            q: nn.Module = TwinQ(*dims) if held == 1 else StackedTwinQ(held, *dims)
        load_weights(q, state, "q_target.", f"{where} {path}")
        self.q = q.requires_grad_(False).eval()
        self.path = path
        self.sha256 = file_sha256(path)
        self.num_members = int(num_members)

    def __call__(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        """``Q(obs, act)`` ``[..., B, 1]`` in fp32 (normalised observations; the gradient flows to ``act``)."""
        with torch.autocast(obs.device.type, enabled=False):
            return self.q(obs.float(), act.float())
