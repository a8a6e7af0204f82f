"""Behaviour-cloning modules: EDM, consistency training (CT) and consistency distillation (CD).

Each clones the dataset's actions given normalised observations, keeps an EMA copy of its weights
(the copy that samples, evaluates and is exported), and calls :mod:`idql_cm.diffusion` for the math.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch

from idql_cm.backbones import BackboneSpec, backbone, edm_from_payload, registered
from idql_cm.checkpoint import (
    DataFacts,
    check_fits_data,
    member_state,
    read_checkpoint,
    state_prefix,
)
from idql_cm.diffusion.consistency import (
    CD_WEIGHTINGS,
    ConsistencyModel,
    cd_loss,
    check_teacher_compatible,
    ct_loss,
    ict_kprime,
    ict_num_intervals,
    lognormal_index_probs,
)
from idql_cm.diffusion.edm import EDMDenoiser, standard_normal
from idql_cm.diffusion.meanflow import H_FEATURES, MeanFlowModel, meanflow_loss
from idql_cm.diffusion.schedules import karras_sigmas
from idql_cm.errors import CheckpointError, ConfigError
from idql_cm.fileio import file_sha256
from idql_cm.modules.common import IDQLModule, TrainingData, cosine_or_constant, make_optimizer
from idql_cm.modules.guidance import (
    CriticGuidance,
    advantage_resample,
    check_critic_members,
    check_q_weight,
    guidance_loss,
)
from idql_cm.modules.members import member_of
from idql_cm.nets.ema import EMAWarmup
from idql_cm.nets.ensemble import StackedIDQLMlp, bind_rng
from idql_cm.nets.mlp import IDQLMlp
from idql_cm.policies import Actor

#: IDQLMlp defaults (the IDQL residual MLP, ~1.6M parameters on HalfCheetah).
NET_DEFAULTS: dict[str, Any] = {"emb_dim": 64, "hidden_dim": 256, "n_blocks": 3, "expand": 4, "dropout": 0.1,
                                "fourier_scale": 16.0, "final_activation": True}


def net_kwargs(net: dict | None, **overrides: Any) -> dict[str, Any]:
    kw = {**NET_DEFAULTS, **overrides, **(net or {})}
    unknown = set(kw) - set(NET_DEFAULTS)
    if unknown:
        raise ConfigError(f"model.net: unknown keys {sorted(unknown)}; expected some of {sorted(NET_DEFAULTS)}")
    return kw


def check_fits_datamodule(payload: dict[str, Any], datamodule: TrainingData | None, what: str, path: str) -> None:
    """A partner checkpoint's payload (read from ``path`` given as ``what``) against the run's data module
    (sizes and normaliser); nothing to check without a data module."""
    if datamodule is None:
        return
    norm = datamodule.normalizer
    data = DataFacts(int(datamodule.obs_dim), int(datamodule.act_dim), norm.mean, norm.std, str(datamodule.dataset))
    check_fits_data(DataFacts.of_payload(payload), data, what, path)


class BehaviourModule(IDQLModule):
    """Shared plumbing of the three behaviour policies: EMA with warm-up, optimiser, evaluation actor."""

    def __init__(
        self,
        net: dict | None = None,
        lr: float = 3e-4,
        optimizer: str = "adam",
        weight_decay: float = 0.0,
        lr_schedule: str = "cosine",
        ema_decay: float = 0.9999,
        ema_power: float = 2 / 3,
        ema_warmup: bool = True,
        sigma_data: float = 0.5,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        rho: float = 7.0,
        action_bound: float = 1.0,
        nonfinite: str = "stop",
        check_finite_every: int = 1,
        compile: bool = False,
        fused_steps: int = 1,
        num_seeds: int = 1,
        q_weight: float = 0.0,
        critic_ckpt: str | None = None,
        init_from: str | None = None,
        sample_noise_scale: float = 1.0,
        advantage_beta: float = 0.0,
    ) -> None:
        """``q_weight`` (η, 0 = off: plain IDQL): train the one-step map against the IQL critic of ``critic_ckpt``
        as well (:mod:`idql_cm.modules.guidance`); the CLI defaults ``critic_ckpt`` to the rollout evaluation's
        critic. Only for a backbone whose spec has a one-step map (CT, CD, MeanFlow).

        ``advantage_beta`` (β, 0 = off): resample every batch towards its better actions, each transition with
        probability ∝ min(exp(β·A), 100), A = Q − V of the same critic at the data's own actions (never an action off
        the data; :func:`~idql_cm.modules.guidance.advantage_resample`). Any backbone; the policy then acts well with
        one candidate (the evaluation's ``one_candidate``) as well as re-ranked.

        ``init_from``: a checkpoint of the same data to start from instead of random weights, of a kind in
        :meth:`init_kinds` (this backbone's own: a fine-tuning stage, e.g. guidance added to a trained policy; CT
        also takes an EDM). The online and EMA networks start as its EMA network, whose architecture they take
        (``net`` here is then not used); with ``num_seeds: S`` it must hold S members (member k from member k).

        ``sample_noise_scale`` (λ, default 1: the trained distribution): the policy's samplers start from λ·ε instead
        of ε, a sampling temperature that concentrates the samples (the checkpoint records it; ``load_actor`` and the
        evaluation use it). Training does not depend on it."""
        super().__init__(nonfinite, check_finite_every, compile, fused_steps, num_seeds)
        self.q_weight = check_q_weight(q_weight)
        self.advantage_beta = check_q_weight(advantage_beta, "advantage_beta")
        self.critic_ckpt = critic_ckpt
        self.init_from = init_from
        self.sample_noise_scale = float(sample_noise_scale)
        if not 0.0 <= self.sample_noise_scale < float("inf"):
            raise ConfigError(f"model.sample_noise_scale: expected a finite number >= 0, found {sample_noise_scale}")
        self.init_sha256: str | None = None
        self.guidance: CriticGuidance | None = None  # built with the nets when the critic is used (uses_critic)
        self.net_cfg = net
        self.lr, self.opt_name, self.weight_decay, self.lr_schedule = lr, optimizer, weight_decay, lr_schedule
        # ema_warmup: k-diffusion's warm-up (the EMA starts as a copy of fresh weights); False: the constant rate
        # ema_decay from the first update (for an EMA that starts from trained weights: CD's teacher)
        self.ema = EMAWarmup(power=ema_power, max_value=ema_decay) if ema_warmup else None
        self.ema_decay = float(ema_decay)
        self.method = {"sigma_data": sigma_data, "sigma_min": sigma_min, "sigma_max": sigma_max, "rho": rho,
                       "x_min": -float(action_bound), "x_max": float(action_bound)}
        self.model: torch.nn.Module | None = None
        self.ema_model: torch.nn.Module | None = None
        spec = self.spec()  # a module without a registered backbone spec is refused before any work
        self.one_step = spec.one_step  # the map guidance trains (looked up once, not every step)
        if self.q_weight > 0 and spec.one_step is None:
            raise ConfigError(f"model.q_weight: {self.q_weight} asks for critic guidance, which trains a one-step map; "
                              f"the {spec.kind} backbone has none (its spec's one_step is None): use q_weight 0, or a "
                              f"one-step backbone ({', '.join(s.kind for s in registered() if s.one_step)})")

    def spec(self) -> BackboneSpec:
        """This module's backbone (:mod:`idql_cm.backbones`), found by its ``kind``."""
        return backbone(self.kind, f"{type(self).__module__}.{type(self).__qualname__}", f"model: {type(self).__name__}")

    # subclasses: wrap a net into their model class and fill self.net_kw
    def wrap(self, net: torch.nn.Module) -> torch.nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    def default_net(self) -> dict[str, Any]:
        return net_kwargs(self.net_cfg)

    member_nets = ("model", "ema_model")

    def build(self, obs_dim: int, act_dim: int) -> None:
        if self.init_from is not None:
            self._build_from_init(obs_dim, act_dim)
            return
        self.net_kw = self.default_net()
        self.model = self.wrap(IDQLMlp(self.net_obs_dim(obs_dim), act_dim, **self.net_kw))
        self.ema_model = copy.deepcopy(self.model).requires_grad_(False).eval()

    def net_obs_dim(self, obs_dim: int) -> int:
        """The width of the net's condition input for ``obs_dim`` observations (MeanFlow appends its interval)."""
        return obs_dim

    def build_members(self, obs_dim: int, act_dim: int) -> None:
        if self.init_from is None:
            super().build_members(obs_dim, act_dim)
        else:
            self.build(obs_dim, act_dim)  # member k starts from the init checkpoint's member k

    @property
    def uses_critic(self) -> bool:
        """Whether training reads the IQL critic of ``critic_ckpt`` (critic guidance or advantage weighting)."""
        return self.q_weight > 0 or self.advantage_beta > 0

    def payload(self) -> dict[str, Any]:
        out = {"net": dict(self.net_kw), "method": dict(self.method)}
        if self.guidance is not None:
            out.update(q_weight=self.q_weight, critic_ckpt=os.path.abspath(self.guidance.path),
                       critic_sha256=self.guidance.sha256)
        if self.advantage_beta > 0:
            out.update(advantage_beta=self.advantage_beta)
        if self.init_from is not None:
            out.update(init_from=os.path.abspath(self.init_from), init_sha256=self.init_sha256)
        if self.sample_noise_scale != 1.0:
            out.update(sample_noise_scale=self.sample_noise_scale)
        return out

    # ------------------------------------------------------------------ init_from
    def init_kinds(self) -> tuple[str, ...]:
        """The kinds an ``init_from`` checkpoint may be: this backbone's own."""
        return (self.kind,)

    def _init_checkpoint(self, data: DataFacts | None = None) -> dict[str, Any]:
        """The ``init_from`` checkpoint, checked: its kind, its member count, and (given ``data``) its data."""
        ckpt = read_checkpoint(self.init_from, expect_kind=self.init_kinds(), what="model.init_from")
        payload = ckpt["idql_cm"]
        ckpt_seeds = int(payload.get("num_seeds", 1))
        if ckpt_seeds != self.num_seeds:
            raise ConfigError(f"model.init_from: {self.init_from} holds {ckpt_seeds} member(s) (num_seeds {ckpt_seeds}), this "
                              f"{self.kind} run has model.num_seeds: {self.num_seeds}; start from a run with "
                              f"num_seeds: {self.num_seeds}")
        if data is not None:
            check_fits_data(DataFacts.of_payload(payload), data, "model.init_from", self.init_from)
        return ckpt

    def data_facts(self, obs_dim: int | None = None, act_dim: int | None = None) -> DataFacts:
        """What ties a partner checkpoint (teacher, init, critic) to this run's data."""
        return DataFacts(obs_dim or self.obs_dim, act_dim or self.act_dim, self.obs_mean, self.obs_std,
                         self.data_payload.get("dataset"))

    def _build_from_init(self, obs_dim: int, act_dim: int) -> None:
        ckpt = self._init_checkpoint(self.data_facts(obs_dim, act_dim))
        self.net_kw = net_kwargs(ckpt["idql_cm"]["net"])
        S, width = self.num_seeds, self.net_obs_dim(obs_dim)
        net = IDQLMlp(width, act_dim, **self.net_kw) if S == 1 else StackedIDQLMlp(S, width, act_dim, **self.net_kw)
        if S > 1:
            bind_rng(net, self.rng)
        self.model = self.wrap(net)
        self._load_init_weights(ckpt["state_dict"])

    def _load_init_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Online and EMA networks <- the init checkpoint's EMA network."""
        self.model.net.load_state_dict(state_prefix(state, "ema_model.net."))
        self.ema_model = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.init_sha256 = file_sha256(self.init_from)

    # ------------------------------------------------------------------ critic guidance
    def init_nets(self, obs_dim, act_dim, obs_mean, obs_std, data_payload, device="cpu") -> None:
        super().init_nets(obs_dim, act_dim, obs_mean, obs_std, data_payload, device)
        if self.uses_critic:
            self.guidance = CriticGuidance(self._critic_path(), self.data_facts(), self.num_seeds,
                                           value=self.advantage_beta > 0)

    def _critic_path(self) -> str:
        if self.critic_ckpt is None:
            raise ConfigError(f"model.critic_ckpt: q_weight {self.q_weight} / advantage_beta {self.advantage_beta} "
                              "needs an IQL checkpoint of this data; set model.init_args.critic_ckpt (the CLI takes the rollout evaluation's "
                              "critic_ckpt when it is unset)")
        if not os.path.isfile(self.critic_ckpt):
            raise ConfigError(f"model.critic_ckpt: no IQL checkpoint at {self.critic_ckpt} (train the IQL stage "
                              "first: idql-cm fit --config configs/<task>/iql.yaml)")
        return str(self.critic_ckpt)

    def preflight(self, datamodule: TrainingData | None) -> None:
        """An ``init_from`` checkpoint and a guiding critic must be of this data, with this run's member count."""
        if self.init_from is not None:
            payload = self._init_checkpoint()["idql_cm"]
            check_fits_datamodule(payload, datamodule, "model.init_from", self.init_from)
        if not self.uses_critic:
            return
        path = self._critic_path()
        payload = read_checkpoint(path, expect_kind="iql", what="model.critic_ckpt")["idql_cm"]
        check_critic_members(int(payload.get("num_seeds", 1)), self.num_seeds, "model.critic_ckpt", path)
        check_fits_datamodule(payload, datamodule, "model.critic_ckpt", path)

    def frozen_nets(self) -> list[torch.nn.Module]:
        return [] if self.guidance is None else self.guidance.nets()

    def behaviour_loss(self, batch: dict[str, torch.Tensor], step: int, generator=None, stats: bool = False
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # pragma: no cover - abstract
        """The backbone's own loss (what :meth:`loss` is without guidance), with its named scalars."""
        raise NotImplementedError

    def loss(self, batch, step, generator=None, stats=False):
        """The behaviour loss, plus with ``q_weight`` η > 0 the guidance term ``−η·mean Q/sg(mean |Q|)`` on one-step
        samples of the online network (noise drawn after the behaviour loss's draws, from the same generator). With
        ``advantage_beta`` β > 0 the behaviour loss sees the batch resampled by exp(β·A) (drawn first)."""
        extra = {}
        if self.advantage_beta > 0:
            adv = self.guidance.advantage(batch["obs"], batch["act"])
            batch, share = advantage_resample(batch, adv, self.advantage_beta, generator)
            extra = {"advantage_effective_share": share}
        loss, named = self.behaviour_loss(batch, step, generator, stats)
        named = {**named, **extra}
        if self.q_weight <= 0:
            return loss, named
        obs = batch["obs"]
        noise = standard_normal((*obs.shape[:-1], self.act_dim), obs, generator)
        act = self.one_step(self.model, obs, noise)
        term, q_mean = guidance_loss(self.guidance(obs, act), self.q_weight, self.num_seeds)
        return loss + term, {**named, "behaviour_loss": loss, "guidance_q": q_mean}

    def trained_nets(self) -> list[torch.nn.Module]:
        return [self.model]

    def configure_optimizers(self):
        opt = make_optimizer(self.model.parameters(), self.opt_name, self.lr, self.weight_decay, self.num_seeds,
                             self.stepping_members)
        sched = cosine_or_constant(opt, self.lr_schedule, self.total_steps())
        return opt if sched is None else {"optimizer": opt, "lr_scheduler": sched}  # stepped by training_step

    def ema_decay_at(self, step: int) -> float:
        """The EMA rate of update ``step`` (0-based): with the warm-up, 0 at update 0 (the EMA copies the weights)."""
        return self.ema.decay(step) if self.ema is not None else self.ema_decay

    def update_targets(self, step: int) -> None:
        self.ema_(self.ema_model, self.model, self.ema_decay_at(step))

    def after_optimizer_step(self, step: int) -> None:
        super().after_optimizer_step(step)
        if self.should_log():
            self.log_scalar("train/ema_decay", self.ema_decay_at(step))

    def train(self, mode: bool = True):
        super().train(mode)
        if self.ema_model is not None:
            self.ema_model.eval()  # the EMA copy never runs dropout
        return self

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """No-op: `idql-cm validate` runs the RolloutEvaluation callback once on a one-batch loader."""

    def eval_actor(self, member: int | None = None) -> Actor:
        """The current EMA policy, sampling exactly as ``actor_from_checkpoint`` of this module's checkpoint would (member
        ``member`` of an S-member module: a solo copy; required when S > 1)."""
        model = self.ema_model
        if self.num_seeds > 1:
            if member is None or not 0 <= member < self.num_seeds:
                raise ValueError(f"{type(self).__name__}.eval_actor: expected a member in 0..{self.num_seeds - 1}, "
                                 f"found {member}")
            model = member_of(model, member).eval().requires_grad_(False)
        payload = {"kind": self.kind, "act_dim": int(self.act_dim), **self.data_payload, **self.payload()}
        return Actor.of_payload(self.spec(), payload, model, self.obs_mean, self.obs_std, self.device)



def start_level(sample_sigma_max: float | None, method: dict[str, Any]) -> float | None:
    """``model.sample_sigma_max`` checked against the model's (σ_min, σ_max] (the level a sampler starts from;
    None: σ_max), one line naming what was expected and found."""
    if sample_sigma_max is None:
        return None
    lo, hi = method["sigma_min"], method["sigma_max"]
    if not lo < float(sample_sigma_max) <= hi:
        raise ConfigError(f"model.sample_sigma_max: expected a level in ({lo:g}, {hi:g}], found {sample_sigma_max}")
    return float(sample_sigma_max)


class EDMModule(BehaviourModule):
    """EDM behaviour policy (Karras et al. 2022), trained with the preconditioned, λ-weighted x0 loss."""

    kind = "edm"

    def __init__(self, P_mean: float = -1.2, P_std: float = 1.2, eval_solver: str = "euler",
                 sample_sigma_max: float | None = None, sample_rho: float | None = None, **kwargs: Any) -> None:
        """``sample_sigma_max``: where sampling starts (None = σ_max = 80, the tutorial's protocol); ``sample_rho``:
        the ρ of the sampling grid (None = 7). From σ = 80 one Euler step returns the conditional mean action
        (c_skip(80) ≈ 4e-5), so every IDQL candidate at NFE 1 is the same action; and on the 4-step ρ = 7 grid
        (80, 17.5, 2.5, 0.17) the step 2.5 → 0.17 crosses the noise levels where the modes separate in one Euler
        step, which lands between them. A low start with a flatter grid keeps the steps where the modes form:
        on the toys of docs/quality.md, start 1 with ρ 2 put 88-94% of Euler NFE-4 samples on a mode, against
        61-85% from (80, 7)."""
        super().__init__(**kwargs)
        if eval_solver not in ("euler", "heun"):
            raise ConfigError(f"model.eval_solver: expected 'euler' or 'heun', found {eval_solver!r}")
        self.method.update(P_mean=P_mean, P_std=P_std)
        self.eval_solver = eval_solver
        self.sample_sigma_max = start_level(sample_sigma_max, self.method)
        if sample_rho is not None and not sample_rho > 0:
            raise ConfigError(f"model.sample_rho: expected a positive number, found {sample_rho}")
        self.sample_rho = sample_rho
        self.save_hyperparameters()

    def wrap(self, net):
        return EDMDenoiser(net, **self.method)

    def payload(self):
        return {**super().payload(), "solver": self.eval_solver, "sample_sigma_max": self.sample_sigma_max,
                "sample_rho": self.sample_rho}

    def behaviour_loss(self, batch, step, generator=None, stats=False):
        return self.model.loss(batch["act"], batch["obs"], generator=generator), {}


class ConsistencyBehaviour(BehaviourModule):
    """What CT and CD share: a consistency model, sampled by re-noising on the σ-grid it was trained on."""

    RENOISE = ("train_grid", "karras")

    def __init__(self, renoise: str = "train_grid", clip_student: bool = False, renoise_min: float | None = None,
                 sample_sigma_max: float | None = None, **kwargs: Any) -> None:
        """``clip_student``: clip the trained output to the action bounds inside the loss (the reference's; it
        zeroes the gradient of a coordinate that overshoots, see ``diffusion.consistency.CLIP_NOTE``); targets and
        samples are always clipped. ``renoise``: where multistep sampling re-noises. ``train_grid``: at the Karras levels of nfe intervals
        moved to the nearest points of the training grid (CD's 18 intervals; CT's last curriculum grid); ``karras``:
        at the Karras levels themselves (the reference's; off CD's grid the model is untrained there).
        ``renoise_min``: the lowest re-noising level (None: the Karras levels of the NFE); the levels then spread on
        the ρ-grid from it to σ_max (:func:`~idql_cm.diffusion.consistency.sampling_sigmas`). ``sample_sigma_max``:
        the level the first step starts from (None: σ_max; on the training grid, its nearest point). Sampling
        choices: training does not depend on them."""
        super().__init__(**kwargs)
        if renoise not in self.RENOISE:
            raise ConfigError(f"model.renoise: expected one of {self.RENOISE}, found {renoise!r}")
        self.renoise = renoise
        self.clip_student = bool(clip_student)
        lo, hi = self.method["sigma_min"], self.method["sigma_max"]
        if renoise_min is not None and not lo < float(renoise_min) < hi:
            raise ConfigError(f"model.renoise_min: expected a level between sigma_min {lo:g} and sigma_max {hi:g}, "
                              f"found {renoise_min}")
        self.renoise_min = None if renoise_min is None else float(renoise_min)
        self.sample_sigma_max = start_level(sample_sigma_max, self.method)
        if None not in (self.sample_sigma_max, self.renoise_min) and not self.renoise_min < self.sample_sigma_max:
            raise ConfigError(f"model.renoise_min: expected a level below sample_sigma_max {sample_sigma_max}, "
                              f"found {renoise_min}")

    def train_intervals(self) -> int:  # pragma: no cover - abstract
        """Intervals of the Karras grid the model has been trained on (the finest, for a curriculum)."""
        raise NotImplementedError

    def wrap(self, net):
        return ConsistencyModel(net, **self.method)

    def payload(self):
        out = {**super().payload(), "renoise": self.renoise, "train_intervals": self.train_intervals()}
        if self.renoise_min is not None:
            out["renoise_min"] = self.renoise_min
        if self.sample_sigma_max is not None:  # absent when None: older checkpoints and payloads stay as they were
            out["sample_sigma_max"] = self.sample_sigma_max
        return out


class CTModule(ConsistencyBehaviour):
    """Improved consistency training (Song & Dhariwal 2023): no teacher, a discretisation curriculum."""

    kind = "ct"

    def __init__(self, s0: int = 10, s1: int = 1280, total_steps: int | None = None, P_mean: float = -1.1,
                 P_std: float = 2.0, huber_c: float | None = None, fourier_scale: float = 0.02, **kwargs: Any) -> None:
        """``init_from`` may also be an EDM checkpoint of the same data (ECT, Geng et al. 2024: consistency training
        started from a trained diffusion model): the curriculum (``s0`` → ``s1``) then shrinks the consistency gap
        from a denoiser rather than from noise."""
        super().__init__(**kwargs)
        self.s0, self.s1, self.curriculum_total = s0, s1, total_steps
        self.P_mean, self.P_std, self.huber_c, self.fourier_scale = P_mean, P_std, huber_c, fourier_scale
        self._grid: tuple[int, torch.Tensor, torch.Tensor] | None = None
        self.save_hyperparameters()

    def init_kinds(self) -> tuple[str, ...]:
        return ("edm", self.kind)

    def default_net(self):
        # iCT recommends Fourier scale 0.02 instead of EDM's 16 (the reference tutorial does the same).
        return net_kwargs(self.net_cfg, fourier_scale=self.fourier_scale)

    def train_intervals(self) -> int:
        # the curriculum's grids are nested (uniform in σ^(1/ρ), N doubling), so the last one holds every σ seen
        return self.curriculum(max(0, self.global_step - 1))[0]

    def curriculum(self, step: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        """N(k) intervals, the Karras grid and the log-normal index probabilities at step k (cached per phase)."""
        kprime = ict_kprime(self.curriculum_total or self.total_steps(), self.s0, self.s1)
        n = ict_num_intervals(step, kprime, self.s0, self.s1)
        if self._grid is None or self._grid[0] != n or self._grid[1].device != self.device:
            sig = karras_sigmas(n, self.method["sigma_min"], self.method["sigma_max"], self.method["rho"], device=self.device)
            self._grid = (n, sig, lognormal_index_probs(sig, self.P_mean, self.P_std))
        return self._grid

    def behaviour_loss(self, batch, step, generator=None, stats=False):
        n, sigmas, probs = self.curriculum(step)
        loss, unweighted = ct_loss(self.model, batch["act"], batch["obs"], sigmas, probs, c=self.huber_c,
                                   generator=generator, clip_student=self.clip_student)
        return loss, {"unweighted_loss": unweighted}

    def loss_step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = super().loss_step(batch)
        if self.should_log():
            self.log_scalar("train/curriculum_N", float(self.curriculum(self.global_step)[0]))
        return out


class CDModule(ConsistencyBehaviour):
    """Consistency distillation (Song et al. 2023) from a frozen EDM teacher checkpoint.

    The teacher (its EMA weights) is held outside the module's parameters: it is not optimised, not
    synchronised by DDP, and not re-saved in CD checkpoints (its path and SHA-256 are recorded instead).
    """

    kind = "cd"

    def __init__(self, teacher_ckpt: str, solver: str = "heun", distill_intervals: int = 18,
                 lr_schedule: str = "constant", ema_warmup: bool = True, target_ema: float | None = 0.0,
                 weighting: str = "inverse_delta", teacher_member: int | None = None, **kwargs: Any) -> None:
        """Two networks follow the online consistency model, as in the CD paper: the **target** θ⁻ of the
        consistency loss, ``θ⁻ ← μ·θ⁻ + (1 − μ)·θ`` with ``μ = target_ema`` (0: the online weights under stop-grad,
        what iCT found best for CT; the CD paper used 0.95), and the **evaluation EMA** (``ema_decay`` with the
        warm-up, from the consistency model's own start), which samples, evaluates and is saved as the policy.
        ``target_ema: null`` makes the evaluation EMA the target too (the reference's single EMA).

        Several seeds: with ``num_seeds: S`` the teacher must hold S members (an EDM run with ``num_seeds: S``), and
        member k distils from teacher member k; a solo CD distils from member ``teacher_member`` of such a teacher.

        Deliberate difference: the reference keeps one EMA, initialised from the teacher's EMA, at a constant rate
        (0.9999) as both target and policy. A slow target starts as the teacher, a denoiser, and the consistency
        signal climbs the 18 intervals only as fast as the target moves: with one EMA at 0.999 from the teacher, a
        2000-step demo-size distillation put 0% of its NFE 1 samples on a mode (docs/quality.md), against 88% with
        the online target and a restarted evaluation EMA."""
        # The reference creates a cosine schedule for CD but never steps it, so its LR is constant
        # (docs/design.md): we default to that explicitly; `lr_schedule: cosine` is available.
        super().__init__(lr_schedule=lr_schedule, ema_warmup=ema_warmup, **kwargs)
        if solver not in ("euler", "heun"):
            raise ConfigError(f"model.solver: expected 'euler' or 'heun', found {solver!r}")
        if target_ema is not None and not 0.0 <= target_ema < 1.0:
            raise ConfigError(f"model.target_ema: expected None or a rate in [0, 1), found {target_ema}")
        self.teacher_ckpt, self.solver, self.distill_intervals = teacher_ckpt, solver, distill_intervals
        if weighting not in CD_WEIGHTINGS:
            raise ConfigError(f"model.weighting: expected one of {CD_WEIGHTINGS}, found {weighting!r}")
        self.target_ema, self.weighting = target_ema, weighting
        if teacher_member is not None and (isinstance(teacher_member, bool) or not isinstance(teacher_member, int)
                                           or teacher_member < 0):
            raise ConfigError(f"model.teacher_member: expected None or a member index >= 0, found {teacher_member!r}")
        if teacher_member is not None and self.num_seeds > 1:
            raise ConfigError(f"model.teacher_member: {teacher_member} picks one teacher member for a solo CD; with "
                              f"model.num_seeds: {self.num_seeds} member k distils from teacher member k (leave it unset)")
        self.teacher_member = teacher_member
        self.target_model: torch.nn.Module | None = None
        self.teacher_sha256: str | None = None
        self.save_hyperparameters()

    @property
    def teacher(self) -> EDMDenoiser:
        return self.__dict__["_teacher"]

    def preflight(self, datamodule: TrainingData | None) -> None:
        """The teacher must be an EDM checkpoint of this data (sizes and normaliser), checked before any work."""
        super().preflight(datamodule)
        payload = read_checkpoint(self.teacher_ckpt, expect_kind="edm", what="model.teacher_ckpt")["idql_cm"]
        self._teacher_members(payload)
        check_fits_datamodule(payload, datamodule, "model.teacher_ckpt", self.teacher_ckpt)

    def _teacher_members(self, payload: dict[str, Any]) -> int | None:
        """The teacher member this run reads (None: all of them, or a solo teacher), checked against num_seeds."""
        ckpt_seeds = int(payload.get("num_seeds", 1))
        where = f"model.teacher_ckpt: {self.teacher_ckpt} holds {ckpt_seeds} member(s) (num_seeds {ckpt_seeds})"
        if self.num_seeds > 1:
            if ckpt_seeds != self.num_seeds:
                raise ConfigError(f"{where}, this CD run has model.num_seeds: {self.num_seeds}; distil from an EDM "
                                  f"run with num_seeds: {self.num_seeds}")
            return None
        if self.teacher_member is None:
            if ckpt_seeds > 1:
                raise ConfigError(f"{where}; set model.teacher_member: k (0..{ckpt_seeds - 1}) to distil one of them, or "
                                  f"model.num_seeds: {ckpt_seeds} to distil all")
            return None
        if self.teacher_member >= ckpt_seeds:
            raise ConfigError(f"{where}; model.teacher_member: {self.teacher_member} is out of range 0..{ckpt_seeds - 1}")
        return self.teacher_member if ckpt_seeds > 1 else None

    def build_members(self, obs_dim: int, act_dim: int) -> None:
        self.build(obs_dim, act_dim)  # no random draws: every member starts from its teacher member's weights

    def build(self, obs_dim: int, act_dim: int) -> None:
        ckpt = read_checkpoint(self.teacher_ckpt, expect_kind="edm", what="model.teacher_ckpt")
        payload, state = ckpt["idql_cm"], ckpt["state_dict"]
        data = self.data_facts(obs_dim, act_dim)
        check_fits_data(DataFacts.of_payload(payload), data, "model.teacher_ckpt", self.teacher_ckpt)
        member = self._teacher_members(payload)
        if member is not None:
            state = member_state(state, member)
        self.net_kw = net_kwargs(payload["net"]) if self.net_cfg is None else net_kwargs(self.net_cfg)
        S = self.num_seeds
        teacher = edm_from_payload(payload, state, f"model.teacher_ckpt {self.teacher_ckpt}", num_seeds=S)
        self.__dict__["_teacher"] = teacher.requires_grad_(False).eval()
        net = IDQLMlp(obs_dim, act_dim, **self.net_kw) if S == 1 else StackedIDQLMlp(S, obs_dim, act_dim, **self.net_kw)
        if S > 1:
            bind_rng(net, self.rng)
        self.model = self.wrap(net)
        check_teacher_compatible(self.model, teacher)
        # CM online <- EDM online, CM EMA <- EDM EMA (the distillation starts from the teacher's weights).
        self.model.net.load_state_dict(state_prefix(state, "model.net."))
        self.ema_model = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.ema_model.net.load_state_dict(state_prefix(state, "ema_model.net."))
        if self.init_from is not None:  # a fine-tuning stage: start from a trained CD instead of the teacher
            init = self._init_checkpoint(data)
            if net_kwargs(init["idql_cm"]["net"]) != self.net_kw:
                raise ConfigError(f"model.init_from: {self.init_from} has net {init['idql_cm']['net']}, this CD run's "
                                  f"is {self.net_kw}; start from a CD of the same architecture")
            self._load_init_weights(init["state_dict"])
        if self.target_ema is not None:
            self.target_model = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.teacher_sha256 = file_sha256(self.teacher_ckpt)
        self.register_buffer("distill_sigmas", karras_sigmas(
            self.distill_intervals, self.method["sigma_min"], self.method["sigma_max"], self.method["rho"]))

    def train_intervals(self) -> int:
        return int(self.distill_intervals)

    def payload(self):
        return {**super().payload(), "teacher_ckpt": os.path.abspath(self.teacher_ckpt),
                "teacher_sha256": self.teacher_sha256, "teacher_solver": self.solver,
                "teacher_member": self.teacher_member}

    def target(self) -> torch.nn.Module:
        return self.ema_model if self.target_model is None else self.target_model

    def update_targets(self, step: int) -> None:
        super().update_targets(step)
        if self.target_model is not None:
            self.ema_(self.target_model, self.model, self.target_ema)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.target_model is not None:
            self.target_model.eval()
        return self

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint["idql_cm"].get("teacher_sha256")
        if saved and self.teacher_sha256 and saved != self.teacher_sha256:
            raise CheckpointError(f"resuming CD with teacher {self.teacher_ckpt} (sha256 {self.teacher_sha256[:12]}), "
                                  f"but the checkpoint was distilled from sha256 {saved[:12]}")

    def frozen_nets(self) -> list[torch.nn.Module]:
        return [self.teacher, *super().frozen_nets()]

    def behaviour_loss(self, batch, step, generator=None, stats=False):
        loss = cd_loss(self.model, self.target(), self.teacher, batch["act"], batch["obs"], self.distill_sigmas,
                       solver=self.solver, generator=generator, weighting=self.weighting,
                       clip_student=self.clip_student)
        return loss, {}



class MeanFlowModule(BehaviourModule):
    """MeanFlow (Geng et al. 2025): a network of the average velocity, one step from noise to action.

    Trained on the MeanFlow identity by one JVP per update (:func:`idql_cm.diffusion.meanflow.meanflow_loss`), with
    a share ``flow_share`` of every batch on plain flow matching (r = t); sampled by
    :func:`~idql_cm.diffusion.meanflow.meanflow_sample` in ``nfe`` equal steps from t = 1. The σ arguments of the
    shared behaviour settings do not apply (the path runs over t ∈ [0, 1])."""

    kind = "meanflow"

    def __init__(self, flow_share: float = 0.25, P_mean_t: float = -0.6, P_std_t: float = 1.6,
                 P_mean_r: float = -4.0, P_std_r: float = 1.6, adaptive_p: float = 1.0, adaptive_c: float = 1e-3,
                 fourier_scale: float = 4.0, **kwargs: Any) -> None:
        """``flow_share``: the share of each batch with r = t (the authors' code 0.25; the paper's image setting
        0.75; OFQL 0.5); ``P_mean_t`` / ``P_std_t`` and ``P_mean_r`` / ``P_std_r``: the logit-normals of t and r (the
        authors' code's, r near 0; :func:`~idql_cm.diffusion.meanflow.sample_t_r`); ``adaptive_p`` / ``adaptive_c``:
        the adaptive loss weight ``1 / (‖Δ‖² + c)^p`` (the paper's p = 1; c = 1e-3 as the authors' code);
        ``fourier_scale``: of the time embedding, whose input here is t ∈ [0, 1] (EDM's 16 acts on ¼·ln σ)."""
        super().__init__(**kwargs)
        if not 0.0 <= flow_share <= 1.0:
            raise ConfigError(f"model.flow_share: expected a share in [0, 1], found {flow_share}")
        if not (P_std_t > 0 and P_std_r > 0):
            raise ConfigError(f"model.P_std_t / P_std_r: expected positive numbers, found {P_std_t}, {P_std_r}")
        if not adaptive_p >= 0 or not adaptive_c > 0:
            raise ConfigError(f"model.adaptive_p / adaptive_c: expected p >= 0 and c > 0, found {adaptive_p}, "
                              f"{adaptive_c}")
        self.flow_share = float(flow_share)
        self.t_r = (float(P_mean_t), float(P_std_t), float(P_mean_r), float(P_std_r))
        self.adaptive_p, self.adaptive_c = float(adaptive_p), float(adaptive_c)
        self.fourier_scale = float(fourier_scale)
        self.save_hyperparameters()

    def default_net(self):
        return net_kwargs(self.net_cfg, fourier_scale=self.fourier_scale)

    def net_obs_dim(self, obs_dim: int) -> int:
        # the condition is [obs, features of t − r]: the interval length is the second time input
        return obs_dim + H_FEATURES

    def wrap(self, net):
        return MeanFlowModel(net, self.method["x_min"], self.method["x_max"])

    def payload(self):
        return {**super().payload(), "flow_share": self.flow_share}

    def behaviour_loss(self, batch, step, generator=None, stats=False):
        loss, unweighted = meanflow_loss(self.model, batch["act"], batch["obs"], generator, self.flow_share,
                                         *self.t_r, self.adaptive_p, self.adaptive_c)
        return loss, {"unweighted_loss": unweighted}
