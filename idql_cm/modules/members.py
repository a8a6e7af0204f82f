"""Several seeds in one module (``num_seeds: S``): stacking the solo nets a module builds, and taking one member out.

A module with S members builds its solo networks S times, member k under ``torch.manual_seed(s + k)`` (what a solo
run of seed ``s + k`` builds), and stacks them (:mod:`idql_cm.nets.ensemble`): a critic into its stacked class, a
preconditioned model (EDM denoiser, consistency model) by stacking its network ``net`` inside one wrapper (the
preconditioning is elementwise and broadcasts over ``[S, B, ...]``).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

from torch import nn

from idql_cm.diffusion.edm import Preconditioned
from idql_cm.nets.critics import TwinQ, ValueNet
from idql_cm.nets.ensemble import MemberGenerators, Stacked, StackedIDQLMlp, StackedTwinQ, StackedValueNet
from idql_cm.nets.mlp import IDQLMlp

_STACKED = {TwinQ: StackedTwinQ, ValueNet: StackedValueNet, IDQLMlp: StackedIDQLMlp}


def stack_members(nets: Sequence[nn.Module], rng: MemberGenerators) -> nn.Module:
    """One module holding ``nets`` (S solo modules of one class) as members 0..S-1, in the first one's train mode
    and ``requires_grad``."""
    first = nets[0]
    trainable = any(p.requires_grad for p in first.parameters())
    if isinstance(first, Preconditioned):
        stacked = copy.deepcopy(first)
        stacked.net = stack_members([n.net for n in nets], rng)
        return stacked.train(first.training).requires_grad_(trainable)
    cls = _STACKED.get(type(first))
    if cls is None:
        raise TypeError(f"stack_members: no stacked form of {type(first).__name__}")
    return cls.from_members(list(nets), rng).train(first.training).requires_grad_(trainable)


def member_of(module: nn.Module, member: int) -> nn.Module:
    """Member ``member`` of a stacked module as the solo module (a copy); a solo module is returned as it is."""
    if isinstance(module, Stacked):
        return module.member(member).requires_grad_(any(p.requires_grad for p in module.parameters()))
    if isinstance(module, Preconditioned) and isinstance(module.net, Stacked):
        net = module.net
        del module.net  # copy the wrapper (its buffers) without the S-member net
        try:
            solo = copy.deepcopy(module)
        finally:
            module.net = net
        solo.net = member_of(net, member)
        return solo.train(module.training)
    return module
