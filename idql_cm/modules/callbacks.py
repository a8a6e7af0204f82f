"""Lightning callbacks the CLI adds to every run."""

from __future__ import annotations

import os

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint


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
            if cb.last_model_path == path and getattr(cb, "_last_global_step_saved", -1) == trainer.global_step:
                continue
            trainer.save_checkpoint(path)
            cb.last_model_path = path
