"""Per-member optimisation of stacked nets (:mod:`idql_cm.nets.ensemble`): Adam with a step count per member and a
mask of the members that step, per-member gradient norms and finiteness, and a per-member EMA.

``torch.optim.Adam`` on stacked parameters already gives every member its solo update (the update is elementwise
and the step count is shared) as long as every member steps every time. When one member's update is skipped
(``nonfinite: skip``) its step count must stay behind, which one shared count cannot do: :class:`MemberAdam`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from idql_cm.nets.ema import ema_update_


class MemberAdam(torch.optim.Optimizer):
    """Adam (AdamW with ``decoupled=True``) over parameters with a leading member dim ``[S, ...]``, each member
    with its own step count; ``step(members=mask)`` updates only the members where ``mask [S]`` is True.

    Member k's weights and moments follow ``torch.optim.Adam`` on member k's solo parameters with the same
    gradients (the same ops on the same values: the tests compare them bit for bit on CPU). The state of a
    parameter holds ``step [S]`` (float32, as torch's ``step``), ``exp_avg`` and ``exp_avg_sq``;
    :meth:`member_state` gives member k's state in ``torch.optim.Adam``'s layout. Learning-rate schedulers act on
    ``param_groups`` as for any optimiser (the rate is shared: a schedule counts updates, skipped ones too).
    """

    def __init__(self, params: Iterable[torch.Tensor], num_seeds: int, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 decoupled: bool = False, members_after_closure: Callable[[], torch.Tensor | None] | None = None):
        """``members_after_closure``: asked after a ``step``'s closure ran which members step this update (a bool
        ``[S]``, or None for all): a non-finite check that runs inside the closure (Lightning's
        ``on_before_optimizer_step``) decides it."""
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"MemberAdam: invalid lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, decoupled=decoupled))
        self.num_seeds = int(num_seeds)
        self._members_after_closure = members_after_closure
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim == 0 or p.shape[0] != self.num_seeds:
                    raise ValueError(f"MemberAdam: expected parameters [{self.num_seeds}, ...], found "
                                     f"{list(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None, members: torch.Tensor | Sequence[bool] | None = None):
        """One update of the members in ``members`` (bool ``[S]``). Without ``members``, those that
        ``members_after_closure`` names after ``closure`` ran, else all. A parameter without gradient is left alone,
        as in torch's Adam."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if members is None and self._members_after_closure is not None:
            members = self._members_after_closure()
        S = self.num_seeds
        if members is None:
            stepping = list(range(S))
        else:
            mask = torch.as_tensor(members, dtype=torch.bool).cpu().tolist()  # a host read: called once per update
            if len(mask) != S:
                raise ValueError(f"MemberAdam.step: expected a mask of {S} members, found {len(mask)}")
            stepping = [k for k in range(S) if mask[k]]
        if not stepping:
            return loss
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros(S, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                steps = state["step"]
                steps[stepping] += 1
                counts = steps.tolist()
                # members with one step count share one update over a contiguous slab; otherwise member by member
                if len(stepping) == S and len(set(counts)) == 1:
                    slabs = [(slice(None), counts[0])]
                else:
                    slabs = [(k, counts[k]) for k in stepping]
                for index, count in slabs:
                    self._adam(p[index], p.grad[index], state["exp_avg"][index], state["exp_avg_sq"][index],
                               count, group)
        return loss

    @staticmethod
    def _adam(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
              step: float, group: dict) -> None:
        # the op sequence of torch.optim.adam._single_tensor_adam (not capturable, not differentiable)
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        if wd != 0:
            if group["decoupled"]:
                param.mul_(1 - lr * wd)
            else:
                grad = grad.add(param, alpha=wd)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        step_size = lr / bias_correction1
        bias_correction2_sqrt = bias_correction2**0.5
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        param.addcdiv_(exp_avg, denom, value=-step_size)

    def member_state(self, param: torch.Tensor, member: int) -> dict[str, torch.Tensor]:
        """Member ``member``'s state of ``param`` as ``torch.optim.Adam`` holds it (copies; empty before a step)."""
        state = self.state.get(param, {})
        if not state:
            return {}
        return {"step": state["step"][member].clone(), "exp_avg": state["exp_avg"][member].clone(),
                "exp_avg_sq": state["exp_avg_sq"][member].clone()}


def per_member_grad_norm(params: Iterable[torch.Tensor], num_seeds: int) -> torch.Tensor:
    """The L2 norm of every member's whole gradient ``[S]`` (parameters ``[S, ...]``; those without grad are left
    out): member k's value is what ``vector_norm`` over its solo gradients gives, up to summation order."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(num_seeds)
    per_tensor = torch.stack([torch.linalg.vector_norm(g.reshape(num_seeds, -1), dim=1) for g in grads])  # [P, S]
    return torch.linalg.vector_norm(per_tensor, dim=0)


def member_finite(tensors: Iterable[torch.Tensor], num_seeds: int) -> torch.Tensor:
    """Bool ``[S]``: True where every value of member k in every tensor (``[S, ...]`` or a per-member ``[S]``) is
    finite. One reduction per tensor and no host sync."""
    ok = torch.ones(num_seeds, dtype=torch.bool)
    for t in tensors:
        ok = ok.to(t.device) & torch.isfinite(t.reshape(num_seeds, -1)).all(dim=1)
    return ok


@torch.no_grad()
def member_ema_update_(ema_module: nn.Module, module: nn.Module, decay: float | torch.Tensor,
                       members: torch.Tensor | None = None) -> None:
    """:func:`~idql_cm.nets.ema.ema_update_` for stacked modules with a rate per member (``decay`` a float or
    ``[S]``) and only the members in ``members`` (bool ``[S]``; None: all) updated; buffers are copied for those.

    With a float rate and every member it is ``ema_update_`` itself (one fused lerp, elementwise: member k gets its
    solo update). Otherwise each updated member is lerped at its own rate on its own slice.
    """
    if members is None and not isinstance(decay, torch.Tensor):
        ema_update_(ema_module, module, decay)
        return
    params_ema, params = list(ema_module.parameters()), list(module.parameters())
    S = params[0].shape[0]
    rates = decay.tolist() if isinstance(decay, torch.Tensor) else [float(decay)] * S
    chosen = range(S) if members is None else [k for k, on in enumerate(members.tolist()) if on]
    for k in chosen:
        torch._foreach_lerp_([p[k] for p in params_ema], [p[k] for p in params], 1.0 - rates[k])
        for b_ema, b in zip(ema_module.buffers(), module.buffers(), strict=True):
            if b.ndim and b.shape[0] == S:
                b_ema[k].copy_(b[k])
            else:  # one value shared by the members (EDMDenoiser's x_min / x_max): a constant, copied whole
                b_ema.copy_(b)
