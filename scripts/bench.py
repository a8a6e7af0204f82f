#!/usr/bin/env python
"""Throughput benchmarks of idql-cm: ``make bench`` → ``benchmarks/results.json`` and a table on stdout.

Everything is measured side by side in one process on one machine (CPU, fp32), so each ratio compares like with like:

1. **Training** (gradient steps/s) of the IQL, EDM, CT and CD modules through a real ``lightning.Trainer`` (the real
   ``TDDataModule`` on a synthetic D4RL-shaped HDF5 file, obs 17 / act 6, batch 256, full-size default nets,
   TensorBoard logger at ``log_every_n_steps=100``, no progress bar, no checkpointing, no validation) against the
   same math in a bare PyTorch loop (the same nets and losses from ``idql_cm.nets`` / ``idql_cm.diffusion``, the same
   Adam, LR schedule and EMA / target update, batches indexed from the same tensors with ``torch.randint``).
   ``ratio`` = Lightning seconds per step / bare seconds per step (1.00 = no overhead). Lightning and bare runs
   alternate for ``rounds`` rounds after a warm-up; the median of the rounds is reported.
2. **Batch sampling**: ``TDDataModule``'s on-device iterable against the reference's path (a per-item ``Dataset``
   returning a dict of tensors, ``DataLoader(batch_size=256, shuffle=True, num_workers=4)``) on 1M in-memory rows.
3. **IDQL action selection** (ms per call): 50 states × 256 candidates at NFE 1, 2, 4 for each backbone (EDM Euler,
   CD, CT; CD and CT share the consistency-model sampler), full-size nets with random weights, plus the critic.
4. **Evaluation throughput**: env steps/s of ``idql_cm.eval.rollout.evaluate`` (10 HalfCheetah-v5 envs, an IDQL agent
   with 32 candidates, CT at NFE 1, episodes of 200 steps), policy time included.
5. **Exported agent** (key ``export``, ``scripts/bench_export.py``): ms per decision of onnxruntime, TorchScript and
   the eager ``load_agent`` for 1 and 50 states × 256 candidates at NFE 1, 2, 4.

``--quick`` runs tiny sizes (seconds; the CI smoke test, not a measurement); ``--only train,sampler`` runs a subset.
Diagnostics (print, write no results): ``--ablate iql,edm`` times Lightning's own floor (a near-empty module), the
in-situ cost of each per-step hook of the modules, and Lightning variants with those costs switched off one by one
against the bare loop; ``--profile iql`` prints a cProfile of one module's Lightning loop. See docs/performance.md.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import datetime
import gc
import io
import json
import logging
import os
import platform
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

KINDS = ("iql", "edm", "ct", "cd")
ACTOR_KINDS = ("edm", "cd", "ct")
NFES = (1, 2, 4)

# Full run: sized for ~5-8 minutes on 2 CPU cores. Steps are per round and per side (Lightning, bare).
FULL: dict[str, Any] = {
    "train_rows": 1_000_000,
    "batch_size": 256,
    # multiples of fused_steps, as every period counted in steps must be (see IDQLModule.fused_steps)
    "warmup_steps": {"iql": 24, "edm": 16, "ct": 16, "cd": 16},
    # Training is timed in alternating blocks inside one fit: `block_steps` bare-loop steps, then `block_steps`
    # Lightning steps, and so on. Consecutive blocks are summed into groups of log_every_n_steps steps a side, so each
    # group holds exactly one logging step; `groups` of them per module and setting.
    "block_steps": 40,
    "groups": {"iql": 8, "edm": 4, "ct": 3, "cd": 3},
    # the shipped configs' model.fused_steps (updates per Trainer iteration); also timed with 1
    "fused_steps": 8,
    # diagnostics (--ablate, --profile) time whole runs of this many steps
    "timed_steps": {"iql": 400, "edm": 200, "ct": 200, "cd": 200},
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

OBS_DIM, ACT_DIM = 17, 6
NOISY_SPREAD = 1.25  # max/min of the rounds above which a training comparison is flagged "noisy"


def _load1() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _quiet() -> None:
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


# ------------------------------------------------------------------------------------------------ machine
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
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
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
        "loadavg_start": load,
        "idql_cm_commit": commit,
    }


# ------------------------------------------------------------------------------------------------ training
def write_dataset(path: Path, rows: int) -> str:
    """A synthetic D4RL-layout HDF5 file of ``rows`` rows (HalfCheetah shape: 1000-step episodes)."""
    from tests.synth import write_d4rl_file

    ep_len = 1000 if rows >= 4000 else max(10, rows // 4)  # >= 2 complete episodes for the reward scale
    write_d4rl_file(path, n_episodes=max(1, rows // ep_len), episode_len=ep_len, obs_dim=OBS_DIM, act_dim=ACT_DIM,
                    with_infos=False, env_id="HalfCheetah-v5")
    return str(path)


def make_module(kind: str, cfg: dict[str, Any], teacher_ckpt: str | None = None, compile: bool = False,
                fused: int = 1):
    from idql_cm.modules import CDModule, CTModule, EDMModule, IQLModule

    net = copy.deepcopy(cfg["net"])
    kw = {"compile": compile, "fused_steps": fused}
    if kind == "iql":
        return IQLModule(hidden_dim=cfg["iql_hidden"], **kw)
    if kind == "edm":
        return EDMModule(net=net, **kw)
    if kind == "ct":
        return CTModule(net=net, **kw)
    if kind == "cd":
        return CDModule(teacher_ckpt=teacher_ckpt, **kw)  # the net comes from the teacher checkpoint
    raise ValueError(kind)


def _sync_fn(device: str):
    """What makes a wall-clock mark honest on this device: CUDA work is asynchronous, so drain the stream first."""
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


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


def PairedTimer(warmup: int, block: int, blocks: int, bare: BareLoop, sync):  # noqa: N802 - used like a class
    """A Lightning callback that times the Trainer and the bare loop in alternating blocks inside one ``fit``.

    After ``warmup`` Lightning steps it warms the bare loop up, then alternates ``blocks`` times: ``block`` bare steps
    (run inside this hook, outside the Lightning window), then ``block`` Lightning steps (each a whole loop
    iteration: batch fetch, every hook, optimiser step, logging). The two sides run a fraction of a second apart, so
    a slow spell of a shared machine slows both and their ratio cancels it, where separate whole runs do not.
    """
    from lightning.pytorch.callbacks import Callback

    class _PairedTimer(Callback):
        def __init__(self):
            self.lightning: list[float] = []  # seconds per block
            self.bare: list[float] = []
            self._t0: float | None = None

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            k = trainer.global_step  # steps done, this one included
            if k < warmup or (k - warmup) % block:
                return
            sync()
            now = time.perf_counter()
            if self._t0 is not None:
                self.lightning.append(now - self._t0)
            if len(self.bare) < blocks:
                with torch.enable_grad():
                    if k == warmup:
                        for _ in range(warmup):
                            bare.step()
                    sync()
                    t = time.perf_counter()
                    for _ in range(block):
                        bare.step()
                    sync()
                    self.bare.append(time.perf_counter() - t)
            self._t0 = time.perf_counter()

    return _PairedTimer()


def make_teacher(dm, cfg: dict[str, Any], path: str) -> str:
    """An EDM checkpoint from a few Lightning steps (the CD teacher)."""
    import lightning.pytorch as pl

    pl.seed_everything(0, verbose=False)
    module = make_module("edm", cfg)
    trainer = make_trainer(2, cfg, None, "teacher")
    trainer.fit(module, datamodule=dm)
    trainer.save_checkpoint(path)
    return path


class BareLoop:
    """The same math as the modules' ``training_step`` + ``optimizer_step``, in a plain PyTorch loop.

    On CUDA with ``bf16-mixed`` it runs the losses under the same bf16 autocast as Lightning's precision plugin.
    """

    def __init__(self, kind: str, tensors: dict[str, torch.Tensor], cfg: dict[str, Any], total_steps: int,
                 teacher_ckpt: str | None = None):
        from idql_cm.diffusion.consistency import ConsistencyModel
        from idql_cm.diffusion.edm import EDMDenoiser
        from idql_cm.diffusion.schedules import karras_sigmas
        from idql_cm.modules.behaviour import net_kwargs
        from idql_cm.nets.critics import TwinQ, ValueNet
        from idql_cm.nets.ema import EMAWarmup
        from idql_cm.nets.mlp import IDQLMlp

        torch.manual_seed(0)
        self.device = torch.device(cfg.get("device", "cpu"))
        self.autocast = cfg.get("precision") == "bf16-mixed"
        self.kind, self.total = kind, total_steps
        self.tensors = {k: t.to(self.device) for k, t in tensors.items()}
        self.n_rows = int(next(iter(tensors.values())).shape[0])
        self.batch_size = cfg["batch_size"]
        self.step_idx = 0
        self.sched = None
        self.ema = EMAWarmup(power=2 / 3, max_value=0.9999)
        if kind == "iql":
            h = cfg["iql_hidden"]
            self.q, self.v = TwinQ(OBS_DIM, ACT_DIM, h).to(self.device), ValueNet(OBS_DIM, h).to(self.device)
            self.q_target = copy.deepcopy(self.q).requires_grad_(False)
            params = list(self.q.parameters()) + list(self.v.parameters())
            self.opt = torch.optim.Adam(params, lr=3e-4, weight_decay=0.0)
            self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=total_steps)
            return
        if kind == "cd":
            from idql_cm.modules.artifacts import read_checkpoint, state_prefix

            ckpt = read_checkpoint(teacher_ckpt, expect_kind="edm")
            meta, state = ckpt["idql_cm"], ckpt["state_dict"]
            kw = net_kwargs(meta["net"])
            method = {k: meta["method"][k] for k in ("sigma_data", "sigma_min", "sigma_max", "rho", "x_min", "x_max")}
            self.teacher = EDMDenoiser(IDQLMlp(OBS_DIM, ACT_DIM, **kw), **method)
            self.teacher.load_state_dict(state_prefix(state, "ema_model."))
            self.teacher.requires_grad_(False).eval().to(self.device)
            self.model = ConsistencyModel(IDQLMlp(OBS_DIM, ACT_DIM, **kw), **method)
            self.model.net.load_state_dict(state_prefix(state, "model.net."))
            self.model.to(self.device)
            self.ema_model = copy.deepcopy(self.model).requires_grad_(False).eval()
            self.ema_model.net.load_state_dict(state_prefix(state, "ema_model.net."))
            self.distill_sigmas = karras_sigmas(18, device=self.device)
            self.opt = torch.optim.Adam(self.model.parameters(), lr=3e-4, weight_decay=0.0)  # constant LR
            return
        if kind == "edm":
            self.model = EDMDenoiser(IDQLMlp(OBS_DIM, ACT_DIM, **net_kwargs(cfg["net"])))
        elif kind == "ct":
            self.model = ConsistencyModel(IDQLMlp(OBS_DIM, ACT_DIM, **net_kwargs(cfg["net"], fourier_scale=0.02)))
            self._grid = None
        else:
            raise ValueError(kind)
        self.model.to(self.device).train()
        self.ema_model = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.opt = torch.optim.Adam(self.model.parameters(), lr=3e-4, weight_decay=0.0)
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=total_steps)

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

        if self.kind == "iql":
            obs, act = b["obs"], b["act"]
            with torch.no_grad():
                q_t = self.q_target(obs, act)
                td_target = b["rew"] + 0.99 * (1.0 - b["tml"]) * self.v(b["next_obs"])
            v = self.v(obs)
            q1, q2 = self.q.both(obs, act)
            return expectile_loss(q_t - v, 0.7) + ((q1 - td_target).square() + (q2 - td_target).square()).mean()
        if self.kind == "edm":
            return self.model.loss(b["act"], b["obs"])
        if self.kind == "ct":
            n = ict_num_intervals(self.step_idx, ict_kprime(self.total, 10, 1280), 10, 1280)
            if self._grid is None or self._grid[0] != n:
                sig = karras_sigmas(n, 0.002, 80.0, 7.0, device=self.device)
                self._grid = (n, sig, lognormal_index_probs(sig, -1.1, 2.0))
            return ct_loss(self.model, b["act"], b["obs"], self._grid[1], self._grid[2])[0]
        return cd_loss(self.model, self.ema_model, self.teacher, b["act"], b["obs"], self.distill_sigmas, solver="heun")

    def step(self) -> None:
        from idql_cm.nets.ema import ema_update_

        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            loss = self.loss(self.batch())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if self.sched is not None:
            self.sched.step()
        if self.kind == "iql":
            ema_update_(self.q_target, self.q, 1.0 - 0.005)  # target <- lerp(target, online, tau)
        else:
            ema_update_(self.ema_model, self.model, self.ema.decay(self.step_idx))
        self.step_idx += 1


def bare_step_times(kind: str, tensors, cfg: dict[str, Any], teacher_ckpt: str | None) -> list[float]:
    warm, steps = cfg["warmup_steps"][kind], cfg["timed_steps"][kind]
    loop = BareLoop(kind, tensors, cfg, warm + steps, teacher_ckpt)
    for _ in range(warm):
        loop.step()
    marks = [time.perf_counter()]
    for _ in range(steps):
        loop.step()
        marks.append(time.perf_counter())
    return [b - a for a, b in zip(marks[:-1], marks[1:], strict=True)]


def make_datamodule(path: str, cfg: dict[str, Any]):
    from idql_cm.data.datamodule import TDDataModule

    dm = TDDataModule(path, batch_size=cfg["batch_size"], reward_scale="iql_locomotion")
    dm.setup("fit")  # load once; every Trainer reuses the CPU tensors
    return dm


def paired_step_times(kind: str, dm, cfg: dict[str, Any], log_dir: str, teacher_ckpt: str | None, fused: int = 1):
    """One ``fit`` of the module (``fused_steps = fused``) with the bare loop timed in alternating blocks (see
    :func:`PairedTimer`); returns (Lightning, bare) seconds per step, one entry per group of ``log_every_n_steps``
    steps a side."""
    import lightning.pytorch as pl

    pl.seed_everything(0, verbose=False)
    warm, block, period = cfg["warmup_steps"][kind], cfg["block_steps"], cfg["log_every_n_steps"]
    if period % block or block % fused or warm % fused:
        raise ValueError(f"block_steps ({block}) must divide log_every_n_steps ({period}); fused_steps ({fused}) must "
                         f"divide block_steps and warmup_steps ({warm})")
    per_group = period // block
    blocks = cfg["groups"][kind] * per_group
    total = warm + block * blocks
    module = make_module(kind, cfg, teacher_ckpt, fused=fused)
    bare = BareLoop(kind, dm.tensors, cfg, total, teacher_ckpt)  # its warm-up + its blocks = total steps
    timer = PairedTimer(warm, block, blocks, bare, _sync_fn(cfg.get("device", "cpu")))
    trainer = make_trainer(total, cfg, log_dir, f"{kind}_paired_k{fused}", [timer])
    trainer.fit(module, datamodule=dm)
    if len(timer.lightning) != blocks or len(timer.bare) != blocks:
        raise RuntimeError(f"PairedTimer: expected {blocks} blocks each, found {len(timer.lightning)} Lightning and "
                           f"{len(timer.bare)} bare")

    def grouped(xs: list[float]) -> list[float]:
        return [sum(xs[i:i + per_group]) / period for i in range(0, len(xs), per_group)]

    return grouped(timer.lightning), grouped(timer.bare)


def compiled_steps_per_s(kind: str, dm, cfg: dict[str, Any], teacher_ckpt: str | None) -> float:
    """Steps/s of the opt-in fast path (``compile: true``) through the Trainer, after a warm-up that compiles."""
    import lightning.pytorch as pl

    pl.seed_everything(0, verbose=False)
    warm, steps = 3 * cfg["warmup_steps"][kind], cfg["log_every_n_steps"] * max(2, cfg["groups"][kind] // 2)
    module = make_module(kind, cfg, teacher_ckpt, compile=True, fused=cfg["fused_steps"])
    timer = StepTimer(warm, steps, cfg["fused_steps"], _sync_fn(cfg.get("device", "cpu")))
    make_trainer(warm + steps, cfg, None, f"{kind}_compiled", [timer]).fit(module, datamodule=dm)
    return steps / sum(timer.step_times)


def sync_check(kind: str, dm, cfg: dict[str, Any], teacher_ckpt: str | None, log=print) -> dict[str, Any]:
    """CUDA only: host-device synchronisations per training step, counted by torch's sync debug mode over one
    logging period after a warm-up (logging steps read their logged values back, the others should not sync)."""
    import warnings

    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback

    period = cfg["log_every_n_steps"]
    warm, total = 2 * period, 3 * period
    marks: list[tuple[int, int]] = []
    record: list[warnings.WarningMessage] = []

    class Count(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            k = trainer.global_step
            if k == warm:
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("warn")
            if k >= warm:
                marks.append((k, len(record)))
            if k == total:
                torch.cuda.set_sync_debug_mode(0)

    pl.seed_everything(0, verbose=False)
    module = make_module(kind, cfg, teacher_ckpt, fused=cfg["fused_steps"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        record = caught
        make_trainer(total, cfg, None, f"{kind}_sync", [Count()]).fit(module, datamodule=dm)
    torch.cuda.set_sync_debug_mode(0)
    # syncs per step, over each Trainer iteration (fused_steps updates) that ends at global_step k
    fused = cfg["fused_steps"]
    per_step = {k1: (n1 - n0) / fused for (_, n0), (k1, n1) in zip(marks[:-1], marks[1:], strict=True)}
    non_log = [n for k, n in per_step.items() if k % period]
    where = sorted({f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)})
    out = {"steps": len(per_step), "syncs_per_non_logging_step_max": max(non_log, default=0),
           "syncs_per_non_logging_step_mean": statistics.fmean(non_log) if non_log else 0.0,
           "syncs_on_logging_steps": [n for k, n in per_step.items() if k % period == 0], "where": where[:20]}
    log(f"  {kind}: host syncs per non-logging step: max {out['syncs_per_non_logging_step_max']}, mean "
        f"{out['syncs_per_non_logging_step_mean']:.2f}; on logging steps {out['syncs_on_logging_steps']}")
    return out


def bench_training(cfg: dict[str, Any], work: str, kinds=KINDS, log=print, compiled=()) -> dict[str, Any]:
    t = time.perf_counter()
    path = write_dataset(Path(work) / "synthetic_d4rl.hdf5", cfg["train_rows"])
    dm = make_datamodule(path, cfg)
    log(f"  synthetic dataset: {dm.num_transitions} transitions, obs {dm.obs_dim} / act {dm.act_dim} "
        f"({time.perf_counter() - t:.1f} s to write and load)")
    cfg["train_transitions"] = dm.num_transitions
    teacher = make_teacher(dm, cfg, str(Path(work) / "edm_teacher.ckpt")) if "cd" in kinds else None
    out: dict[str, Any] = {}
    fused = cfg["fused_steps"]
    for kind in kinds:
        out[kind] = {"fused_steps": fused}
        for k, suffix in ((fused, ""), (1, "_unfused")) if fused > 1 else ((1, ""),):
            gc.collect()
            load_before = _load1()
            lt, bt = paired_step_times(kind, dm, cfg, work, teacher, fused=k)
            ratios = [a / b for a, b in zip(lt, bt, strict=True)]
            # per group: Lightning / bare seconds per step over interleaved blocks; across groups: the median
            l_sec, b_sec = statistics.median(lt), statistics.median(bt)
            o = {
                "lightning": 1.0 / l_sec,
                "bare": 1.0 / b_sec,
                "ratio": statistics.median(ratios),
                "lightning_ms_per_step": 1e3 * l_sec,
                "bare_ms_per_step": 1e3 * b_sec,
                # from the paired ratio (the medians of either side alone may come from different groups)
                "overhead_ms_per_step": 1e3 * (statistics.median(ratios) - 1.0) * b_sec,
                "groups_lightning_ms": [round(1e3 * x, 3) for x in lt],
                "groups_bare_ms": [round(1e3 * x, 3) for x in bt],
                "group_ratios": [round(x, 4) for x in ratios],
                "ratio_max": max(ratios),
                "loadavg_1min": [load_before, _load1()],
                # the machine's speed changed during the run (another tenant's burst on these shared cores): the
                # paired ratio is robust to slow spells longer than a block, the absolute steps/s are not
                "noisy": max(lt) / min(lt) > NOISY_SPREAD or max(bt) / min(bt) > NOISY_SPREAD,
            }
            out[kind].update({f"{key}{suffix}": v for key, v in o.items()})
            log(f"  {kind:4s} fused_steps {k}: lightning {o['lightning']:7.1f} steps/s  bare {o['bare']:7.1f} steps/s  "
                f"ratio {o['ratio']:.3f}  (group ratios {o['group_ratios']}; ms/step L {o['groups_lightning_ms']}, "
                f"B {o['groups_bare_ms']})")
            if o["noisy"]:
                log(f"  note: {kind} blocks differ by more than {NOISY_SPREAD:.2f}x in speed (the machine was busy); "
                    "the paired ratio is robust to that, the absolute steps/s less so")
        o = out[kind]
        if kind in compiled:
            gc.collect()
            o["lightning_compiled"] = compiled_steps_per_s(kind, dm, cfg, teacher)
            log(f"  {kind:4s} lightning, compile: true: {o['lightning_compiled']:7.1f} steps/s")
        if cfg.get("device") == "cuda":
            o["cuda_sync_check"] = sync_check(kind, dm, cfg, teacher, log)
    return out


# ------------------------------------------------------------------------------------------------ sampler
class PerItemDataset(torch.utils.data.Dataset):
    """The reference's path: one transition per ``__getitem__`` as a dict of tensors, collated by the DataLoader."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors
        self.n = int(next(iter(tensors.values())).shape[0])

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: t[i] for k, t in self.tensors.items()}


