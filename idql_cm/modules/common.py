"""What every idql-cm LightningModule shares: the checkpoint payload, per-step seeding, optimisers,
cheap logging and the non-finite guard.

The modules are thin: the math lives in :mod:`idql_cm.nets` and :mod:`idql_cm.diffusion`.
"""

from __future__ import annotations

import hashlib
import math
import os
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from idql_cm.errors import CheckpointError, ConfigError, NonFiniteError

#: Bumped whenever the checkpoint payload changes incompatibly; older payloads are refused.
FORMAT_VERSION = 1

_MASK64 = (1 << 63) - 1


def step_seed(seed: int, rank: int, step: int, stream: int = 0) -> int:
    """A 63-bit seed that is a pure function of (seed, rank, step, stream).

    Seeding every step from this makes a run's randomness (batch indices, noise, dropout) independent of
    how it was interrupted: resuming at step k draws exactly what an uninterrupted run draws at step k,
    with no RNG state to save. Ranks get different streams.
    """
    h = hashlib.blake2b(f"{seed}:{rank}:{step}:{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & _MASK64


def global_seed() -> int:
    """The seed given to ``seed_everything`` (Lightning exports it as PL_GLOBAL_SEED), else 0."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


def file_sha256(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def cosine_or_constant(optimizer: torch.optim.Optimizer, schedule: str, total_steps: int) -> dict | None:
    """LR schedule config for Lightning: ``cosine`` decays to 0 over ``total_steps``; ``constant`` is none."""
    if schedule == "constant":
        return None
    if schedule != "cosine":
        raise ConfigError(f"model.lr_schedule: expected 'cosine' or 'constant', found {schedule!r}")
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total_steps))
    return {"scheduler": sched, "interval": "step", "frequency": 1}


def make_optimizer(params, name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    # The reference trains its actors with AdamW at PyTorch's default weight decay 0.01 because it passes
    # only {"lr": 3e-4} (reference-spec §8.6). We make the decay explicit in every config instead.
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ConfigError(f"model.optimizer: expected 'adam' or 'adamw', found {name!r}")


class IDQLModule(pl.LightningModule):
    """Base class: holds the dataset facts every checkpoint must carry and the shared training plumbing.

    Subclasses set ``kind`` and implement ``build(obs_dim, act_dim)`` (create the networks) and
    ``payload()`` (the architecture hyper-parameters for :mod:`idql_cm.modules.artifacts`).
    """

    kind: str = "?"

    def __init__(self, nonfinite: str = "stop", check_finite_every: int = 1) -> None:
        super().__init__()
        if nonfinite not in ("stop", "skip"):
            raise ConfigError(f"model.nonfinite: expected 'stop' or 'skip', found {nonfinite!r}")
        self.nonfinite = nonfinite
        self.check_finite_every = max(1, int(check_finite_every))
        self.obs_dim: int | None = None
        self.act_dim: int | None = None
        self.data_info: dict[str, Any] = {}
        self.skipped_steps = 0

    # ------------------------------------------------------------------ building
    def setup(self, stage: str) -> None:
        if self.obs_dim is not None:
            return
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None:
            raise ConfigError(f"{type(self).__name__} needs a data module (the `data:` section) to know its sizes")
        self.obs_dim, self.act_dim = int(dm.obs_dim), int(dm.act_dim)
        norm = dm.normalizer
        self.register_buffer("obs_mean", torch.as_tensor(norm.mean, dtype=torch.float32).clone())
        self.register_buffer("obs_std", torch.as_tensor(norm.std, dtype=torch.float32).clone())
        self.data_info = {"dataset": str(dm.dataset), "env_id": dm.env_id, "num_transitions": int(dm.num_transitions)}
        self.build(self.obs_dim, self.act_dim)
        self.to(self.trainer.strategy.root_device)

    def build(self, obs_dim: int, act_dim: int) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def payload(self) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["idql_cm"] = {
            "format": FORMAT_VERSION,
            "kind": self.kind,
            "obs_dim": self.obs_dim,
            "act_dim": self.act_dim,
            "normalizer": {"mean": self.obs_mean.tolist(), "std": self.obs_std.tolist()},
            **self.data_info,
            **self.payload(),
            "skipped_steps": self.skipped_steps,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get("idql_cm")
        if meta is None:
            raise CheckpointError(f"expected an idql-cm checkpoint of kind '{self.kind}', found one without the 'idql_cm' payload")
        if meta.get("format") != FORMAT_VERSION:
            raise CheckpointError(f"checkpoint format {meta.get('format')} is not supported (expected {FORMAT_VERSION})")
        if meta.get("kind") != self.kind:
            raise CheckpointError(f"expected a '{self.kind}' checkpoint to resume {type(self).__name__}, found kind '{meta.get('kind')}'")
        if (meta.get("obs_dim"), meta.get("act_dim")) != (self.obs_dim, self.act_dim):
            raise CheckpointError(
                f"checkpoint has obs/act size {meta.get('obs_dim')}/{meta.get('act_dim')}, "
                f"the data has {self.obs_dim}/{self.act_dim} ({self.data_info.get('dataset')})")
        self.skipped_steps = int(meta.get("skipped_steps", 0))

    # ------------------------------------------------------------------ per-step plumbing
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Randomness of step k is a function of (seed, rank, k): exact resume without saved RNG state.
        torch.manual_seed(step_seed(global_seed(), self.global_rank, self.global_step, stream=1))

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # Inside the step, not in on_train_batch_end: callbacks (ModelCheckpoint) run their
        # on_train_batch_end first, and a checkpoint must hold the EMA / target of the step it is named for.
        self.after_optimizer_step()

    def after_optimizer_step(self) -> None:
        """EMA / target-network update; subclasses override."""

    def should_log(self) -> bool:
        """True on the steps whose metrics Lightning writes (every ``trainer.log_every_n_steps``).

        Modules call ``self.log`` only then: it costs ~2 ms a call, and a logged tensor is read back
        (a host sync) only when written.
        """
        try:
            return bool(self.trainer._logger_connector.should_update_logs)
        except (AttributeError, RuntimeError, NotImplementedError):
            return False

    def guard_finite(self, name: str, value: torch.Tensor) -> bool:
        """False when ``value`` is NaN/Inf and the step should be skipped; raises in 'stop' mode.

        Checked every ``check_finite_every`` steps (1 = every step: a host sync on GPU; GPU configs may
        raise it, trading detection latency for speed).
        """
        if self.global_step % self.check_finite_every:
            return True
        if bool(torch.isfinite(value).all()):
            return True
        if self.nonfinite == "skip":
            self.skipped_steps += 1
            self.log("train/skipped_nonfinite_steps", float(self.skipped_steps))
            return False
        raise NonFiniteError(
            f"{type(self).__name__}: non-finite {name} at step {self.global_step}; training stopped, the last "
            "good checkpoint is kept (set model.nonfinite: skip to skip such steps)")

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if not self.should_log():
            return
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if params:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
            self.guard_finite("gradient norm", norm)
            self.log("train/grad_norm", norm)
        self.log("train/lr", optimizer.param_groups[0]["lr"])

    def normalize_obs(self, obs: torch.Tensor) -> torch.Tensor:
        return (obs - self.obs_mean) / self.obs_std

    def total_steps(self) -> int:
        ms = getattr(self.trainer, "max_steps", -1) if self._trainer is not None else -1
        if ms is None or ms <= 0:
            raise ConfigError("trainer.max_steps: expected a positive step count (training is step-based), found "
                              f"{ms}")
        return int(ms)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def finite_or_nan(x: float) -> float:
    return x if math.isfinite(x) else float("nan")
