"""Diagnostics of the training benchmark (print, write no results): where Lightning's time goes.

``--profile KIND``: a cProfile of one module's Lightning loop. ``--ablate KINDS``: Lightning's own floor (a near-empty
module), the in-situ cost of the module's per-step pieces (from a cProfile listing: nothing is wrapped), and
Lightning variants with those costs switched off one by one through constructor arguments and Trainer flags,
against the bare loop. See docs/performance.md, "Where the Lightning overhead went".
"""

from __future__ import annotations

import cProfile
import gc
import io
import pstats
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.bare import BareLoop, bare_step_times
from benchmarks.harness import (
    OBS_DIM,
    StepTimer,
    load1,
    make_datamodule,
    make_module,
    make_teacher,
    make_trainer,
    synthetic_tensors,
    write_dataset,
)


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
    extra = {"check_finite_every": opts["finite_every"]} if opts.get("finite_every") else {}
    module = make_module(kind, cfg, teacher, fused=fused, **extra)  # a constructor argument, nothing patched
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



#: The per-step pieces that ``instrument`` reports, as (label, where the function is defined, its name): found in
#: the cProfile listing by code location, so nothing is wrapped or replaced.
PIECES = (
    ("on_before_optimizer_step (finite check, sync; grad norm if log)", "modules/common.py", "on_before_optimizer_step"),
    ("Lightning's should_update_logs (once per iteration)", "modules/common.py", "_lightning_logs_now"),
    ("self.log of the step's scalars (logging steps)", "modules/common.py", "_flush_logs"),
    ("watch_finite (all calls)", "modules/common.py", "watch_finite"),
    ("after_optimizer_step (EMA / target update: also in bare)", "modules/", "after_optimizer_step"),
    ("should_log (all calls)", "modules/common.py", "should_log"),
    ("loss_step (the forward and the loss)", "modules/", "loss_step"),
    ("data stream: reseed + randint + one row gather", "data/datamodule.py", "_draw"),
)


def instrument(kind: str, dm, cfg: dict[str, Any], work: str, teacher: str | None, log=print) -> dict[str, Any]:
    """In-situ cost of the module's per-step pieces inside the real Lightning loop (as shipped, ``fused_steps`` 1).

    Two windows of one fit: ``timed_steps`` steps timed by a :func:`StepTimer` (the median step, the extra time of
    the logging steps), then as many under cProfile, whose listing gives each piece's calls and time (cumulative,
    per call: a mean, and inflated a little by the profiler's own cost per Python call). Nothing in the module or
    the data module is wrapped or replaced."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback

    pl.seed_everything(0, verbose=False)
    warm, steps = cfg["warmup_steps"][kind], cfg["timed_steps"][kind]
    prof = cProfile.Profile()

    class Toggle(Callback):  # profiles the steps after the timed window
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == warm + steps:
                prof.enable()

        def on_train_end(self, trainer, pl_module):
            prof.disable()

    module = make_module(kind, cfg, teacher)
    timer = StepTimer(warm, steps)
    trainer = make_trainer(warm + 2 * steps, cfg, work, f"instr_{kind}", [timer, Toggle()])
    trainer.fit(module, datamodule=dm)
    st = timer.step_times
    med = statistics.median(st)
    n_log = cfg["log_every_n_steps"]
    log_idx = [i for i in range(steps) if n_log and (warm + i + 1) % n_log == 0]
    log_excess = statistics.fmean(st[i] - med for i in log_idx) if log_idx else 0.0
    # the bare loop's batch for comparison
    loop = BareLoop(module, dm.tensors, cfg, 10)
    bare_batch = []
    for _ in range(500):
        t0 = time.perf_counter()
        loop.batch()
        bare_batch.append(time.perf_counter() - t0)
    out = {"median_step_ms": 1e3 * med, "log_step_excess_ms": 1e3 * log_excess,
           "log_step_excess_amortised_ms": 1e3 * log_excess / max(1, n_log),
           "bare_batch_ms": 1e3 * statistics.median(bare_batch), "pieces_ms_per_step": {}}
    log(f"\n{kind.upper()} in-situ (Lightning as shipped, {steps} steps timed, {steps} profiled): median step "
        f"{1e3 * med:.3f} ms")
    stats = pstats.Stats(prof).stats  # {(file, line, name): (primitive calls, calls, tottime, cumtime, callers)}
    for label, where, name in PIECES:
        rows = [v for (file, _, fn), v in stats.items() if fn == name and where in file.replace("\\", "/")]
        if not rows:
            continue  # a hook this version of the code does not have
        # the outermost definition (an override calling super() is listed twice); primitive calls: recursion once
        calls, cum = max(((r[0], r[3]) for r in rows), key=lambda r: r[1])
        out["pieces_ms_per_step"][label] = {"mean_call_ms": 1e3 * cum / calls, "calls": calls,
                                            "mean_ms_per_step": 1e3 * cum / steps}
        log(f"  {label:58s} mean {1e3 * cum / calls:7.3f} ms/call, {calls:4d} calls, {1e3 * cum / steps:7.3f} ms/step")
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
                    st = bare_step_times(make_module(kind, cfg, teacher), dm.tensors, cfg)
                else:
                    st = _ablated_step_times(kind, dm, cfg, work, f"{r}_{len(mean_ms[name])}", teacher,
                                             dict(ABLATIONS)[name])
                mean_ms[name].append(1e3 * statistics.fmean(st))
                med_ms[name].append(1e3 * statistics.median(st))
        bare_mean = statistics.median(mean_ms["bare"])
        out[kind] = {}
        log(f"\n{kind.upper()}: {rounds} interleaved rounds of {cfg['timed_steps'][kind]} steps; load {load1()}")
        log(f"  {'variant':38s} {'ms/step':>8s} {'median step':>12s} {'vs bare':>8s}")
        for name in names:
            m, md = statistics.median(mean_ms[name]), statistics.median(med_ms[name])
            out[kind][name] = {"ms_per_step": m, "median_step_ms": md, "ratio": m / bare_mean,
                               "rounds_ms": [round(x, 3) for x in mean_ms[name]]}
            log(f"  {name:38s} {m:8.3f} {md:12.3f} {m / bare_mean:8.3f}   rounds {out[kind][name]['rounds_ms']}")
    return out
