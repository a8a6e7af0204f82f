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
