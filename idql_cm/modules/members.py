"""Several seeds in one module (``num_seeds: S``): stacking the solo nets a module builds, and taking one member out.

A module with S members builds its solo networks S times, member k under ``torch.manual_seed(s + k)`` (what a solo
run of seed ``s + k`` builds), and stacks them (:mod:`idql_cm.nets.ensemble`): a critic into its stacked class, a
*wrapper* (a model whose parameters all live in its network ``net``: the EDM denoiser, the consistency model, a
user's backbone built the same way) by stacking its ``net`` inside one copy of the wrapper (the wrapper's own work
must be elementwise, so that it broadcasts over ``[S, B, ...]``).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

from torch import nn

from idql_cm.nets.critics import TwinQ, ValueNet
from idql_cm.nets.ensemble import MemberGenerators, Stacked, StackedIDQLMlp, StackedTwinQ, StackedValueNet
from idql_cm.nets.mlp import IDQLMlp

_STACKED = {TwinQ: StackedTwinQ, ValueNet: StackedValueNet, IDQLMlp: StackedIDQLMlp}


def stack_members(nets: Sequence[nn.Module], rng: MemberGenerators) -> nn.Module:
    """One module holding ``nets`` (S solo modules of one class) as members 0..S-1, in the first one's train mode
    and ``requires_grad``."""
    first = nets[0]
    trainable = any(p.requires_grad for p in first.parameters())
    if is_wrapper(first):
        stacked = copy.deepcopy(first)
        stacked.net = stack_members([n.net for n in nets], rng)
        return stacked.train(first.training).requires_grad_(trainable)
    cls = _STACKED.get(type(first))
    if cls is None:
        raise TypeError(f"stack_members: no stacked form of {type(first).__name__}")
    return cls.from_members(list(nets), rng).train(first.training).requires_grad_(trainable)


def is_wrapper(module: nn.Module) -> bool:
    """True for a model whose parameters all live in its submodule ``net`` (stacked by stacking ``net``)."""
    net = getattr(module, "net", None)
    if not isinstance(net, nn.Module) or type(module) in _STACKED:
        return False
    inner = {id(p) for p in net.parameters()}
    return all(id(p) in inner for p in module.parameters())


def member_of(module: nn.Module, member: int) -> nn.Module:
    """Member ``member`` of a stacked module as the solo module (a copy); a solo module is returned as it is."""
    if isinstance(module, Stacked):
        return module.member(member).requires_grad_(any(p.requires_grad for p in module.parameters()))
    if isinstance(getattr(module, "net", None), Stacked):
        net = module.net
        del module.net  # copy the wrapper (its buffers) without the S-member net
        try:
            solo = copy.deepcopy(module)
        finally:
            module.net = net
        solo.net = member_of(net, member)
        return solo.train(module.training)
    return module
