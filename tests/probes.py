"""Test-only Lightning callbacks, named by class path in shrunk configs."""

from __future__ import annotations

import json
import os

import lightning.pytorch as pl
import torch


class StopAtStep(pl.Callback):
    """Stops fit after ``step`` optimiser steps, as an interruption would (the checkpoint of that step is kept)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


class RankProbe(pl.Callback):
    """Each rank writes what it saw (batch checksums, a parameter checksum) to probe_rank<r>.json in ``out``."""

    def __init__(self, out: str) -> None:
        self.out = out
        self.batches: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append(float(batch["obs"].double().sum()))

    def on_train_end(self, trainer, pl_module) -> None:
        params = torch.cat([p.detach().flatten().double() for p in pl_module.parameters()])
        with open(os.path.join(self.out, f"probe_rank{trainer.global_rank}.json"), "w") as f:
            json.dump({"batches": self.batches, "param_sum": float(params.sum()),
                       "param_sq": float(params.square().sum()), "world_size": trainer.world_size}, f)


class PoisonAt(pl.Callback):
    """Makes the given steps non-finite, as a corrupt batch or an overflow would.

    ``what="batch"`` writes NaN into one action (or, with ``key``, one entry of that batch key) before the step: a NaN
    loss. ``what="grad"`` writes Inf into one gradient after backward (callbacks run ``on_before_optimizer_step``
    before the module's check): a finite loss with a non-finite gradient. ``member``: poison only that member of a
    ``num_seeds`` run (its slice of the ``[S, B, ...]`` batch, or of the stacked gradient).
    """

    def __init__(self, steps: list[int], what: str = "batch", key: str = "act", member: int | None = None) -> None:
        self.steps, self.what, self.key, self.member = {int(s) for s in steps}, what, key, member

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.what == "batch" and trainer.global_step in self.steps:
            target = batch[self.key] if self.member is None else batch[self.key][self.member]
            target[0, 0] = float("nan")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.what == "grad" and trainer.global_step in self.steps:
            p = next(p for g in optimizer.param_groups for p in g["params"] if p.grad is not None)
            (p.grad if self.member is None else p.grad[self.member]).view(-1)[0] = float("inf")


class StateTrace(pl.Callback):
    """Writes, after every step, a checksum of the module's whole state (weights, EMA, targets) to ``out`` (JSON:
    global step -> [sum, sum of squares])."""

    def __init__(self, out: str) -> None:
        self.out = out
        self.trace: dict[int, list[float]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        flat = torch.cat([v.detach().double().flatten() for v in pl_module.state_dict().values()
                          if v.is_floating_point()])
        self.trace[int(trainer.global_step)] = [float(flat.sum()), float(flat.square().sum())]

    def on_train_end(self, trainer, pl_module) -> None:
        with open(self.out, "w") as f:
            json.dump(self.trace, f)


class StepReporter(pl.Callback):
    """Prints ``@step <global step>`` (flushed) after every step, so a test can kill the run at a chosen step."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        print(f"@step {trainer.global_step}", flush=True)


class DeferFiniteCheck(pl.Callback):
    """Makes the module read its non-finite verdicts one step late, as stop mode does on a GPU (on CPU the copy is
    synchronous, but the bookkeeping is the same)."""

    def setup(self, trainer, pl_module, stage) -> None:
        pl_module.guard.defer = True
