"""Lightning callbacks: the final checkpoint the CLI adds to every run, and the configs' progress bar."""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar

from idql_cm.lightning_compat import last_saved_step


class FinalCheckpoint(pl.Callback):
    """Writes ``last.ckpt`` at the final step when the periodic checkpoints did not land on it.

    ModelCheckpoint(every_n_train_steps=N, save_last=True) saves ``last`` only every N steps, so a run whose
    max_steps is not a multiple of N would end with a ``last.ckpt`` from before its final step (and the
    pipeline would take the stage as unfinished).
    """

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for cb in trainer.checkpoint_callbacks:
            if not (isinstance(cb, ModelCheckpoint) and cb.save_last and cb.dirpath):
                continue
            path = os.path.join(cb.dirpath, cb.CHECKPOINT_NAME_LAST + cb.FILE_EXTENSION)
            if cb.last_model_path == path and last_saved_step(cb) == trainer.global_step:
                continue
            trainer.save_checkpoint(path)
            cb.last_model_path = path


class StepProgressBar(TQDMProgressBar):
    """Lightning's TQDM bar, counting gradient steps (``trainer.global_step``) instead of Trainer iterations.

    With ``model.fused_steps = K`` an iteration makes K updates: the stock bar would count iterations against a
    total of ``max_steps`` and its rate would be K times too low. This one shows ``global_step / max_steps`` and
    steps per second, also after a resume.
    """

    _shown = 0  # the step the bar last showed

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        bar = self.train_progress_bar
        if bar is None:
            return
        if trainer.max_steps and trainer.max_steps > 0:
            bar.total = trainer.max_steps
        bar.initial = bar.n = int(trainer.global_step)  # a resumed run starts at its step (and its rate from there)
        self._shown = bar.n

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        bar = self.train_progress_bar
        if bar is None or not self.is_enabled:
            return
        n = int(trainer.global_step)
        # every refresh_rate steps, also when K-step jumps skip over the multiple itself
        if n // self.refresh_rate > self._shown // self.refresh_rate or n == bar.total:
            self._shown = n
            bar.n = n
            bar.refresh()
            bar.set_postfix(self.get_metrics(trainer, pl_module))
