"""Exponential moving average of weights: an in-place update and k-diffusion's warm-up schedule."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def ema_update_(ema_module: nn.Module, module: nn.Module, decay: float) -> None:
    """``p_ema ← decay·p_ema + (1 − decay)·p`` for every parameter (one fused foreach op); buffers are copied."""
    torch._foreach_lerp_(list(ema_module.parameters()), list(module.parameters()), 1.0 - decay)
    for b_ema, b in zip(ema_module.buffers(), module.buffers(), strict=True):
        b_ema.copy_(b)


class EMAWarmup:
    """EMA decay warm-up of k-diffusion (``utils.EMAWarmup``): ``1 − (1 + step/inv_gamma)^−power``, clamped.

    With ``inv_gamma=1, power=2/3`` the decay reaches 0.999 at 31.6k steps and 0.9999 at 1M steps.
    """

    def __init__(
        self, inv_gamma: float = 1.0, power: float = 2 / 3, min_value: float = 0.0, max_value: float = 0.9999
    ):
        self.inv_gamma, self.power = inv_gamma, power
        self.min_value, self.max_value = min_value, max_value

    def decay(self, step: int) -> float:
        value = 1.0 - (1.0 + step / self.inv_gamma) ** -self.power
        return min(self.max_value, max(self.min_value, value))
