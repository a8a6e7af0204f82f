"""The non-finite guard of a training module: NaN/Inf in a loss or a gradient stops training or skips the update.

Modes (``model.nonfinite``): ``stop`` raises :class:`~idql_cm.errors.NonFiniteError` before the bad update (on a GPU
one checked step late, see :meth:`NonFiniteGuard.defer_`); ``skip`` drops the bad update (with S members, only the
bad members' updates) and counts it. The guard holds its own state; what it needs of the module it guards (the
step, the device, the trainer, logging) comes through :class:`Guarded`.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch

from idql_cm.errors import ConfigError, NonFiniteError
from idql_cm.lightning_compat import last_saved_step, trainer_of
from idql_cm.nets.member_optim import member_finite

MODES = ("stop", "skip")
Watched = list[tuple[str, torch.Tensor]]


class Guarded(Protocol):
    """What the guard reads from the module it guards (an :class:`~idql_cm.modules.common.IDQLModule`)."""

    global_step: int
    device: torch.device
    num_seeds: int

    def member_seed(self, member: int) -> int: ...

    def log_scalar(self, name: str, value: Any, **kwargs: Any) -> None: ...

    def named_parameters(self) -> Any: ...

    def warn(self, message: str) -> None: ...


class NonFiniteGuard:
    """This fit's non-finite bookkeeping: the losses watched this step, the skip counts, the members stepping this
    update, a deferred verdict not read yet."""

    def __init__(self, mode: str, check_every: int, num_seeds: int) -> None:
        if mode not in MODES:
            raise ConfigError(f"model.nonfinite: expected 'stop' or 'skip', found {mode!r}")
        self.mode = mode
        self.check_every = max(1, int(check_every))
        self.num_seeds = int(num_seeds)
        self.skipped: int | list[int] = 0 if self.num_seeds == 1 else [0] * self.num_seeds
        self.watched: Watched = []  # this step's losses, checked before the update
        self.skip_update = False  # this step's update is skipped (skip mode)
        self.member_mask: torch.Tensor | None = None  # members whose update goes ahead this step (skip mode, S > 1)
        self.defer: bool | None = None  # None: decided at the first check (see deferred)
        self.pending: tuple | None = None  # a deferred verdict not read yet

    # ------------------------------------------------------------------ per update
    def watch(self, name: str, value: torch.Tensor) -> None:
        self.watched.append((name, value.detach()))

    def begin_update(self) -> None:
        self.skip_update = False
        self.member_mask = None

    def checks(self, step: int) -> bool:
        return step % self.check_every == 0

    def wants_grad_norms(self, check: bool, log: bool) -> bool:
        # The gradients cost one pass over them (docs/performance.md): skip mode reads them before every checked
        # update, as it must act before a bad update; stop mode only on logging steps (train/grad_norm), because a
        # non-finite gradient that gets through makes the weights, hence the next step's loss, non-finite: training
        # stops one step later, and no checkpoint is ever written with non-finite weights.
        return log or (check and self.mode == "skip")

    def take_watched(self) -> Watched:
        watched, self.watched = self.watched, []
        return watched

    def check(self, host: Guarded, watched: Watched, grad_norms: torch.Tensor | None, params: list[torch.Tensor]
              ) -> None:
        """Stop (raise) or skip the update when a watched loss or a gradient norm is NaN/Inf.

        The hot path is one sum and one read-back (the host sync of a checked step): a sum is non-finite iff a term
        is (or the terms overflow float32, which is no healthy loss either); which one is bad is worked out only on
        failure. ``params``: the optimiser's parameters (their gradients are dropped for a skipped update)."""
        if self.num_seeds > 1:  # per-member [S] losses and norms: one sum all the same
            terms = [v.float().sum() for _, v in watched]
        else:
            terms = [v.reshape(()).float() for _, v in watched]
        terms += [grad_norms.sum()] if grad_norms is not None else []
        if not terms:
            return
        total = torch.stack(terms).sum()
        trainer = trainer_of(host)
        if trainer is not None and trainer.world_size > 1:
            # every rank decides the same: a skip on one rank only would make the replicas diverge
            total = trainer.strategy.reduce(total, reduce_op="sum")
        if self.deferred(host):
            self.resolve_pending(host)  # the previous checked step's verdict: ready by now, so no wait in practice
            self.defer_(host, total, watched, grad_norms)
            return
        if math.isfinite(total.item()):
            return
        quantity = bad_quantity(watched, grad_norms)
        name = type(host).__name__
        if self.num_seeds > 1:
            self._members(host, watched, grad_norms, quantity)
            return
        if self.mode == "skip":
            for p in params:  # no gradient: the optimiser leaves weights and moments alone
                p.grad = None
            self.skip_update = True
            self.skipped += 1
            host.log_scalar("train/skipped_nonfinite_steps", float(self.skipped))
            if self.skipped & (self.skipped - 1) == 0:  # 1, 2, 4, 8, ...: a count, not a flood
                host.warn(f"{name}: non-finite {quantity} at step {host.global_step}: update skipped ({self.skipped} "
                          "skipped so far, model.init_args.nonfinite: skip)")
            return
        poisoned = nonfinite_param(host)
        if poisoned is not None:
            raise NonFiniteError(
                f"{name}: non-finite {quantity} at step {host.global_step} because the weights were already "
                f"non-finite ({poisoned}): a non-finite gradient of step {host.global_step - 1} got through (with "
                "nonfinite: stop gradients are checked on logging steps; nonfinite: skip checks them before every "
                f"update); training stopped, {last_good_checkpoint(host)}")
        raise NonFiniteError(
            f"{name}: non-finite {quantity} at step {host.global_step}; training stopped before the update, "
            f"{last_good_checkpoint(host)} (set model.init_args.nonfinite: skip to skip such steps)")

    def _verdict(self, host: Guarded, watched: Watched, grad_norms: torch.Tensor | None) -> list[bool]:
        """Per member: True where its watched losses and gradient norm are finite, on every rank."""
        ok = member_finite([v for _, v in watched] + ([grad_norms] if grad_norms is not None else []),
                           self.num_seeds)
        trainer = trainer_of(host)
        if trainer is not None and trainer.world_size > 1:  # a member skipped on one rank is skipped on all
            bad = trainer.strategy.reduce((~ok).float(), reduce_op="sum")
            ok = bad == 0
        return [bool(v) for v in ok.cpu()]

    def _members(self, host: Guarded, watched: Watched, grad_norms: torch.Tensor | None, quantity: str) -> None:
        """The failure path with S members: stop naming the members, or skip only their updates."""
        ok = self._verdict(host, watched, grad_norms)
        bad = [k for k, good in enumerate(ok) if not good] or list(range(self.num_seeds))
        who = ", ".join(f"member {k} (seed {host.member_seed(k)})" for k in bad)
        name = type(host).__name__
        if self.mode == "stop":
            raise NonFiniteError(
                f"{name}: non-finite {quantity} of {who} at step {host.global_step}; training stopped before the "
                f"update, {last_good_checkpoint(host)} (set model.init_args.nonfinite: skip to skip only that "
                "member's update)")
        # only these members step (MemberAdam asks after this closure), and only their EMA / targets move
        self.member_mask = torch.tensor(ok, dtype=torch.bool).to(host.device)
        if not any(ok):
            self.skip_update = True
        for k in bad:
            self.skipped[k] += 1
        host.log_scalar("train/skipped_nonfinite_steps", torch.tensor(self.skipped, dtype=torch.float32))
        worst = max(self.skipped[k] for k in bad)
        if worst & (worst - 1) == 0:  # 1, 2, 4, 8, ...: a count, not a flood
            counts = ", ".join(f"member {k}: {self.skipped[k]}" for k in bad)
            host.warn(f"{name}: non-finite {quantity} of {who} at step {host.global_step}: that update skipped, the "
                      f"other members' went ahead (skipped so far: {counts}; model.init_args.nonfinite: skip)")

    # ------------------------------------------------------------------ the deferred verdict (stop mode on a GPU)
    def deferred(self, host: Guarded) -> bool:
        """Whether this step's verdict is read one checked step later (stop mode on a GPU; see :meth:`defer_`)."""
        if self.defer is None:
            self.defer = self.mode == "stop" and host.device.type == "cuda"
        return self.defer

    def defer_(self, host: Guarded, total: torch.Tensor, watched: Watched, grad_norms: torch.Tensor | None) -> None:
        """Queue a copy of ``total`` to the host without waiting for it.

        Reading a device value waits for every kernel queued before it, which on a GPU stalls the host once a step
        (the hot path must not). So the verdict of checked step k is read at the next checked step, when the device
        has long finished step k: training stops one step late, which stop mode can afford, since no checkpoint is
        ever written with non-finite weights. Skip mode must act before the update and reads its verdict at once,
        a sync per checked step.
        """
        if host.device.type == "cuda":
            buf = torch.empty((), dtype=torch.float32, pin_memory=True)
            buf.copy_(total.detach(), non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:  # (tests force the deferred path on CPU, where the copy is synchronous)
            buf, event = total.detach().clone(), None
        self.pending = (host.global_step, buf, event, watched, grad_norms)

    def resolve_pending(self, host: Guarded) -> None:
        """Raise for a deferred check that found NaN/Inf (a no-op when none is pending)."""
        if self.pending is None:
            return
        step, buf, event, watched, grad_norms = self.pending
        self.pending = None
        if event is not None:
            event.synchronize()
        if math.isfinite(float(buf)):
            return
        raise NonFiniteError(
            f"{type(host).__name__}: non-finite {bad_quantity(watched, grad_norms)} at step {step} (read at step "
            f"{host.global_step}: on a GPU the check is read one step late, so that no step waits for the device); "
            f"training stopped, {last_good_checkpoint(host)} (set model.init_args.nonfinite: skip to check before "
            "every update)")

    # ------------------------------------------------------------------ checkpoints and the end of a fit
    def check_saved_state(self, host: Guarded, state_dict: dict[str, Any]) -> None:
        """Refuse to write a checkpoint with non-finite weights (possible when a poisoned update got through: a
        gradient in stop mode, a deferred check on a GPU, check_finite_every > 1): the last good one stays. A
        pending deferred check is read first, for the precise message. One host sync per save."""
        self.resolve_pending(host)
        state = [v for v in state_dict.values() if isinstance(v, torch.Tensor) and v.is_floating_point()]
        if not state or bool(torch.stack([torch.isfinite(v).all() for v in state]).all()):
            return
        bad = next(k for k, v in state_dict.items()
                   if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all()))
        hint = ("with nonfinite: stop gradients are checked on logging steps; nonfinite: skip checks them before "
                "every update" if self.check_every == 1 else
                "lower model.init_args.check_finite_every to catch the step that caused it")
        raise NonFiniteError(
            f"{type(host).__name__}: non-finite weights ({bad}) after step {host.global_step - 1}; the checkpoint was "
            f"not written, {last_good_checkpoint(host)} ({hint})")

    def restore(self, saved: Any) -> None:
        """The skip counts of a resumed checkpoint."""
        self.skipped = [int(n) for n in saved] if self.num_seeds > 1 else int(saved or 0)

    def finish(self, host: Guarded) -> None:
        """The end of a fit: the last deferred verdict, and the skip counts said once."""
        self.resolve_pending(host)
        name = type(host).__name__
        if self.num_seeds > 1 and any(self.skipped):
            counts = ", ".join(f"member {k}: {n}" for k, n in enumerate(self.skipped))
            host.warn(f"{name}: training steps skipped for non-finite values per member ({counts}; "
                      "model.init_args.nonfinite: skip)")
        elif self.num_seeds == 1 and self.skipped:
            host.warn(f"{name}: {self.skipped} training steps were skipped for non-finite values "
                      "(model.init_args.nonfinite: skip)")


def bad_quantity(watched: Watched, grad_norms: torch.Tensor | None) -> str:
    named = watched + ([("gradient norm", grad_norms)] if grad_norms is not None else [])
    names = [name for name, v in named if not bool(torch.isfinite(v).all())] or ["values on another rank"]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def nonfinite_param(host: Guarded) -> str | None:
    """The name of the first trained parameter holding NaN/Inf, or None (the failure path only: a host sync)."""
    for name, p in host.named_parameters():
        if p.requires_grad and not bool(torch.isfinite(p).all()):
            return name
    return None


def last_good_checkpoint(host: Guarded) -> str:
    import os

    trainer = trainer_of(host)
    cb = trainer.checkpoint_callback if trainer is not None else None
    path = (cb.last_model_path or cb.best_model_path) if cb is not None else ""
    if path and os.path.isfile(path):
        step = last_saved_step(cb)
        return f"the last good checkpoint is kept: {path}" + (f" (step {step})" if step else "")
    return "no checkpoint had been written yet"
