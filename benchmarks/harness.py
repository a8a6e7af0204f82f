"""What every throughput benchmark shares: sizes, the machine record, the synthetic data, modules and Trainers."""

from __future__ import annotations

import copy
import logging
import os
import platform
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from idql_cm.backbones import backbone, builtin_kinds

ROOT = Path(__file__).resolve().parents[1]
ACTOR_KINDS = builtin_kinds()  # the package's backbones, in registry order
KINDS = ("iql", *ACTOR_KINDS)
NFES = (1, 2, 4)
OBS_DIM, ACT_DIM = 17, 6  # HalfCheetah's sizes
NOISY_SPREAD = 1.25  # max/min of the groups above which a training comparison is flagged "noisy"

# Full run: sized for ~5-8 minutes on 2 CPU cores. Steps are per round and per side (Lightning, bare).
FULL: dict[str, Any] = {
    "train_rows": 1_000_000,
    "batch_size": 256,
    # multiples of fused_steps, as every period counted in steps must be (see IDQLModule.fused_steps)
    "warmup_steps": {"iql": 24, "edm": 16, "ct": 16, "cd": 16, "meanflow": 16},
    # Training is timed in alternating blocks inside one fit: `block_steps` bare-loop steps, then `block_steps`
    # Lightning steps, and so on. Consecutive blocks are summed into groups of log_every_n_steps steps a side, so each
    # group holds exactly one logging step; `groups` of them per module and setting.
    "block_steps": 40,
    "groups": {"iql": 8, "edm": 4, "ct": 3, "cd": 3, "meanflow": 3},
    # the shipped configs' model.fused_steps (updates per Trainer iteration); also timed with 1
    "fused_steps": 8,
    # diagnostics (--ablate, --profile) time whole runs of this many steps
    "timed_steps": {"iql": 400, "edm": 200, "ct": 200, "cd": 200, "meanflow": 200},
    "rounds": 6,
    "log_every_n_steps": 200,
    "net": None,          # the module defaults (IDQLMlp 256 x 3 blocks x4, ~1.6M parameters)
    "iql_hidden": 256,
    "sampler_rows": 1_000_000,
    "datamodule_batches": 5000,
    "dataloader_batches": 200,
    "dataloader_workers": 4,
    "action_envs": 50,
    "action_candidates": 256,
    "action_min_calls": 5,
    "action_min_seconds": 1.0,
    "eval_envs": 10,
    "eval_episodes": 10,
    "eval_candidates": 32,
    "eval_max_steps": 200,
    "eval_nfe": 1,
    "eval_kind": "ct",
}

QUICK: dict[str, Any] = {
    **FULL,
    "train_rows": 2_000,
    "batch_size": 32,
    "warmup_steps": {k: 4 for k in KINDS},
    "block_steps": 4,
    "groups": {k: 2 for k in KINDS},
    "fused_steps": 2,
    "timed_steps": {k: 4 for k in KINDS},
    "rounds": 1,
    "log_every_n_steps": 4,
    "net": {"hidden_dim": 32, "n_blocks": 1, "expand": 2},
    "iql_hidden": 32,
    "sampler_rows": 5_000,
    "datamodule_batches": 20,
    "dataloader_batches": 4,
    "dataloader_workers": 2,
    "action_envs": 4,
    "action_candidates": 8,
    "action_min_calls": 2,
    "action_min_seconds": 0.0,
    "eval_envs": 2,
    "eval_episodes": 2,
    "eval_candidates": 4,
    "eval_max_steps": 10,
}


def load1() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def quiet() -> None:
    """Silence Lightning's advice and the warnings of tiny runs (the benchmark's output is its table)."""
    for pat in (".*does not have many workers.*", ".*The number of training batches.*", ".*LeafSpec.*",
                ".*You defined a `validation_step` but have no.*", ".*sanity.*", ".*srun.*",
                ".*`settotalmass`.*", ".*pin_memory.*", ".*GPU available but not used.*",
                ".*module\\(s\\) in eval mode.*", ".*suggested max number of worker.*"):
        warnings.filterwarnings("ignore", message=pat)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    import lightning.pytorch  # noqa: F401 - creates its loggers, whose levels we lower next

    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("lightning", "pytorch_lightning")):
            logging.getLogger(name).setLevel(logging.ERROR)


def machine_info() -> dict[str, Any]:
    import lightning

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "idql_cm"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        if commit and dirty:
            commit += " (idql_cm modified)"
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_start": loadavg(),
        "idql_cm_commit": commit,
    }


