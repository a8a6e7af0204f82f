"""Networks (torch only): the IDQL residual MLP, the IQL critics, the EMA helpers, and their stacked S-member forms
with per-member optimisation (several seeds in one process)."""

from idql_cm.nets.critics import TwinQ, ValueNet
from idql_cm.nets.ema import EMAWarmup, ema_update_
from idql_cm.nets.ensemble import (
    MemberGenerators,
    StackedIDQLMlp,
    StackedTwinQ,
    StackedValueNet,
    bind_rng,
    set_batched,
    stack_state_dicts,
    unstack_state_dict,
)
from idql_cm.nets.member_optim import MemberAdam, member_ema_update_, member_finite, per_member_grad_norm
from idql_cm.nets.mlp import FourierEmbedding, IDQLMlp, ResidualBlock

__all__ = ["EMAWarmup", "FourierEmbedding", "IDQLMlp", "MemberAdam", "MemberGenerators", "ResidualBlock",
           "StackedIDQLMlp", "StackedTwinQ", "StackedValueNet", "TwinQ", "ValueNet", "bind_rng", "ema_update_",
           "member_ema_update_", "member_finite", "per_member_grad_norm", "set_batched", "stack_state_dicts",
           "unstack_state_dict"]
