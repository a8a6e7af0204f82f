"""Inference API: a checkpoint in, a policy out.

::

    from idql_cm import load_actor, load_agent
    policy = load_actor("ct.ckpt")                    # policy.sample(obs, nfe=1) -> actions (NumPy in, NumPy out)
    agent = load_agent("ct.ckpt", "iql.ckpt")         # agent.act(obs, nfe=1)     -> IDQL-selected actions

Observations are raw environment observations (the checkpoint carries its normaliser); answers come back as the
kind that went in (NumPy float32 for NumPy, tensors on the policy's device for tensors).
"""

from __future__ import annotations

from idql_cm.checkpoint import read_checkpoint, seeds_in
from idql_cm.eval.agent import ActorPolicy, IDQLAgent
from idql_cm.policies import actor_from_checkpoint, critic_from_checkpoint


def load_actor(ckpt_path: str, device=None, member: int | None = None) -> ActorPolicy:
    """The EMA behaviour policy of a backbone checkpoint (EDM, CD, CT or one of your own), as an :class:`ActorPolicy`.

    ``member``: which member of a checkpoint trained with ``num_seeds: S`` (0..S-1); such a checkpoint is refused
    without it, with a line saying how many members it holds.

    ``device``: ``None`` picks CUDA when available, else CPU. Raises ``CheckpointError`` for a missing, unreadable
    or non-actor checkpoint.
    """
    return ActorPolicy(actor_from_checkpoint(str(ckpt_path), device=device, member=member))


def load_agent(actor_ckpt: str, critic_ckpt: str | None, num_candidates: int = 256, temperature: float = 100.0,
               selection: str = "softmax", device=None, member: int | None = None) -> IDQLAgent:
    """An :class:`IDQLAgent` from a behaviour checkpoint (any backbone) and an IQL checkpoint.

    ``critic_ckpt=None`` gives the behaviour policy alone. The critic is loaded on the actor's device; a critic of
    another task (different obs/act sizes) is refused with ``CheckpointError``. ``member`` k picks member k of
    S-member checkpoints (``num_seeds``), of the actor and of an S-member critic alike: critic k pairs with actor k;
    a solo critic serves any member.
    """
    actor = actor_from_checkpoint(str(actor_ckpt), device=device, member=member)
    critic = None
    if critic_ckpt is not None:
        critic = critic_from_checkpoint(str(critic_ckpt), device=actor.device, member=critic_member(str(critic_ckpt), member))
    return IDQLAgent(actor, critic, num_candidates=num_candidates, temperature=temperature, selection=selection)


def critic_member(critic_ckpt: str, member: int | None) -> int | None:
    """The critic member that pairs with actor member ``member``: the same one, or None for a solo critic."""
    if member is None:
        return None
    payload = read_checkpoint(critic_ckpt, expect_kind="iql", what="critic checkpoint")["idql_cm"]
    return member if seeds_in(payload) > 1 else None