def sync_fn(device: str):
    """What makes a wall-clock mark honest on this device: CUDA work is asynchronous, so drain the stream first."""
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def write_dataset(path: Path, rows: int) -> str:
    """A synthetic D4RL-layout HDF5 file of ``rows`` rows (HalfCheetah shape: 1000-step episodes)."""
    from idql_cm.data.synthetic import write_d4rl_file

    ep_len = 1000 if rows >= 4000 else max(10, rows // 4)  # >= 2 complete episodes for the reward scale
    write_d4rl_file(path, n_episodes=max(1, rows // ep_len), episode_len=ep_len, obs_dim=OBS_DIM, act_dim=ACT_DIM,
                    with_infos=False, env_id="HalfCheetah-v5")
    return str(path)


def make_datamodule(path: str, cfg: dict[str, Any]):
    from idql_cm.data.datamodule import TDDataModule

    dm = TDDataModule(path, batch_size=cfg["batch_size"], reward_scale="iql_locomotion")
    dm.setup("fit")  # load once; every Trainer reuses the CPU tensors
    return dm


def synthetic_tensors(rows: int) -> dict[str, torch.Tensor]:
    """In-memory random rows of the five training keys (the sampler benchmark and the Lightning floor)."""
    g = torch.Generator().manual_seed(0)
    return {
        "obs": torch.randn(rows, OBS_DIM, generator=g),
        "act": torch.rand(rows, ACT_DIM, generator=g) * 2 - 1,
        "rew": torch.randn(rows, 1, generator=g),
        "next_obs": torch.randn(rows, OBS_DIM, generator=g),
        "tml": (torch.rand(rows, 1, generator=g) < 0.001).float(),
    }


def make_module(kind: str, cfg: dict[str, Any], teacher_ckpt: str | None = None, compile: bool = False,
                fused: int = 1, **overrides: Any):
    """The module of ``kind`` at its own defaults, with the benchmark's net size; ``overrides``: constructor
    arguments (e.g. ``check_finite_every``)."""
    import importlib

    from idql_cm.modules import IQLModule

    kw = {"compile": compile, "fused_steps": fused, **overrides}
    if kind == "iql":
        return IQLModule(hidden_dim=cfg["iql_hidden"], **kw)
    spec = backbone(kind)
    module, _, name = spec.module.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    if spec.needs:  # distilled: the net comes from the teacher checkpoint
        return cls(teacher_ckpt=teacher_ckpt, **kw)
    return cls(net=copy.deepcopy(cfg["net"]), **kw)


def make_trainer(max_steps: int, cfg: dict[str, Any], log_dir: str | None, version: str, callbacks=(),
                 progress_bar: bool = False):
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger

    logger = (TensorBoardLogger(save_dir=log_dir, name="", version=version, default_hp_metric=False)
              if log_dir else False)
    return pl.Trainer(
        accelerator="gpu" if cfg.get("device") == "cuda" else "cpu", devices=1,
        precision=cfg.get("precision", "32-true"), max_steps=max_steps,
        logger=logger, log_every_n_steps=cfg["log_every_n_steps"],
        enable_progress_bar=progress_bar, enable_checkpointing=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, callbacks=list(callbacks),
    )


def make_teacher(dm, cfg: dict[str, Any], path: str, **overrides: Any) -> str:
    """An EDM checkpoint from a few Lightning steps (the CD teacher); ``overrides``: EDMModule arguments (e.g.
    ``num_seeds=5`` for the teacher of a 5-member CD)."""
    import lightning.pytorch as pl

    pl.seed_everything(0, verbose=False)
    module = make_module("edm", cfg, **overrides)
    trainer = make_trainer(2, cfg, None, "teacher")
    trainer.fit(module, datamodule=dm)
    trainer.save_checkpoint(path)
    return path


def block_end(trainer, warmup: int, block: int, sync) -> float | None:
    """For the block timers: ``time.perf_counter()`` after ``sync()`` when the step just done closes a block of
    ``block`` steps after ``warmup`` (the warm-up's end included), else None."""
    k = trainer.global_step  # steps done, this one included
    if k < warmup or (k - warmup) % block:
        return None
    sync()
    return time.perf_counter()


def StepTimer(warmup: int, steps: int, per_iteration: int = 1, sync=None):  # noqa: N802 - used like a class
    """A Lightning callback recording per-iteration wall times from the end of step ``warmup`` to the end of step
    ``warmup + steps`` (each interval is one whole loop iteration: batch fetch, hooks, ``per_iteration`` updates,
    logging); read them from its ``step_times`` after ``fit``. ``sync`` (CUDA) drains the device before a mark."""
    from lightning.pytorch.callbacks import Callback

    class _StepTimer(Callback):
        def __init__(self):
            self.marks: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if warmup <= trainer.global_step <= warmup + steps:  # global_step already counts this batch's step
                if sync is not None:
                    sync()
                self.marks.append(time.perf_counter())

        @property
        def step_times(self) -> list[float]:
            if len(self.marks) != steps // per_iteration + 1:
                raise RuntimeError(f"StepTimer: expected {steps // per_iteration + 1} marks, found {len(self.marks)}")
            return [b - a for a, b in zip(self.marks[:-1], self.marks[1:], strict=True)]

    return _StepTimer()
