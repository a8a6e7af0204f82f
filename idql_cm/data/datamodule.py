"""``TDDataModule``: qlearning transitions on the training device, sampled by random index.

The whole dataset sits on the device as one packed float32 tensor (obs, act, rew, next_obs, tml side by side,
``pack_columns``); a batch, or K batches at once for a fused step, is ``torch.randint`` indices plus one
``index_select`` of packed rows, viewed back as per-key columns (``column_views``): no host sync, no per-item
``__getitem__`` / collate, no worker processes.
This replaces the reference's shuffled ``DataLoader`` + ``loop_dataloader`` (docs/design.md): both draw
uniform batches from the transitions; the reference draws without replacement within an epoch, this draws with
replacement (the standard for TD learning: CORL, JAX-CORL).

Reproducibility without saved sampler state: the batch of step ``s`` on rank ``r`` comes from a generator seeded
with a hash of ``(seed, r, s)``. The step counter starts, when iteration starts, at the number of training batches
the trainer has already consumed (``trainer.fit_loop.epoch_loop.batch_progress.total.ready``, restored from a
checkpoint on resume; it equals ``trainer.global_step`` with one optimiser and no gradient accumulation, and stays
right when a manual-optimisation module steps two optimisers per batch). So a run resumed at step N draws exactly
the batches an uninterrupted run draws from step N on, and ranks draw different batches.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from typing import Any

import lightning as L
import numpy as np
import torch

from idql_cm.data.d4rl import DataWarning, iql_reward_scale, load_d4rl, read_env_id
from idql_cm.data.normalizer import ObsNormalizer
from idql_cm.data.scores import task_family
from idql_cm.data.sources import d4rl_task_of, resolve_source
from idql_cm.errors import ConfigError, DataError
from idql_cm.lightning_compat import consumed_batches
from idql_cm.seeding import resolve_seed, step_seed

__all__ = ["BATCH_KEYS", "SingleBatchLoader", "TDBatchIterable", "TDDataModule", "column_views", "pack_columns"]

BATCH_KEYS = ("obs", "act", "rew", "next_obs", "tml")
REWARD_SCALES = ("none", "iql_locomotion")
OUT_OF_BOUNDS = ("clip", "error")


def _consumed_batches(trainer) -> int:
    """Training batches the trainer has already drawn (0 without a trainer)."""
    if trainer is None:
        return 0
    return consumed_batches(trainer)


def pack_columns(tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, tuple[int, int]]]:
    """One row-major ``[N, W]`` matrix holding the 2-D tensors side by side, and each key's column range.

    A batch is then one row gather instead of one per key: 256 random rows of ~170 bytes each cost about half the
    time of five gathers that touch five places in memory per row (scripts/bench.py, sampler). Tensors that already
    are consecutive column views of one such matrix (what :class:`TDDataModule` holds) are used as they are.
    """
    items = [(k, t if t.dim() == 2 else t.reshape(t.shape[0], -1)) for k, t in tensors.items()]
    cols, c = {}, 0
    for k, t in items:
        cols[k] = (c, c + t.shape[1])
        c += t.shape[1]
    first = items[0][1]
    n, width = first.shape[0], c
    ptr, off = first.untyped_storage().data_ptr(), first.storage_offset()
    viewed = all(t.shape[0] == n and t.stride() == (width, 1) and t.dtype == first.dtype
                 and t.untyped_storage().data_ptr() == ptr and t.storage_offset() == off + cols[k][0]
                 for k, t in items)
    if viewed:
        return first.as_strided((n, width), (width, 1), off), cols
    return torch.cat([t for _, t in items], dim=1).contiguous(), cols


def column_views(rows: torch.Tensor, cols: dict[str, tuple[int, int]],
                 shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """The keys of ``rows`` (``[..., W]``, as laid out by :func:`pack_columns`) as views ``[..., *shapes[key]]``."""
    lead = rows.shape[:-1]
    return {k: rows[..., a:b] if len(shapes[k]) == 1 else rows[..., a:b].view(*lead, *shapes[k])
            for k, (a, b) in cols.items()}


class TDBatchIterable:
    """An endless iterable of batches ``{obs, act, rew [B,1], next_obs, tml [B,1]}`` drawn uniformly by index.

    Each ``iter()`` starts at step ``start_step()`` (read when iteration starts) and yields the batch of step s from a
    generator seeded with ``step_seed(seed, rank, s)``; :meth:`batch_at` gives any step's batch directly.

    With ``fused_steps = K > 1`` each item holds the batches of K consecutive steps, stacked: ``{key: [K, B,
    ...]}`` (for modules that make K updates per Trainer iteration, ``fused_steps``); item j holds steps
    ``start_step() + j·K`` to ``start_step() + j·K + K − 1``: exactly the batches of the 1-step stream.

    Args:
        tensors: ``{key: Tensor[N, ...]}`` on one device (keys :data:`BATCH_KEYS`).
        batch_size: rows per batch.
        seed: base seed; ``rank``: this process's rank.
        start_step: callable returning the first step (default 0).
        fused_steps: batches per item (K).
        member_seeds: several seeds in one run (``num_seeds``): member k's batch of step s is what a solo stream of
            seed ``member_seeds[k]`` draws, and an item is ``{key: [S, B, ...]}`` (``[K, S, B, ...]``), one gather.
    """

    def __init__(self, tensors: dict[str, torch.Tensor], batch_size: int, seed: int, rank: int = 0, start_step=None,
                 fused_steps: int = 1, member_seeds: list[int] | None = None):
        self.tensors = tensors
        self.packed, self._cols = pack_columns(tensors)
        self._shapes = {k: tuple(t.shape[1:]) for k, t in tensors.items()}
        self._widths = [b - a for a, b in self._cols.values()]
        self._flat = all(len(s) == 1 for s in self._shapes.values())  # [N, d] keys: a batch is one split
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.rank = int(rank)
        self.start_step = start_step or (lambda: 0)
        self.num_rows = int(self.packed.shape[0])
        self.device = self.packed.device
        self.fused_steps = int(fused_steps)
        if self.fused_steps < 1:
            raise ConfigError(f"fused_steps: expected a positive integer, found {fused_steps!r}")
        self._gen = torch.Generator(device=self.device)
        self.member_seeds = None if member_seeds is None else [int(m) for m in member_seeds]

    def _indices(self, step: int, gen: torch.Generator) -> torch.Tensor:
        if self.member_seeds is not None:  # [S·B]: member k's solo indices, member after member
            return torch.cat([self._solo_indices(m, step, gen) for m in self.member_seeds])
        return self._solo_indices(self.seed, step, gen)

    def _solo_indices(self, seed: int, step: int, gen: torch.Generator) -> torch.Tensor:
        gen.manual_seed(step_seed(seed, self.rank, step))  # host-side: no device sync
        return torch.randint(self.num_rows, (self.batch_size,), generator=gen, device=self.device)

    def _draw(self, step: int, gen: torch.Generator, steps: int = 1) -> dict[str, torch.Tensor]:
        """The batches of ``steps`` consecutive steps from ``step``: ``{key: [B, ...]}`` for one, ``[steps, B, ...]``
        for more (one gather of steps·B rows; the keys are column views of it)."""
        idx = self._indices(step, gen) if steps == 1 else torch.cat([self._indices(s, gen)
                                                                    for s in range(step, step + steps)])
        rows = self.packed.index_select(0, idx)  # [steps·(S·)B, W]
        lead = ((steps,) if steps > 1 else ()) + ((len(self.member_seeds),) if self.member_seeds is not None else ())
        if lead:
            rows = rows.view(*lead, self.batch_size, -1)
        if self._flat:  # one split into the five column views (cheaper than five slices)
            return dict(zip(self._cols, rows.split(self._widths, dim=-1), strict=True))
        return column_views(rows, self._cols, self._shapes)

    def batch_at(self, step: int) -> dict[str, torch.Tensor]:
        """The batch of step ``step`` (``[B, ...]``, whatever ``fused_steps`` is)."""
        return self._draw(step, torch.Generator(device=self.device))

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        k = self.fused_steps
        step = int(self.start_step())
        gen = self._gen
        while True:
            yield self._draw(step, gen, k)
            step += k


class TDDataModule(L.LightningDataModule):
    """Offline TD data for IQL / EDM / CD / CT training (docs/design.md).

    Observations and next observations are normalised with the dataset's population mean/std
    (:class:`ObsNormalizer`, also used at evaluation and stored in checkpoints); actions are kept raw (checked
    against ``action_bounds``); rewards are optionally scaled. ``train_dataloader()`` is an endless iterable of
    batches sampled on the training device (see the module docstring for the reproducibility contract); run with
    ``max_steps``.

    Args:
        dataset: the data: a D4RL id (``halfcheetah-medium-v2``, read from ``$D4RL_DATASET_DIR``), a path to a
            D4RL-layout HDF5 file (e.g. written by ``idql-cm collect``), or ``minari:<dataset id>``.
        batch_size: transitions per training batch.
        reward_scale: ``"none"`` keeps the rewards; ``"iql_locomotion"`` multiplies them by
            1000 / (max − min episode return) (the IQL/CleanDiffuser rule, episodes split at terminals or every 1000
            rows; a dataset with fewer than two such episodes keeps its rewards, with a warning).
        seed: base seed of the batch sampler; None takes the seed given to ``lightning.seed_everything``
            (``PL_GLOBAL_SEED``), else 0.
        action_bounds: actions are expected in [-action_bounds, action_bounds] (the policy's output range).
        out_of_bounds: what to do with actions outside the bounds: ``"clip"`` them (one warning with the count) or
            ``"error"`` (raise DataError).
        device: where the dataset tensors live and batches are made, e.g. ``"cuda:0"``; None uses the trainer's root
            device (CPU when used without a trainer).
    """

    def __init__(
        self,
        dataset: str,
        batch_size: int = 256,
        reward_scale: str = "none",
        seed: int | None = None,
        action_bounds: float = 1.0,
        out_of_bounds: str = "clip",
        device: str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(dataset, (str, os.PathLike)) or not str(dataset).strip():
            raise ConfigError(f"data.dataset: expected a D4RL id, an HDF5 path or 'minari:<id>', found {dataset!r}")
        if int(batch_size) < 1:
            raise ConfigError(f"data.batch_size: expected a positive integer, found {batch_size!r}")
        if reward_scale not in REWARD_SCALES:
            raise ConfigError(f"data.reward_scale: expected one of {', '.join(REWARD_SCALES)}, found {reward_scale!r}")
        if out_of_bounds not in OUT_OF_BOUNDS:
            raise ConfigError(f"data.out_of_bounds: expected one of {', '.join(OUT_OF_BOUNDS)}, found {out_of_bounds!r}")
        if not float(action_bounds) > 0:
            raise ConfigError(f"data.action_bounds: expected a positive number, found {action_bounds!r}")
        dataset = str(dataset)  # a Path in the saved hyper-parameters would break weights_only checkpoint loading
        self.save_hyperparameters()
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.reward_scale = reward_scale
        self.seed = seed
        self.action_bounds = float(action_bounds)
        self.out_of_bounds = out_of_bounds
        self.device = device
        self._arrays: dict[str, np.ndarray] | None = None
        self._normalizer: ObsNormalizer | None = None
        self._tensors: dict[str, torch.Tensor] | None = None
        self._env_id: Any = _UNSET
        #: batches per Trainer iteration and members trained side by side: what the module's updates need, told by
        #: the module through :meth:`configure_draws`
        self.fused_steps = 1
        self.num_seeds = 1

    def configure_draws(self, num_seeds: int, fused_steps: int) -> None:
        """Draw one batch per member (``[S, B, ...]``, member k's from seed s + k) and ``fused_steps`` updates'
        batches per item (``[K, B, ...]``): called by the module at every setup (``num_seeds``, ``fused_steps``)."""
        if int(num_seeds) < 1 or int(fused_steps) < 1:
            raise ConfigError(f"TDDataModule.configure_draws: expected positive counts, found {num_seeds} member(s), "
                              f"{fused_steps} step(s) per batch")
        self.num_seeds, self.fused_steps = int(num_seeds), int(fused_steps)

    # ----------------------------------------------------------------------------------------- lazy dataset
    @property
    def source_path(self) -> str:
        """The file (or ``minari:<id>``) the dataset is read from."""
        return str(resolve_source(self.dataset))

    def _load(self) -> dict[str, np.ndarray]:
        if self._arrays is not None:
            return self._arrays
        where = self.source_path
        data = load_d4rl(self.dataset)
        act = data["actions"]
        b = self.action_bounds
        outside = np.abs(act) > b
        n_out = int(outside.sum())
        if n_out:
            worst = float(np.abs(act).max())
            if self.out_of_bounds == "error":
                raise DataError(
                    f"{where}: key 'actions': expected values in [-{b:g}, {b:g}], found {n_out} of {act.size} entries "
                    f"outside (max |a| = {worst:.6g}); set data.out_of_bounds=clip or data.action_bounds"
                )
            warnings.warn(
                f"{where}: key 'actions': {n_out} of {act.size} entries lie outside [-{b:g}, {b:g}] "
                f"(max |a| = {worst:.6g}); clipped to the bounds (data.out_of_bounds=error refuses them)",
                DataWarning,
                stacklevel=3,
            )
            act = np.clip(act, -b, b)
        rew = data["rewards"]
        if self.reward_scale == "iql_locomotion":
            try:
                rew = iql_reward_scale(rew, data["terminals"], 1000, where=where)
            except DataError as exc:
                # A tiny dataset (a smoke test, a few hundred collected steps) has no return range; the reference
                # would crash on min([]). Train on the raw rewards instead, and say so.
                warnings.warn(f"{exc}; rewards left unscaled", DataWarning, stacklevel=3)
        norm = ObsNormalizer.from_data(data["observations"])
        self._normalizer = norm
        self._arrays = {
            "obs": norm.normalize(data["observations"]).astype(np.float32, copy=False),
            "act": act.astype(np.float32, copy=False),
            "rew": rew.astype(np.float32, copy=False).reshape(-1, 1),
            "next_obs": norm.normalize(data["next_observations"]).astype(np.float32, copy=False),
            "tml": data["terminals"].astype(np.float32).reshape(-1, 1),
        }
        return self._arrays

    @property
    def obs_dim(self) -> int:
        """Observation size (loads the dataset on first use)."""
        return int(self._load()["obs"].shape[1])

    @property
    def act_dim(self) -> int:
        """Action size (loads the dataset on first use)."""
        return int(self._load()["act"].shape[1])

    @property
    def num_transitions(self) -> int:
        """Number of qlearning transitions (loads the dataset on first use)."""
        return int(self._load()["obs"].shape[0])

    @property
    def normalizer(self) -> ObsNormalizer:
        """The observation normaliser of the dataset (loads the dataset on first use)."""
        self._load()
        assert self._normalizer is not None
        return self._normalizer

    @property
    def env_id(self) -> str | None:
        """The environment the data came from (:func:`read_env_id`: a gym id, a D4RL family, or None)."""
        if self._env_id is _UNSET:
            self._env_id = read_env_id(self.dataset)
        return self._env_id

    @property
    def task(self) -> str | None:
        """The task used for normalised scores: the D4RL id when the data is a D4RL dataset, else the family of
        ``env_id`` (``"halfcheetah"`` for HalfCheetah-v5 data), else None."""
        task = d4rl_task_of(self.dataset)
        if task is not None:
            return task
        return task_family(self.env_id)

    # ------------------------------------------------------------------------------------------ device tensors
    def _target_device(self) -> torch.device:
        if self.device is not None:
            return torch.device(self.device)
        trainer = self.trainer
        if trainer is not None:
            return trainer.strategy.root_device
        return torch.device("cpu")

    def setup(self, stage: str | None = None) -> None:
        """Load (once), normalise, scale, and put the five float32 tensors on the device."""
        device = self._target_device()
        if self._tensors is not None and next(iter(self._tensors.values())).device == device:
            return
        arrays = {k: torch.from_numpy(np.asarray(self._load()[k], dtype=np.float32)) for k in BATCH_KEYS}
        # one row-major matrix on the device, the five keys its column views (pack_columns: one gather per batch)
        packed, cols = pack_columns(arrays)
        self._tensors = column_views(packed.to(device), cols, {k: tuple(t.shape[1:]) for k, t in arrays.items()})

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        """The dataset tensors ``obs, act, rew [N,1], next_obs, tml [N,1]`` (calls ``setup`` if needed)."""
        if self._tensors is None:
            self.setup()
        assert self._tensors is not None
        return self._tensors

    def _rank(self) -> int:
        trainer = self.trainer
        return int(trainer.global_rank) if trainer is not None else 0

    def train_dataloader(self) -> TDBatchIterable:
        """Endless batches ``{obs, act, rew [B,1], next_obs, tml [B,1]}`` on the device (not a DataLoader); with
        ``fused_steps = K > 1``, K steps' batches per item, ``[K, B, ...]``."""
        return TDBatchIterable(
            self.tensors,
            self.batch_size,
            seed=resolve_seed(self.seed),
            rank=self._rank(),
            # K > 1: the module counts one global step per update, whatever K a resumed run had before
            start_step=(lambda: _consumed_batches(self.trainer)) if self.fused_steps == 1
            else (lambda: int(getattr(self.trainer, "global_step", 0) or 0)),
            fused_steps=self.fused_steps,
            member_seeds=self.member_seeds(),
        )

    def member_seeds(self) -> list[int] | None:
        """The batch seeds of the members of a ``num_seeds: S`` run (None for one member). Member k draws what a solo
        run of seed ``s + k`` draws: ``s + k`` when the batch seed comes from ``seed_everything: s``; with an explicit
        ``data.seed: d`` a solo run draws from ``d`` whatever its seed, so every member does."""
        if self.num_seeds == 1:
            return None
        base = resolve_seed(self.seed)
        return [base if self.seed is not None else base + k for k in range(self.num_seeds)]

    def val_dataloader(self) -> SingleBatchLoader:
        """A loader of one tiny batch (the first transition, B = 1), so that ``trainer.validate`` and validation
        during fit run the validation hooks exactly once: the evaluation callback (environment rollouts) hooks into
        the validation epoch, and there is no held-out data to score. (A bare ``[batch]`` would not do: Lightning
        reads a list as several loaders.)"""
        return SingleBatchLoader({key: t[:1] for key, t in self.tensors.items()})

    def state_dict(self) -> dict[str, Any]:
        return {}


class SingleBatchLoader:
    """An iterable of exactly one batch, with ``len() == 1`` (see :meth:`TDDataModule.val_dataloader`)."""

    def __init__(self, batch: dict[str, torch.Tensor]):
        self.batch = batch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        yield self.batch

    def __len__(self) -> int:
        return 1


class _Unset:
    pass


_UNSET = _Unset()
