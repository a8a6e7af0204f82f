"""What every idql-cm LightningModule shares: the checkpoint payload, per-step seeding, optimisers,
cheap logging, and the non-finite guard's hooks (the guard itself: :mod:`idql_cm.modules.guard`).

The modules are thin: the math lives in :mod:`idql_cm.nets` and :mod:`idql_cm.diffusion`.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Protocol, runtime_checkable

import lightning.pytorch as pl
import torch
from torch import nn

from idql_cm.checkpoint import MODULE_KEY, DataFacts, check_fits_data, check_payload, make_payload
from idql_cm.errors import CheckpointError, ConfigError
from idql_cm.lightning_compat import (
    checkpoint_every_n_train_steps,
    logs_this_iteration,
    migrate_loop_progress,
    set_logging_step,
    trainer_of,
)
from idql_cm.modules.guard import NonFiniteGuard
from idql_cm.modules.members import stack_members
from idql_cm.nets.ema import ema_update_
from idql_cm.nets.ensemble import MemberGenerators, member_mean
from idql_cm.nets.member_optim import MemberAdam, member_ema_update_, per_member_grad_norm
from idql_cm.seeding import resolve_seed, step_seed

log = logging.getLogger(__name__)


class TrainingData(Protocol):
    """What the modules read from their data module (:class:`~idql_cm.data.datamodule.TDDataModule`): the sizes,
    the observation normaliser (``mean`` / ``std``, ``[obs_dim]``) and the facts a checkpoint records."""

    obs_dim: int
    act_dim: int
    normalizer: Any
    dataset: str
    env_id: str | None
    num_transitions: int


@runtime_checkable
class ConfigurableDraws(Protocol):
    """A data module that draws what the module's updates need (:class:`~idql_cm.data.datamodule.TDDataModule`):
    one batch per member (``[S, B, ...]``, member k's from seed s + k; ``model.num_seeds`` needs it) and the batches
    of K updates per item (``[K, B, ...]``; ``model.fused_steps`` needs it)."""

    def configure_draws(self, num_seeds: int, fused_steps: int) -> None: ...


@runtime_checkable
class StepPeriodic(Protocol):
    """A callback that acts every ``every_n_steps`` optimiser steps (e.g. ``RolloutEvaluation``)."""

    every_n_steps: int


def cosine_or_constant(optimizer: torch.optim.Optimizer, schedule: str, total_steps: int):
    """The LR scheduler, stepped once per optimiser step by :meth:`IDQLModule.training_step`: ``cosine`` decays to 0
    over ``total_steps``; ``constant`` is None."""
    if schedule == "constant":
        return None
    if schedule != "cosine":
        raise ConfigError(f"model.lr_schedule: expected 'cosine' or 'constant', found {schedule!r}")
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total_steps))


def make_optimizer(params, name: str, lr: float, weight_decay: float, num_seeds: int = 1,
                   members_after_closure=None) -> torch.optim.Optimizer:
    """Adam or AdamW; for ``num_seeds`` S > 1 (stacked ``[S, ...]`` parameters) :class:`MemberAdam`, which gives
    member k torch's Adam / AdamW update with its own step count (so one member's update can be skipped: it asks
    ``members_after_closure`` which members step)."""
    # The reference trains its actors with AdamW at PyTorch's default weight decay 0.01 because it passes
    # only {"lr": 3e-4} (docs/design.md). Every shipped actor config sets optimizer and weight_decay
    # explicitly (tests/test_configs_smoke.py checks it): Adam without decay, as AdamW 0.01 measured no better.
    if name in ("adam", "adamw") and num_seeds > 1:
        return MemberAdam(params, num_seeds, lr=lr, weight_decay=weight_decay, decoupled=name == "adamw",
                          members_after_closure=members_after_closure)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ConfigError(f"model.optimizer: expected 'adam' or 'adamw', found {name!r}")


class IDQLModule(pl.LightningModule):
    """Base class: holds the dataset facts every checkpoint must carry and the shared training plumbing.

    Subclasses set ``kind`` and implement ``build(obs_dim, act_dim)`` (create the networks) and
    ``payload()`` (the architecture hyper-parameters for the checkpoint payload, :mod:`idql_cm.checkpoint`).
    """

    kind: str = "?"

    def __init__(self, nonfinite: str = "stop", check_finite_every: int = 1, compile: bool = False,
                 fused_steps: int = 1, num_seeds: int = 1) -> None:
        """``fused_steps``: gradient updates per Trainer iteration (K). The Trainer's per-iteration work (batch
        fetch, every callback's batch hooks, logging bookkeeping; docs/performance.md) is then paid once per K updates. The training is the same for any K, bit for bit: every update draws its
        own batch and seeds its own noise by its global step, and global_step counts updates. K is lowered to the
        largest divisor of log_every_n_steps and of the checkpoint and evaluation periods, with a warning."""
        super().__init__()
        # num_seeds: S independent members trained side by side (stacked nets, docs/ensemble-design.md): member k of a
        # run with seed_everything: s trains as a solo run with seed s + k (batches, noise, dropout, initial weights,
        # Adam, LR, EMA, targets).
        if not isinstance(num_seeds, int) or isinstance(num_seeds, bool) or num_seeds < 1:
            raise ConfigError(f"model.num_seeds: expected a positive integer, found {num_seeds!r}")
        self.num_seeds = int(num_seeds)
        self.rng: MemberGenerators | None = None  # the members' generators (num_seeds > 1)
        if int(fused_steps) < 1:
            raise ConfigError(f"model.fused_steps: expected a positive integer, found {fused_steps!r}")
        self.fused_steps = int(fused_steps)
        self.fused_steps_in_use = 1  # the K in use this fit (see _effective_fused_steps)
        # Manual optimisation: training_step runs backward, the optimiser, the EMA / target update and the LR
        # scheduler itself. The same hooks run (on_before_optimizer_step inside opt.step); Lightning's automatic
        # loop (closure, step/zero_grad progress, scheduler bookkeeping) costs more per step (docs/performance.md).
        self.automatic_optimization = False
        self.compile_nets = bool(compile)
        self.guard = NonFiniteGuard(nonfinite, check_finite_every, self.num_seeds)
        self.obs_dim: int | None = None
        self.act_dim: int | None = None
        self.data_payload: dict[str, Any] = {}
        self._log_now: bool | None = None  # should_log() of the current training step (set per batch)
        self._opt_params: tuple[int, list[torch.Tensor]] | None = None  # (id(optimizer), its parameters)
        self._step_logs: list[tuple[str, Any, dict[str, Any]]] = []  # this iteration's scalars (see log_scalar)

    # ------------------------------------------------------------------ building
    def setup(self, stage: str) -> None:
        dm: TrainingData | None = self.trainer.datamodule
        self.fused_steps_in_use = self._effective_fused_steps() if stage == "fit" else 1
        if isinstance(dm, ConfigurableDraws):  # told every time: a reused data module follows this run
            dm.configure_draws(self.num_seeds, self.fused_steps_in_use)
        else:
            if self.num_seeds > 1:
                raise ConfigError(f"model.num_seeds: {self.num_seeds} members need a data module that draws a batch "
                                  f"per member (TDDataModule), found {type(dm).__name__}")
            if self.fused_steps_in_use > 1:
                self.warn(f"model.fused_steps: the data module {type(dm).__name__} makes one batch per iteration; "
                           "using 1")
                self.fused_steps_in_use = 1
        if self.obs_dim is not None:
            return
        if dm is None:
            raise ConfigError(f"{type(self).__name__} needs a data module (the `data:` section) to know its sizes")
        norm = dm.normalizer
        self.init_nets(int(dm.obs_dim), int(dm.act_dim), norm.mean, norm.std,
                       {"dataset": str(dm.dataset), "env_id": dm.env_id, "num_transitions": int(dm.num_transitions)},
                       self.trainer.strategy.root_device)
        if self.compile_nets:
            # Opt-in fast path: torch.compile of the trained networks' forward (nn.Module.compile keeps the
            # parameter names, so checkpoints are unchanged). The eager path stays the reference: see
            # tests/test_fast_path.py for the equivalence check.
            for net in self.trained_nets():
                net.compile()
        self.to(self.trainer.strategy.root_device)

    def init_nets(self, obs_dim: int, act_dim: int, obs_mean: Any, obs_std: Any, data_payload: dict[str, Any],
                  device: torch.device | str = "cpu") -> None:
        """Build the networks for data of these sizes and this normaliser (what ``setup`` does with the data module's
        facts; also the bare benchmark loop's way to get the module's own networks without a Trainer)."""
        self.obs_dim, self.act_dim = int(obs_dim), int(act_dim)
        self.register_buffer("obs_mean", torch.as_tensor(obs_mean, dtype=torch.float32).clone())
        self.register_buffer("obs_std", torch.as_tensor(obs_std, dtype=torch.float32).clone())
        self.data_payload = dict(data_payload)
        if self.num_seeds == 1:
            self.build(self.obs_dim, self.act_dim)
        else:
            self.rng = MemberGenerators(self.num_seeds, device)
            self.build_members(self.obs_dim, self.act_dim)

    def build(self, obs_dim: int, act_dim: int) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    #: the attributes ``build`` sets that hold one member's networks (stacked when num_seeds > 1)
    member_nets: tuple[str, ...] = ()

    def member_seed(self, member: int) -> int:
        """The seed member ``member`` trains under: ``s + member`` for ``seed_everything: s``."""
        return resolve_seed(None) + member

    def build_members(self, obs_dim: int, act_dim: int) -> None:
        """``build`` once per member, member k under ``torch.manual_seed(s + k)`` (the solo run of seed s + k builds
        right after ``seed_everything``), then the ``member_nets`` stacked along a leading member dim."""
        built: dict[str, list[nn.Module]] = {name: [] for name in self.member_nets}
        for k in range(self.num_seeds):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.member_seed(k))
                self.build(obs_dim, act_dim)
            for name in self.member_nets:
                built[name].append(getattr(self, name))
        for name, nets in built.items():
            setattr(self, name, stack_members(nets, self.rng))

    def stepping_members(self) -> torch.Tensor | None:
        """The members whose update goes ahead this step (``nonfinite: skip`` with S members), None for all: what
        :class:`MemberAdam` asks after the non-finite check ran inside its closure."""
        return self.guard.member_mask

    def member_generator(self) -> MemberGenerators | None:
        """What the losses draw from: the members' generators, or None (torch's default generator) for one member."""
        return self.rng

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        """A batch mean: scalar, or ``[S]`` per member."""
        return member_mean(x, self.num_seeds)

    def ema_(self, ema: nn.Module, model: nn.Module, decay: float) -> None:
        """``ema <- decay·ema + (1 − decay)·model`` for the members whose update went ahead this step."""
        if self.guard.member_mask is None:
            ema_update_(ema, model, decay)
        else:
            member_ema_update_(ema, model, decay, self.guard.member_mask)

    def trained_nets(self) -> list[torch.nn.Module]:
        """The networks the optimiser trains (compiled when ``compile: true``)."""
        return []

    def payload(self) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def preflight(self, datamodule: TrainingData | None) -> None:
        """Check the artefacts this module needs against the data before any work (the CLI calls it after
        instantiation, before ``fit`` / ``validate`` writes anything); subclasses with a partner checkpoint override."""

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.guard.check_saved_state(self, checkpoint.get("state_dict", {}))  # never a checkpoint of NaN weights
        members = {"num_seeds": self.num_seeds, "seed": resolve_seed(None)} if self.num_seeds > 1 else {}
        # the module's class path: a backbone defined outside the package is found again by importing it
        module = {MODULE_KEY: f"{type(self).__module__}.{type(self).__qualname__}"}
        checkpoint["idql_cm"] = make_payload(self.kind, self.obs_dim, self.act_dim, self.obs_mean, self.obs_std,
                                             self.data_payload, {**module, **self.payload(), **members},
                                             self.guard.skipped)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainer = trainer_of(self)
        path = trainer.ckpt_path if trainer is not None else None
        payload = check_payload(checkpoint.get("idql_cm"), self.kind, "checkpoint", str(path))
        # Resuming on other data would silently replace this data's normaliser by the checkpoint's (the buffers
        # load with the weights): refuse while fitting. validate / test use the checkpoint's normaliser, as they should.
        fitting = trainer is not None and trainer.state.fn == "fit"
        if self.obs_dim is not None:
            data = DataFacts(int(self.obs_dim), int(self.act_dim), self.obs_mean if fitting else None,
                             self.obs_std if fitting else None, self.data_payload.get("dataset"))
            check_fits_data(DataFacts.of_payload(payload), data, "--ckpt_path", str(path))
        ckpt_seeds = int(payload.get("num_seeds", 1))
        if ckpt_seeds != self.num_seeds:
            raise CheckpointError(f"--ckpt_path: {path} holds {ckpt_seeds} member(s) (num_seeds), this run has "
                                  f"model.init_args.num_seeds: {self.num_seeds}; resume with the same count")
        self.guard.restore(payload.get("skipped_steps", 0))
        migrate_loop_progress(checkpoint)

    # ------------------------------------------------------------------ the update step (plain functions)
    def loss(self, batch: dict[str, torch.Tensor], step: int, generator: MemberGenerators | None,
             stats: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # pragma: no cover - abstract
        """The loss of update ``step`` on ``batch`` and the named scalars that go with it (the losses that make it
        up; with ``stats`` also diagnostics), drawing its noise from ``generator`` (None: torch's default
        generator). A plain function of the networks, the batch, the step and the generator: no Trainer, no
        logging; the module's training step, the bare benchmark loop and the tests call it alike."""
        raise NotImplementedError

    def update_targets(self, step: int) -> None:
        """The EMA / target-network updates after update ``step`` (0-based); subclasses with such networks
        override. Plain like :meth:`loss`."""

    #: the values of :meth:`loss` checked for NaN/Inf before each update ("loss", or named parts of it)
    watched: tuple[str, ...] = ("loss",)

    def frozen_nets(self) -> list[nn.Module]:
        """Networks the module uses but never trains or saves (CD's teacher); moved to the module's device."""
        return []

    # ------------------------------------------------------------------ per-step plumbing
    def loss_step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """This update's loss for the Trainer: :meth:`loss` at the current step with the members' generators; its
        named scalars are checked for NaN/Inf before the update and logged on logging steps."""
        log = self.should_log()
        loss, named = self.loss(batch, self.global_step, self.member_generator(), stats=log)
        for name in self.watched:
            self.watch_finite(name, loss if name == "loss" else named[name])
        if log:
            # sync_dist: with DDP the logged value is the mean over ranks (an all-reduce on log steps only)
            for k, v in named.items():
                self.log_scalar(f"train/{k}", v, sync_dist=True)
            self.log_scalar("train/loss", loss, prog_bar=True, sync_dist=True)
        return loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._log_now = None
        k = self.fused_steps_in_use
        if k > 1:  # batch: [K, B, ...]
            left = self.trainer.max_steps - self.global_step if self.trainer.max_steps > 0 else k
            k = max(1, min(k, left))  # the last iteration of a run whose max_steps is not a multiple of K
            # Lightning's logging period and x-axis count iterations. Count updates instead, as with K = 1: this
            # iteration logs when its last update completes a period, at that update's index.
            set_logging_step(self.trainer, self.global_step + k - 1)
        log = logs_this_iteration(self.trainer)  # whether this iteration logs: asked once per iteration
        for i in range(k):
            self._update(batch if self.fused_steps_in_use == 1 else {key: t[i] for key, t in batch.items()}, log and i == k - 1)
        self._flush_logs()

    def log_scalar(self, name: str, value: Any, **kwargs: Any) -> None:
        """``self.log`` for the training scalars, sent at the end of training_step: Lightning, in its first
        iteration, drops a hook's values logged before another hook logged (LightningModule.log resets the tensors
        of a hook it re-enters), and one update logs from training_step, on_before_optimizer_step and again after
        the optimiser step.

        With S members a per-member value ``[S]`` is logged as ``name`` (the mean over members) and
        ``name/member_<k>``."""
        if self.num_seeds > 1 and isinstance(value, torch.Tensor) and value.ndim == 1 and len(value) == self.num_seeds:
            value = value.detach()
            for k in range(self.num_seeds):
                self._step_logs.append((f"{name}/member_{k}", value[k], {**kwargs, "prog_bar": False}))
            value = value.mean()
        self._step_logs.append((name, value, kwargs))

    def _flush_logs(self) -> None:
        logs, self._step_logs = self._step_logs, []
        for name, value, kwargs in logs:
            self.log(name, value, **kwargs)

    def _update(self, batch: dict[str, torch.Tensor], log: bool) -> None:
        """One gradient update: seed, loss, backward, optimiser (with the non-finite guard), EMA / target, LR."""
        # Randomness of step k is a function of (seed, rank, k): exact resume without saved RNG state.
        seed = step_seed(resolve_seed(None), self.global_rank, self.global_step, stream=1)
        # Only the generators in use: torch.manual_seed also seeds uninitialised CUDA/XPU/MTIA back-ends, each
        # recording a stack trace (a measurable share of a CPU step, docs/performance.md).
        torch.default_generator.manual_seed(seed)
        if self.device.type == "cuda":
            torch.cuda.manual_seed(seed)
        if self.rng is not None:  # member k draws what the solo run of seed s + k draws at this step
            self.rng.seed_([step_seed(self.member_seed(k), self.global_rank, self.global_step, stream=1)
                            for k in range(self.num_seeds)])
        self._log_now = log
        loss = self.loss_step(batch)  # under the precision plugin's autocast (bf16-mixed), as Lightning runs it
        opt, sched = self._opt_and_sched()
        step = self.global_step  # the index of this update (global_step counts it once opt.step() returns)
        # Backward and the update outside autocast: training_step runs inside the plugin's autocast region, and a
        # backward pass started there runs its matmuls in bf16 too (autograd carries the caller's autocast state to
        # the backward; torch's AMP notes advise against it). Lightning's automatic loop calls backward outside
        # the region; manual optimisation has to leave it itself. (Measured: an IQL fit with the critic's forward in
        # fp32 still drifted from the 32-true run by 6e-4 in 6 steps from its bf16 gradients.)
        with torch.autocast(self.device.type, enabled=False):
            opt.zero_grad()  # set_to_none
            # S members: the sum of their losses, so member k's gradient is its own loss' gradient
            self.manual_backward(loss if self.num_seeds == 1 else loss.sum())
            self.guard.begin_update()
            opt.step()  # runs on_before_optimizer_step (callbacks, then the non-finite guard) before the update
            # Here, not in on_train_batch_end: callbacks (ModelCheckpoint) run their on_train_batch_end first, and a
            # checkpoint must hold the EMA / target of the step it is named for.
            if not self.guard.skip_update:
                self.after_optimizer_step(step)
        if sched is not None:
            sched.step()  # also after a skipped update, as Lightning's automatic loop does

    def _opt_and_sched(self):
        """This fit's (LightningOptimizer, scheduler or None)."""
        sched = self.lr_schedulers()
        return self.optimizers(), sched[0] if isinstance(sched, list) else sched

    @staticmethod
    def check_trainer(trainer: pl.Trainer) -> None:
        """Refuse Trainer flags that only apply to Lightning's automatic optimisation (the CLI calls this before
        anything is written; :meth:`on_fit_start` again for Python users)."""
        for flag, value, ok in (("gradient_clip_val", trainer.gradient_clip_val, (None, 0, 0.0)),
                                ("accumulate_grad_batches", trainer.accumulate_grad_batches, (1,))):
            if value not in ok:
                raise ConfigError(f"trainer.{flag}: idql-cm modules step their optimiser themselves (manual "
                                  f"optimisation), which this flag does not apply to; expected it unset, found {value}")

    def on_fit_start(self) -> None:
        self.check_trainer(self.trainer)
        for net in self.frozen_nets():
            net.to(self.device)

    def _effective_fused_steps(self) -> int:
        """``fused_steps``, lowered to divide every period counted in steps (logging, checkpoints, evaluation):
        callbacks act between iterations, so a period must end on an iteration's last update."""
        k = self.fused_steps
        trainer = trainer_of(self)
        if k == 1 or trainer is None:
            return k
        from lightning.pytorch.callbacks import ModelCheckpoint

        periods = {"trainer.log_every_n_steps": trainer.log_every_n_steps}
        for cb in trainer.callbacks:
            if isinstance(cb, ModelCheckpoint):
                periods[f"{type(cb).__name__}.every_n_train_steps"] = checkpoint_every_n_train_steps(cb)
            elif isinstance(cb, StepPeriodic) and isinstance(cb.every_n_steps, int):
                periods[f"{type(cb).__name__}.every_n_steps"] = cb.every_n_steps
        g = k
        for p in periods.values():
            if p and p > 0:
                g = math.gcd(g, int(p))
        if g != k:
            bad = ", ".join(f"{name} = {p}" for name, p in periods.items() if p and p > 0 and p % k)
            self.warn(f"model.fused_steps: {k} updates per Trainer iteration do not divide {bad}; using {g} (make "
                       f"those periods multiples of {k} for the full speed-up)")
        return g

    def after_optimizer_step(self, step: int) -> None:
        """After update number ``step`` (0-based; not called for a skipped step): :meth:`update_targets`, then what
        subclasses log about it."""
        self.update_targets(step)

    def should_log(self) -> bool:
        """True on the steps whose metrics Lightning writes (every ``trainer.log_every_n_steps``).

        Modules log (:meth:`log_scalar`) only then: ``self.log`` is costly per call, and a logged tensor is read
        back (a host sync) only when written.
        """
        if self._log_now is not None:  # set by training_step for the current update
            return self._log_now
        return logs_this_iteration(trainer_of(self))

    def watch_finite(self, name: str, value: torch.Tensor) -> None:
        """Have ``value`` (a loss of this step) checked for NaN/Inf before this step's update.

        No host sync here: the check happens in :meth:`on_before_optimizer_step` as one read-back every
        ``check_finite_every`` steps (1 = every step; on a GPU the read-back is a device sync, so fast runs raise
        it, trading detection latency for speed), together with the gradient norm where that is computed.
        """
        self.guard.watch(name, value)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._log_now = None  # outside a training step, should_log() asks Lightning again

    def _params_of(self, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
        """The optimiser's parameters, listed once per optimiser rather than walking the param groups every step."""
        if self._opt_params is None or self._opt_params[0] != id(optimizer):
            self._opt_params = (id(optimizer), [p for g in optimizer.param_groups for p in g["params"]])
        return self._opt_params[1]

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # After backward, before the optimiser touches the weights: the last point where a bad step can be
        # stopped or skipped without harm.
        watched = self.guard.take_watched()
        check = self.guard.checks(self.global_step)
        log = self.should_log()
        if not (check or log):
            return
        norms = None
        if self.guard.wants_grad_norms(check, log):
            if self.num_seeds > 1:  # [S]: every member's own gradient norm
                norms = per_member_grad_norm(self._params_of(optimizer), self.num_seeds)
            else:
                grads = [p.grad for p in self._params_of(optimizer) if p.grad is not None]
                # per-tensor norms in one fused call: a non-finite gradient makes its norm non-finite
                norms = torch.stack(torch._foreach_norm(grads)) if grads else None
        if check:
            self.guard.check(self, watched, norms, self._params_of(optimizer))
        if log:
            if norms is not None and not self.guard.skip_update and self.guard.member_mask is None:
                self.log_scalar("train/grad_norm", norms if self.num_seeds > 1 else torch.linalg.vector_norm(norms))
            self.log_scalar("train/lr", optimizer.param_groups[0]["lr"])

    def warn(self, message: str) -> None:
        """One line on stderr (through logging, so a configured logger receives it), on rank 0 only."""
        if self.global_rank == 0:
            log.warning(message)

    def on_train_end(self) -> None:
        self.guard.finish(self)

    #: the run's length outside a Trainer (the bare benchmark loop); a fit reads trainer.max_steps
    planned_steps: int | None = None

    def total_steps(self) -> int:
        trainer = trainer_of(self)
        ms = trainer.max_steps if trainer is not None else (self.planned_steps or -1)
        if ms is None or ms <= 0:
            raise ConfigError("trainer.max_steps: expected a positive step count (training is step-based), found "
                              f"{ms}")
        return int(ms)
