"""The bare PyTorch loop the Lightning modules are timed against: the same math, no Trainer.

Every hyperparameter comes from a constructed module (:func:`bare_hparams` reads its attributes), so the bare loop
cannot drift from the module's defaults or from a config's values: what the Lightning side trains with, the bare
side trains with. The nets, losses, optimiser, LR schedule and EMA / target updates are the package's own functions
(``idql_cm.nets``, ``idql_cm.diffusion``, ``idql_cm.modules``); what the bare loop leaves out is the plumbing: no
per-step seeding, no non-finite check, no logging, batches drawn by ``torch.randint`` from the same tensors.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch

from benchmarks.harness import ACT_DIM, OBS_DIM

#: IQLModule.configure_optimizers: one Adam without weight decay over Q and V (fixed in the module, not an argument)
IQL_OPTIMIZER = ("adam", 0.0)


def bare_hparams(module) -> dict[str, Any]:
    """The hyperparameters of an (unfitted) idql-cm module that its training math depends on, from its attributes."""
    kind = module.kind
    if kind == "iql":
        opt, decay = IQL_OPTIMIZER
        return {"kind": kind, "hidden_dim": module.hidden_dim, "discount": module.discount,
                "expectile": module.expectile, "tau": module.tau, "lr": module.lr, "lr_schedule": module.lr_schedule,
                "optimizer": opt, "weight_decay": decay}
    hp: dict[str, Any] = {
        "kind": kind, "lr": module.lr, "lr_schedule": module.lr_schedule, "optimizer": module.opt_name,
        "weight_decay": module.weight_decay, "method": dict(module.method),
        # the EMA rate per update: EMAWarmup's (power, max_value) with the warm-up, else the constant ema_decay
        "ema_warmup": None if module.ema is None else {"power": module.ema.power, "max_value": module.ema.max_value,
                                                       "min_value": module.ema.min_value,
                                                       "inv_gamma": module.ema.inv_gamma},
        "ema_decay": module.ema_decay,
    }
    if kind == "edm":
        hp["net"] = module.default_net()
    elif kind == "ct":
        hp.update(net=module.default_net(), s0=module.s0, s1=module.s1, curriculum_total=module.curriculum_total,
                  P_mean=module.P_mean, P_std=module.P_std, huber_c=module.huber_c, clip_student=module.clip_student)
    elif kind == "cd":
        hp.update(net=module.net_cfg, teacher_ckpt=module.teacher_ckpt, solver=module.solver,
                  distill_intervals=module.distill_intervals, target_ema=module.target_ema,
                  weighting=module.weighting, clip_student=module.clip_student)
    else:
        raise ValueError(f"bare_hparams: expected a module of kind iql, edm, ct or cd, found {kind!r}")
    return hp


def _edm_teacher(ckpt_path: str):
    """(frozen EDM teacher from the checkpoint's EMA weights, its payload, its state_dict) for the CD bare loop."""
    from idql_cm.backbones import edm_from_payload
    from idql_cm.checkpoint import read_checkpoint

    ckpt = read_checkpoint(ckpt_path, expect_kind="edm")
    meta, state = ckpt["idql_cm"], ckpt["state_dict"]
    teacher = edm_from_payload(meta, state, f"teacher {ckpt_path}")
    return teacher.requires_grad_(False).eval(), meta, state


class BareLoop:
    """The same math as ``module.training_step`` (loss, backward, optimiser, EMA / target, LR) in a plain loop.

    ``module``: a constructed idql-cm module (not fitted; only its hyperparameters are read, see
    :func:`bare_hparams`). ``total_steps``: the run's length (the cosine schedule's and CT's curriculum horizon, as
    the Trainer's ``max_steps`` is the module's). On CUDA with ``bf16-mixed`` the losses run under the same bf16
    autocast as Lightning's precision plugin (IQL's in fp32, as the module does).
    """

    def __init__(self, module, tensors: dict[str, torch.Tensor], cfg: dict[str, Any], total_steps: int):
        from idql_cm.checkpoint import state_prefix
        from idql_cm.diffusion.consistency import ConsistencyModel
        from idql_cm.diffusion.edm import EDMDenoiser
        from idql_cm.diffusion.schedules import karras_sigmas
        from idql_cm.modules.behaviour import net_kwargs
        from idql_cm.modules.common import cosine_or_constant, make_optimizer
        from idql_cm.nets.critics import TwinQ, ValueNet
        from idql_cm.nets.ema import EMAWarmup
        from idql_cm.nets.mlp import IDQLMlp

        torch.manual_seed(0)
        hp = self.hp = bare_hparams(module)
        self.kind, self.total = hp["kind"], total_steps
        self.device = torch.device(cfg.get("device", "cpu"))
        self.autocast = cfg.get("precision") == "bf16-mixed" and self.kind != "iql"
        self.tensors = {k: t.to(self.device) for k, t in tensors.items()}
        self.n_rows = int(next(iter(tensors.values())).shape[0])
        self.batch_size = cfg["batch_size"]
        self.step_idx = 0
        self.target_model = None
        if self.kind == "iql":
            h = hp["hidden_dim"]
            self.q, self.v = TwinQ(OBS_DIM, ACT_DIM, h).to(self.device), ValueNet(OBS_DIM, h).to(self.device)
            self.q_target = copy.deepcopy(self.q).requires_grad_(False)
            params = list(self.q.parameters()) + list(self.v.parameters())
        else:
            ema = hp["ema_warmup"]
            self.ema = EMAWarmup(**ema) if ema is not None else None
            if self.kind == "cd":
                self.teacher, meta, state = _edm_teacher(hp["teacher_ckpt"])
                self.teacher.to(self.device)
                kw = net_kwargs(meta["net"]) if hp["net"] is None else net_kwargs(hp["net"])
                self.model = ConsistencyModel(IDQLMlp(OBS_DIM, ACT_DIM, **kw), **hp["method"])
                self.model.net.load_state_dict(state_prefix(state, "model.net."))
                self.model.to(self.device)
                self.ema_model = copy.deepcopy(self.model).requires_grad_(False).eval()
                self.ema_model.net.load_state_dict(state_prefix(state, "ema_model.net."))
                if hp["target_ema"] is not None:  # CDModule's separate online target
                    self.target_model = copy.deepcopy(self.model).requires_grad_(False).eval()
                m = hp["method"]
                self.distill_sigmas = karras_sigmas(hp["distill_intervals"], m["sigma_min"], m["sigma_max"],
                                                    m["rho"], device=self.device)
            else:
                wrap = EDMDenoiser if self.kind == "edm" else ConsistencyModel
                self.model = wrap(IDQLMlp(OBS_DIM, ACT_DIM, **hp["net"]), **hp["method"]).to(self.device).train()
                self.ema_model = copy.deepcopy(self.model).requires_grad_(False).eval()
                self._grid = None
            params = self.model.parameters()
        self.opt = make_optimizer(params, hp["optimizer"], hp["lr"], hp["weight_decay"])
        self.sched = cosine_or_constant(self.opt, hp["lr_schedule"], total_steps)

    def batch(self) -> dict[str, torch.Tensor]:
        idx = torch.randint(self.n_rows, (self.batch_size,), device=self.device)
        return {k: t[idx] for k, t in self.tensors.items()}

    def loss(self, b: dict[str, torch.Tensor]) -> torch.Tensor:
        from idql_cm.diffusion.consistency import (
            cd_loss,
            ct_loss,
            ict_kprime,
            ict_num_intervals,
            lognormal_index_probs,
        )
        from idql_cm.diffusion.schedules import karras_sigmas
        from idql_cm.modules.iql import expectile_loss

        hp = self.hp
        if self.kind == "iql":
            obs, act = b["obs"], b["act"]
            with torch.no_grad():
                q_t = self.q_target(obs, act)
                td_target = b["rew"] + hp["discount"] * (1.0 - b["tml"]) * self.v(b["next_obs"])
            v = self.v(obs)
            q1, q2 = self.q.both(obs, act)
            return (expectile_loss(q_t - v, hp["expectile"])
                    + ((q1 - td_target).square() + (q2 - td_target).square()).mean())
        if self.kind == "edm":
            return self.model.loss(b["act"], b["obs"])
        if self.kind == "ct":
            s0, s1 = hp["s0"], hp["s1"]
            n = ict_num_intervals(self.step_idx, ict_kprime(hp["curriculum_total"] or self.total, s0, s1), s0, s1)
            if self._grid is None or self._grid[0] != n:
                m = hp["method"]
                sig = karras_sigmas(n, m["sigma_min"], m["sigma_max"], m["rho"], device=self.device)
                self._grid = (n, sig, lognormal_index_probs(sig, hp["P_mean"], hp["P_std"]))
            return ct_loss(self.model, b["act"], b["obs"], self._grid[1], self._grid[2], c=hp["huber_c"],
                           clip_student=hp["clip_student"])[0]
        target = self.ema_model if self.target_model is None else self.target_model
        return cd_loss(self.model, target, self.teacher, b["act"], b["obs"], self.distill_sigmas,
                       solver=hp["solver"], weighting=hp["weighting"], clip_student=hp["clip_student"])

    def ema_rate(self, step: int) -> float:
        """The evaluation EMA's rate at update ``step`` (behaviour modules)."""
        return self.ema.decay(step) if self.ema is not None else self.hp["ema_decay"]

    def step(self) -> None:
        from idql_cm.nets.ema import ema_update_

        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            loss = self.loss(self.batch())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if self.kind == "iql":
            ema_update_(self.q_target, self.q, 1.0 - self.hp["tau"])  # target <- lerp(target, online, tau)
        else:
            ema_update_(self.ema_model, self.model, self.ema_rate(self.step_idx))
            if self.target_model is not None:
                ema_update_(self.target_model, self.model, self.hp["target_ema"])
        if self.sched is not None:
            self.sched.step()
        self.step_idx += 1


def bare_step_times(module, tensors, cfg: dict[str, Any]) -> list[float]:
    """Seconds per bare step of ``module``'s math over ``timed_steps`` after ``warmup_steps``."""
    kind = module.kind
    warm, steps = cfg["warmup_steps"][kind], cfg["timed_steps"][kind]
    loop = BareLoop(module, tensors, cfg, warm + steps)
    for _ in range(warm):
        loop.step()
    marks = [time.perf_counter()]
    for _ in range(steps):
        loop.step()
        marks.append(time.perf_counter())
    return [b - a for a, b in zip(marks[:-1], marks[1:], strict=True)]
