"""Training throughput: each module through a real ``lightning.Trainer`` against the same math in a bare loop.

The two sides are timed in alternating blocks inside one ``fit`` (:func:`PairedTimer`), so a slow spell of a shared
machine slows both and cancels in their ratio; the bare side is :class:`benchmarks.bare.BareLoop`, built from the
very module the Trainer fits. CUDA only: host syncs per step (:func:`sync_check`) and the ``compile: true`` path.
"""

from __future__ import annotations

import gc
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.bare import BareLoop
from benchmarks.harness import (
    KINDS,
    NOISY_SPREAD,
    StepTimer,
    block_end,
    load1,
    make_datamodule,
    make_module,
    make_teacher,
    make_trainer,
    sync_fn,
    write_dataset,
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
            now = block_end(trainer, warmup, block, sync)
            if now is None:
                return
            k = trainer.global_step
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
    bare = BareLoop(module, dm.tensors, cfg, total)  # the module's hyperparameters; warm-up + blocks = total steps
    timer = PairedTimer(warm, block, blocks, bare, sync_fn(cfg.get("device", "cpu")))
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
    timer = StepTimer(warm, steps, cfg["fused_steps"], sync_fn(cfg.get("device", "cpu")))
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
            load_before = load1()
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
                "loadavg_1min": [load_before, load1()],
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