def synthetic_tensors(rows: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "obs": torch.randn(rows, OBS_DIM, generator=g),
        "act": torch.rand(rows, ACT_DIM, generator=g) * 2 - 1,
        "rew": torch.randn(rows, 1, generator=g),
        "next_obs": torch.randn(rows, OBS_DIM, generator=g),
        "tml": (torch.rand(rows, 1, generator=g) < 0.001).float(),
    }


def bench_sampler(cfg: dict[str, Any], log=print) -> dict[str, Any]:
    from idql_cm.data.datamodule import TDBatchIterable

    tensors = synthetic_tensors(cfg["sampler_rows"])
    bs = cfg["batch_size"]
    # the data module's stream (what TDDataModule.train_dataloader returns)
    it = iter(TDBatchIterable(tensors, bs, seed=0))
    for _ in range(20):
        next(it)
    n = cfg["datamodule_batches"]
    rates = []
    for _ in range(5):  # the median of 5 rounds: a burst of another tenant on these cores drops out
        t0 = time.perf_counter()
        for _ in range(n // 5):
            b = next(it)
        rates.append((n // 5) / (time.perf_counter() - t0))
    dm_rate = statistics.median(rates)
    assert b["obs"].shape == (bs, OBS_DIM)
    # the reference's DataLoader, looped endlessly
    loader = torch.utils.data.DataLoader(PerItemDataset(tensors), batch_size=bs, shuffle=True,
                                         num_workers=cfg["dataloader_workers"], drop_last=True,
                                         persistent_workers=cfg["dataloader_workers"] > 0)
    dl = iter(loader)
    for _ in range(max(2, cfg["dataloader_workers"] * 2)):  # worker start-up and the prefetch queue
        next(dl)
    n = cfg["dataloader_batches"]
    t0 = time.perf_counter()
    for _ in range(n):
        b = next(dl)
    dl_rate = n / (time.perf_counter() - t0)
    assert b["obs"].shape == (bs, OBS_DIM)
    del dl, loader
    out = {"datamodule_batches_per_s": dm_rate, "dataloader_batches_per_s": dl_rate, "ratio": dm_rate / dl_rate,
           "rows": cfg["sampler_rows"], "batch_size": bs, "dataloader_workers": cfg["dataloader_workers"]}
    log(f"  datamodule {dm_rate:10.1f} batches/s   DataLoader({cfg['dataloader_workers']} workers) "
        f"{dl_rate:8.1f} batches/s   ratio {out['ratio']:.0f}x")
    return out


# ------------------------------------------------------------------------------------------------ acting
def random_actor_and_critic(kind: str, cfg: dict[str, Any]):
    from idql_cm.diffusion.consistency import ConsistencyModel
    from idql_cm.diffusion.edm import EDMDenoiser
    from idql_cm.modules.artifacts import Actor, Critic
    from idql_cm.modules.behaviour import net_kwargs
    from idql_cm.nets.critics import TwinQ, ValueNet
    from idql_cm.nets.mlp import IDQLMlp

    torch.manual_seed(0)
    dev = torch.device(cfg.get("device", "cpu"))
    kw = net_kwargs(cfg["net"], fourier_scale=0.02 if kind == "ct" else 16.0)
    net = IDQLMlp(OBS_DIM, ACT_DIM, **kw)
    model = EDMDenoiser(net) if kind == "edm" else ConsistencyModel(net)
    model = model.eval().requires_grad_(False).to(dev)
    zeros, ones = torch.zeros(OBS_DIM, device=dev), torch.ones(OBS_DIM, device=dev)
    actor = Actor(kind=kind, model=model, obs_mean=zeros, obs_std=ones, act_dim=ACT_DIM, env_id="HalfCheetah-v5",
                  solver="euler")
    h = cfg["iql_hidden"]
    critic = Critic(q_target=TwinQ(OBS_DIM, ACT_DIM, h).eval().requires_grad_(False).to(dev),
                    v=ValueNet(OBS_DIM, h).eval().requires_grad_(False).to(dev), obs_mean=zeros, obs_std=ones,
                    act_dim=ACT_DIM, env_id="HalfCheetah-v5")
    return actor, critic


def bench_action(cfg: dict[str, Any], log=print) -> dict[str, Any]:
    from idql_cm.eval.agent import IDQLAgent

    dev = torch.device(cfg.get("device", "cpu"))
    sync = _sync_fn(dev.type)
    obs = torch.randn(cfg["action_envs"], OBS_DIM, generator=torch.Generator().manual_seed(0)).to(dev)
    out: dict[str, Any] = {}
    for kind in ACTOR_KINDS:
        actor, critic = random_actor_and_critic(kind, cfg)
        agent = IDQLAgent(actor, critic, num_candidates=cfg["action_candidates"], temperature=100.0)
        out[kind] = {}
        for nfe in NFES:
            g = torch.Generator(device=dev).manual_seed(0)
            for _ in range(3 if dev.type == "cuda" else 1):  # warm-up (CUDA: kernels and allocator)
                agent.act_tensor(obs, nfe, generator=g)
            times: list[float] = []
            t_all = time.perf_counter()
            while len(times) < cfg["action_min_calls"] or time.perf_counter() - t_all < cfg["action_min_seconds"]:
                sync()
                t0 = time.perf_counter()
                a = agent.act_tensor(obs, nfe, generator=g)
                sync()
                times.append(time.perf_counter() - t0)
            assert a.shape == (cfg["action_envs"], ACT_DIM)
            out[kind][f"nfe{nfe}"] = 1e3 * statistics.median(times)
        log(f"  {kind:4s} " + "  ".join(f"NFE {n}: {out[kind][f'nfe{n}']:8.2f} ms" for n in NFES))
    return out


def bench_eval(cfg: dict[str, Any], log=print) -> dict[str, Any]:
    from idql_cm.eval.agent import IDQLAgent
    from idql_cm.eval.rollout import evaluate, make_vector_env

    actor, critic = random_actor_and_critic(cfg["eval_kind"], cfg)
    agent = IDQLAgent(actor, critic, num_candidates=cfg["eval_candidates"], temperature=100.0)
    evaluate(agent, "HalfCheetah-v5", episodes=1, num_envs=1, nfe=cfg["eval_nfe"], max_episode_steps=5)  # warm-up
    res = evaluate(agent, "HalfCheetah-v5", episodes=cfg["eval_episodes"], num_envs=cfg["eval_envs"],
                   nfe=cfg["eval_nfe"], seed=0, max_episode_steps=cfg["eval_max_steps"])
    # context: the same vector env stepped with random actions (no policy)
    vec = make_vector_env("HalfCheetah-v5", cfg["eval_envs"], max_episode_steps=cfg["eval_max_steps"])
    vec.reset(seed=0)
    rng = np.random.default_rng(0)
    steps = cfg["eval_max_steps"]
    t0 = time.perf_counter()
    for _ in range(steps):
        vec.step(rng.uniform(-1, 1, size=(cfg["eval_envs"], ACT_DIM)).astype(np.float32))
    env_only = steps * cfg["eval_envs"] / (time.perf_counter() - t0)
    vec.close()
    out = {"env_steps_per_s": res["env_steps_per_second"], "env_steps": res["env_steps"], "seconds": res["seconds"],
           "action_latency_ms": res["action_latency_ms"], "policy_calls": res["policy_calls"],
           "env_only_steps_per_s": env_only}
    log(f"  evaluate: {out['env_steps_per_s']:.0f} env steps/s ({res['env_steps']} steps in {res['seconds']:.2f} s, "
        f"{out['action_latency_ms']:.2f} ms per action call); env alone {env_only:.0f} steps/s")
    return out


# ------------------------------------------------------------------------------------------------ profile
def profile_lightning(kind: str, cfg: dict[str, Any], work: str, top: int = 40) -> str:
    """cProfile of the timed Lightning steps of one module (tottime and cumtime listings)."""
    path = write_dataset(Path(work) / "synthetic_d4rl.hdf5", cfg["train_rows"])
    dm = make_datamodule(path, cfg)
    teacher = make_teacher(dm, cfg, str(Path(work) / "edm_teacher.ckpt")) if kind == "cd" else None
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback

    prof = cProfile.Profile()

    class Toggle(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == cfg["warmup_steps"][kind]:
                prof.enable()

        def on_train_end(self, trainer, pl_module):
            prof.disable()

    pl.seed_everything(0, verbose=False)
    module = make_module(kind, cfg, teacher)
    steps = cfg["warmup_steps"][kind] + cfg["timed_steps"][kind]
    trainer = make_trainer(steps, cfg, work, f"profile_{kind}", [Toggle()])
    trainer.fit(module, datamodule=dm)
    buf = io.StringIO()
    st = pstats.Stats(prof, stream=buf)
    buf.write(f"cProfile of {cfg['timed_steps'][kind]} Lightning steps of {kind}\n")
    st.sort_stats("tottime").print_stats(top)
    st.sort_stats("cumulative").print_stats(top)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------ ablation
#: Lightning variants of ``--ablate``, each switching off one more per-step cost of the module / data stream / loop.
ABLATIONS = (
    ("fused_steps 1 (the module default)", {}),
    ("+ TQDM progress bar (refresh 100)", {"progress_bar": True}),
    ("check_finite_every=100", {"finite_every": 100}),
    ("no finite check, no logging", {"finite_every": 10**9, "no_log": True}),
    ("fused_steps as the shipped configs (8)", {"fused": True}),
)


def _ablated_step_times(kind: str, dm, cfg: dict[str, Any], work: str, tag: str, teacher: str | None,
                        opts: dict[str, Any]) -> list[float]:
    import lightning.pytorch as pl

    pl.seed_everything(0, verbose=False)
    warm, steps = cfg["warmup_steps"][kind], cfg["timed_steps"][kind]
    fused = cfg["fused_steps"] if opts.get("fused") else 1
    module = make_module(kind, cfg, teacher, fused=fused)
    if opts.get("finite_every"):
        module.check_finite_every = opts["finite_every"]
    cfg2 = dict(cfg, log_every_n_steps=0) if opts.get("no_log") else cfg
    timer = StepTimer(warm, steps, fused)
    callbacks = [timer]
    if opts.get("progress_bar"):
        from lightning.pytorch.callbacks import TQDMProgressBar

        callbacks.append(TQDMProgressBar(refresh_rate=100))
    trainer = make_trainer(warm + steps, cfg2, None if opts.get("no_log") else work, f"abl_{kind}_{tag}", callbacks,
                           progress_bar=bool(opts.get("progress_bar")))
    trainer.fit(module, datamodule=dm)
    return [t / fused for t in timer.step_times]  # per update


def lightning_floor(cfg: dict[str, Any], steps: int = 1000, log=print) -> dict[str, float]:
    """Lightning's own per-step cost: a near-empty module (Linear(17, 1), SGD) on the same batch stream, through
    the Trainer with automatic and with manual optimisation, against the same step in a bare loop (no logging)."""
    import lightning.pytorch as pl

    from idql_cm.data.datamodule import TDBatchIterable

    tensors = synthetic_tensors(cfg["sampler_rows"])

    class DM(pl.LightningDataModule):
        def train_dataloader(self):
            return TDBatchIterable(tensors, cfg["batch_size"], 0)

    class Auto(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(OBS_DIM, 1)

        def training_step(self, b, i):
            return self.lin(b["obs"]).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-3)

    class Manual(Auto):
        k = 1  # updates per Trainer iteration (as IDQLModule's fused_steps)

        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, b, i):
            opt = self.optimizers()
            for _ in range(self.k):
                loss = self.lin(b["obs"]).mean()
                opt.zero_grad()
                self.manual_backward(loss)
                opt.step()

    class Fused(Manual):
        k = 8

    def lightning(cls) -> float:
        """Median ms per update (an iteration's time / its updates), after a 10% warm-up."""
        k = getattr(cls, "k", 1)
        warm = max(k, steps // 10 // k * k)  # the first mark comes at the end of the first iteration
        timer = StepTimer(warm, steps - warm, k)
        make_trainer(steps, dict(cfg, log_every_n_steps=0), None, "floor", [timer]).fit(cls(), datamodule=DM())
        return 1e3 * statistics.median(timer.step_times) / k

    def bare() -> float:
        m = Auto()
        opt = torch.optim.SGD(m.parameters(), lr=1e-3)
        it = iter(TDBatchIterable(tensors, cfg["batch_size"], 0))
        ts = []
        for _ in range(50 + steps):
            t0 = time.perf_counter()
            loss = m.lin(next(it)["obs"]).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            ts.append(time.perf_counter() - t0)
        return 1e3 * statistics.median(ts[50:])

    res = {"bare_ms": bare(), "lightning_automatic_ms": lightning(Auto), "lightning_manual_ms": lightning(Manual),
           "lightning_manual_8_per_iteration_ms": lightning(Fused)}
    b = res["bare_ms"]
    log(f"\nLightning floor (near-empty module, median ms per update): bare {b:.3f}, Trainer automatic optimisation "
        f"{res['lightning_automatic_ms']:.3f} (+{res['lightning_automatic_ms'] - b:.3f}), manual "
        f"{res['lightning_manual_ms']:.3f} (+{res['lightning_manual_ms'] - b:.3f}), manual with 8 updates per "
        f"iteration {res['lightning_manual_8_per_iteration_ms']:.3f} (+{res['lightning_manual_8_per_iteration_ms'] - b:.3f})")
    return res


def instrument(kind: str, dm, cfg: dict[str, Any], work: str, teacher: str | None, log=print) -> dict[str, Any]:
    """In-situ cost of the module's per-step pieces inside the real Lightning loop (as shipped): each hook is wrapped
    with a timer; medians per call are robust to other processes' bursts. Also: the stack depth at which
    ``on_train_batch_start`` runs, and the extra time of the logging steps (amortised over log_every_n_steps)."""
    import inspect
    import types

    import lightning.pytorch as pl

    from idql_cm.data import datamodule as dmod

    pl.seed_everything(0, verbose=False)
    warm, steps = cfg["warmup_steps"][kind], cfg["timed_steps"][kind] * 2
    module = make_module(kind, cfg, teacher)
    acc: dict[str, list[float]] = {}
    depth: list[int] = []

    def timed(name, fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                acc.setdefault(name, []).append(time.perf_counter() - t0)
        return wrapper

    loss_step = module.loss_step

    def on_loss(self, batch):
        if not depth:
            depth.append(len(inspect.stack(0)))
        return loss_step(batch)

    module.loss_step = types.MethodType(on_loss, module)
    for name, label in (("on_before_optimizer_step", "on_before_optimizer_step (finite check, sync; grad norm if log)"),
                        ("_lightning_logs_now", "Lightning's should_update_logs (once per iteration)"),
                        ("_flush_logs", "self.log of the step's scalars (logging steps)"),
                        ("watch_finite", "watch_finite (all calls)"),
                        ("after_optimizer_step", "after_optimizer_step (EMA / target update: also in bare)"),
                        ("should_log", "should_log (all calls)")):
        if callable(getattr(module, name, None)):  # the hooks this version of the module has
            setattr(module, name, timed(label, getattr(module, name)))
    orig = dmod.TDBatchIterable._draw
    dmod.TDBatchIterable._draw = timed("data stream: reseed + randint + one row gather", orig)
    timer = StepTimer(warm, steps)
    trainer = make_trainer(warm + steps, cfg, work, f"instr_{kind}", [timer])
    try:
        trainer.fit(module, datamodule=dm)
    finally:
        dmod.TDBatchIterable._draw = orig
    st = timer.step_times
    med = statistics.median(st)
    n_log = cfg["log_every_n_steps"]
    log_idx = [i for i in range(steps) if n_log and (warm + i + 1) % n_log == 0]
    log_excess = statistics.fmean(st[i] - med for i in log_idx) if log_idx else 0.0
    # the bare loop's batch for comparison
    loop = BareLoop(kind, dm.tensors, cfg, 10, teacher)
    bare_batch = []
    for _ in range(500):
        t0 = time.perf_counter()
        loop.batch()
        bare_batch.append(time.perf_counter() - t0)
    out = {"median_step_ms": 1e3 * med, "stack_depth_of_loss_step": depth[0] if depth else None,
           "log_step_excess_ms": 1e3 * log_excess, "log_step_excess_amortised_ms": 1e3 * log_excess / max(1, n_log),
           "bare_batch_ms": 1e3 * statistics.median(bare_batch), "pieces_ms_per_step": {}}
    log(f"\n{kind.upper()} in-situ (Lightning as shipped, {steps} steps): median step {1e3 * med:.3f} ms; "
        f"loss_step runs {out['stack_depth_of_loss_step']} frames deep")
    for name, ts in acc.items():
        per_step = sum(ts) / steps  # all calls in the window (some run before it: counts are approximate)
        out["pieces_ms_per_step"][name] = {"median_call_ms": 1e3 * statistics.median(ts), "calls": len(ts),
                                           "mean_ms_per_step": 1e3 * per_step}
        log(f"  {name:58s} median {1e3 * statistics.median(ts):7.3f} ms/call, {len(ts):4d} calls, "
            f"{1e3 * per_step:7.3f} ms/step")
    label = f"logging steps (every {n_log}): extra time per logging step"
    log(f"  {label:58s} {1e3 * log_excess:7.3f} ms, "
        f"amortised {1e3 * log_excess / max(1, n_log):.3f} ms/step")
    log(f"  {'bare loop batch (torch.randint + 5 tensor[idx], warm cache)':58s} median {out['bare_batch_ms']:7.3f} "
        "ms/call")
    return out


def ablate(kinds, cfg: dict[str, Any], work: str, rounds: int, log=print) -> dict[str, Any]:
    """Where the Lightning-vs-bare gap goes: interleaved rounds of the bare loop and Lightning variants that
    switch off the module's per-step costs one by one. Reports the median over rounds of ms/step (mean of the
    window) and of the per-step median."""
    path = write_dataset(Path(work) / "synthetic_d4rl.hdf5", cfg["train_rows"])
    dm = make_datamodule(path, cfg)
    teacher = make_teacher(dm, cfg, str(Path(work) / "edm_teacher.ckpt")) if "cd" in kinds else None
    out: dict[str, Any] = {}
    for kind in kinds:
        out[f"{kind}_in_situ"] = instrument(kind, dm, cfg, work, teacher, log)
    for kind in kinds if rounds > 0 else ():
        names = ["bare"] + [n for n, _ in ABLATIONS]
        mean_ms: dict[str, list[float]] = {n: [] for n in names}
        med_ms: dict[str, list[float]] = {n: [] for n in names}
        for r in range(rounds):
            for name in names:
                gc.collect()
                if name == "bare":
                    st = bare_step_times(kind, dm.tensors, cfg, teacher)
                else:
                    st = _ablated_step_times(kind, dm, cfg, work, f"{r}_{len(mean_ms[name])}", teacher,
                                             dict(ABLATIONS)[name])
                mean_ms[name].append(1e3 * statistics.fmean(st))
                med_ms[name].append(1e3 * statistics.median(st))
        bare_mean = statistics.median(mean_ms["bare"])
        out[kind] = {}
        log(f"\n{kind.upper()}: {rounds} interleaved rounds of {cfg['timed_steps'][kind]} steps; load {_load1()}")
        log(f"  {'variant':38s} {'ms/step':>8s} {'median step':>12s} {'vs bare':>8s}")
        for name in names:
            m, md = statistics.median(mean_ms[name]), statistics.median(med_ms[name])
            out[kind][name] = {"ms_per_step": m, "median_step_ms": md, "ratio": m / bare_mean,
                               "rounds_ms": [round(x, 3) for x in mean_ms[name]]}
            log(f"  {name:38s} {m:8.3f} {md:12.3f} {m / bare_mean:8.3f}   rounds {out[kind][name]['rounds_ms']}")
    return out


# ------------------------------------------------------------------------------------------------ report
def table(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = [f"idql-cm benchmarks, {res['date']} — {m['cpu']}, {m['cores']} cores, GPU: {m['gpu'] or 'none'}, "
             f"torch {m['torch']}, lightning {m['lightning']}"
             + (" (QUICK sizes: not representative)" if res["settings"]["quick"] else ""), ""]
    tr = res.get("train_steps_per_s")
    if tr:
        st = res["settings"]
        where = f"{st.get('precision', '32-true')}, {st.get('device', 'cpu').upper()}"
        comp = any("lightning_compiled" in tr[k] for k in tr)
        unf = any("ratio_unfused" in tr[k] for k in tr)
        k_ship = st.get("fused_steps", 1)
        lines += [f"| training (batch {st['batch_size']}, {where}) | Lightning steps/s (fused_steps {k_ship}) | "
                  "bare PyTorch steps/s | ratio (L/bare time) |"
                  + (" Lightning steps/s, fused_steps 1 | ratio |" if unf else "")
                  + (" Lightning, compile: true |" if comp else ""),
                  "| --- | ---: | ---: | ---: |" + (" ---: | ---: |" if unf else "") + (" ---: |" if comp else "")]
        for k in KINDS:
            if k in tr:
                o = tr[k]
                flag = " (speed varied: machine busy)" if o.get("noisy") or o.get("noisy_unfused") else ""
                lines.append(f"| {k.upper()}{flag} | {o['lightning']:.1f} | {o['bare']:.1f} | {o['ratio']:.3f} |"
                             + (f" {o['lightning_unfused']:.1f} | {o['ratio_unfused']:.3f} |" if unf else "")
                             + (f" {o.get('lightning_compiled', float('nan')):.1f} |" if comp else ""))
        lines.append("")
    sp = res.get("sampler")
    if sp:
        lines += [f"| batch sampling (batch {sp['batch_size']}, {sp['rows']:,} rows) | batches/s |",
                  "| --- | ---: |",
                  f"| TDDataModule (on-device index) | {sp['datamodule_batches_per_s']:,.0f} |",
                  f"| per-item Dataset + DataLoader ({sp['dataloader_workers']} workers, shuffle) | "
                  f"{sp['dataloader_batches_per_s']:,.1f} |",
                  f"| ratio | {sp['ratio']:,.0f}× |", ""]
    ac = res.get("action_ms")
    if ac:
        s = res["settings"]
        lines += [f"| IDQL action selection, {s['action_envs']} states × {s['action_candidates']} candidates "
                  "(ms/call) | NFE 1 | NFE 2 | NFE 4 |", "| --- | ---: | ---: | ---: |"]
        for k in ACTOR_KINDS:
            lines.append(f"| {k.upper()} | " + " | ".join(f"{ac[k][f'nfe{n}']:.1f}" for n in NFES) + " |")
        lines.append("")
    if "eval_env_steps_per_s" in res:
        s = res["settings"]
        lines += [f"Evaluation: {res['eval_env_steps_per_s']:,.0f} env steps/s ({s['eval_envs']} × HalfCheetah-v5, "
                  f"IDQL {s['eval_kind'].upper()} NFE {s['eval_nfe']}, {s['eval_candidates']} candidates, "
                  f"{s['eval_max_steps']}-step episodes; the env alone: {res['eval']['env_only_steps_per_s']:,.0f})"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="benchmarks/results.json", help="where to write the JSON results")
    p.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test, not a measurement)")
    p.add_argument("--only", default="train,sampler,action,eval,export",
                   help="comma-separated subset of train,sampler,action,eval,export")
    p.add_argument("--kinds", default=",".join(KINDS), help="training modules to bench (iql,edm,ct,cd)")
    p.add_argument("--rounds", type=int, default=None, help="with --ablate: interleaved rounds per variant")
    p.add_argument("--groups", type=int, default=None,
                   help="training: timed groups (log_every_n_steps steps a side) per module")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where to train and act (auto: cuda when available); CUDA runs bf16-mixed, CPU fp32")
    p.add_argument("--compile", default="auto", metavar="auto|off|KINDS",
                   help="also time the opt-in fast path (compile: true) through the Trainer for these modules (e.g. "
                        "ct,iql); auto: ct with CUDA (the module of the GPU target), none on CPU, where compiling "
                        "costs 10-20 s per module and gains nothing")
    p.add_argument("--profile", choices=KINDS, default=None,
                   help="print a cProfile of one module's Lightning loop and exit (writes no results)")
    p.add_argument("--no-ablation-rounds", action="store_true",
                   help="with --ablate: only the Lightning floor and the in-situ hook timings")
    p.add_argument("--ablate", default=None, metavar="KINDS",
                   help="e.g. iql,edm: time Lightning variants without the module's per-step costs against the "
                        "bare loop, print the breakdown and exit (writes no results)")
    args = p.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # progress lines appear as they are measured, also when piped
    _quiet()
    cfg = copy.deepcopy(QUICK if args.quick else FULL)
    if args.rounds:
        cfg["rounds"] = args.rounds
    if args.groups:
        cfg["groups"] = {k: args.groups for k in KINDS}
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("bench.py: --device cuda: expected a CUDA device, found none (torch "
              f"{torch.__version__}, torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    cfg.update(device=device, precision="bf16-mixed" if device == "cuda" else "32-true")
    if args.compile == "auto":
        compiled = ("ct",) if device == "cuda" else ()
    elif args.compile in ("off", "none", ""):
        compiled = ()
    else:
        compiled = tuple(k for k in args.compile.split(",") if k)
        if not set(compiled) <= set(KINDS):
            print(f"bench.py: --compile: expected auto, off or some of {','.join(KINDS)}, found {args.compile!r}",
                  file=sys.stderr)
            return 2
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    kinds = tuple(k for k in args.kinds.split(",") if k)
    log = print

    with tempfile.TemporaryDirectory(prefix="idql_bench_") as work:
        if args.profile:
            print(profile_lightning(args.profile, cfg, work))
            return 0
        if args.ablate:
            lightning_floor(cfg, steps=64 if args.quick else 1000)  # multiples of the 8 fused updates
            ablate([k for k in args.ablate.split(",") if k], cfg, work,
                   0 if args.no_ablation_rounds else (args.rounds or 3))
            return 0
        t_start = time.perf_counter()
        res: dict[str, Any] = {"machine": machine_info(),
                               "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        settings = {k: v for k, v in cfg.items()}
        settings.update(quick=args.quick, compiled_fast_path=list(compiled),
                        logger=f"TensorBoard, log_every_n_steps={cfg['log_every_n_steps']}",
                        obs_dim=OBS_DIM, act_dim=ACT_DIM,
                        data="synthetic D4RL-layout HDF5 (tests/synth.py) through TDDataModule for training; "
                             "in-memory random tensors for the sampler; random-weight nets for acting")
        res["settings"] = settings  # bench_training adds train_transitions to it
        m = res["machine"]
        log(f"machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads), "
            f"GPU {m['gpu'] or 'none'}, load average {m['loadavg_start']}")
        if "train" in only:
            log("training throughput (Lightning vs bare loop):")
            res["train_steps_per_s"] = bench_training(settings, work, kinds, log, compiled=compiled)
        if "sampler" in only:
            log("batch sampling:")
            res["sampler"] = bench_sampler(cfg, log)
        if "action" in only:
            log(f"IDQL action selection ({cfg['action_envs']} x {cfg['action_candidates']}):")
            res["action_ms"] = bench_action(settings, log)
        if "eval" in only:
            log("evaluation throughput:")
            res["eval"] = bench_eval(settings, log)
            res["eval_env_steps_per_s"] = res["eval"]["env_steps_per_s"]
        if "export" in only:  # self-contained: scripts/bench_export.py
            import bench_export

            log("exported agent (onnxruntime / TorchScript / eager load_agent, ms per decision):")
            res["export"] = bench_export.bench_export(bench_export.QUICK if args.quick else bench_export.FULL, work, log)
        try:
            res["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
        except OSError:
            pass
        res["total_seconds"] = time.perf_counter() - t_start

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print()
    print(table(res))
    if "export" in res:
        import bench_export

        print("\n" + "\n".join(bench_export.table_lines(res["export"])))
    print(f"\nwrote {out} ({res['total_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
