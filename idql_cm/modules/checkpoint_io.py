"""``AtomicCheckpointIO``: Lightning's checkpoint writer, made atomic (the CLI installs it)."""

from __future__ import annotations

import os
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from idql_cm.fileio import atomic_path


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoint writes that a kill or a power cut cannot leave half-done (:func:`idql_cm.fileio.atomic_path`).

    A crash during a save leaves the previous file intact and at worst a stray temporary file, which the next save
    of the same file removes. Lightning's ``_atomic_save`` stages local files in the system temporary folder and
    moves them with ``shutil.move``, which copies (not atomically) when that folder is on another file system, and
    never syncs. Remote URLs (``s3://`` ...) go through Lightning's writer. ``idql-cm`` installs this plugin unless
    the configuration names its own ``CheckpointIO``.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        target = os.fspath(path)
        if "://" in target and not target.startswith("file://"):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint does not take storage_options")
        with atomic_path(target.removeprefix("file://")) as tmp, open(tmp, "wb") as f:
            torch.save(checkpoint, f)
