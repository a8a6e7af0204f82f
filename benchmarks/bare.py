"""The bare PyTorch loop the Lightning modules are timed against: the same update step, no Trainer.

The loop calls the module's own update step (``loss(batch, step, generator)`` and ``update_targets(step)``, plain
functions of its networks) and its own ``configure_optimizers`` on a copy of the module, so it cannot drift from
the module's math, defaults or a config's values. What it leaves out is the plumbing: no per-step seeding, no
non-finite check, no logging, no fused steps, batches drawn by ``torch.randint`` from the same tensors.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch

from benchmarks.harness import ACT_DIM, OBS_DIM


class BareLoop:
    """The module's own update step (``module.loss``, backward, optimiser, ``module.update_targets``, LR) in a plain
    loop, on a copy of ``module`` built without a Trainer.

    ``module``: a constructed, unfitted idql-cm module (it is deep-copied, then its networks are built with
    ``init_nets``; the original stays unbuilt for its Lightning fit). ``total_steps``: the run's length (the cosine
    schedule's and CT's curriculum horizon, as the Trainer's ``max_steps`` is the module's). On CUDA with
    ``bf16-mixed`` the loss runs under the same bf16 autocast as Lightning's precision plugin (IQL's loss leaves it
    itself, as in a fit).
    """

    def __init__(self, module, tensors: dict[str, torch.Tensor], cfg: dict[str, Any], total_steps: int):
        torch.manual_seed(0)
        self.module = m = copy.deepcopy(module)
        m.planned_steps = total_steps
        self.device = torch.device(cfg.get("device", "cpu"))
        self.autocast = cfg.get("precision") == "bf16-mixed"
        mean, std = _normaliser_for(m)
        m.init_nets(OBS_DIM, ACT_DIM, mean, std, {"dataset": "bare loop"}, self.device)
        m.to(self.device).train()
        for net in m.frozen_nets():
            net.to(self.device)
        opt = m.configure_optimizers()
        self.opt, self.sched = (opt["optimizer"], opt["lr_scheduler"]) if isinstance(opt, dict) else (opt, None)
        self.tensors = {k: t.to(self.device) for k, t in tensors.items()}
        self.n_rows = int(next(iter(tensors.values())).shape[0])
        self.batch_size = cfg["batch_size"]
        self.step_idx = 0

    def batch(self) -> dict[str, torch.Tensor]:
        idx = torch.randint(self.n_rows, (self.batch_size,), device=self.device)
        return {k: t[idx] for k, t in self.tensors.items()}

    def loss(self, b: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.module.loss(b, self.step_idx, None)[0]

    def step(self) -> None:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            loss = self.loss(self.batch())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.module.update_targets(self.step_idx)
        if self.sched is not None:
            self.sched.step()
        self.step_idx += 1


def _normaliser_for(module) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeros / ones, or the normaliser of the teacher a distilled module reads (its build checks it)."""
    from idql_cm.backbones import backbone
    from idql_cm.checkpoint import read_checkpoint

    if module.kind == "iql" or not backbone(module.kind).needs:
        return torch.zeros(OBS_DIM), torch.ones(OBS_DIM)
    norm = read_checkpoint(module.teacher_ckpt, what="teacher")["idql_cm"]["normalizer"]
    return torch.tensor(norm["mean"]), torch.tensor(norm["std"])


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
